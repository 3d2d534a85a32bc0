"""Bad arguments to the Fisher ops raise ValueError/TypeError naming the argument, before any launch.

The arguments live on the `device` fixture's device (CUDA where there is one), except those
that are bad for being on the meta device.
"""
import pytest
import torch

from fibec import ops

N, T, I, O, R = 2, 5, 7, 6, 3


def good():
    return {
        "X": torch.randn(N, T, I), "G": torch.randn(N, T, O),
        "A": torch.randn(R, I), "B": torch.randn(O, R), "scaling": 0.5,
        "token_mask": torch.ones(N, T, dtype=torch.bool),
    }


def on(device, value):
    """`value` (a tensor, or a tuple or dict of them) moved to `device`; meta tensors stay meta."""
    if isinstance(value, torch.Tensor):
        return value if value.is_meta else value.to(device)
    if isinstance(value, tuple):
        return tuple(on(device, v) for v in value)
    if isinstance(value, dict):
        return {k: on(device, v) for k, v in value.items()}
    return value


def meta(t):
    return t.to("meta")


# (argument named in the message, exception, change applied to the good arguments)
LAYER_CASES = [
    ("X", TypeError, {"X": [[1.0]]}),
    ("X", ValueError, {"X": torch.randn(N * T, I)}),
    ("X", TypeError, {"X": torch.randn(N, T, I, dtype=torch.float64)}),
    ("X", TypeError, {"X": torch.ones(N, T, I, dtype=torch.int32)}),
    ("X", ValueError, {"X": torch.randn(N, 0, I), "G": torch.randn(N, 0, O), "token_mask": None}),
    ("G", ValueError, {"G": torch.randn(N, T)}),
    ("G", ValueError, {"G": torch.randn(N + 1, T, O)}),
    ("G", ValueError, {"G": torch.randn(N, T + 1, O)}),
    ("G", TypeError, {"G": torch.randn(N, T, O).half()}),
    ("G", ValueError, {"G": meta(torch.randn(N, T, O))}),
    ("token_mask", ValueError, {"token_mask": torch.ones(N, T + 1, dtype=torch.bool)}),
    ("token_mask", ValueError, {"token_mask": torch.ones(N, T, 1, dtype=torch.bool)}),
    ("token_mask", TypeError, {"token_mask": torch.ones(N, T, dtype=torch.complex64)}),
    ("token_mask", TypeError, {"token_mask": [[True] * T] * N}),
    ("token_mask", ValueError, {"token_mask": torch.full((N, T), 2)}),
    ("token_mask", ValueError, {"token_mask": meta(torch.ones(N, T))}),
]

LORA_CASES = [
    ("A", ValueError, {"A": torch.randn(R, I + 1)}),
    ("A", ValueError, {"A": torch.randn(I)}),
    ("A", ValueError, {"A": torch.randn(0, I), "B": torch.randn(O, 0)}),
    ("A", TypeError, {"A": torch.randn(R, I).bfloat16()}),
    ("A", ValueError, {"A": meta(torch.randn(R, I))}),
    ("B", ValueError, {"B": torch.randn(O + 1, R)}),
    ("B", ValueError, {"B": torch.randn(O, R + 1)}),
    ("B", TypeError, {"B": torch.randn(O, R).double()}),
    ("B", ValueError, {"B": meta(torch.randn(O, R))}),
    ("scaling", ValueError, {"scaling": float("nan")}),
    ("scaling", ValueError, {"scaling": float("inf")}),
    ("scaling", TypeError, {"scaling": "2"}),
]


def call_fisher_diag(args, **extra):
    return ops.fisher_diag(args["X"], args["G"], token_mask=args["token_mask"], **extra)


def call_lora(args, **extra):
    return ops.lora_fisher_diag(args["X"], args["G"], args["A"], args["B"], args["scaling"],
                                token_mask=args["token_mask"], **extra)


def call_sqnorms(args, **extra):
    return ops.sample_sqnorms(args["X"], args["G"], token_mask=args["token_mask"], **extra)


def assert_raises_naming(name, error, fn):
    with pytest.raises(error) as info:
        fn()
    assert name in str(info.value)


@pytest.mark.parametrize("op", [call_fisher_diag, call_lora, call_sqnorms], ids=["fisher", "lora", "sqnorms"])
@pytest.mark.parametrize("name,error,change", LAYER_CASES, ids=lambda c: c if isinstance(c, str) else None)
def test_bad_layer_input_is_rejected_naming_it(backend, device, op, name, error, change):
    args = on(device, {**good(), **change})
    assert_raises_naming(name, error, lambda: op(args))


@pytest.mark.parametrize("name,error,change", LORA_CASES)
def test_bad_lora_factor_or_scaling_is_rejected_naming_it(backend, device, name, error, change):
    args = on(device, {**good(), **change})
    assert_raises_naming(name, error, lambda: call_lora(args))


@pytest.mark.parametrize("error,out", [
    (ValueError, torch.zeros(I, O)),
    (TypeError, torch.zeros(O, I, dtype=torch.float64)),
    (TypeError, torch.zeros(O, I, dtype=torch.bfloat16)),
    (ValueError, torch.zeros(I, O).T),
    (ValueError, meta(torch.zeros(O, I))),
    (TypeError, torch.zeros(O, I).tolist()),
])
def test_bad_fisher_out_is_rejected_naming_it(backend, device, error, out):
    assert_raises_naming("out", error, lambda: call_fisher_diag(on(device, good()), out=on(device, out)))


@pytest.mark.parametrize("name,error,out", [
    ("out", TypeError, torch.zeros(R, I)),
    ("out", TypeError, (torch.zeros(R, I),)),
    ("out[0]", ValueError, (torch.zeros(I, R), torch.zeros(O, R))),
    ("out[0]", TypeError, (torch.zeros(R, I).half(), torch.zeros(O, R))),
    ("out[1]", ValueError, (torch.zeros(R, I), torch.zeros(R, O))),
    ("out[1]", ValueError, (torch.zeros(R, I), meta(torch.zeros(O, R)))),
    ("out[1]", ValueError, (torch.zeros(R, I), torch.zeros(R, O).T)),
])
def test_bad_lora_out_is_rejected_naming_it(backend, device, name, error, out):
    assert_raises_naming(name, error, lambda: call_lora(on(device, good()), out=on(device, out)))


@pytest.mark.parametrize("value", [1, "yes", None])
def test_non_bool_with_sqnorms_is_rejected(backend, device, value):
    assert_raises_naming("with_sqnorms", TypeError, lambda: call_fisher_diag(on(device, good()), with_sqnorms=value))


def test_unknown_sqnorm_method_is_rejected(backend, device):
    assert_raises_naming("method", ValueError, lambda: call_sqnorms(on(device, good()), method="fast"))


def test_rejected_call_leaves_out_untouched(backend, device):
    out = torch.full((O, I), 3.0, device=device)
    with pytest.raises(ValueError):
        call_fisher_diag(on(device, {**good(), "token_mask": torch.full((N, T), 2)}), out=out)
    assert torch.equal(out.cpu(), torch.full((O, I), 3.0))
