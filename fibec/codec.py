"""Compact, checksummed, pickle-free payloads of named tensors.

The byte format is specified in docs/PAYLOAD.md; the C++ core (fibec._codec, csrc/)
does the coding with the GIL released. This module validates arguments, runs the
optional zstd stage and turns decoded buffers into tensors without copying them.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from fibec import _backend, _codec, _compat, _payload_on_device
from fibec._checks import FLOAT_DTYPES, check_int, check_tensor

__all__ = ["PayloadError", "encode", "decode", "inspect", "release_cached_memory", "VALUE_FORMATS",
           "INTEGER_LEVELS"]


class PayloadError(ValueError):
    """decode()/inspect() got bytes that are not a valid fibec payload; the message says why."""


VALUE_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4")  # in the order of their codes, fp32 = 1
# The blockwise integer formats: steps each side of zero, scale = max|x| / levels per block of 64.
INTEGER_LEVELS = {"int8": 127, "int4": 7}
_VALUE_CODES = {name: code for code, name in enumerate(VALUE_FORMATS, start=1)}
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_ENCODINGS = ("dense", "rows", "cols", "elements")
_INDEX_CODES = ("none", "varint", "bitmap")
_MASK_AUTO, _MASK_ROWS, _MASK_COLS, _MASK_ELEMENTS, _MASK_KEEP_ALL = 0, 1, 2, 3, 4
_FLAG_ZSTD = 1
_MAX_DIMS = 8
_MAX_NAME_BYTES = 0xFFFF
# decode() allocates at most this many bytes per payload byte (or the floor) unless told otherwise.
OUTPUT_BYTES_PER_PAYLOAD_BYTE = 256
MIN_OUTPUT_BYTES = 64 << 20

MaskSpec = torch.Tensor | tuple[torch.Tensor, int]


def encode(
    tensors: Mapping[str, torch.Tensor],
    *,
    masks: Mapping[str, MaskSpec] | None = None,
    values: str = "fp32",
    level: int | None = None,
    check_finite: bool = False,
) -> bytes:
    """Encode named float tensors into one payload.

    tensors: {name: contiguous fp32/fp16/bf16 tensor of any shape (up to 8 dims)}. CUDA
        tensors are copied to the host first, except with values="int8" or "int4" (and Triton
        installed, check_finite off): their kept entries are quantised on the GPU and only the
        bodies and masks cross, in one copy (a tensor without a mask that holds a zero entry is copied
        whole, for the layout choice); the bytes are the same either way.
    masks: {name: element_mask | (neuron_mask, mask_dim)}: an element mask has the tensor's
        shape; a neuron mask of a 2-D tensor [O, I] is [O] with mask_dim=0 (rows) or [I] with
        mask_dim=1 (columns). Nonzero/True = kept; masked-off entries decode as 0. Tensors
        without a mask (or masks=None) get the smallest lossless layout among dense, zero rows
        dropped, zero columns dropped and zero elements dropped (an entry is zero only if all its
        bits are, so -0.0 survives).
    values: "fp32" (lossless: each tensor stored in its own dtype), "fp16", "bf16" (round to
        nearest even, as Tensor.to), "int8" (blocks of 64 stored values, one fp32 scale each:
        scale = max|x| / 127, q = round(x / scale)) or "int4" (the same with scale = max|x| / 7,
        two values a byte).
    level: None stores the section as is; an int 1..22 byte-shuffles the values and compresses
        the section with zstd at that level.
    check_finite: raise ValueError if any entry of any tensor is inf or NaN.

    Returns the payload bytes; decode() returns each tensor in its original dtype and shape.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a mapping of name -> Tensor, got {type(tensors).__name__}")
    if values not in _VALUE_CODES:
        raise ValueError(f"values must be one of {VALUE_FORMATS}, got {values!r}")
    if level is not None:
        check_int("level", level, low=1, high=22)
    if masks is None:
        masks = {}
    elif not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping of name -> mask, got {type(masks).__name__}")
    unknown = [name for name in masks if name not in tensors]
    if unknown:
        raise ValueError(f"masks has entries for tensors not being encoded: {unknown}")
    if len(tensors) > 0xFFFFFFFF:
        raise ValueError("tensors holds more than 2**32 - 1 entries")

    # The specs hold the tensors (and masks) whose memory the C++ side reads by address.
    specs = [_tensor_spec(name, tensor, masks.get(name)) for name, tensor in tensors.items()]
    if values in INTEGER_LEVELS and not check_finite:
        _quantise_on_device(specs, values)
    specs = [spec if isinstance(spec, tuple) else _on_host(spec) for spec in specs]
    compress = level is not None
    section = _codec.encode(specs, _VALUE_CODES[values], compress, bool(check_finite), not compress)
    if not compress:
        return section
    import zstandard

    compressed = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(section)
    return _codec.frame(compressed, len(section), len(specs), _FLAG_ZSTD)


