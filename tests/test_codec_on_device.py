"""encode(values="int8" or "int4") of tensors Triton runs on: quantised where they live, the same bytes.

Without a GPU the device path runs on CPU tensors under FIBEC_BACKEND=triton and the interpreter;
every payload is compared byte for byte with the host encoder's (FIBEC_BACKEND=torch)."""
import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed (Linux only)")

from fibec import _codec, _payload_on_device, codec  # noqa: E402
from fibec.kernels import quantize  # noqa: E402


@pytest.fixture(autouse=True)
def triton_runs_here():
    if not torch.cuda.is_available() and not quantize._LAUNCHERS["int8"]._interpreted:
        pytest.skip("no GPU and TRITON_INTERPRET unset: the kernel cannot run here")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


QUANTISED = ["int8", "int4"]


def both_ways(monkeypatch, tensors, masks=None, level=None, values="int8") -> tuple[bytes, bytes]:
    """(the host encoder's payload, the device path's) of the same tensors."""
    monkeypatch.setenv("FIBEC_BACKEND", "torch")
    host = codec.encode({n: t.cpu() for n, t in tensors.items()},
                        masks=None if masks is None else {n: _cpu(m) for n, m in masks.items()},
                        values=values, level=level)
    monkeypatch.setenv("FIBEC_BACKEND", "triton")
    on_device = codec.encode(tensors, masks=masks, values=values, level=level)
    return host, on_device


def _cpu(mask):
    return (mask[0].cpu(), mask[1]) if isinstance(mask, tuple) else mask.cpu()


def random(shape, dtype, seed, special=False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if special:
        flat = x.view(-1)
        flat[::7] = 0.0
        flat[3 % flat.numel()] = float("nan")
        flat[-1] = float("-inf")
    return x.to(dtype).to(device())


def coin(shape, p, seed) -> torch.Tensor:
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p).to(device())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("level", [None, 3], ids=["raw", "zstd"])
@pytest.mark.parametrize("values", QUANTISED)
def test_masked_and_unmasked_tensors_encode_to_the_host_encoders_bytes(monkeypatch, dtype, level, values):
    tensors = {
        "rows": random((37, 130), dtype, 1), "cols": random((9, 71), dtype, 2),
        "elements": random((4, 66), dtype, 3), "three_d": random((3, 5, 7), dtype, 4),
        "one": random((1,), dtype, 5), "dense": random((65, 3), dtype, 6),
        "keeps_nothing": random((6, 6), dtype, 7), "keeps_everything": random((5, 13), dtype, 8),
        "special_masked": random((11, 17), dtype, 9, special=True),
    }
    masks = {
        "rows": (coin(37, 0.5, 1), 0), "cols": (coin(71, 0.3, 2), 1), "elements": coin((4, 66), 0.25, 3),
        "three_d": coin((3, 5, 7), 0.6, 4), "keeps_nothing": (torch.zeros(6, dtype=torch.bool, device=device()), 1),
        "keeps_everything": torch.ones(5, 13, dtype=torch.bool, device=device()),
        "special_masked": coin((11, 17), 0.5, 9),
    }
    host, on_device = both_ways(monkeypatch, tensors, masks, level, values)
    assert on_device == host


def test_the_kernels_block_is_the_payload_formats():
    assert quantize.BLOCK == _codec.QUANT_BLOCK


def test_an_unmasked_tensor_with_a_zero_entry_is_planned_on_the_host(monkeypatch):
    """Its layout (rows, columns or elements dropped) is chosen from its values by the C++ encoder."""
    zero_rows = random((8, 40), torch.float32, 1)
    zero_rows[::2] = 0.0
    negative_zero = random((8, 40), torch.float32, 2)
    negative_zero[0, 0] = -0.0  # not all bits 0: stays dense, staged
    staged = []
    stage = _payload_on_device.stage_quantised

    def spy(tensors, keeps, values):
        bodies = stage(tensors, keeps, values)
        staged.extend(body is not None for body in bodies)
        return bodies

    monkeypatch.setattr(_payload_on_device, "stage_quantised", spy)
    host, on_device = both_ways(monkeypatch, {"zero_rows": zero_rows, "negative_zero": negative_zero})
    assert on_device == host
    assert staged == [False, True]
    assert codec.inspect(on_device)["tensors"][0]["encoding"] == "rows"


@pytest.mark.parametrize("values", QUANTISED)
def test_only_the_quantised_bodies_and_mask_bits_cross_to_the_host(monkeypatch, values):
    tensors = {"a": random((64, 96), torch.float32, 1), "b": random((32, 96), torch.float32, 2)}
    masks = {"a": coin((64, 96), 0.25, 1), "b": (coin(32, 0.5, 2), 0)}
    monkeypatch.setenv("FIBEC_BACKEND", "torch")
    host = codec.encode(tensors, masks=masks, values=values)
    monkeypatch.setenv("FIBEC_BACKEND", "triton")
    monkeypatch.setattr(codec, "_on_host", lambda spec: pytest.fail(f"{spec[0]} copied to the host whole"))
    copies = []
    to_host = _payload_on_device._to_host
    monkeypatch.setattr(_payload_on_device, "_to_host", lambda staging: copies.append(staging.numel()) or
                        to_host(staging))
    assert codec.encode(tensors, masks=masks, values=values) == host
    a_kept, b_kept = int(masks["a"].sum()), int(masks["b"][0].sum()) * 96
    padded = -(-a_kept // 64) * 64 + -(-b_kept // 64) * 64
    # One copy: the scales and values (a byte each for int8, half for int4) of the kept entries,
    # and each mask as bits.
    value_bytes = padded if values == "int8" else padded // 2
    assert copies == [padded // 64 * 4 + value_bytes + 64 * 96 // 8 + 32 // 8]


def test_check_finite_and_other_value_formats_read_the_tensors_on_the_host(monkeypatch):
    monkeypatch.setenv("FIBEC_BACKEND", "triton")
    monkeypatch.setattr(_payload_on_device, "stage_quantised", lambda *a: pytest.fail("staged"))
    x = random((3, 70), torch.float32, 1)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite value at flat index 72"):
        codec.encode({"x": x}, values="int8", check_finite=True)
    assert codec.decode(codec.encode({"x": x}, values="fp16"))["x"].shape == (3, 70)


@pytest.mark.parametrize("body", ["short_scales", "long_values", "int8_values_as_int4", "no_data_unmasked",
                                  "other_values"])
def test_the_encoder_rejects_a_quantised_body_that_does_not_fit_its_mask(body):
    scales, q = torch.zeros(4 * 2, dtype=torch.uint8), torch.zeros(100, dtype=torch.uint8)
    kind, values = 4, 4  # keep everything; int8
    if body == "short_scales":
        scales = scales[:4]
    elif body == "long_values":
        q = torch.zeros(101, dtype=torch.uint8)
    elif body == "int8_values_as_int4":
        values = 5  # int4: 100 values take 50 bytes
    elif body == "no_data_unmasked":
        kind = 0
    else:
        values = 1
    spec = (b"x", 1, (10, 10), 0, 0, kind, 0, 0, scales.data_ptr(), scales.numel(), q.data_ptr(), q.numel(),
            (scales, q))
    message = {"short_scales": "does not hold the 100 values", "long_values": "does not hold the 100 values",
               "int8_values_as_int4": "does not hold the 100 values", "no_data_unmasked": "needed on the host",
               "other_values": "int8 or int4, not the requested"}[body]
    with pytest.raises(ValueError, match=message):
        _codec.encode([spec], values, False, False, True)
