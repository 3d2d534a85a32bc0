"""Fuzz fibec.codec.decode with hypothesis: mutations of valid payloads and random bytes.

Run as a script, in its own process, so that a crash (segfault, abort) shows up as the
process's exit status. Every input must decode or raise PayloadError; an accepted
input must decode exactly as the pure-Python reference decoder does. Each input also takes
decode(device=...)'s path (the CPU standing in for the device): it refuses what decode()
refuses and returns the same values. Prints
"fuzz: N cases, only PayloadError" and exits 0 on success.

    FIBEC_FUZZ_CASES=20000         how many inputs (default 20000)
    FIBEC_FUZZ_SECONDS=3600        keep going (fresh random seeds) for this long instead
    FIBEC_FUZZ_DERANDOMIZE=1       fixed seed, as CI runs it
    FIBEC_FUZZ_INJECT=error|crash  self-test: make the harness fail the way a bug would
"""
from __future__ import annotations

import os
import struct
import sys
import time

import torch
import zstandard
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from payload_reference_decoder import crc32c, decode as reference_decode  # noqa: E402

from fibec import codec  # noqa: E402
from fibec.codec import PayloadError, decode, encode  # noqa: E402

HUGE = [0, 1, 2, 7, 8, 9, 63, 64, 65, 255, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
        2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]


def _seed_payloads() -> list[bytes]:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dtype=torch.float32, zeros=0.0):
        t = torch.randn(shape, generator=g)
        if zeros:
            t[torch.rand(shape, generator=g) < zeros] = 0
        return t.to(dtype)

    base = {"a": rnd(3, 5), "b": rnd(4, dtype=torch.bfloat16), "s": rnd(), "e": torch.zeros(0, 3),
            "h": rnd(2, 3, dtype=torch.float16)}
    sparse = {"rows": rnd(9, 4), "cols": rnd(4, 9), "el": rnd(7, 7), "bits": rnd(40, zeros=0.5),
              "few": rnd(300, zeros=0.99), "none": rnd(5, 2)}
    masks = {"rows": (torch.rand(9, generator=g) < 0.4, 0), "cols": (torch.rand(9, generator=g) < 0.4, 1),
             "el": torch.rand(7, 7, generator=g) < 0.2, "none": (torch.zeros(5, dtype=torch.bool), 0)}
    seeds = []
    for values in ("fp32", "fp16", "bf16", "int8", "int4"):
        for level in (None, 1):
            seeds.append(encode(base, values=values, level=level))
            seeds.append(encode(sparse, masks=masks, values=values, level=level))
    seeds.append(encode({"auto": rnd(6, 11, zeros=0.7), "zero_rows": torch.zeros(3, 3)}))
    seeds.append(encode({}))
    return seeds


