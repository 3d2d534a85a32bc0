"""masked_adamw_ / masked_sgd_: torch.optim semantics on the selected entries, nothing else touched.

Values are drawn on the CPU and moved to the `device` fixture's device (CUDA where there is one),
so on a GPU machine the triton backend runs the compiled kernels.
"""
import re

import pytest
import torch

from fibec.ops import masked_adamw_, masked_sgd_

SHAPES = [(7, 1003), (1, 1), (1, 33), (5, 5), (17,)]
MASK_KINDS = ["element", "rows", "cols"]
ADAMW = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)


def _random_mask(kind, shape, density, gen, dtype=torch.bool, device="cpu"):
    """(mask, mask_dim, the element mask it stands for), on `device`."""
    if kind == "element":
        mask = torch.rand(shape, generator=gen) < density
        return mask.to(device, dtype), None, mask.to(device)
    dim = 0 if kind == "rows" else 1
    neurons = torch.rand(shape[dim], generator=gen) < density
    full = neurons[:, None].expand(shape) if dim == 0 else neurons[None, :].expand(shape)
    return neurons.to(device, dtype), dim, full.contiguous().to(device)


def _randn(shape, gen, device, dtype=torch.float32):
    return torch.randn(shape, generator=gen).to(device, dtype)


# Neuron masks need a 2-D parameter.
SHAPE_KINDS = [(shape, kind) for shape in SHAPES for kind in (MASK_KINDS if len(shape) == 2 else ["element"])]


def _seed(*parts):
    return sum(len(str(part)) * 7919 + i for i, part in enumerate(parts)) + sum(map(ord, str(parts)))


def _bits(t):
    """Bitwise identity even for NaN entries."""
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _torch_adamw_step(p, grad, exp_avg, exp_avg_sq, step, **hp):
    """One torch.optim.AdamW step from the given state, on copies: (p, exp_avg, exp_avg_sq)."""
    q = p.clone().requires_grad_(True)
    opt = torch.optim.AdamW([q], foreach=False, **hp)
    opt.state[q] = {"step": torch.tensor(float(step - 1)), "exp_avg": exp_avg.clone(), "exp_avg_sq": exp_avg_sq.clone()}
    q.grad = grad.clone()
    opt.step()
    return q.detach(), opt.state[q]["exp_avg"], opt.state[q]["exp_avg_sq"]


def _torch_sgd_step(p, grad, buf, **hp):
    q = p.clone().requires_grad_(True)
    opt = torch.optim.SGD([q], foreach=False, **hp)
    if hp.get("momentum", 0):
        opt.state[q] = {"momentum_buffer": buf.clone()}
    q.grad = grad.clone()
    opt.step()
    return q.detach(), opt.state[q].get("momentum_buffer")


def _adamw_float64(p, grad, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """AdamW in float64 from fp32 state: the oracle for bf16/fp16 parameters."""
    p, grad, m, v = (t.double() for t in (p, grad, exp_avg, exp_avg_sq))
    beta1, beta2 = betas
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    p = p - lr / (1 - beta1**step) * m / ((v / (1 - beta2**step)).sqrt() + eps)
    return p, m, v


@pytest.mark.parametrize("shape,kind", SHAPE_KINDS)
def test_adamw_equals_torch_on_masked_entries_as_masks_change(backend, device, shape, kind):
    gen = torch.Generator().manual_seed(_seed(shape, kind))
    p = _randn(shape, gen, device)
    exp_avg, exp_avg_sq = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
    for step, density in enumerate([0.5, 0.1, 0.9, 0.3], start=1):
        grad = _randn(shape, gen, device)
        mask, mask_dim, full = _random_mask(kind, shape, density, gen, torch.uint8 if step % 2 else torch.bool,
                                            device)
        before = [t.clone() for t in (p, exp_avg, exp_avg_sq)]
        expected = _torch_adamw_step(p, grad, exp_avg, exp_avg_sq, step, **ADAMW)
        masked_adamw_(p, grad, exp_avg, exp_avg_sq, mask, step=step, mask_dim=mask_dim, **ADAMW)
        for got, old, want in zip((p, exp_avg, exp_avg_sq), before, expected):
            torch.testing.assert_close(got[full], want[full], rtol=1e-6, atol=1e-6)
            assert torch.equal(got[~full], old[~full])


@pytest.mark.parametrize("shape,kind", SHAPE_KINDS)
@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 0.0),
                                                            (0.9, True, 0.05), (0.5, False, 0.1)])
