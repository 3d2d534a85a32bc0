"""FisherCollector: per-layer diagonal empirical Fisher and per-sample difficulty from one backward.

Wrap the forward and backward pass of any model::

    with FisherCollector(model, layers="lora") as fc:
        fc.token_mask = batch["attention_mask"]
        loss = model(**batch).loss
        loss.backward()
    fc.sample_scores   # [N] fp32: per-sample Fisher trace over the hooked parameters
    fc.fisher          # {layer_name: {"lora_A": [r,I], "lora_B": [O,r]}} running fp32 sums

A forward hook saves each hooked layer's input X and registers a tensor hook on its output;
when backward reaches that output the hook receives G, the gradient of the loss w.r.t. the
output, and hands (X, G) to the fused ops in fibec.ops, so per-sample gradients are never
materialised and the model's own gradients are left as they are. For a peft LoRA layer X is
the input of lora_A, i.e. the output of the adapter's dropout, and the adapter's scaling is
taken from the layer: dA_n = s (G_n B)^T X_n, dB_n = s G_n^T (X_n A^T).

Layer inputs [N,T,I] have a sequence dimension T; [N,I] is taken as T=1 and [N,d1,..,dk,I] as
T = d1*..*dk. The batch must be the first dimension of every hooked layer's input.

A backward pass is delimited by autograd itself (a callback queued on the running backward),
so several forward/backward pairs can run inside one context. Gradient checkpointing works in
both modes: non-reentrant (the original forward's hooks fire) and reentrant (layers run again
inside backward and their gradients arrive in nested backward calls, which count as one pass).

That callback, and knowing whether a backward pass is running, are private torch APIs
(fibec._compat). On a torch without them a pass ends once every hooked layer call made with
gradients enabled has received its gradient, or when the results are read or the context exits.
There gradient checkpointing, a hooked layer whose output does not reach the loss followed by
another forward before the results are read, and hooked layers run under torch.no_grad() and
not again with gradients before the next backward each raise a RuntimeError saying so.

Limits, each reported with an error rather than a wrong number: LoRA variants (DoRA and
others), merged adapters, several active adapters in one layer, peft's mixed-adapter batches
(`adapter_names=`), and a hooked layer whose output enters one backward pass more than once
(weight sharing inside the graph: the per-sample gradient would need cross terms). Only the
weights count: biases are not part of the Fisher.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fibec import _compat, ops
from fibec._checks import check_tensor

_SELECTORS = ("lora", "linear", "all")
_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class _Layer:
    """One hooked layer: its qualified name, the module, its kind and, for LoRA, the adapter collected."""

    name: str
    module: nn.Module
    kind: LayerKind
    adapter: str | None = None

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights whose Fisher is collected, under their keys in FisherCollector.fisher."""
        return self.kind.weights(self)


