"""fibec.codec: round trips, encoding choice, argument errors, decoder rejections, and
agreement with the independent reference decoder written from docs/PAYLOAD.md."""
import random
import struct
import warnings
import zlib

import pytest
import torch
import zstandard

from fibec import _codec
from fibec.codec import INTEGER_LEVELS, VALUE_FORMATS, PayloadError, decode, encode, inspect, release_cached_memory
from payload_reference_decoder import crc32c as reference_crc32c
from payload_reference_decoder import decode as reference_decode

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CAST = {"fp16": torch.float16, "bf16": torch.bfloat16}
DENSITIES = [0.0, 1e-4, 0.01, 0.1, 0.5, 1.0]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


def _keep(n, density, g):
    """A bool mask of n units keeping about density * n of them (at least one when density > 0)."""
    keep = torch.rand(n, generator=g) < density
    if density > 0 and n and not keep.any():
        keep[torch.randint(n, (1,), generator=g)] = True
    return keep


def _element_keep(t, kind, mask):
    """Bool [shape] of the entries an encoder with this mask keeps."""
    if kind == "rows":
        return mask[:, None].expand(t.shape)
    if kind == "cols":
        return mask[None, :].expand(t.shape)
    return mask


def _stream(t, kind, mask):
    """The stored value stream (stream order of docs/PAYLOAD.md) of the kept entries."""
    if kind == "rows":
        return t[mask].reshape(-1)
    if kind == "cols":
        return t[:, mask].reshape(-1)
    if kind == "elements":
        return t.reshape(-1)[mask.reshape(-1)]
    return t.reshape(-1)


def _check_decoded(t, decoded, values, kind, mask):
    assert decoded.dtype == t.dtype and decoded.shape == t.shape
    keep = _element_keep(t, kind, mask) if mask is not None else torch.ones(t.shape, dtype=torch.bool)
    expected = torch.where(keep, t, torch.zeros((), dtype=t.dtype))
    if values == "fp32":
        assert torch.equal(_bits(decoded), _bits(expected))
    elif values in CAST:
        assert torch.equal(_bits(decoded), _bits(expected.to(CAST[values]).to(t.dtype)))
    else:
        assert not torch.isnan(decoded).any()
        assert torch.equal(decoded[~keep], torch.zeros_like(decoded[~keep]))
        x = _stream(t.float(), kind, mask)
        y = _stream(decoded.float(), kind, mask)
        pad = (-x.numel()) % 64
        blocks = torch.nn.functional.pad(x, (0, pad)).reshape(-1, 64)
        step = (blocks.abs().amax(dim=1) / INTEGER_LEVELS[values]).repeat_interleave(64)[: x.numel()]
        cast_eps = {torch.float32: 1e-6, torch.float16: 2**-11, torch.bfloat16: 2**-8}[t.dtype]
        assert ((y - x).abs() <= step * 0.5 * (1 + 1e-5) + x.abs() * cast_eps + 1e-30).all()


