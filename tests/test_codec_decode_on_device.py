"""decode(device=...) of int8 and int4 payloads: dequantised where the tensors go, the host's values.

Without a GPU the device half (fibec/_payload_on_device.py's dequantise_staged and the codec's
assembly) runs with CPU tensors and is compared with the host decoder; the "meta" device shows
which path decode() takes and what crosses, without values."""
import pytest
import torch

from fibec import _payload_on_device, codec

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random(shape, dtype, seed, special=False) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if special:
        flat = x.view(-1)
        flat[::7] = 0.0
        flat[3 % flat.numel()] = float("nan")
        flat[-1] = float("-inf")
    return x.to(dtype)


def coin(shape, p, seed) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


def tensors_and_masks(dtype) -> tuple[dict, dict]:
    """Every layout the encoder writes: rows, columns and elements kept by masks; rows dropped
    because they are zero (no mask); dense; empty; a mask keeping nothing; inf and NaN."""
    zero_rows = random((10, 70), dtype, 10)
    zero_rows[1::3] = 0
    tensors = {
        "rows": random((37, 130), dtype, 1), "cols": random((9, 71), dtype, 2),
        "elements": random((4, 66), dtype, 3), "three_d": random((3, 5, 7), dtype, 4),
        "one": random((1,), dtype, 5), "dense": random((65, 3), dtype, 6),
        "keeps_nothing": random((6, 6), dtype, 7), "zero_rows_found": zero_rows,
        "empty": torch.zeros((0, 4), dtype=dtype), "special": random((11, 17), dtype, 9, special=True),
    }
    masks = {
        "rows": (coin(37, 0.5, 1), 0), "cols": (coin(71, 0.3, 2), 1), "elements": coin((4, 66), 0.25, 3),
        "three_d": coin((3, 5, 7), 0.6, 4), "keeps_nothing": (torch.zeros(6, dtype=torch.bool), 1),
        "special": coin((11, 17), 0.5, 9),
    }
    return tensors, masks


def decoded_on_cpu_device_path(payload: bytes) -> dict[str, torch.Tensor]:
    """What decode(device=...) returns on a GPU, with the CPU standing in for it."""
    return codec._decode_to(torch.device("cpu"), codec._parse(payload, None))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("values", ["int8", "int4"])
@pytest.mark.parametrize("level", [None, 3], ids=["raw", "zstd"])
def test_quantised_payloads_decode_on_the_device_to_the_host_decoders_values(dtype, values, level):
    tensors, masks = tensors_and_masks(dtype)
    payload = codec.encode(tensors, masks=masks, values=values, level=level)
    layouts = {t["name"]: t["encoding"] for t in codec.inspect(payload)["tensors"]}
    assert {"rows", "cols", "elements", "dense"} <= set(layouts.values())  # every layout is exercised
    host = codec.decode(payload)
    on_device = decoded_on_cpu_device_path(payload)
    assert list(on_device) == list(host)
    for name, expected in host.items():
        got = on_device[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu.sh runs it on one)")
@pytest.mark.parametrize("values", ["int8", "int4"])
@pytest.mark.parametrize("level", [None, 3], ids=["raw", "zstd"])
def test_quantised_payloads_decode_on_a_gpu_to_the_host_decoders_values(values, level):
    tensors, masks = tensors_and_masks(torch.bfloat16)
    payload = codec.encode(tensors, masks=masks, values=values, level=level)
    on_gpu = codec.decode(payload, device="cuda")
    for name, expected in codec.decode(payload).items():
        assert on_gpu[name].is_cuda and on_gpu[name].dtype == expected.dtype, name
        torch.testing.assert_close(on_gpu[name].cpu(), expected, rtol=0, atol=0, equal_nan=True, msg=name)


def test_a_payload_without_tensors_decodes_to_nothing_on_the_device():
    assert decoded_on_cpu_device_path(codec.encode({}, values="int8")) == {}


def test_the_checksum_is_verified_before_anything_crosses(monkeypatch):
    tensors, masks = tensors_and_masks(torch.float32)
    payload = bytearray(codec.encode(tensors, masks=masks, values="int8"))
    payload[len(payload) // 2] ^= 0x10
    crossed = []
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: crossed.append(self) or self)
    with pytest.raises(codec.PayloadError, match="checksum"):
        decoded_on_cpu_device_path(bytes(payload))
    assert crossed == []


