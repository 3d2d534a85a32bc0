"""MaskedAdamW / MaskedSGD: drop-in torch.optim optimizers with swappable masks."""
import copy
import io

import pytest
import torch

from fibec.optim import MaskedAdamW, MaskedSGD
from fibec.selection import select_neurons

ADAMW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
SGD = dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True)


@pytest.fixture(scope="module")
def tiny_lora_bert():
    """A 2-layer BERT (hidden 32) with LoRA on query/value, built from a config; copy before training."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    return get_peft_model(model, lora)


def _batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (3, 11), generator=gen), torch.randint(0, 2, (3,), generator=gen)) for _ in range(n)]


def _train(model, optimizer, batches):
    model.train(False)  # no dropout: both runs see the same function
    for input_ids, labels in batches:
        optimizer.zero_grad()
        model(input_ids=input_ids, labels=labels).loss.backward()
        optimizer.step()


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("masks", ["none", "full"])
@pytest.mark.parametrize("ours,theirs,hp", [(MaskedAdamW, torch.optim.AdamW, ADAMW), (MaskedSGD, torch.optim.SGD, SGD)])
def test_peft_lora_model_trains_to_torch_optim_parameters(backend, tiny_lora_bert, masks, ours, theirs, hp):
    model, twin = copy.deepcopy(tiny_lora_bert), copy.deepcopy(tiny_lora_bert)
    optimizer = ours(_trainable(model), **hp)
    if masks == "full":
        optimizer.set_masks({p: torch.ones(p.shape[1], dtype=torch.bool) if "lora_A" in name
                             else torch.ones_like(p, dtype=torch.bool)
                             for name, p in model.named_parameters() if p.requires_grad})
    batches = _batches(4)
    _train(model, optimizer, batches)
    _train(twin, theirs(_trainable(twin), foreach=False, **hp), batches)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)
    assert any(not torch.equal(p, q) for p, q in zip(_trainable(model), _trainable(tiny_lora_bert)))


def test_set_masks_updates_only_selected_neurons_and_swaps_between_steps(backend):
    gen = torch.Generator().manual_seed(2)
    a = torch.nn.Parameter(torch.randn(4, 9, generator=gen))   # lora_A-like: mask its columns
    b = torch.nn.Parameter(torch.randn(12, 4, generator=gen))  # lora_B-like: mask its rows
    dense = torch.nn.Parameter(torch.randn(5, generator=gen))
    optimizer = MaskedAdamW([a, b, dense], **ADAMW)
    scores = {"layer": {"lora_A": torch.randn(9, generator=gen), "lora_B": torch.randn(12, generator=gen)}}
    for rho in (0.3, 0.6):
        masks = select_neurons(scores, rho)["layer"]
        optimizer.set_masks({a: masks["lora_A"], b: masks["lora_B"]})
        before = [t.detach().clone() for t in (a, b, dense)]
        moments = [optimizer.state[t]["exp_avg"].clone() for t in (a, b)] if optimizer.state[a].get("step") else None
        for t in (a, b, dense):
            t.grad = torch.randn(t.shape, generator=gen)
        optimizer.step()
        cols, rows = masks["lora_A"][0], masks["lora_B"][0]
        assert torch.equal(a[:, ~cols], before[0][:, ~cols]) and not torch.equal(a[:, cols], before[0][:, cols])
        assert torch.equal(b[~rows], before[1][~rows]) and not torch.equal(b[rows], before[1][rows])
        assert (dense != before[2]).all()
        if moments is not None:
            assert torch.equal(optimizer.state[a]["exp_avg"][:, ~cols], moments[0][:, ~cols])
            assert torch.equal(optimizer.state[b]["exp_avg"][~rows], moments[1][~rows])
    optimizer.set_masks(None)
    assert optimizer.masks() == {}
    before = a.detach().clone()
    a.grad = torch.ones_like(a)
    optimizer.step()
    assert (a != before).all()


@pytest.mark.parametrize("ours,hp", [(MaskedAdamW, ADAMW), (MaskedSGD, SGD)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_continues_like_uninterrupted(backend, ours, hp, dtype):
    gen = torch.Generator().manual_seed(3)
    start = [torch.randn(6, 10, generator=gen).to(dtype), torch.randn(10, generator=gen).to(dtype)]
    grads = [[torch.randn(t.shape, generator=gen).to(dtype) for t in start] for _ in range(6)]
    mask = torch.rand(6, 10, generator=gen) < 0.5

    def run(params, optimizer, steps):
        for step_grads in steps:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()

    straight = [torch.nn.Parameter(t.clone()) for t in start]
    opt = ours(straight, **hp)
    opt.set_masks({straight[0]: (torch.ones(10, dtype=torch.bool), 1)})
    run(straight, opt, grads[:3])
    opt.set_masks({straight[0]: mask})
    run(straight, opt, grads[3:])

    first = [torch.nn.Parameter(t.clone()) for t in start]
    opt = ours(first, **hp)
    opt.set_masks({first[0]: (torch.ones(10, dtype=torch.bool), 1)})
    run(first, opt, grads[:3])
    opt.set_masks({first[0]: mask})
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "optimizer": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors and numbers only
    resumed = [torch.nn.Parameter(t) for t in saved["params"]]
    opt = ours(resumed, **hp)
    opt.load_state_dict(saved["optimizer"])
    assert torch.equal(opt.masks()[resumed[0]][0], mask)
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
            if key in state:
                assert state[key].dtype == torch.float32
    run(resumed, opt, grads[3:])
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


def test_step_count_is_shared_per_parameter_and_counts_masked_steps(backend):
    p = torch.nn.Parameter(torch.zeros(3, 4))
    optimizer = MaskedAdamW([p])
    optimizer.set_masks({p: torch.zeros(3, 4, dtype=torch.bool)})
    for _ in range(3):
        p.grad = torch.ones(3, 4)
        optimizer.step()
    assert optimizer.state[p]["step"] == 3
    assert torch.equal(p, torch.zeros(3, 4))


def test_closure_loss_is_returned(backend):
    p = torch.nn.Parameter(torch.ones(2))
    optimizer = MaskedSGD([p], lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == 2.0
    assert torch.allclose(p, torch.full((2,), 0.8))


@pytest.mark.parametrize("make,error,message", [
    (lambda p: MaskedAdamW([p], lr=-1.0), ValueError, "lr must be >= 0"),
    (lambda p: MaskedAdamW([p], betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be in \[0, 1\)"),
    (lambda p: MaskedAdamW([p], eps=0), ValueError, "eps must be > 0"),
    (lambda p: MaskedAdamW([p], weight_decay=-1), ValueError, "weight_decay must be >= 0"),
    (lambda p: MaskedSGD([p], lr=0.1, nesterov=True), ValueError, "nesterov=True requires momentum > 0"),
    (lambda p: MaskedSGD([p], lr=0.1, momentum=-0.1), ValueError, "momentum must be >= 0"),
    (lambda p: MaskedAdamW([p]).set_masks({torch.zeros(3, 4): torch.ones(3, 4, dtype=torch.bool)}), ValueError,
     "not a parameter of this optimizer"),
    (lambda p: MaskedAdamW([p]).set_masks({p: torch.ones(5, dtype=torch.bool)}), ValueError,
     r"masks\[param\] of shape \(5,\) matches neither"),
    (lambda p: MaskedAdamW([p]).set_masks({p: torch.ones(3, 4)}), TypeError, r"masks\[param\] must have dtype"),
    (lambda p: MaskedAdamW([p]).set_masks({p: (torch.ones(3, dtype=torch.bool), 1)}), ValueError,
     "mask_dim=1 needs"),
    (lambda p: MaskedAdamW([p]).set_masks([p]), TypeError, "masks must be a mapping"),
])
def test_optimizers_reject_bad_arguments(make, error, message):
    with pytest.raises(error, match=message):
        make(torch.nn.Parameter(torch.zeros(3, 4)))
