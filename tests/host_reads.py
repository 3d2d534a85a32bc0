"""Counting the reads of tensors back to the host: on a GPU each is a wait for the device, so
code that reads once per batch or step instead of once per pass is slow there. On the CPU every
tensor is on the host already, so the reads are counted where the code under test makes them."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from types import FrameType

import pytest
import torch

HOST_READS = ("__float__", "__int__", "item", "tolist", "cpu", "numpy")


@contextlib.contextmanager
def counting_host_reads(where: Callable[[FrameType, torch.Tensor], bool], reads: list | None = None
                        ) -> Iterator[list[tuple[str, int]]]:
    """Within the block, every host read of a tensor that `where(frame, tensor)` accepts (frame:
    the caller's) appends (method name, tensor.numel()) to `reads` (a new list by default), which
    the block gets."""
    reads = [] if reads is None else reads

    def counting(name: str, original: Callable) -> Callable:
        def read(self, *args, **kwargs):
            if where(sys._getframe(1), self):
                reads.append((name, self.numel()))
            return original(self, *args, **kwargs)
        return read

    with pytest.MonkeyPatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
        yield reads


def within(frame: FrameType | None, function: str) -> bool:
    """Whether `frame` runs in a call of `function` (its own code or anything it calls)."""
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False
