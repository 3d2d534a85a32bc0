"""An independent reader of the payload format, written from docs/PAYLOAD.md alone.

Pure Python (struct + zstandard), slow, for small payloads: the oracle that the C++
decoder is checked against. decode() returns {name: (dtype_code, shape, data)} where
data is the decoded tensor's raw little-endian bytes (dtype 1 float32, 2 float16,
3 bfloat16), or raises Malformed.
"""
from __future__ import annotations

import math
import struct

import zstandard

DTYPE_WIDTH = {1: 4, 2: 2, 3: 2}
VALUE_WIDTH = {1: 4, 2: 2, 3: 2, 4: 1, 5: 0.5}


class Malformed(Exception):
    pass


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        c = byte
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = (c >> 8) ^ _TABLE[(c ^ b) & 0xFF]
    return c ^ 0xFFFFFFFF


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise Malformed("truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u(self, width: int) -> int:
        return int.from_bytes(self.take(width), "little")


def _read_indices(code: int, body: bytes, universe: int, n_kept: int) -> list[int]:
    if code == 1:
        indices, pos, previous = [], 0, -1
        for _ in range(n_kept):
            gap, shift, length = 0, 0, 0
            while True:
                if pos >= len(body):
                    raise Malformed("varint truncated")
                b = body[pos]
                pos += 1
                length += 1
                gap |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    if length > 1 and b == 0:
                        raise Malformed("non-minimal varint")
                    break
            if length > 10 or gap >= 1 << 64:
                raise Malformed("varint overflow")
            index = previous + 1 + gap
            if index >= universe:
                raise Malformed("index out of range")
            indices.append(index)
            previous = index
        if pos != len(body):
            raise Malformed("index bytes left over")
        return indices
    if len(body) != (universe + 7) // 8:
        raise Malformed("bitmap length")
    indices = [i for i in range(len(body) * 8) if body[i // 8] >> (i % 8) & 1]
    if any(i >= universe for i in indices) or len(indices) != n_kept:
        raise Malformed("bitmap bits disagree")
    return indices


def _to_f32(x: float) -> float:
    """Round a double to the nearest fp32 (ties to even); past the fp32 range that is +-inf."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _value_floats(fmt: int, body: bytes, n: int, shuffled: bool) -> list[float]:
    """The stored values as Python floats holding exact fp32 values."""
    if fmt in (4, 5):
        blocks = (n + 63) // 64
        scales_raw = body[:4 * blocks]
        if shuffled:
            scales_raw = bytes(scales_raw[b * blocks + j] for j in range(blocks) for b in range(4))
        scales = struct.unpack(f"<{blocks}f", scales_raw)
        if fmt == 4:
            q = struct.unpack(f"<{n}b", body[4 * blocks:])
        else:  # two 4-bit two's complement values a byte, the even one in the low nibble
            nibbles = [(byte >> shift) & 0xF for byte in body[4 * blocks:] for shift in (0, 4)][:n]
            q = [v - 16 if v >= 8 else v for v in nibbles]
        return [_to_f32(q[j] * scales[j // 64]) for j in range(n)]
    w = VALUE_WIDTH[fmt]
    if shuffled:
        body = bytes(body[b * n + j] for j in range(n) for b in range(w))
    if fmt == 1:
        return list(struct.unpack(f"<{n}f", body))
    if fmt == 2:
        return list(struct.unpack(f"<{n}e", body))
    return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in struct.unpack(f"<{n}H", body)]


def _encode_value(dtype: int, x: float) -> bytes:
    if dtype == 1:
        return struct.pack("<f", x)
    if dtype == 2:
        try:
            return struct.pack("<e", x)
        except OverflowError:
            return struct.pack("<H", 0x7C00 | (0x8000 if x < 0 else 0))
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    if (bits & 0x7FFFFFFF) > 0x7F800000:
        return struct.pack("<H", 0x7FC0)
    return struct.pack("<H", ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)


def decode(payload: bytes) -> dict[str, tuple[int, tuple[int, ...], bytes]]:
    payload = bytes(payload)
    if len(payload) < 32 or payload[:4] != b"FBEC":
        raise Malformed("magic or length")
    head = _Reader(payload)
    head.take(4)
    version, flags, n_tensors, section_len, raw_len = head.u(2), head.u(2), head.u(4), head.u(8), head.u(8)
    if version != 1 or flags & ~1:
        raise Malformed("version or flags")
    if 32 + section_len != len(payload):
        raise Malformed("length")
    if crc32c(payload[:28 + section_len]) != int.from_bytes(payload[28 + section_len:], "little"):
        raise Malformed("crc")
    section = payload[28:28 + section_len]
    shuffled = bool(flags & 1)
    if shuffled:
        if zstandard.frame_content_size(section) != raw_len:
            raise Malformed("zstd content size")
        stream = zstandard.ZstdDecompressor().decompressobj()
        section = stream.decompress(section)
        if not stream.eof or stream.unused_data or len(section) != raw_len:
            raise Malformed("zstd frame")
    elif raw_len != section_len:
        raise Malformed("raw_len")

    r = _Reader(section)
    out = {}
    for _ in range(n_tensors):
        name = r.take(r.u(2)).decode("utf-8")
        dtype, fmt, encoding, code, ndim = (r.u(1) for _ in range(5))
        if dtype not in DTYPE_WIDTH or fmt not in VALUE_WIDTH or encoding > 3 or code > 2 or ndim > 8:
            raise Malformed("codes")
        shape = tuple(r.u(8) for _ in range(ndim))
        if any(d >= 1 << 63 for d in shape):
            raise Malformed("dimension too large")
        numel = 1
        for d in shape:
            numel *= d
        if numel >= 1 << 64:
            raise Malformed("numel overflow")
        n_kept, index_len, values_len = r.u(8), r.u(8), r.u(8)
        if encoding in (1, 2) and ndim != 2:
            raise Malformed("rows/cols need 2-D")
        rows, cols = (shape if ndim == 2 else (1, numel))
        universe = {0: numel, 1: rows, 2: cols, 3: numel}[encoding]
        n_values = {0: numel, 1: n_kept * cols, 2: n_kept * rows, 3: n_kept}[encoding]
        if (encoding == 0) != (code == 0) or (encoding == 0 and n_kept != numel) or n_kept > universe:
            raise Malformed("encoding")
        scales = 4 * ((n_values + 63) // 64)
        expected = {4: scales + n_values, 5: scales + (n_values + 1) // 2}.get(fmt, int(n_values * VALUE_WIDTH[fmt]))
        if values_len != expected:
            raise Malformed("values_len")
        if encoding == 0 and index_len != 0:
            raise Malformed("index on dense")
        index_body, values_body = r.take(index_len), r.take(values_len)
        if fmt == 5 and n_values % 2 and values_body[-1] & 0xF0:
            raise Malformed("int4: the last byte's unused high nibble")
        values = _value_floats(fmt, values_body, n_values, shuffled)
        if encoding == 0:
            flat = values
        else:
            kept = _read_indices(code, index_body, universe, n_kept)
            flat = [0.0] * numel
            if encoding == 1:
                for k, row in enumerate(kept):
                    flat[row * cols:(row + 1) * cols] = values[k * cols:(k + 1) * cols]
            elif encoding == 2:
                for row in range(rows):
                    for k, col in enumerate(kept):
                        flat[row * cols + col] = values[row * n_kept + k]
            else:
                for k, e in enumerate(kept):
                    flat[e] = values[k]
        if name in out:
            raise Malformed("duplicate name")
        out[name] = (dtype, shape, b"".join(_encode_value(dtype, x) for x in flat))
    if r.pos != len(section):
        raise Malformed("trailing bytes")
    return out