def decode(payload: bytes | bytearray | memoryview, *, max_output_bytes: int | None = None,
           device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Decode a payload into {name: tensor} (original dtype and shape, in encoded order).

    Raises PayloadError, with the reason, for anything that is not a valid payload. Entries
    not kept by the encoder's mask are 0; a tensor whose mask kept nothing is all zeros.
    max_output_bytes bounds the memory decode() may allocate (decompressed section, and the
    dense outputs); by default max(64 MiB, 256 x len(payload)). Raise it to accept payloads
    of very sparse tensors whose dense size exceeds that.

    device: where the tensors go (default: the CPU). On another device a payload of int8 or int4
    values is dequantised there: the host validates it (checksum included) and only the bodies and
    the kept entries, as bits, cross, in one copy; the tensors are views of one block there. A
    payload of other values is decoded on the host and copied. The values are the host's either way.

    On the CPU the tensors are separate storages over one shared block, freed with the last of them
    (docs/PAYLOAD.md, "Memory of decoded tensors"); they are writable but not resizable.
    """
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch.device or a device name such as 'cuda', got {device!r}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r}, but this torch sees no CUDA device")
    section = _parse(payload, max_output_bytes)
    if device is not None and device.type != "cpu":
        return _decode_to(device, section)
    names, capsules = _call(section.decode)
    return dict(zip(names, map(_compat.dlpack_converter(), capsules)))


def _decode_to(device: torch.device, section: "_codec.Section") -> dict[str, torch.Tensor]:
    """decode()'s tensors on a device other than the CPU."""
    layout = section.quantised_layout()
    if layout is None:
        names, capsules = _call(section.decode)
        return {name: tensor.to(device) for name, tensor in zip(names, map(_compat.dlpack_converter(), capsules))}
    flat = _call(_payload_on_device.dequantise_staged, section, layout, device)
    described = section.tensors()
    dtypes = [_CODE_DTYPES[dtype_code] for _, dtype_code, _, _ in described]
    if len(set(dtypes)) == 1:
        flat = flat.to(dtypes[0])  # one conversion for the whole block
    pieces = flat.split([numel for _, _, numel in layout[2]])
    return {name: (piece if piece.dtype == dtype else piece.to(dtype)).view(shape)
            for (name, _, shape, _), dtype, piece in zip(described, dtypes, pieces)}


def inspect(payload: bytes | bytearray | memoryview, *, max_output_bytes: int | None = None) -> dict:
    """Describe a payload without decoding values: header fields and, per tensor, name,
    dtype, shape, encoding, value format, index code, kept count and byte lengths.
    Validates exactly as decode() does (raises PayloadError)."""
    view = _byte_view(payload)
    flags, n_tensors, _, section_len, raw_len = _call(_codec.read_frame, view, False)
    section = _parse(view, max_output_bytes)
    described = _call(section.tensors)
    _call(section.verify)
    tensors = []
    for name, dtype_code, shape, layout in described:
        value_code, encoding, index_code, kept, index_bytes, values_bytes = layout
        tensors.append({
            "name": name,
            "dtype": _CODE_DTYPES[dtype_code],
            "shape": shape,
            "encoding": _ENCODINGS[encoding],
            "values": VALUE_FORMATS[value_code - 1],
            "index": _INDEX_CODES[index_code],
            "kept": kept,
            "index_bytes": index_bytes,
            "values_bytes": values_bytes,
        })
    return {
        "version": _codec.FORMAT_VERSION,
        "compressed": bool(flags & _FLAG_ZSTD),
        "payload_bytes": view.nbytes,
        "section_bytes": section_len,
        "raw_section_bytes": raw_len,
        "n_tensors": n_tensors,
        "tensors": tensors,
    }


def release_cached_memory() -> int:
    """Free the output blocks decode() keeps for reuse (at most two of up to 64 MiB each, see
    docs/PAYLOAD.md, "Memory of decoded tensors"); returns the bytes freed. Tensors already
    decoded are not affected; the next decode() allocates afresh."""
    return _codec.release_cached_blocks()


def _tensor_spec(name: object, tensor: object, mask: MaskSpec | None) -> list:
    """One tensor, checked: [name bytes, dtype code, shape, tensor, mask kind, kept units or None],
    on their devices; _quantise_on_device or _on_host turns it into the C++ encoder's entry."""
    # Runs once per tensor on every encode: checks are ordered cheapest first and error
    # messages are only built when raised.
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be str, got {type(name).__name__}")
    dtype_code = _DTYPE_CODES.get(tensor.dtype) if isinstance(tensor, torch.Tensor) else None
    if dtype_code is None:
        check_tensor(f"tensors[{name!r}]", tensor, dtypes=FLOAT_DTYPES)  # raises, naming the argument
    if not tensor.is_contiguous():
        raise TypeError(f"tensors[{name!r}] must be contiguous (call .contiguous() first)")
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"tensors[{name!r}] has {tensor.dim()} dimensions; at most {_MAX_DIMS} are supported")
    encoded_name = name.encode("utf-8")
    if len(encoded_name) > _MAX_NAME_BYTES:
        raise ValueError(f"tensor name {name[:40]!r}... is longer than {_MAX_NAME_BYTES} UTF-8 bytes")
    mask_kind, kept = _MASK_AUTO, None
    if mask is not None:
        mask_kind, kept = _mask_spec(name, tensor, mask)
    return [encoded_name, dtype_code, tensor.shape, tensor, mask_kind, kept]