class LayerKind:
    """How FisherCollector collects one kind of layer, as Opacus registers a grad sampler per module
    type: which modules it takes, which weights it scores, which hooks pair each call's input X with
    the gradient of its output, and which fused op turns (X, G) into the Fisher and per-sample norms.
    Kinds are tried in LAYER_KINDS order; `register_layer_kind` adds one."""

    selector: str  # the `layers=` string that selects every trainable layer of this kind

    def claims(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def layer(self, name: str, module: nn.Module) -> _Layer:
        """The layer to hook, or a ValueError saying why this module cannot be collected."""
        return _Layer(name, module, self)

    def trainable(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def weights(self, layer: _Layer) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def hook(self, collector: FisherCollector, layer: _Layer) -> list:
        """Register the forward hooks that hand (X, output) to collector._watch; returns their handles."""
        raise NotImplementedError

    def collect(self, layer: _Layer, X: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None,
                grad_scale: float, fisher: dict[str, torch.Tensor]) -> torch.Tensor:
        """Add the batch's diagonal Fisher into `fisher` (the layer's running sums); return the
        per-sample squared gradient norms [N] fp32. X [N,T,I], G [N,T,O]."""
        raise NotImplementedError


class DenseLinear(LayerKind):
    """An nn.Linear outside LoRA layers: the Fisher of its weight [O, I]."""

    selector = "linear"

    def claims(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def trainable(self, module: nn.Module) -> bool:
        return module.weight.requires_grad

    def weights(self, layer: _Layer) -> dict[str, torch.Tensor]:
        return {"weight": layer.module.weight}

    def hook(self, collector: FisherCollector, layer: _Layer) -> list:
        def forward(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            collector._watch(layer, args[0] if args else kwargs["input"], output)

        return [layer.module.register_forward_hook(forward, with_kwargs=True)]

    def collect(self, layer: _Layer, X: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None,
                grad_scale: float, fisher: dict[str, torch.Tensor]) -> torch.Tensor:
        if grad_scale != 1:
            G = G * grad_scale
        return ops.fisher_diag(X, G, token_mask=mask, out=fisher["weight"], with_sqnorms=True)[1]


class PeftLoraLinear(LayerKind):
    """A peft lora.Linear: the Fisher of its one active adapter's factors lora_A [r, I], lora_B [O, r]."""

    selector = "lora"

    def claims(self, module: nn.Module) -> bool:
        peft = _compat.peft_lora()
        return peft is not None and isinstance(module, peft.linear)

    def layer(self, name: str, module: nn.Module) -> _Layer:
        """The one active, vanilla-LoRA, unmerged adapter of the layer, else a ValueError."""
        active = [a for a in module.active_adapters if a in module.lora_A]
        if len(active) != 1:
            raise ValueError(f"layer {name!r} has {len(active)} active LoRA adapters {active}; "
                             "FisherCollector collects exactly one per layer (set_adapter first)")
        adapter = active[0]
        if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter, False):
            raise ValueError(f"layer {name!r}: adapter {adapter!r} is a LoRA variant (e.g. DoRA); "
                             "FisherCollector supports plain LoRA only")
        if module.merged:
            raise ValueError(f"layer {name!r} has merged LoRA weights; call unmerge_adapter() first")
        return _Layer(name, module, self, adapter)

    def trainable(self, module: nn.Module) -> bool:
        return any(module.lora_A[a].weight.requires_grad or module.lora_B[a].weight.requires_grad
                   for a in module.active_adapters if a in module.lora_A)

    def weights(self, layer: _Layer) -> dict[str, torch.Tensor]:
        return {"lora_A": layer.module.lora_A[layer.adapter].weight,
                "lora_B": layer.module.lora_B[layer.adapter].weight}

    def hook(self, collector: FisherCollector, layer: _Layer) -> list:
        # X is the input of lora_A (the output of the adapter's dropout): saved when lora_A runs,
        # inside the layer's forward, and taken when that forward returns.
        def lora_input(module: nn.Module, args: tuple) -> None:
            collector._lora_inputs[layer.name] = args[0]

        def forward(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            X = collector._lora_inputs.pop(layer.name, None)
            if kwargs.get("adapter_names") is not None:
                raise RuntimeError(f"layer {layer.name!r}: peft mixed-adapter batches (adapter_names=) "
                                   "are not supported by FisherCollector")
            if module.disable_adapters:
                return  # the adapter took no part: its gradient is zero
            if module.merged:
                raise RuntimeError(f"layer {layer.name!r} has merged LoRA weights; unmerge before collecting")
            if list(module.active_adapters) != [layer.adapter]:
                raise RuntimeError(f"layer {layer.name!r}: active adapters changed to {module.active_adapters} "
                                   f"while collecting adapter {layer.adapter!r}")
            if X is not None:
                collector._watch(layer, X, output)

        return [layer.module.lora_A[layer.adapter].register_forward_pre_hook(lora_input),
                layer.module.register_forward_hook(forward, with_kwargs=True)]

    def collect(self, layer: _Layer, X: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None,
                grad_scale: float, fisher: dict[str, torch.Tensor]) -> torch.Tensor:
        weights = self.weights(layer)
        A, B = (weights[key].detach().to(X.dtype) for key in ("lora_A", "lora_B"))
        scaling = float(layer.module.scaling[layer.adapter]) * grad_scale
        return ops.lora_fisher_diag(X, G, A, B, scaling, token_mask=mask, out=(fisher["lora_A"], fisher["lora_B"]))[2]


# Tried in order: a module is collected as the first kind that claims it.
LAYER_KINDS: list[LayerKind] = [PeftLoraLinear(), DenseLinear()]


def register_layer_kind(kind: LayerKind) -> None:
    """Collect another kind of layer: tried before the built-in ones, selected by its `selector`
    and by name."""
    LAYER_KINDS.insert(0, kind)


def _kind_of(module: nn.Module) -> LayerKind | None:
    return next((kind for kind in LAYER_KINDS if kind.claims(module)), None)


def _select_layers(model: nn.Module, layers: str | Iterable[str]) -> list[_Layer]:
    modules = dict(model.named_modules())
    if isinstance(layers, str):
        if layers not in _SELECTORS:
            raise ValueError(f"layers must be one of {_SELECTORS} or an iterable of module names, got {layers!r}")
        # Modules inside an adapter layer (its base layer, its factors) belong to that layer.
        peft = _compat.peft_lora()
        tuner_prefixes = tuple(n + "." for n, m in modules.items() if peft and isinstance(m, peft.tuner))
        selected = []
        for name, m in modules.items():
            kind = _kind_of(m)
            if (kind is not None and layers in (kind.selector, "all") and kind.trainable(m)
                    and (kind.selector == "lora" or not name.startswith(tuner_prefixes))):
                selected.append(kind.layer(name, m))
        if not selected:
            what = {"lora": "peft LoRA layer (peft.tuners.lora.Linear)",
                    "linear": "nn.Linear outside LoRA layers",
                    "all": "peft LoRA layer or nn.Linear"}[layers]
            raise ValueError(f'layers="{layers}": no {what} with trainable weights in the model; '
                             "pass module names to hook frozen layers")
        return selected

    names = list(layers)
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError("layers must be one of "
                         f"{_SELECTORS} or a non-empty iterable of module names (str), got {names!r}")
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"layers: no module named {unknown} in the model")
    selected = []
    for name in dict.fromkeys(names):
        kind = _kind_of(modules[name])
        if kind is None:
            raise ValueError(f"layers: module {name!r} is a {type(modules[name]).__name__}; "
                             "only nn.Linear and peft lora.Linear layers can be hooked")
        selected.append(kind.layer(name, modules[name]))
    return selected


def _as_ntd(t: torch.Tensor) -> torch.Tensor:
    """[N,D] -> [N,1,D]; [N,d1,..,dk,D] -> [N,d1*..*dk,D]; contiguous for the kernels."""
    if t.dim() < 2:
        raise ValueError(f"a hooked layer got a {t.dim()}-D tensor; the batch must be its first dimension")
    return t.reshape(t.shape[0], -1, t.shape[-1]).contiguous()


class FisherCollector:
    """Collects diagonal empirical Fisher and per-sample Fisher traces during backward.

    Args:
        model: any nn.Module; it is not changed (no parameter, flag or gradient is touched).
        layers: "lora" (every peft lora.Linear with trainable adapter weights), "linear" (every
            nn.Linear with a trainable weight outside LoRA layers: dense Fisher of the weight),
            "all" (both), or an iterable of qualified module names (nn.Linear or lora.Linear,
            trainable or not).
        loss_reduction: how the loss combines the samples of a batch. "sum": loss = sum_n l_n.
            "mean": loss = (1/N) sum_n l_n, the mean over the batch dimension N (as HF sequence
            classification does); the gradients are scaled back by N so a sample's score does not
            depend on the batch size. A loss averaged over tokens is neither: use "sum" with a
            per-sample loss summed over the batch.
        token_mask: [N,T] bool or 0/1 (e.g. the attention mask); tokens where it is 0 contribute
            nothing. Set `fc.token_mask` per batch, before the forward pass; layers whose input has
            no sequence dimension ([N,I]) ignore it.

    Attributes (read after backward):
        fisher: {layer_name: {"lora_A": [r,I], "lora_B": [O,r]}} or {layer_name: {"weight": [O,I]}},
            fp32 running sums over all samples since construction or reset(): F = sum_n g_n**2.
        sample_scores: [N] fp32 of the last backward pass: sum over hooked layers of each
            sample's squared gradient norm (its Fisher trace); None before the first backward.
        layer_traces: {layer_name: float} running sums of each layer's Fisher trace.
        num_samples: samples seen (sum of N over backward passes) since construction or reset().

    layer_name is the module's qualified name in model.named_modules(). The context can be
    entered again (e.g. once per batch); running sums continue until reset().
    """

    def __init__(self, model: nn.Module, layers: str | Iterable[str] = "lora", *, loss_reduction: str = "sum",
                 token_mask: torch.Tensor | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_reduction not in _REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_REDUCTIONS}, got {loss_reduction!r}")
        self._layers = _select_layers(model, layers)
        self._layer_index = {layer.name: index for index, layer in enumerate(self._layers)}
        self._trace_orders: dict[tuple[int, ...], torch.Tensor] = {}
        self._loss_reduction = loss_reduction
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._lora_inputs: dict[str, torch.Tensor] = {}
        self._active = False
        self._warned_late_backward = False
        # Without torch's private graph-task API the collector finds the end of each pass itself.
        self._counts_passes = _compat.backward_running() is None
        self._generation = 0
        self.token_mask = token_mask
        self.reset()

    # ---- results --------------------------------------------------------------------------
    @property
    def fisher(self) -> dict[str, dict[str, torch.Tensor]]:
        return self._fisher

    @property
    def sample_scores(self) -> torch.Tensor | None:
        self._end_counted_pass()
        return self._sample_scores

    @property
    def layer_traces(self) -> dict[str, float]:
        return dict(zip(self.layer_names, self._trace_sums.tolist()))

    @property
    def num_samples(self) -> int:
        self._end_counted_pass()
        return self._num_samples

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._layers]

    def reset(self) -> None:
        """Start the running sums again (fresh tensors: dicts read earlier keep their values)."""
        self._fisher = {}
        for layer in self._layers:
            self._fisher[layer.name] = {key: torch.zeros(w.shape, dtype=torch.float32, device=w.device)
                                        for key, w in layer.weights().items()}
        # Each layer's trace, in layer order, on the first layer's device; added to once per pass.
        first = next(iter(self._layers[0].weights().values()))
        self._trace_sums = torch.zeros(len(self._layers), dtype=torch.float32, device=first.device)
        self._sample_scores: torch.Tensor | None = None
        self._num_samples = 0
        self._end_backward_state()

    # ---- token mask -----------------------------------------------------------------------
    @property
    def token_mask(self) -> torch.Tensor | None:
        return self._token_mask

    @token_mask.setter
    def token_mask(self, mask: torch.Tensor | None) -> None:
        if mask is not None:
            check_tensor("token_mask", mask, ndim=2)
            if mask.dtype != torch.bool:
                if mask.is_complex() or not ((mask == 0) | (mask == 1)).all():
                    raise ValueError("token_mask must be bool or hold only 0 and 1")
                mask = mask != 0
        self._token_mask = mask
        self._masks_on_device: dict[torch.device, torch.Tensor] = {}

    # ---- context --------------------------------------------------------------------------
    def __enter__(self) -> FisherCollector:
        if self._active:
            raise RuntimeError("this FisherCollector is already active (contexts cannot nest)")
        for layer in self._layers:
            self._handles += layer.kind.hook(self, layer)
        self._active = True
        self._end_backward_state()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._end_counted_pass()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._lora_inputs.clear()
            self._active = False
            self._end_backward_state()

    # ---- forward: pair each layer call's input with its output's gradient (the kinds' hooks) ----
    def _watch(self, layer: _Layer, X: torch.Tensor, output: torch.Tensor) -> None:
        """Hook the autograd node that produced this call's output, with the token mask of this batch.

        A node receives G even when the model later modifies the output in place, which would
        silence a hook on the output tensor itself. When the output is a reshaped view of the
        layer's matmul result (nn.Linear on [N,T,I]), an in-place op on it would bypass the view's
        node, so the hook goes on the node of the viewed tensor.
        """
        if not torch.is_grad_enabled():
            if self._counts_passes:
                self._gradless_layers.add(layer.name)
            return
        if not (isinstance(output, torch.Tensor) and output.grad_fn is not None):
            return
        node, index = _compat.producing_edge(output)
        if self._counts_passes:
            self._count_call(layer)
        elif _compat.backward_running():
            # A forward inside backward is a checkpoint recomputation. Reentrant checkpointing
            # runs a nested backward for its gradients: end the pass with the outer backward.
            self._queue_end_of_pass()
        saved = [X, self._layer_mask(layer, X)]
        shape, generation = output.shape, self._generation

        def on_grad(grad_outputs: tuple[torch.Tensor | None, ...]) -> None:
            if not saved:
                self._fail(f"layer {layer.name!r}: a second backward through the same forward "
                           "(retain_graph=True) is not supported; run the forward again")
            X, mask = saved
            saved.clear()  # the graph's nodes, and so this hook, may outlive the backward pass
            G = grad_outputs[index]
            self._collect(layer, X, None if G is None else G.reshape(shape), mask, generation)

        node.register_prehook(on_grad)

    def _count_call(self, layer: _Layer) -> None:
        """Without the private end-of-backward callback: note a hooked call that awaits its gradient."""
        if self._pass_size is not None:
            self._fail(f"layer {layer.name!r} ran while the backward pass before it still awaited the gradients "
                       f"of hooked layer calls {sorted(self._pending_layers)}: they did not reach the loss, or "
                       "this is a recomputation inside backward (gradient checkpointing). This torch lacks the "
                       "private torch._C._current_graph_task_id, so fibec cannot tell which: read "
                       "fc.sample_scores after each backward, and do not use gradient checkpointing")
        if layer.name in self._pending_layers:
            # Called again before any gradient arrived: the earlier forward had no backward.
            self._generation += 1
            self._pending_layers.clear()
        self._pending_layers.add(layer.name)
        self._gradless_layers.discard(layer.name)

    def _layer_mask(self, layer: _Layer, X: torch.Tensor) -> torch.Tensor | None:
        mask = self._token_mask
        if mask is None:
            return None
        N = X.shape[0]
        if mask.shape[0] != N:
            raise ValueError(f"token_mask has {mask.shape[0]} samples but layer {layer.name!r} got a batch "
                             f"of {N} (input {tuple(X.shape)}); set fc.token_mask for each batch")
        if X.dim() == 2:
            return None  # no sequence dimension: nothing to mask
        T = math.prod(X.shape[1:-1])
        if mask.shape[1] != T:
            raise ValueError(f"token_mask has {mask.shape[1]} tokens but layer {layer.name!r} got input "
                             f"{tuple(X.shape)} with {T} positions per sample")
        # One copy per batch and device, not one per layer: a copy from pageable host memory waits
        # for the device's queue, so each would stall the backward pass. Pinned, it does not.
        moved = self._masks_on_device.get(X.device)
        if moved is None:
            if mask.device != X.device and mask.device.type == "cpu" and X.device.type == "cuda":
                mask = mask.pin_memory()
            moved = self._masks_on_device[X.device] = mask.to(X.device, non_blocking=True)
        return moved

    # ---- backward: one fused op call per layer call ---------------------------------------
    def _end_backward_state(self) -> None:
        # The running pass: its batch size (None: no pass), and each collected layer's (index, [N] norms).
        self._pass_size: int | None = None
        self._pass_norms: list[tuple[int, torch.Tensor]] = []
        self._pass_layers: set[str] = set()
        self._pass_end_queued = False
        # Only without the private API: hooked calls awaiting their gradient, in this generation of
        # calls (a gradient for an earlier generation means fibec misjudged where a pass ended),
        # and layers last run without gradients (they might yet be recomputed inside backward).
        self._pending_layers: set[str] = set()
        self._gradless_layers: set[str] = set()
        self._generation += 1

    def _queue_end_of_pass(self) -> None:
        if self._counts_passes or self._pass_end_queued:
            return
        if not _compat.queue_at_end_of_backward(self._finish_backward):
            self._fail("this torch reports running backward passes but cannot queue a callback at their end "
                       "(torch.autograd.Variable._execution_engine.queue_callback is missing)")
        self._pass_end_queued = True

    def _end_counted_pass(self) -> None:
        """Without the private API, a pass whose gradients stopped arriving ends when read or left."""
        if self._counts_passes and self._pass_size is not None:
            self._finish_backward()

    def _finish_backward(self) -> None:
        if self._gradless_layers and self._pass_size is not None:
            self._fail(f"layers {sorted(self._gradless_layers)} ran without gradients (torch.no_grad() or "
                       "reentrant gradient checkpointing) and not again with gradients before this backward "
                       "pass. This torch lacks the private torch._C._current_graph_task_id, so fibec cannot "
                       "tell whether they are still to be recomputed inside the pass: run no-grad forwards "
                       "outside the FisherCollector context, and do not use gradient checkpointing")
        if self._pass_norms:
            self._sample_scores = self._close_pass()
            self._num_samples += self._pass_size
        self._end_backward_state()

    def _close_pass(self) -> torch.Tensor:
        """The pass's per-sample scores [N] fp32, after adding each layer's trace to the running sums:
        a few launches for the whole pass, not a few per layer."""
        device = self._pass_norms[0][1].device
        stacked = torch.stack([norms.to(device) for _, norms in self._pass_norms])  # [layers, N]
        order = tuple(index for index, _ in self._pass_norms)
        if order not in self._trace_orders:  # backward meets the layers in the same order every pass
            self._trace_orders[order] = torch.tensor(order, device=self._trace_sums.device)
        self._trace_sums.index_add_(0, self._trace_orders[order], stacked.sum(1).to(self._trace_sums.device))
        return stacked.sum(0)

    def _fail(self, message: str) -> None:
        self._end_backward_state()
        raise RuntimeError(message)

    def _collect(self, layer: _Layer, X: torch.Tensor, G: torch.Tensor | None, mask: torch.Tensor | None,
                 generation: int) -> None:
        if not self._active:
            if not self._warned_late_backward:
                warnings.warn("backward ran after the FisherCollector context exited; "
                              "its gradients were not collected", RuntimeWarning, stacklevel=2)
                self._warned_late_backward = True
            return
        if self._counts_passes:
            if generation != self._generation:
                self._fail(f"layer {layer.name!r} got a gradient for a call that fibec took to have no backward: "
                           "the layer ran again before any gradient arrived (called twice in one forward, two "
                           "forwards before one backward, or recomputed by gradient checkpointing). This torch "
                           "lacks the private torch._C._current_graph_task_id, so fibec cannot tell these apart: "
                           "run one backward after each forward, with each hooked layer called once")
            self._pending_layers.discard(layer.name)
        if G is not None:
            self._accumulate(layer, X, G, mask)
        if self._counts_passes and not self._pending_layers:
            self._finish_backward()

    def _accumulate(self, layer: _Layer, X: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None) -> None:
        X3 = _as_ntd(X.detach())
        G3 = _as_ntd(G.detach()).to(X3.dtype)
        N = X3.shape[0]
        if self._pass_size is None:
            self._pass_size = N
            self._queue_end_of_pass()
        elif self._pass_size != N:
            self._fail(f"layer {layer.name!r} got a batch of {N} samples but another hooked layer got "
                       f"{self._pass_size} in the same backward pass")
        if layer.name in self._pass_layers:
            self._fail(f"layer {layer.name!r} reached the same backward pass twice (called more than once "
                       "in the graph); per-sample gradients of shared layers are not supported")
        self._pass_layers.add(layer.name)
        # With a batch-mean loss every gradient carries a factor 1/N: undo it.
        grad_scale = N if self._loss_reduction == "mean" else 1
        sqnorm = layer.kind.collect(layer, X3, G3, mask, grad_scale, self._fisher[layer.name])
        self._pass_norms.append((self._layer_index[layer.name], sqnorm))
