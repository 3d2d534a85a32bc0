"""Every private torch API and every peft internal fibec uses, each behind a function.

Private names can vanish in any torch release. Each one is looked up when it is used, so a torch
without it, or a test that removes it, takes the fallback. Where no public API can give the same
answer the fallback says so by its return value, and the caller must degrade with a clear error
rather than a wrong number.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

# Autograd nodes of views that only reshape: the gradient of their input, reshaped to the view's
# shape, is the gradient of the view (element order is the logical, row-major one in both).
_RESHAPE_VIEW_NODES = frozenset({"ViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0",
                                 "SqueezeBackward0", "SqueezeBackward1", "AliasBackward0"})


def producing_edge(output: torch.Tensor) -> tuple[torch.autograd.graph.Node, int]:
    """(autograd node, index among its outputs) that computed the data of `output`.

    `output` must have a grad_fn. For a reshape of another tensor (nn.Linear on a [N,T,I] input
    returns a view of its [N*T,O] matmul) this is the node of the reshaped tensor, which keeps
    receiving the gradient even after an in-place op on the view replaces the view's own node;
    the gradient it receives, reshaped to output.shape, is output's gradient. Otherwise it is
    output's own node.

    Private: Tensor._base (the viewed tensor, used when both it and the view are contiguous and
    of the same size). Fallback: walk back through reshape-only view nodes with the public
    torch.autograd.graph.Node API. The two agree on the views layers produce (tests/test_compat.py);
    on a chain of views with a step that is no reshape (as_strided over the whole tensor, then a
    reshape) they pick different nodes, each of which receives the gradient that reshapes to
    output's.
    """
    try:
        base = output._base
    except AttributeError:
        return _reshape_source_edge(output)
    if (base is not None and base.grad_fn is not None and base.numel() == output.numel()
            and base.is_contiguous() and output.is_contiguous()):
        return base.grad_fn, base.output_nr
    return output.grad_fn, output.output_nr


def _reshape_source_edge(output: torch.Tensor) -> tuple[torch.autograd.graph.Node, int]:
    own = output.grad_fn, output.output_nr
    if not output.is_contiguous():
        return own
    node, index = own
    while node is not None and node.name() in _RESHAPE_VIEW_NODES:
        node, index = node.next_functions[0]
    # A view of a leaf ends at its gradient accumulator; the leaf's _base has no grad_fn, so the
    # private path keeps the view's own node there too.
    if node is None or hasattr(node, "variable"):
        return own
    return node, index


def backward_running() -> bool | None:
    """True while this thread runs a backward pass (e.g. inside a gradient hook, or a checkpointed
    forward recomputed by backward), False outside one; None where this torch cannot tell.

    Private: torch._C._current_graph_task_id(). No public torch API answers this (the public
    helpers that do, torch.utils.module_tracker and autograd.graph.register_multi_grad_hook, call
    the same private function), so the fallback is None and the caller must track passes itself.
    """
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return None if task_id is None else task_id() != -1


def queue_at_end_of_backward(callback: Callable[[], None]) -> bool:
    """Run `callback` once the backward pass running on this thread has finished (nested backward
    calls inside it included); call only while backward_running() is True. Returns False, without
    queueing, where this torch cannot: the caller must then find the end of the pass itself.

    Private: torch.autograd.Variable._execution_engine.queue_callback. No public torch API runs
    code at the end of a backward pass, so there is no fallback beyond saying so.
    """
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    queue = getattr(engine, "queue_callback", None)
    if queue is None:
        return False
    queue(callback)
    return True


def dlpack_converter() -> Callable[[object], torch.Tensor]:
    """The function turning a DLPack capsule into a tensor that shares its memory.

    Private: torch._C._from_dlpack, torch.from_dlpack's own converter: the public wrapper spends
    3 us a call finding out that a capsule is a capsule, as long as decoding a 48 KB tensor takes.
    Fallback: torch.from_dlpack, the same tensor.
    """
    return getattr(torch._C, "_from_dlpack", None) or torch.from_dlpack


class PeftLora(NamedTuple):
    """peft's LoRA layer classes: `layer` (any LoRA layer), `linear` (lora.Linear), `tuner` (the base
    of every adapter layer, whose submodules belong to it)."""

    layer: type
    linear: type
    tuner: type


def peft_lora() -> PeftLora | None:
    """peft's LoRA layer classes, or None when peft was never imported: a model can hold peft layers
    only once peft is imported, so fibec does not import it for a model that has none.

    Internal: peft.tuners.lora.{LoraLayer, Linear} and peft.tuners.tuners_utils.BaseTunerLayer are
    not part of peft's documented API; fibec reaches them here only."""
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora import Linear, LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    return PeftLora(LoraLayer, Linear, BaseTunerLayer)