def _on_host(spec: list) -> tuple:
    """The entry of a tensor read from host memory: its values (and mask) copied there if need be."""
    encoded_name, dtype_code, shape, tensor, mask_kind, kept = spec
    tensor = tensor.cpu()
    kept = None if kept is None else kept.cpu()
    # The C++ side reads the memory at these addresses; the last entry keeps it alive meanwhile.
    return (encoded_name, dtype_code, shape, tensor.data_ptr(), tensor.nbytes, mask_kind,
            0 if kept is None else kept.data_ptr(), 0 if kept is None else kept.numel(), None, 0, 0, 0,
            (tensor, kept))


def _quantise_on_device(specs: list, values: str) -> None:
    """Replaces, in place, the entries of tensors that Triton runs on (CUDA tensors; any under
    FIBEC_BACKEND=triton with the interpreter), on the first such tensor's device, by `values`
    ("int8" or "int4") bodies quantised there."""
    staged = [k for k, spec in enumerate(specs) if spec[3].numel() and _backend.use_triton(spec[3])]
    if not staged:
        return
    device = specs[staged[0]][3].device
    staged = [k for k in staged if specs[k][3].device == device]
    keeps = [None if specs[k][5] is None else
             _payload_on_device.Keep(specs[k][5].to(device), {_MASK_ROWS: 0, _MASK_COLS: 1}.get(specs[k][4]))
             for k in staged]
    for k, body in zip(staged, _payload_on_device.stage_quantised([specs[k][3] for k in staged], keeps, values)):
        if body is None:
            continue
        encoded_name, dtype_code, shape, _, mask_kind, _ = specs[k]
        flags = body.flags
        specs[k] = (encoded_name, dtype_code, shape, 0, 0, _MASK_KEEP_ALL if flags is None else mask_kind,
                    0 if flags is None else flags.data_ptr(), 0 if flags is None else flags.numel(),
                    body.scales.data_ptr(), body.scales.numel(), body.quantised.data_ptr(),
                    body.quantised.numel(), body)


