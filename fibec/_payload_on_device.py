"""int8 and int4 values of tensors that live on a GPU, encoded and decoded there: only the bodies
(about a quarter of the fp32 bytes for int8, an eighth for int4) and the masks, as bits, cross
between host and device, in one copy.

encode(): the kept entries are gathered and quantised on the device (fibec/kernels/quantize.py,
byte for byte the C++ encoder's). decode(device=...): the C++ side validates the payload (and its
checksum) and copies each record's scales, values and kept entries, as bits, apart on the host;
they cross in one copy and are dequantised and placed there, as the host decoder would.

The layout stays the C++ encoder's choice (docs/PAYLOAD.md, "Encoding choice"): a masked tensor's
layout follows its mask, and a tensor without a mask is staged here only when none of its entries
has all bits 0, which is when the encoder would store it dense; one that holds such an entry is
left to the host, where the encoder reads it to choose among dense, rows, columns and elements.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fibec import _codec

_SAME_WIDTH_INTEGER = {4: torch.int32, 2: torch.int16}


@dataclass(frozen=True)
class Keep:
    """A mask on the tensor's device: bool [rows] (dim 0), [columns] (dim 1) or of the tensor's
    shape (dim None, elements)."""

    mask: torch.Tensor
    dim: int | None


@dataclass(frozen=True)
class Staged:
    """One tensor's body on the host: scales uint8 [4 * ceil(n / 64)] (fp32 bytes) and quantised
    uint8 [n] (int8) or [ceil(n / 2)] (int4), over the n values its mask keeps in stream order;
    flags uint8 [units] (1 = kept) for a masked tensor, None for one that keeps everything."""

    flags: torch.Tensor | None
    scales: torch.Tensor
    quantised: torch.Tensor


def stage_quantised(tensors: list[torch.Tensor], keeps: list[Keep | None], values: str) -> list[Staged | None]:
    """`values` ("int8" or "int4") bodies of contiguous float tensors (fp32/fp16/bf16, at least one
    entry each, all on one device), each with its mask or None. None in the result: a tensor
    without a mask that holds an entry whose bits are all 0 (the host plans it). Synchronises with
    the device twice: once for the stream lengths, once for the copy."""
    from fibec.kernels import quantize  # needs triton, which installs on Linux only

    # A stream's length (-1: no mask and a zero entry), for all tensors in one transfer.
    lengths = []
    for tensor, keep in zip(tensors, keeps):
        if keep is None:
            zero = (tensor.view(_SAME_WIDTH_INTEGER[tensor.element_size()]) == 0).any()
            lengths.append(torch.where(zero, -1, tensor.numel()))
        else:
            lengths.append(keep.mask.sum() * (tensor.numel() // keep.mask.numel()))
    lengths = torch.stack(lengths).tolist()

    # Each stream starts at a multiple of the block size, so that one launch quantises them all and
    # no block holds values of two tensors; the padding is zeros, which change no block's scale.
    starts, total = [], 0
    for length in lengths:
        starts.append(total)
        total += max(length, 0) + (-max(length, 0)) % quantize.BLOCK
    blocks = total // quantize.BLOCK
    # Scales (4 bytes a block), then the values (a whole number of bytes: total is a multiple of
    # the block), then the mask bits.
    values_bytes = quantize.value_bytes(values, total)
    bits_at, end = [], 4 * blocks + values_bytes
    for keep, length in zip(keeps, lengths):
        bits_at.append(end)
        end += 0 if keep is None or length < 0 else -(-keep.mask.numel() // 8)
    device = tensors[0].device
    staging = torch.empty(max(end, 1), dtype=torch.uint8, device=device)
    # One slot past the streams takes every entry a mask drops.
    streams = torch.zeros(total + 1, dtype=torch.float32, device=device)
    for tensor, keep, start, length, at in zip(tensors, keeps, starts, lengths, bits_at):
        if length < 0:
            continue
        flat = tensor.reshape(-1)
        if keep is None:
            streams[start:start + length].copy_(flat)
            continue
        kept = _kept_entries(tensor, keep)
        streams.scatter_(0, torch.where(kept, torch.cumsum(kept, 0) + (start - 1), total), flat.float())
        staging[at:at + -(-keep.mask.numel() // 8)].copy_(_packed_bits(keep.mask.reshape(-1)))
    if total:
        body = staging[4 * blocks:4 * blocks + values_bytes]
        quantize.quantise_blocks(streams[:total], values, out=(staging[:4 * blocks].view(torch.float32),
                                                               body.view(torch.int8) if values == "int8" else body))
    host = _to_host(staging)

    staged = []
    for keep, start, length, at in zip(keeps, starts, lengths, bits_at):
        if length < 0:
            staged.append(None)
            continue
        first_block = start // quantize.BLOCK
        flags = None
        if keep is not None:
            units = keep.mask.numel()
            flags = torch.from_numpy(np.unpackbits(host[at:at + -(-units // 8)].numpy(), count=units,
                                                   bitorder="little"))
        values_at = 4 * blocks + quantize.value_bytes(values, start)
        staged.append(Staged(flags, host[4 * first_block:4 * (first_block + -(-length // quantize.BLOCK))],
                             host[values_at:values_at + quantize.value_bytes(values, length)]))
    return staged


def _to_host(staging: torch.Tensor) -> torch.Tensor:
    """The one copy: into pinned memory from a GPU (pageable memory would stage it again)."""
    host = torch.empty(staging.numel(), dtype=torch.uint8, pin_memory=staging.is_cuda)
    return host.copy_(staging)


def _kept_entries(tensor: torch.Tensor, keep: Keep) -> torch.Tensor:
    """bool [numel]: the entries a mask keeps, in row-major order (the order of the stream)."""
    if keep.dim is None:
        return keep.mask.reshape(-1)
    units = keep.mask[:, None] if keep.dim == 0 else keep.mask[None, :]
    return units.expand(tensor.shape).reshape(-1)


def _packed_bits(mask: torch.Tensor) -> torch.Tensor:
    """uint8 [ceil(n / 8)] of bool [n]: entry i in bit i % 8 of byte i // 8."""
    padded = torch.zeros(-(-mask.numel() // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:mask.numel()] = mask
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)


def dequantise_staged(section: "_codec.Section", layout: tuple, device: torch.device) -> torch.Tensor:
    """fp32 [elements] on device: the entries of every record of a validated section in turn, 0 where
    the encoder dropped one, from one copy of the bodies (layout: section.quantised_layout(), not
    None). Waits for nothing on the device."""
    blocks, elements, records = layout
    block = _codec.QUANT_BLOCK
    # Per record, int64: where its values start in the block-aligned stream less the values of the
    # records before it (what turns a running count of kept entries into a stream position), and
    # its element count. They travel with the bodies, in the same copy.
    first_block, n_values, numel = torch.tensor(records, dtype=torch.int64).view(-1, 3).unbind(1)
    tables = torch.stack([first_block * block - (torch.cumsum(n_values, 0) - n_values), numel])
    table_bytes = tables.numel() * 8
    host = torch.empty(table_bytes + blocks * (4 + block) + -(-elements // 8), dtype=torch.uint8,
                       pin_memory=device.type == "cuda")
    host[:table_bytes].view(torch.int64).copy_(tables.view(-1))
    section.stage_quantised(host[table_bytes:].numpy())
    staged = host.to(device, non_blocking=True)

    shift, counts = staged[:table_bytes].view(torch.int64).view(2, -1)
    scales = staged[table_bytes:table_bytes + 4 * blocks].view(torch.float32)
    values_at = table_bytes + 4 * blocks
    stream = torch.zeros(blocks * block + 1, dtype=torch.float32, device=device)  # the last: dropped entries
    torch.mul(staged[values_at:values_at + blocks * block].view(torch.int8).view(blocks, block), scales[:, None],
              out=stream[:-1].view(blocks, block))
    bits = staged[values_at + blocks * block:]
    kept = ((bits[:, None] >> torch.arange(8, dtype=torch.uint8, device=device)) & 1).view(-1)[:elements].bool()
    position = torch.cumsum(kept, 0) - 1 + torch.repeat_interleave(shift, counts, output_size=elements)
    return stream[torch.where(kept, position, blocks * block)]