def test_one_copy_of_tables_scales_values_and_kept_bits_crosses(monkeypatch):
    tensors, masks = tensors_and_masks(torch.float32)
    payload = codec.encode(tensors, masks=masks, values="int8")
    blocks, elements, records = codec._parse(payload, None).quantised_layout()
    values_held = []
    for t in codec.inspect(payload)["tensors"]:
        rows, cols = (t["shape"][0], t["shape"][1]) if len(t["shape"]) == 2 else (1, None)
        numel = int(torch.Size(t["shape"]).numel())
        values_held.append({"dense": numel, "rows": t["kept"] * (cols or 0), "cols": t["kept"] * rows,
                            "elements": t["kept"]}[t["encoding"]])
    assert [values for _, values, _ in records] == values_held
    assert blocks == sum(-(-n // 64) for n in values_held)
    assert elements == sum(t.numel() for t in tensors.values())
    crossings = []
    original_to = torch.Tensor.to

    def spy(self, *args, **kwargs):
        target = torch.device(args[0]) if args and isinstance(args[0], (str, torch.device)) else None
        if target is not None and target.type != self.device.type:
            crossings.append(self.numel() * self.element_size())
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    on_meta = codec.decode(payload, device="meta")
    assert crossings == [16 * len(records) + blocks * (4 + 64) + -(-elements // 8)]
    assert {name: (t.device.type, t.shape, t.dtype) for name, t in on_meta.items()} == \
           {name: ("meta", t.shape, t.dtype) for name, t in tensors.items()}


def test_other_value_formats_are_decoded_on_the_host_and_copied(monkeypatch):
    tensors, masks = tensors_and_masks(torch.bfloat16)
    staged = []
    monkeypatch.setattr(_payload_on_device, "dequantise_staged", lambda *args: staged.append(args))
    for values in ("fp32", "fp16", "bf16"):
        on_meta = codec.decode(codec.encode(tensors, masks=masks, values=values), device="meta")
        assert {name: (t.device.type, t.dtype) for name, t in on_meta.items()} == \
               {name: ("meta", torch.bfloat16) for name in tensors}
    assert staged == []


@pytest.mark.parametrize("device", [None, "cpu", torch.device("cpu")], ids=["none", "str", "device"])
def test_decoding_to_the_cpu_is_the_host_decoder(device):
    tensors, masks = tensors_and_masks(torch.float32)
    payload = codec.encode(tensors, masks=masks, values="int8")
    decoded = codec.decode(payload, device=device)
    for name, expected in codec.decode(payload).items():
        torch.testing.assert_close(decoded[name], expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("device", ["gpu0", 3.5, "cuda:x"])
def test_a_device_that_is_not_one_is_named_in_the_error(device):
    with pytest.raises(ValueError, match="device"):
        codec.decode(codec.encode({"a": torch.ones(3)}, values="int8"), device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_cuda_device_is_named_in_the_error():
    with pytest.raises(ValueError, match="device='cuda'.*no CUDA"):
        codec.decode(codec.encode({"a": torch.ones(3)}, values="int8"), device="cuda")


def test_the_staging_entry_refuses_a_buffer_of_the_wrong_size_or_format():
    quantised = codec._parse(codec.encode({"a": torch.ones(3, 70)}, values="int8"), None)
    blocks, elements, _ = quantised.quantised_layout()
    size = blocks * 68 + -(-elements // 8)
    for wrong in (size - 1, size + 1):
        with pytest.raises(ValueError, match="wrong size"):
            quantised.stage_quantised(torch.empty(wrong, dtype=torch.uint8).numpy())
    with pytest.raises(TypeError, match="writable"):
        quantised.stage_quantised(bytes(size))
    lossless = codec._parse(codec.encode({"a": torch.ones(3, 70)}), None)
    assert lossless.quantised_layout() is None
    with pytest.raises(ValueError, match="int8 or int4"):
        lossless.stage_quantised(torch.empty(size, dtype=torch.uint8).numpy())