def _mask_spec(name: str, tensor: torch.Tensor, mask: MaskSpec) -> tuple[int, torch.Tensor]:
    """(mask kind, contiguous bool tensor of the kept units, on the mask's device)."""
    if isinstance(mask, tuple):
        if len(mask) != 2:
            raise ValueError(f"masks[{name!r}] must be an element mask or a (neuron_mask, mask_dim) pair")
        mask, mask_dim = mask
        if mask_dim not in (0, 1) or isinstance(mask_dim, bool):
            raise ValueError(f"masks[{name!r}]: mask_dim must be 0 (rows) or 1 (columns), got {mask_dim!r}")
        if tensor.dim() != 2:
            raise ValueError(f"masks[{name!r}]: a neuron mask needs a 2-D tensor, got shape {tuple(tensor.shape)}")
        expected, kind = (tensor.shape[mask_dim],), (_MASK_ROWS if mask_dim == 0 else _MASK_COLS)
    else:
        expected, kind = tensor.shape, _MASK_ELEMENTS
    if not isinstance(mask, torch.Tensor):
        check_tensor(f"masks[{name!r}]", mask)  # raises, naming the argument
    if mask.shape != expected:
        raise ValueError(f"masks[{name!r}] must have shape {tuple(expected)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        mask = mask.detach() != 0
    return kind, mask.contiguous()


def _byte_view(payload: object) -> memoryview:
    try:
        view = memoryview(payload)
    except TypeError:
        raise TypeError(f"payload must be bytes-like, got {type(payload).__name__}") from None
    if not view.c_contiguous:
        raise TypeError("payload must be a contiguous buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _call(fn, *args):
    try:
        return fn(*args)
    except _codec.CorruptPayload as error:
        raise PayloadError(str(error)) from None


def _parse(payload: object, max_output_bytes: int | None) -> "_codec.Section":
    """The payload's section, parsed and validated up to the checksum."""
    view = _byte_view(payload)
    if max_output_bytes is None:
        max_output_bytes = max(MIN_OUTPUT_BYTES, OUTPUT_BYTES_PER_PAYLOAD_BYTE * view.nbytes)
    else:
        check_int("max_output_bytes", max_output_bytes, low=0)
    max_output_bytes = min(max_output_bytes, 2**64 - 1)
    flags, n_tensors, offset, section_len, raw_len = _call(_codec.read_frame, view, False)
    compressed = bool(flags & _FLAG_ZSTD)
    buffer = view
    if compressed:
        _call(_codec.read_frame, view, True)  # checksum first: zstd only ever sees intact bytes
        buffer = _decompress(view[offset:offset + section_len], raw_len, max_output_bytes)
        offset, section_len = 0, raw_len
    # Uncompressed: the Section verifies the checksum while it decodes.
    section = _call(_codec.Section, buffer, offset, section_len, n_tensors, compressed, max_output_bytes,
                    not compressed)
    return section


def _decompress(compressed: memoryview, raw_len: int, max_output_bytes: int) -> bytes:
    import zstandard

    if raw_len > max_output_bytes:
        raise PayloadError(f"raw section of {raw_len} bytes exceeds max_output_bytes={max_output_bytes}")
    try:
        # The frame must declare exactly raw_len: zstd then refuses to produce more than that.
        if zstandard.frame_content_size(compressed) != raw_len:
            raise PayloadError("zstd frame size disagrees with the raw section length")
        stream = zstandard.ZstdDecompressor().decompressobj()
        section = stream.decompress(compressed)
    except zstandard.ZstdError as error:
        raise PayloadError(f"zstd section is corrupt: {error}") from None
    if not stream.eof or len(section) != raw_len:
        raise PayloadError("truncated: zstd section ends early")
    if stream.unused_data:
        raise PayloadError("trailing garbage after the zstd frame")
    return section