@pytest.mark.parametrize("level", [None, 3])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("kind", ["rows", "cols", "elements"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("values", VALUE_FORMATS)
def test_masked_round_trip_matches_the_value_format(values, dtype, kind, density, level):
    shape = (37, 130)
    seed = _seed(values, dtype, kind, density, level)
    g = torch.Generator().manual_seed(seed)
    t = _random(shape, dtype, seed)
    units = {"rows": shape[0], "cols": shape[1], "elements": shape[0] * shape[1]}[kind]
    keep = _keep(units, density, g)
    mask = keep.reshape(shape) if kind == "elements" else keep
    spec = mask if kind == "elements" else (mask, 0 if kind == "rows" else 1)
    payload = encode({"w": t, "other": _random((3, 5), dtype, seed + 1)}, masks={"w": spec}, values=values, level=level)
    decoded = decode(payload)
    assert list(decoded) == ["w", "other"]
    _check_decoded(t, decoded["w"], values, kind, mask)
    layout = inspect(payload)["tensors"][0]
    if keep.all():
        assert (layout["encoding"], layout["kept"]) == ("dense", t.numel())
    else:
        assert (layout["encoding"], layout["kept"]) == (kind, int(keep.sum()))


SHAPES = [(), (0,), (1,), (0, 7), (5, 0), (1, 97), (97, 1), (13, 71), (3, 4, 5), (2, 1, 3, 1, 2)]


@pytest.mark.parametrize("level", [None, 5])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("values", VALUE_FORMATS)
def test_auto_round_trip_on_odd_shapes(values, dtype, shape, level):
    seed = _seed(values, dtype, shape, level)
    t = _random(shape, dtype, seed)
    if t.dim() == 2 and t.numel():
        t[::2] = 0  # zero rows: the encoder may drop them
    payload = encode({"t": t}, values=values, level=level)
    decoded = decode(payload)["t"]
    kind = inspect(payload)["tensors"][0]["encoding"]
    if kind == "dense" or values not in INTEGER_LEVELS:
        _check_decoded(t, decoded, values, "dense", None)
    else:
        nonzero = _bits(t) != 0
        mask = {"rows": nonzero.any(dim=1) if t.dim() == 2 else None,
                "cols": nonzero.any(dim=0) if t.dim() == 2 else None,
                "elements": nonzero}[kind]
        _check_decoded(t, decoded, values, kind, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_picks_the_smallest_lossless_encoding(dtype):
    g = torch.Generator().manual_seed(0)
    rows = _random((200, 16), dtype, 1)
    rows[torch.rand(200, generator=g) > 0.1] = 0
    cols = _random((16, 200), dtype, 2)
    cols[:, torch.rand(200, generator=g) > 0.1] = 0
    scattered = _random((64, 64), dtype, 3)
    scattered[torch.rand(64, 64, generator=g) > 0.05] = 0
    dense = _random((64, 64), dtype, 4)
    zeros = torch.zeros(10, 10, dtype=dtype)
    flat = _random((1000,), dtype, 5)
    flat[100:] = 0
    tensors = dict(rows=rows, cols=cols, scattered=scattered, dense=dense, zeros=zeros, flat=flat)
    payload = encode(tensors)
    layouts = {d["name"]: d for d in inspect(payload)["tensors"]}
    assert {n: d["encoding"] for n, d in layouts.items()} == dict(
        rows="rows", cols="cols", scattered="elements", dense="dense", zeros="rows", flat="elements")
    assert layouts["zeros"]["kept"] == 0
    assert layouts["flat"]["kept"] == 100 and layouts["flat"]["index"] == "varint"
    for name in ("rows", "cols", "scattered"):
        stored = layouts[name]["index_bytes"] + layouts[name]["values_bytes"]
        assert stored < 0.2 * tensors[name].numel() * tensors[name].element_size()
    decoded = decode(payload)
    for name, t in tensors.items():
        assert torch.equal(_bits(decoded[name]), _bits(t))


def test_negative_zero_and_nan_survive_lossless_auto_encoding():
    t = torch.tensor([[0.0, -0.0, 0.0], [0.0, float("nan"), float("-inf")], [0.0, 0.0, 0.0]])
    nan_payload = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)
    for tensor in (t, nan_payload):
        assert torch.equal(_bits(decode(encode({"t": tensor}))["t"]), _bits(tensor))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 63, 64, 65, 200, 64 * 6 + 7])
def test_element_layouts_keep_exactly_the_entries_with_a_set_bit_across_64_entry_words(n, dtype):
    # The encoder reads flags and values 64 at a time: a word with none kept, one with all kept,
    # -0.0 (a set bit, so kept) and a scalar tail, with the mask given and found.
    g = torch.Generator().manual_seed(_seed(n, str(dtype)))
    t = _random(n, dtype, _seed(n)) * (torch.rand(n, generator=g) < 0.1)
    t[64:128] = _random(n, dtype, 1)[64:128]
    t[128:192] = 0.0
    t[1::37] = -0.0
    has_bits = _bits(t) != 0
    given = torch.rand(n, generator=g) < 0.1
    given[64:128] = True
    given[128:192] = False
    for masks, kept in ((None, has_bits), ({"t": given}, given)):
        payload = encode({"t": t}, masks=masks)
        (record,) = inspect(payload)["tensors"]
        assert record["kept"] == (int(kept.sum()) if record["encoding"] != "dense" else n)
        expected = torch.where(kept, t, torch.zeros_like(t))
        assert torch.equal(_bits(decode(payload)["t"]), _bits(expected))
        assert reference_decode(payload)["t"][2] == _bits(expected).numpy().tobytes()