def _int_fields(payload: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every integer field of an uncompressed payload."""
    fields = [(8, 4), (12, 8), (20, 8)]
    flags, n_tensors = struct.unpack_from("<HI", payload, 6)
    if flags:
        return fields
    pos = 28
    for _ in range(n_tensors):
        fields.append((pos, 2))
        name_len = struct.unpack_from("<H", payload, pos)[0]
        pos += 2 + name_len
        fields += [(pos + k, 1) for k in range(5)]
        ndim = payload[pos + 4]
        pos += 5
        fields += [(pos + 8 * k, 8) for k in range(ndim + 3)]
        pos += 8 * ndim
        _, index_len, values_len = struct.unpack_from("<QQQ", payload, pos)
        pos += 24 + index_len + values_len
    return fields


SEEDS = _seed_payloads()
FIELDS = [_int_fields(p) for p in SEEDS]


@st.composite
def mutated_payloads(draw) -> bytes:
    which = draw(st.integers(0, len(SEEDS) - 1))
    data = bytearray(SEEDS[which])
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "field", "overwrite"]))
        n = len(data)
        if op == "flip" and n:
            pos = draw(st.integers(0, n - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[draw(st.integers(0, n)):]
        elif op == "insert":
            pos = draw(st.integers(0, n))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            pos = draw(st.integers(0, n - 1))
            del data[pos:pos + draw(st.integers(1, 16))]
        elif op == "field":
            offset, width = draw(st.sampled_from(FIELDS[which]))
            value = draw(st.sampled_from(HUGE) | st.integers(0, 2 ** (8 * width) - 1)) % 2 ** (8 * width)
            if offset + width <= n:
                data[offset:offset + width] = value.to_bytes(width, "little")
        elif op == "overwrite" and n:
            pos = draw(st.integers(0, n - 1))
            chunk = draw(st.binary(min_size=1, max_size=8))
            data[pos:pos + len(chunk)] = chunk
    if draw(st.integers(0, 9)) < 8 and len(data) >= 32:  # mostly keep the checksum valid to reach the parser
        data[-4:] = struct.pack("<I", crc32c(bytes(data[:-4])))
    return bytes(data)


ZSTD_SEEDS = [p for p in SEEDS if struct.unpack_from("<H", p, 6)[0] & 1]


@st.composite
def mutated_compressed_sections(draw) -> bytes:
    """Damage inside a zstd section: the shuffled-record parser sees it, not just zstd."""
    payload = draw(st.sampled_from(ZSTD_SEEDS))
    n_tensors = struct.unpack_from("<I", payload, 8)[0]
    section = bytearray(zstandard.ZstdDecompressor().decompress(payload[28:-4]))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "huge"]))
        n = len(section)
        if op == "flip" and n:
            section[draw(st.integers(0, n - 1))] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del section[draw(st.integers(0, n)):]
        elif op == "huge" and n >= 8:
            pos = draw(st.integers(0, n - 8))
            section[pos:pos + 8] = draw(st.sampled_from(HUGE)).to_bytes(8, "little")
    compressed = zstandard.ZstdCompressor(level=1).compress(bytes(section))
    head = b"FBEC" + struct.pack("<HHIQQ", 1, 1, n_tensors, len(compressed), len(section)) + compressed
    return head + struct.pack("<I", crc32c(head))


@st.composite
def framed_random_sections(draw) -> bytes:
    section = draw(st.binary(max_size=200))
    flags = draw(st.sampled_from([0, 1, 2]))
    n_tensors = draw(st.sampled_from([0, 1, 2, 3, 2**32 - 1]))
    raw_len = len(section) if flags == 0 else draw(st.sampled_from(HUGE))
    head = b"FBEC" + struct.pack("<HHIQQ", 1, flags, n_tensors, len(section), raw_len) + section
    return head + struct.pack("<I", crc32c(head))


PAYLOADS = st.one_of(mutated_payloads(), mutated_payloads(), mutated_compressed_sections(), st.binary(max_size=300),
                     framed_random_sections())


class Stats:
    cases = 0
    accepted = 0


INJECT = os.environ.get("FIBEC_FUZZ_INJECT", "")


def check(data: bytes) -> None:
    Stats.cases += 1
    if INJECT and Stats.cases == 50:
        if INJECT == "crash":
            os.abort()
        raise RuntimeError("injected non-PayloadError failure")
    try:
        decoded = decode(data)
    except PayloadError:
        try:
            _decoded_on_device_path(data)
        except PayloadError:
            return
        raise AssertionError("decode(device=...)'s path accepted a payload that decode() refuses")
    Stats.accepted += 1
    for name, t in _decoded_on_device_path(data).items():
        assert t.dtype == decoded[name].dtype and t.shape == decoded[name].shape, name
        assert bool(((_bits(t) == _bits(decoded[name])) | (t.isnan() & decoded[name].isnan())).all()), name
    if sum(t.numel() for t in decoded.values()) <= 4096:
        reference = reference_decode(data)
        assert list(reference) == list(decoded), "reference decoder disagrees on names"
        for name, t in decoded.items():
            expected = torch.frombuffer(bytearray(reference[name][2]), dtype=t.dtype) if t.numel() else t.reshape(-1)
            same_bits = _bits(t.reshape(-1)) == _bits(expected)
            both_nan = torch.isnan(t.reshape(-1)) & torch.isnan(expected)  # NaN payloads may differ
            assert bool((same_bits | both_nan).all()), name


def _decoded_on_device_path(data: bytes) -> dict[str, torch.Tensor]:
    return codec._decode_to(torch.device("cpu"), codec._parse(data, None))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def run(cases: int, derandomize: bool) -> None:
    @settings(max_examples=cases, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink])
    @given(PAYLOADS)
    def fuzz(data):
        check(data)

    fuzz()


def main() -> None:
    for seed in SEEDS:
        decode(seed)  # the seeds themselves are valid
    seconds = float(os.environ.get("FIBEC_FUZZ_SECONDS", 0))
    cases = int(os.environ.get("FIBEC_FUZZ_CASES", 20000))
    start = time.monotonic()
    if seconds:
        while time.monotonic() - start < seconds:
            run(2000, derandomize=False)
            print(f"fuzz: {Stats.cases} cases after {time.monotonic() - start:.0f}s", flush=True)
    else:
        run(cases, derandomize=os.environ.get("FIBEC_FUZZ_DERANDOMIZE") == "1")
    print(f"fuzz: {Stats.cases} cases, {Stats.accepted} accepted, only PayloadError "
          f"({time.monotonic() - start:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