def test_sgd_equals_torch_on_masked_entries_as_masks_change(backend, device, shape, kind, momentum, nesterov,
                                                           weight_decay):
    gen = torch.Generator().manual_seed(_seed(shape, kind, momentum))
    hp = dict(lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    p, buf = _randn(shape, gen, device), torch.zeros(shape, device=device)
    for density in [0.5, 0.2, 1.0]:
        grad = _randn(shape, gen, device)
        mask, mask_dim, full = _random_mask(kind, shape, density, gen, device=device)
        p_before, buf_before = p.clone(), buf.clone()
        want_p, want_buf = _torch_sgd_step(p, grad, buf, **hp)
        masked_sgd_(p, grad, mask, buf=buf if momentum else None, mask_dim=mask_dim, **hp)
        torch.testing.assert_close(p[full], want_p[full], rtol=1e-6, atol=1e-6)
        assert torch.equal(p[~full], p_before[~full])
        if momentum:
            torch.testing.assert_close(buf[full], want_buf[full], rtol=1e-6, atol=1e-6)
            assert torch.equal(buf[~full], buf_before[~full])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_adamw_half_params_keep_fp32_state_and_match_float64(backend, device, dtype, kind):
    shape = (7, 1003)
    gen = torch.Generator().manual_seed(3)
    p = _randn(shape, gen, device, dtype)
    exp_avg, exp_avg_sq = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
    for step in range(1, 4):
        grad = _randn(shape, gen, device, dtype)
        mask, mask_dim, full = _random_mask(kind, shape, 0.4, gen, device=device)
        before = [t.clone() for t in (p, exp_avg, exp_avg_sq)]
        want_p, want_m, want_v = _adamw_float64(p, grad, exp_avg, exp_avg_sq, step, **ADAMW)
        masked_adamw_(p, grad, exp_avg, exp_avg_sq, mask, step=step, mask_dim=mask_dim, **ADAMW)
        assert p.dtype == dtype and exp_avg.dtype == exp_avg_sq.dtype == torch.float32
        torch.testing.assert_close(p[full].double(), want_p.to(dtype).double()[full], rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(exp_avg[full].double(), want_m[full], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(exp_avg_sq[full].double(), want_v[full], rtol=1e-5, atol=1e-6)
        for got, old in zip((p, exp_avg, exp_avg_sq), before):
            assert torch.equal(got[~full], old[~full])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sgd_half_params_match_float64(backend, device, dtype):
    gen = torch.Generator().manual_seed(4)
    p, buf = _randn((7, 1003), gen, device, dtype), torch.zeros(7, 1003, device=device)
    want_p, want_buf = p.double(), buf.double()
    for _ in range(3):
        grad = _randn((7, 1003), gen, device, dtype)
        direction = grad.double() + 0.01 * p.double()
        want_buf = 0.9 * buf.double() + direction
        want_p = p.double() - 0.1 * (direction + 0.9 * want_buf)
        masked_sgd_(p, grad, torch.ones(1003, dtype=torch.bool, device=device), lr=0.1, momentum=0.9, buf=buf,
                    weight_decay=0.01, nesterov=True)
        torch.testing.assert_close(p.double(), want_p.to(dtype).double(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(buf.double(), want_buf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_unselected_entries_keep_their_bits(backend, device, kind):
    """NaN everywhere the mask is unset: the selected entries stay finite and exact, the NaNs stay
    bit-for-bit (element and column masks write whole groups of 8 back, the unset entries as read)."""
    shape = (9, 130)
    gen = torch.Generator().manual_seed(5)
    mask, mask_dim, full = _random_mask(kind, shape, 0.5, gen, device=device)
    tensors = [_randn(shape, gen, device), _randn(shape, gen, device), _randn(shape, gen, device),
               torch.rand(shape, generator=gen).to(device)]
    clean = [t.clone() for t in tensors]
    for t in tensors:
        t[~full] = float("nan")
    poisoned = [t.clone() for t in tensors]
    p, grad, exp_avg, exp_avg_sq = tensors
    masked_adamw_(p, grad, exp_avg, exp_avg_sq, mask, step=2, mask_dim=mask_dim, **ADAMW)
    want = _torch_adamw_step(*clean, 2, **ADAMW)
    for got, old, expected in zip((p, exp_avg, exp_avg_sq), poisoned, want):
        torch.testing.assert_close(got[full], expected[full], rtol=1e-6, atol=1e-6)
        assert torch.equal(_bits(got[~full]), _bits(old[~full]))
    buf = torch.full(shape, float("nan"), device=device)
    buf[full] = 0.0
    buf_before = buf.clone()
    p_before = p.clone()
    masked_sgd_(p, grad, mask, lr=0.1, momentum=0.9, buf=buf, mask_dim=mask_dim)
    assert not p[full].isnan().any() and not buf[full].isnan().any()
    assert torch.equal(_bits(p[~full]), _bits(p_before[~full]))
    assert torch.equal(_bits(buf[~full]), _bits(buf_before[~full]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_groups_written_back_stop_at_the_end_of_the_tensor(backend, device, kind, dtype):
    """Views over the head of poisoned buffers, with sizes that are not multiples of a group of 8:
    the last selected entry's group must not reach into the rest of the buffer."""
    shape = (3, 13)
    gen = torch.Generator().manual_seed(11)
    mask, mask_dim, _ = _random_mask(kind, shape, 0.5, gen, device=device)
    mask.view(-1)[-1] = True  # the last entry, row or column
    full = mask if mask_dim is None else (mask[:, None] if mask_dim == 0 else mask[None, :]).expand(shape)
    buffers = [torch.full((64,), float("nan"), device=device, dtype=d) for d in (dtype, dtype, torch.float32,
                                                                                 torch.float32)]
    values = [_randn(shape, gen, device, dtype), _randn(shape, gen, device, dtype), _randn(shape, gen, device),
              _randn(shape, gen, device).abs()]
    tensors = []
    for buffer, value in zip(buffers, values):
        buffer[:value.numel()] = value.view(-1)
        tensors.append(buffer[:value.numel()].view(shape))
    tails = [_bits(buffer[values[0].numel():]).clone() for buffer in buffers]
    masked_adamw_(*tensors, mask, step=2, mask_dim=mask_dim, **ADAMW)
    masked_sgd_(tensors[0], tensors[1], mask, lr=0.1, momentum=0.9, buf=tensors[2], mask_dim=mask_dim)
    for buffer, tail in zip(buffers, tails):
        assert torch.equal(_bits(buffer[values[0].numel():]), tail)
    assert all(not t[full].isnan().any() for t in tensors)


@pytest.mark.parametrize("kind,density", [("element", 0.005), ("rows", 0.15), ("cols", 0.02)])
def test_tiles_the_mask_leaves_empty_are_skipped_and_the_others_updated(monkeypatch, device, kind, density):
    """Tiles of 64 entries and densities at which most tiles hold no selected entry: those programs
    stop early, and every selected entry must still match torch."""
    from fibec.kernels import masked_update

    monkeypatch.setenv("FIBEC_BACKEND", "triton")
    monkeypatch.setattr(masked_update, "TILE", 64)
    monkeypatch.setattr(masked_update, "INTERPRETER_TILE", 64)
    gen = torch.Generator().manual_seed(8)
    shape = (9, 300)
    mask, mask_dim, full = _random_mask(kind, shape, density, gen, device=device)
    assert 0 < int(full.sum()) < full.numel()
    p, grad, exp_avg = (_randn(shape, gen, device) for _ in range(3))
    exp_avg_sq = _randn(shape, gen, device).abs()
    want = _torch_adamw_step(p, grad, exp_avg, exp_avg_sq, 3, **ADAMW)
    expected = [torch.where(full, new, old) for new, old in zip(want, (p, exp_avg, exp_avg_sq))]
    masked_adamw_(p, grad, exp_avg, exp_avg_sq, mask, step=3, mask_dim=mask_dim, **ADAMW)
    for got, reference in zip((p, exp_avg, exp_avg_sq), expected):
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_empty_mask_changes_nothing(backend, device, kind):
    gen = torch.Generator().manual_seed(6)
    mask, mask_dim, _ = _random_mask(kind, (7, 1003), 0.0, gen, device=device)
    tensors = [_randn((7, 1003), gen, device) for _ in range(4)]
    before = [t.clone() for t in tensors]
    masked_adamw_(*tensors, mask, step=1, mask_dim=mask_dim, **ADAMW)
    masked_sgd_(tensors[0], tensors[1], mask, lr=1.0, momentum=0.9, buf=tensors[2], mask_dim=mask_dim)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before))


@pytest.mark.parametrize("mask_form", ["full_element", "full_rows", "full_cols", "none"])
def test_full_mask_and_no_mask_equal_dense_torch_adamw_over_steps(backend, device, mask_form):
    gen = torch.Generator().manual_seed(7)
    shape = (7, 1003)
    masks = {"full_element": (torch.ones(shape, dtype=torch.bool, device=device), None),
             "full_rows": (torch.ones(7, dtype=torch.uint8, device=device), 0),
             "full_cols": (torch.ones(1003, dtype=torch.bool, device=device), 1), "none": (None, None)}
    mask, mask_dim = masks[mask_form]
    p = _randn(shape, gen, device)
    q = p.clone().requires_grad_(True)
    reference = torch.optim.AdamW([q], foreach=False, **ADAMW)
    exp_avg, exp_avg_sq = torch.zeros(shape, device=device), torch.zeros(shape, device=device)
    for step in range(1, 5):
        grad = _randn(shape, gen, device)
        q.grad = grad.clone()
        reference.step()
        masked_adamw_(p, grad, exp_avg, exp_avg_sq, mask, step=step, mask_dim=mask_dim, **ADAMW)
    torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(exp_avg_sq, reference.state[q]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def test_square_param_takes_mask_dim_to_pick_rows_or_columns(backend, device):
    gen = torch.Generator().manual_seed(8)
    neurons = torch.tensor([True, False, False, True, False], device=device)
    for mask_dim, full in ((0, neurons[:, None].expand(5, 5)), (1, neurons[None, :].expand(5, 5))):
        p, grad = _randn((5, 5), gen, device), _randn((5, 5), gen, device)
        before = p.clone()
        masked_sgd_(p, grad, neurons, lr=0.5, mask_dim=mask_dim)
        torch.testing.assert_close(p[full], (before - 0.5 * grad)[full], rtol=1e-6, atol=1e-6)
        assert torch.equal(p[~full], before[~full])


def test_masked_ops_work_on_leaf_parameters_that_require_grad(backend, device):
    p = torch.nn.Parameter(torch.randn(3, 4, device=device))
    before = p.detach().clone()
    masked_sgd_(p, torch.ones(3, 4, device=device), torch.ones(3, 4, dtype=torch.bool, device=device), lr=0.5)
    assert torch.equal(p.detach(), before - 0.5)


def _adamw_args(**overrides):
    args = dict(p=torch.zeros(4, 6), grad=torch.zeros(4, 6), exp_avg=torch.zeros(4, 6), exp_avg_sq=torch.zeros(4, 6),
                mask=torch.ones(4, 6, dtype=torch.bool), step=1, lr=1e-3)
    args.update(overrides)
    return args


BAD_ADAMW = [
    (dict(p=[1.0]), TypeError, "p must be a torch.Tensor"),
    (dict(p=torch.zeros(4, 6, dtype=torch.float64)), TypeError, "p must have dtype"),
    (dict(p=torch.zeros(6, 4).t()), ValueError, "p must be contiguous"),
    (dict(grad=torch.zeros(4, 5)), ValueError, "grad must have shape"),
    (dict(grad=torch.zeros(4, 6, dtype=torch.bfloat16)), TypeError, "grad must have dtype"),
    (dict(grad=torch.zeros(6, 4).t()), ValueError, "grad must be contiguous"),
    (dict(grad=torch.zeros(4, 6).to_sparse()), TypeError, "grad must be a dense"),
    (dict(exp_avg=torch.zeros(4, 6, dtype=torch.bfloat16)), TypeError, "exp_avg must have dtype"),
    (dict(exp_avg_sq=torch.zeros(4, 5)), ValueError, "exp_avg_sq must have shape"),
    (dict(exp_avg=torch.zeros(4, 6, device="meta")), ValueError, "exp_avg is on meta"),
    (dict(mask=torch.ones(4, 6)), TypeError, "mask must have dtype"),
    (dict(mask=torch.ones(4, 5, dtype=torch.bool)), ValueError, "mask must have p's shape"),
    (dict(mask=torch.ones(7, dtype=torch.bool)), ValueError, "matches neither"),
    (dict(mask=torch.ones(4, dtype=torch.bool), mask_dim=1), ValueError, "mask_dim=1 needs mask of length 6"),
    (dict(mask=torch.ones(4, 6, dtype=torch.bool), mask_dim=2), ValueError, "mask_dim must be None, 0"),
    (dict(p=torch.zeros(5, 5), grad=torch.zeros(5, 5), exp_avg=torch.zeros(5, 5), exp_avg_sq=torch.zeros(5, 5),
          mask=torch.ones(5, dtype=torch.bool)), ValueError, "mask_dim must be 0 (rows) or 1 (columns)"),
    (dict(mask=torch.ones(6, 4, dtype=torch.bool).t()), ValueError, "mask must be contiguous"),
    (dict(step=0), ValueError, "step must be >= 1"),
    (dict(step=1.0), TypeError, "step must be an int"),
    (dict(lr=-1.0), ValueError, "lr must be >= 0"),
    (dict(lr=float("nan")), ValueError, "lr must be finite"),
    (dict(betas=(1.0, 0.9)), ValueError, "betas[0] must be in [0, 1)"),
    (dict(betas=(0.9, -0.1)), ValueError, "betas[1] must be in [0, 1)"),
    (dict(betas=0.9), TypeError, "betas must be a pair"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be >= 0"),
]


def _on(device, args):
    """Every tensor argument moved to `device`, but those bad for being on the meta device."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) and not v.is_meta else v for k, v in args.items()}


@pytest.mark.parametrize("overrides,error,message", BAD_ADAMW)
def test_masked_adamw_rejects_bad_input_naming_the_argument(backend, device, overrides, error, message):
    args = _on(device, _adamw_args(**overrides))
    with pytest.raises(error, match=re.escape(message)):
        masked_adamw_(args.pop("p"), args.pop("grad"), args.pop("exp_avg"), args.pop("exp_avg_sq"), args.pop("mask"),
                      **args)


BAD_SGD = [
    (dict(momentum=0.9), ValueError, "buf .* is required when momentum > 0"),
    (dict(nesterov=True), ValueError, "nesterov=True requires momentum > 0"),
    (dict(momentum=-0.5, buf=torch.zeros(4, 6)), ValueError, "momentum must be >= 0"),
    (dict(momentum=0.9, buf=torch.zeros(4, 6, dtype=torch.float16)), TypeError, "buf must have dtype"),
    (dict(momentum=0.9, buf=torch.zeros(4, 5)), ValueError, "buf must have shape"),
    (dict(lr=None), TypeError, "lr must be a number"),
    (dict(weight_decay=float("inf")), ValueError, "weight_decay must be finite"),
    (dict(nesterov=1), TypeError, "nesterov must be a bool"),
    (dict(mask=torch.ones(6, dtype=torch.int32)), TypeError, "mask must have dtype"),
]


@pytest.mark.parametrize("overrides,error,message", BAD_SGD)
def test_masked_sgd_rejects_bad_input_naming_the_argument(backend, device, overrides, error, message):
    args = _on(device, {"mask": torch.ones(6, dtype=torch.bool), "lr": 0.1, **overrides})
    with pytest.raises(error, match=message):
        masked_sgd_(torch.zeros(4, 6, device=device), torch.zeros(4, 6, device=device), args.pop("mask"), **args)