def test_index_code_is_the_smaller_of_varint_and_bitmap():
    every_other = torch.zeros(4000)
    every_other[::2] = 1.0
    few = torch.zeros(4000)
    few[[5, 3000]] = 1.0
    layouts = inspect(encode({"many": every_other, "few": few}))["tensors"]
    assert layouts[0]["encoding"] == "elements" and layouts[0]["index"] == "bitmap"
    assert layouts[0]["index_bytes"] == 500
    assert layouts[1]["index"] == "varint" and layouts[1]["index_bytes"] == 1 + 2


def test_mask_keeping_everything_is_dense_and_nothing_decodes_to_zeros():
    t = _random((6, 9), torch.float32, 0)
    full = encode({"t": t}, masks={"t": (torch.ones(6, dtype=torch.bool), 0)})
    assert inspect(full)["tensors"][0]["encoding"] == "dense"
    empty = encode({"t": t}, masks={"t": torch.zeros(6, 9)})
    assert inspect(empty)["tensors"][0]["kept"] == 0
    decoded = decode(empty)["t"]
    assert decoded.shape == (6, 9) and not decoded.any()


def test_numeric_masks_and_masks_absent_for_some_tensors():
    t = _random((4, 5), torch.float32, 0)
    u = _random((4, 5), torch.float32, 1)
    decoded = decode(encode({"t": t, "u": u}, masks={"t": (torch.tensor([1.0, 0, 0, 2.0]), 0)}))
    assert torch.equal(decoded["t"][[1, 2]], torch.zeros(2, 5)) and torch.equal(decoded["t"][[0, 3]], t[[0, 3]])
    assert torch.equal(decoded["u"], u)


def test_decode_accepts_bytes_likes_and_returns_writable_unshared_tensors():
    t = _random((8, 8), torch.float32, 0)
    payload = encode({"t": t})
    for buffer in (payload, bytearray(payload), memoryview(payload)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = decode(buffer)["t"]
        out.add_(1)
        assert torch.equal(out, t + 1)
    first, second = decode(payload)["t"], decode(payload)["t"]
    first.zero_()
    assert torch.equal(second, t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decoded_tensors_stay_intact_while_output_memory_is_recycled(dtype):
    # Each decode() fills one output block and recycles freed ones: tensors still held must
    # never see a later decode's bytes, and each must own its bytes alone as far as torch can tell.
    originals = {f"t{i}": _random((i + 1, 37), dtype, i) for i in range(4)}
    payload = encode(originals)
    kept = decode(payload)
    del payload
    for seed in range(6):
        churn = decode(encode({f"t{i}": _random((i + 1, 37), dtype, 100 + seed) for i in range(4)}))
        churn["t0"].fill_(7)
        del churn
    for name, t in originals.items():
        assert torch.equal(_bits(kept[name]), _bits(t))
        assert kept[name].untyped_storage().nbytes() == t.nbytes
    only = kept.pop("t3")
    del kept
    decode(encode({"t3": torch.full((4, 37), 5.0, dtype=dtype)}))
    assert torch.equal(_bits(only), _bits(originals["t3"]))


def test_encode_reads_views_and_tensors_that_require_grad():
    base = _random((5, 9), torch.float32, 3)
    view = base[2:]  # contiguous, at an offset into its storage
    weight = torch.nn.Parameter(_random((3, 4), torch.bfloat16, 4))
    decoded = decode(encode({"view": view, "weight": weight}))
    assert torch.equal(decoded["view"], view)
    assert torch.equal(_bits(decoded["weight"]), _bits(weight.detach()))
    assert not decoded["weight"].requires_grad


def test_unicode_names_and_inspect_description():
    t = _random((3, 4), torch.bfloat16, 0)
    payload = encode({"layer.ä.λ": t}, values="int8", level=2)
    info = inspect(payload)
    assert info["compressed"] and info["n_tensors"] == 1 and info["payload_bytes"] == len(payload)
    (d,) = info["tensors"]
    assert (d["name"], d["dtype"], d["shape"], d["values"], d["encoding"]) == (
        "layer.ä.λ", torch.bfloat16, (3, 4), "int8", "dense")
    assert d["values_bytes"] == 12 + 4


def test_crc32c_known_value_and_agreement_with_reference():
    assert _codec.crc32c(b"123456789") == 0xE3069283
    data = random.Random(7).randbytes(70_000)
    # Lengths around the 64-byte folding block and its 128-byte minimum, at unaligned starts.
    lengths = [*range(0, 300), 511, 512, 513, 4095, 4096, 65_537]
    for offset in (0, 1, 3, 8):
        for n in lengths:
            chunk = data[offset:offset + n]
            assert _codec.crc32c(chunk) == reference_crc32c(chunk), (offset, n)
    for split in (0, 50, 127, 128, 1000):
        assert _codec.crc32c(data[split:], _codec.crc32c(data[:split])) == _codec.crc32c(data)


@pytest.mark.parametrize("seed", range(12))
def test_reference_decoder_agrees_on_random_payloads(seed):
    g = torch.Generator().manual_seed(seed)
    tensors, masks = {}, {}
    for k in range(int(torch.randint(1, 5, (1,), generator=g))):
        dtype = DTYPES[int(torch.randint(3, (1,), generator=g))]
        shape = tuple(int(s) for s in torch.randint(0, 40, (int(torch.randint(0, 4, (1,), generator=g)),), generator=g))
        t = _random(shape, dtype, seed * 10 + k)
        t[torch.rand(shape, generator=g) < 0.6] = 0
        name = f"t{k}"
        tensors[name] = t
        choice = int(torch.randint(4, (1,), generator=g))
        if choice == 1 and t.dim() == 2:
            dim = int(torch.randint(2, (1,), generator=g))
            masks[name] = (_keep(t.shape[dim], 0.3, g), dim)
        elif choice == 2:
            masks[name] = torch.rand(shape, generator=g) < 0.2
    values = VALUE_FORMATS[seed % 4]
    level = None if seed % 3 else 1 + seed % 7
    payload = encode(tensors, masks=masks, values=values, level=level)
    mine = decode(payload)
    theirs = reference_decode(payload)
    assert list(theirs) == list(mine)
    for name, t in mine.items():
        dtype_code, shape, data = theirs[name]
        assert shape == tuple(t.shape) and dtype_code == {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}[t.dtype]
        assert data == t.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("values", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dense_bodies_at_every_alignment_keep_their_values_and_checksum(dtype, values):
    # Dense bodies are copied (or widened) and checksummed with streaming stores once the
    # output passes 1 MiB, from a cache-line boundary: name lengths move the bodies across
    # byte offsets, sizes straddle the 128-byte fold and the 8-value vector width.
    tensors = {"n" * k: _random((k * 37 % 300 + 1,), dtype, k) for k in range(1, 33)}
    tensors |= {"m" * k: _random((2**18 // 2 + 61 * k,), dtype, k) for k in range(1, 4)}
    payload = encode(tensors, values=values)
    theirs = reference_decode(payload)
    for name, t in decode(payload).items():
        expected = tensors[name] if values == "fp32" else tensors[name].to(CAST[values]).to(dtype)
        assert torch.equal(_bits(t), _bits(expected))
        assert theirs[name][2] == expected.view(torch.uint8).numpy().tobytes()


# ------------------------------------------------------------------ argument errors

def test_encode_rejects_bad_tensors_with_their_name():
    with pytest.raises(TypeError, match=r"tensors\['w'\].*contiguous"):
        encode({"w": torch.randn(4, 6).t()})
    with pytest.raises(TypeError, match=r"tensors\['w'\].*dtype"):
        encode({"w": torch.zeros(3, dtype=torch.int64)})
    with pytest.raises(TypeError, match=r"tensors\['w'\]"):
        encode({"w": [1.0, 2.0]})
    with pytest.raises(TypeError, match="str"):
        encode({3: torch.zeros(2)})
    with pytest.raises(ValueError, match="dimensions"):
        encode({"w": torch.zeros([1] * 9)})


def test_check_finite_rejects_only_when_asked():
    t = torch.tensor([1.0, float("inf"), 2.0]).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"'w'.*non-finite.*index 1"):
        encode({"w": t}, check_finite=True)
    assert torch.isinf(decode(encode({"w": t}))["w"][1])


@pytest.mark.parametrize("values", INTEGER_LEVELS)
def test_a_block_with_nan_decodes_as_a_nan_block(values):
    t = torch.arange(130, dtype=torch.float32)
    t[70] = float("nan")
    out = decode(encode({"t": t}, values=values))["t"]
    assert torch.isnan(out[64:128]).all() and not torch.isnan(out[:64]).any() and not torch.isnan(out[128:]).any()


def test_encode_rejects_bad_options_and_masks():
    t = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="values"):
        encode({"t": t}, values="fp8")
    with pytest.raises(ValueError, match="level"):
        encode({"t": t}, level=0)
    with pytest.raises(ValueError, match=r"masks\['t'\] must have shape \(4,\)"):
        encode({"t": t}, masks={"t": (torch.ones(5, dtype=torch.bool), 0)})
    with pytest.raises(ValueError, match="mask_dim"):
        encode({"t": t}, masks={"t": (torch.ones(5, dtype=torch.bool), 2)})
    with pytest.raises(ValueError, match="2-D"):
        encode({"t": torch.zeros(2, 3, 4)}, masks={"t": (torch.ones(2, dtype=torch.bool), 0)})
    with pytest.raises(ValueError, match=r"masks\['t'\] must have shape \(4, 5\)"):
        encode({"t": t}, masks={"t": torch.ones(20, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not being encoded"):
        encode({"t": t}, masks={"u": torch.ones(4, 5)})
    with pytest.raises(TypeError, match="bytes-like"):
        decode("not bytes")


# ------------------------------------------------------------------ decoder rejections

def _reframe(section: bytes, n_tensors: int, flags: int = 0, raw_len: int | None = None) -> bytes:
    """A payload around any section, with a correct checksum (so parsing is reached)."""
    raw_len = len(section) if raw_len is None else raw_len
    head = b"FBEC" + struct.pack("<HHIQQ", 1, flags, n_tensors, len(section), raw_len) + section
    return head + struct.pack("<I", reference_crc32c(head))


def _record(name=b"t", dtype=1, values=1, encoding=0, code=0, shape=(4,), n_kept=4, index=b"", body=None,
            index_len=None, values_len=None):
    body = bytes(4 * 4) if body is None else body
    return (struct.pack("<H", len(name)) + name + bytes([dtype, values, encoding, code, len(shape)])
            + b"".join(struct.pack("<Q", d) for d in shape)
            + struct.pack("<QQQ", n_kept, len(index) if index_len is None else index_len,
                          len(body) if values_len is None else values_len) + index + body)


def test_hand_built_payload_decodes():
    body = struct.pack("<2f", 1.5, -2.0)
    payload = _reframe(_record(encoding=3, code=1, shape=(2, 3), n_kept=2, index=bytes([1, 3]), body=body), 1)
    assert torch.equal(decode(payload)["t"], torch.tensor([[0, 1.5, 0], [0, 0, -2.0]]))


REJECTIONS = {
    "truncated": (lambda p: p[:-1], "truncated"),
    "tiny": (lambda p: p[:3], "truncated"),
    "magic": (lambda p: b"XBEC" + p[4:], "magic"),
    "version": (lambda p: p[:4] + b"\x02\x00" + p[6:], "version"),
    "flags": (lambda p: p[:6] + b"\x04\x00" + p[8:], "flag"),
    "trailing": (lambda p: p + b"\x00", "trailing garbage"),
    "checksum": (lambda p: p[:40] + bytes([p[40] ^ 1]) + p[41:], "checksum"),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_decode_rejects_damaged_frames(case):
    mutate, reason = REJECTIONS[case]
    payload = encode({"t": torch.randn(3, 4)})
    with pytest.raises(PayloadError, match=reason):
        decode(mutate(payload))


RECORD_REJECTIONS = {
    "unknown dtype": (dict(dtype=9), 1, "unknown dtype"),
    "unknown value format": (dict(values=0), 1, "unknown value format"),
    "unknown encoding": (dict(encoding=4), 1, "unknown encoding"),
    "unknown index code": (dict(encoding=3, code=3), 1, "unknown index code"),
    "overflowing shape": (dict(shape=(2**32, 2**32), n_kept=0), 1, "overflows"),
    "dimension past int64": (dict(shape=(0, 2**63), n_kept=0, body=b""), 1, "2\\^63"),
    "huge sparse shape": (dict(encoding=3, code=1, shape=(2**40,), n_kept=0, body=b""), 1, "max_output_bytes"),
    "values length": (dict(values_len=12), 1, "truncated|values length"),
    "count vs shape": (dict(n_kept=3, body=bytes(12)), 1, "count disagrees"),
    "kept exceeds": (dict(encoding=3, code=1, n_kept=5, index=bytes(5), body=bytes(20)), 1, "exceeds"),
    "index out of range": (dict(encoding=3, code=1, n_kept=1, index=bytes([4]), body=bytes(4)), 1, "out of range"),
    "varint overlong": (dict(encoding=3, code=1, n_kept=1, index=b"\x81\x00", body=bytes(4)), 1, "minimally"),
    "varint left over": (dict(encoding=3, code=1, n_kept=1, index=b"\x01\x01", body=bytes(4)), 1, "longer than"),
    "bitmap stray bit": (dict(encoding=3, code=2, n_kept=1, index=b"\x11", body=bytes(4)), 1, "out of range"),
    "bitmap count": (dict(encoding=3, code=2, n_kept=2, index=b"\x01", body=bytes(8)), 1, "fewer set bits"),
    "bitmap length": (dict(encoding=3, code=2, n_kept=1, index=b"\x01\x00", body=bytes(4)), 1, "bitmap length"),
    "rows on 1-D": (dict(encoding=1, code=1, n_kept=0, body=b""), 1, "2-D"),
    "dense with index": (dict(code=1), 1, "dense tensor with an index"),
    "more tensors than records": (dict(), 2, "truncated|tensor count"),
    "huge tensor count": (dict(), 2**32 - 1, "tensor count"),
    "name truncated": (dict(name=b"\xff" * 3), 1, "UTF-8"),
}


@pytest.mark.parametrize("case", list(RECORD_REJECTIONS))
def test_decode_rejects_inconsistent_records(case):
    fields, n_tensors, reason = RECORD_REJECTIONS[case]
    with pytest.raises(PayloadError, match=reason):
        decode(_reframe(_record(**fields), n_tensors))


@pytest.mark.parametrize("damage", ["name byte", "duplicate name", "shape"])
def test_damage_that_breaks_a_record_is_reported_as_a_checksum_mismatch(damage):
    payload = bytearray(encode({"ab": torch.randn(3, 4), "ac": torch.randn(5)}))
    first_name = 28 + 2  # header, then the first record's name length
    if damage == "name byte":
        payload[first_name] = 0xFF  # not UTF-8
    elif damage == "duplicate name":
        payload[first_name + 1] = ord("c")  # both records named "ac"
    else:
        payload[first_name + 2 + 5] = 0xFF  # a dimension far past the bytes present
    with pytest.raises(PayloadError, match="checksum mismatch"):
        decode(bytes(payload))
    with pytest.raises(PayloadError, match="checksum mismatch"):
        inspect(bytes(payload))


def test_decode_rejects_duplicate_names_and_bytes_after_last_record():
    with pytest.raises(PayloadError, match="duplicate"):
        decode(_reframe(_record() + _record(), 2))
    with pytest.raises(PayloadError, match="after the last"):
        decode(_reframe(_record() + b"\x00", 1))


def test_sparse_output_budget_is_configurable():
    payload = _reframe(_record(encoding=3, code=1, shape=(2**25,), n_kept=0, body=b""), 1)
    with pytest.raises(PayloadError, match="max_output_bytes"):
        decode(payload)
    assert decode(payload, max_output_bytes=2**27)["t"].shape == (2**25,)


def test_zstd_bombs_and_corrupt_frames_are_refused():
    section = _record()
    good = zstandard.ZstdCompressor(level=3).compress(section)
    assert torch.equal(decode(_reframe(good, 1, flags=1, raw_len=len(section)))["t"], torch.zeros(4))
    with pytest.raises(PayloadError, match="exceeds max_output_bytes"):
        decode(_reframe(good, 1, flags=1, raw_len=2**40))
    with pytest.raises(PayloadError, match="zstd frame size"):
        decode(_reframe(good, 1, flags=1, raw_len=len(section) + 1))
    bomb = zstandard.ZstdCompressor(level=3).compress(bytes(100 << 20))
    with pytest.raises(PayloadError, match="exceeds max_output_bytes"):
        decode(_reframe(bomb, 1, flags=1, raw_len=100 << 20))
    with pytest.raises(PayloadError, match="trailing garbage"):
        decode(_reframe(good + b"x", 1, flags=1, raw_len=len(section)))
    with pytest.raises(PayloadError, match="zstd"):
        decode(_reframe(good[:-2], 1, flags=1, raw_len=len(section)))
    with pytest.raises(PayloadError, match="raw section length"):
        decode(_reframe(section, 1, flags=0, raw_len=len(section) + 1))


@pytest.mark.parametrize("values", ["fp16", "bf16"])
def test_half_rounding_matches_torch_on_edge_and_random_bit_patterns(values):
    edges = torch.tensor([65504.0, 65519.996, 65520.0, 65536.0, 1e38, 2.0**-14, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001,
                          2.0**-26, 1e-45, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8,
                          3.4e38, float("inf"), 0.0, 6.1e-5, 5.9e-8, 2.98e-8])
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31 - 1, (4099,), generator=g, dtype=torch.int64).to(torch.int32)
    random = bits.view(torch.float32)
    random = random[torch.isfinite(random)]
    for t in (torch.cat([edges, -edges]), random, random[:7]):  # vector body and scalar tail
        decoded = decode(encode({"t": t}, values=values))["t"]
        assert torch.equal(_bits(decoded), _bits(t.to(CAST[values]).float()))
    for dtype in (torch.float16, torch.bfloat16):
        half = random.to(dtype)
        assert torch.equal(_bits(decode(encode({"t": half}, values=values))["t"]),
                           _bits(half.to(CAST[values]).to(dtype)))
    specials = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf"), 1.0, -0.0] * 3)
    specials[12] = torch.tensor(0x7F800001, dtype=torch.int32).view(torch.float32)  # a signalling NaN
    decoded = decode(encode({"t": specials}, values=values))["t"]
    assert torch.equal(decoded.isnan(), specials.isnan())
    assert torch.equal(_bits(decoded[~specials.isnan()]), _bits(specials[~specials.isnan()]))


def test_int8_rounds_half_to_even_and_zero_blocks_have_zero_scale():
    t = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, -126.5] + [0.0] * 57 + [0.0] * 64)
    out = decode(encode({"t": t}, values="int8"))["t"]
    assert out[:7].tolist() == [127.0, 0.0, 2.0, 2.0, 0.0, -2.0, -126.0]
    assert not out[64:].any()
    assert inspect(encode({"t": t}, masks={"t": torch.ones(128)}, values="int8"))["tensors"][0]["values_bytes"] == 136


def _blockwise_body_reference(x: torch.Tensor, levels: int) -> bytes:
    """The documented int8 (127 levels) or int4 (7 levels) body of a flat fp32 stream, in torch fp32."""
    n = x.numel()
    blocks = torch.nn.functional.pad(x, (0, (-n) % 64)).reshape(-1, 64)
    amax = blocks.abs().amax(dim=1)
    usable = torch.isfinite(blocks).all(dim=1)
    scale = torch.where(usable, amax / levels, torch.full_like(amax, float("nan")))
    lift = torch.where(amax < 2.0**-100, torch.tensor(2.0**64), torch.tensor(1.0))
    inv = torch.where(usable & (amax > 0), torch.tensor(float(levels)) / (amax * lift), torch.zeros_like(amax))
    q = torch.round((blocks * lift[:, None] * inv[:, None]).clamp(-levels, levels))
    q = torch.where((usable & (amax > 0))[:, None], q, torch.zeros_like(q)).reshape(-1)[:n].to(torch.int8)
    if levels == 7:  # two a byte, the even value in the low nibble
        nibbles = torch.nn.functional.pad(q.to(torch.int32) & 0xF, (0, n % 2)).reshape(-1, 2)
        q = (nibbles[:, 0] | (nibbles[:, 1] << 4)).to(torch.uint8)
    return scale.numpy().tobytes() + q.numpy().tobytes()


@pytest.mark.parametrize("values", INTEGER_LEVELS)
@pytest.mark.parametrize("n", [1, 63, 64, 65, 200, 64 * 9 + 17])
def test_blockwise_bodies_are_exactly_the_documented_quantisation(n, values):
    levels = INTEGER_LEVELS[values]
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 3, n)
    x[::5] = (torch.round(x[::5]) + 0.5).clamp(-levels + 0.5, levels - 0.5)  # ties on the grid when amax = levels
    x[: min(n, 64)] = x[: min(n, 64)].clamp(-levels, levels)
    if n > 64:
        x[64] = float("inf")  # its block has no usable scale
    if n > 128:
        x[128:192] = torch.randn(64, generator=g) * 1e-40  # subnormal block
        x[192:256] = 0.0
    payload = encode({"x": x}, values=values)
    (record,) = inspect(payload)["tensors"]
    body = payload[len(payload) - 4 - record["values_bytes"]:len(payload) - 4]
    assert body == _blockwise_body_reference(x, levels)
    assert record["values_bytes"] == 4 * (-(-n // 64)) + (n if values == "int8" else -(-n // 2))
    if n > 256:  # the subnormal and zero blocks decode within half a step
        decoded = decode(payload)["x"][128:256]
        step = x[128:192].abs().max() / levels
        assert (decoded[:64] - x[128:192]).abs().max() <= step / 2 and not decoded[64:].any()


def _resealed(payload: bytearray) -> bytes:
    """The payload with its checksum made right again after an edit."""
    payload[-4:] = struct.pack("<I", reference_crc32c(bytes(payload[:-4])))
    return bytes(payload)


def test_int4_decodes_every_nibble_and_refuses_a_used_padding_nibble():
    odd = bytearray(encode({"x": torch.ones(3)}, values="int4"))  # q = 7, 7, 7: bytes 0x77, 0x07
    assert odd[-6:-4] == b"\x77\x07"
    odd[-5] = 0x87  # the third value -8 (never written, still read), its padding nibble 8
    with pytest.raises(PayloadError, match="high nibble"):
        decode(_resealed(odd))
    with pytest.raises(Exception):
        reference_decode(_resealed(odd))
    odd[-5] = 0x08  # the third value -8, padding 0
    assert decode(_resealed(odd))["x"].tolist() == pytest.approx([1.0, 1.0, -8 / 7])


@pytest.mark.parametrize("tail", [0, 2, 37])
def test_int4_whole_blocks_decode_every_byte_as_the_reference_decoder_does(tail):
    # Eight whole blocks (the vectorised path) whose packed bytes run through all 256 values,
    # nibble 8 (-8, read though never written) included, then a shorter block.
    g = torch.Generator().manual_seed(tail)
    x = torch.randn(8 * 64 + tail, generator=g) * torch.logspace(-2, 2, 8 * 64 + tail)
    payload = bytearray(encode({"x": x}, values="int4"))
    (record,) = inspect(bytes(payload))["tensors"]
    packed_at = len(payload) - 4 - record["values_bytes"] + 4 * (8 + (tail > 0))
    payload[packed_at:packed_at + 256] = bytes(range(256))
    sealed = _resealed(payload)
    decoded = decode(sealed)["x"]
    assert decoded.numpy().tobytes() == reference_decode(sealed)["x"][2]
    scale = x[:64].abs().max() / 7  # byte 8 is 0x08: value 16 reads as -8 steps, value 17 as 0
    assert decoded[16].item() == pytest.approx(-8 * scale.item()) and decoded[17].item() == 0.0


def test_threads_encoding_and_decoding_at_once_each_get_their_own_tensors():
    # Coding runs without the GIL and decoded blocks are recycled through a shared cache.
    from concurrent.futures import ThreadPoolExecutor

    def work(seed):
        tensors = {f"t{k}": _random((50 + seed, 30 + k), torch.float32, seed * 10 + k) for k in range(3)}
        for _ in range(15):
            decoded = decode(encode(tensors))
            decoded["t0"].fill_(seed)  # scribbling on one result must not reach another thread's
            assert all(torch.equal(decoded[n], t) for n, t in tensors.items() if n != "t0")
        return True

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(work, range(8)))


def test_freed_output_blocks_are_cached_until_released():
    release_cached_memory()
    payload = encode({"t": torch.randn(1000, 100)})
    kept = decode(payload)["t"]
    del kept  # its block goes to the cache...
    assert _codec.cached_block_bytes() >= 400_000
    again = decode(payload)["t"]  # ...and serves the next decode
    assert _codec.cached_block_bytes() == 0
    del again
    assert release_cached_memory() >= 400_000 and _codec.cached_block_bytes() == 0
    assert torch.equal(decode(payload)["t"], decode(payload)["t"])  # decoding afresh still works


def test_the_extension_refuses_an_unknown_value_format_code():
    """The Python side names formats; the C++ side still never trusts a code it does not know."""
    for code in (0, 6, 255):
        with pytest.raises(ValueError, match="unknown value format"):
            _codec.encode([], code, False, False, True)
