"""fibec._compat: each private torch API and its public fallback give the same answer, and the
FisherCollector and codec.decode give the same results through the fallbacks."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fibec import _compat, codec
from fibec.fisher import FisherCollector

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


class _EngineWithoutQueueCallback:
    """The autograd engine minus queue_callback (backward itself still needs the engine)."""

    def __init__(self, engine: object) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> object:
        if name == "queue_callback":
            raise AttributeError(name)
        return getattr(self._engine, name)


def _no_base(tensor: torch.Tensor) -> None:
    raise AttributeError("_base")


@pytest.fixture
def no_view_base(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "_base", property(_no_base))


@pytest.fixture
def no_private_autograd(monkeypatch, no_view_base):
    """A torch without Tensor._base, torch._C._current_graph_task_id and the engine's queue_callback."""
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    monkeypatch.setattr(torch.autograd.Variable, "_execution_engine",
                        _EngineWithoutQueueCallback(torch.autograd.Variable._execution_engine))


# ---- producing_edge ---------------------------------------------------------------------------
_linear = nn.Linear(5, 4)
_OUTPUTS = {
    "linear-2d": lambda: _linear(torch.randn(3, 5)),
    "linear-3d": lambda: _linear(torch.randn(3, 2, 5)),
    "linear-4d": lambda: _linear(torch.randn(3, 2, 2, 5)),
    "linear-3d-unsqueezed": lambda: _linear(torch.randn(3, 2, 5)).unsqueeze(0),
    "linear-3d-sliced": lambda: _linear(torch.randn(3, 2, 5))[:, :1],
    "linear-3d-transposed": lambda: _linear(torch.randn(3, 2, 5)).transpose(0, 1),
    "view-of-leaf": lambda: torch.randn(6, requires_grad=True).view(2, 3),
    "no-view": lambda: torch.randn(3, requires_grad=True) * 2,
}


@pytest.mark.parametrize("make", _OUTPUTS.values(), ids=_OUTPUTS.keys())
def test_producing_edge_fallback_picks_the_node_base_picks(make, monkeypatch):
    output = make()
    private = _compat.producing_edge(output)
    monkeypatch.setattr(torch.Tensor, "_base", property(_no_base))
    assert _compat.producing_edge(output) == private


def test_producing_edge_of_a_reshaped_linear_output_is_the_matmul():
    node, index = _compat.producing_edge(_linear(torch.randn(3, 2, 5)))
    assert node.name() == "AddmmBackward0" and index == 0


# ---- backward_running / queue_at_end_of_backward ----------------------------------------------
def _during_backward(probe):
    """(probe() outside backward, probe() from a gradient hook inside it)."""
    x = torch.randn(3, requires_grad=True)
    y = x * 2
    inside = []
    y.register_hook(lambda grad: inside.append(probe()))
    outside = probe()
    y.sum().backward()
    return outside, inside[0]


def test_backward_running_is_true_only_inside_backward():
    assert _during_backward(_compat.backward_running) == (False, True)


def test_backward_running_without_the_private_api_says_it_cannot_tell(monkeypatch):
    monkeypatch.delattr(torch._C, "_current_graph_task_id")
    assert _during_backward(_compat.backward_running) == (None, None)


@pytest.mark.parametrize("private", [True, False], ids=["private", "fallback"])
def test_queue_at_end_of_backward_runs_after_every_hook_or_says_it_cannot(private, monkeypatch):
    if not private:
        monkeypatch.setattr(torch.autograd.Variable, "_execution_engine",
                            _EngineWithoutQueueCallback(torch.autograd.Variable._execution_engine))
    events, queued = [], []
    x = torch.randn(3, requires_grad=True)
    a, b = x * 2, x * 3
    a.register_hook(lambda grad: queued.append(_compat.queue_at_end_of_backward(lambda: events.append("end"))))
    b.register_hook(lambda grad: events.append("hook"))
    (a.sum() + b.sum()).backward()
    assert queued == [private]
    assert events == (["hook", "end"] if private else ["hook"])


# ---- FisherCollector through the fallbacks ----------------------------------------------------
def _tiny_lora_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = peft.get_peft_model(transformers.BertForSequenceClassification(config),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would zero every dA
                p.normal_(0.0, 0.2)
    return model.eval()


def _batches(n_batches: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 40, (3, 6), generator=gen), "attention_mask": torch.ones(3, 6),
             "labels": torch.randint(0, 3, (3,), generator=gen)} for _ in range(n_batches)]


def _collect_lora(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> FisherCollector:
    """One context: per batch an evaluation forward without gradients, then a forward and backward."""
    with FisherCollector(model, loss_reduction="mean") as fc:
        for batch in batches:
            with torch.no_grad():
                model(**batch)
            fc.token_mask = batch["attention_mask"]
            model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return fc


def _collect_dense_in_place(model: nn.Sequential, x: torch.Tensor) -> FisherCollector:
    """The first layer's [N,T,O] output (a view of its matmul) modified in place before the loss."""
    with FisherCollector(model, layers=["0", "2"]) as fc:
        model[2](model[1](model[0](x).mul_(2.0))).square().sum().backward()
    model.zero_grad(set_to_none=True)
    return fc


def _assert_same_results(fallback: FisherCollector, private: FisherCollector) -> None:
    assert fallback.num_samples == private.num_samples
    torch.testing.assert_close(fallback.sample_scores, private.sample_scores, rtol=0, atol=0)
    assert fallback.layer_traces == private.layer_traces
    for layer, factors in private.fisher.items():
        for key, value in factors.items():
            torch.testing.assert_close(fallback.fisher[layer][key], value, rtol=0, atol=0)


def test_collector_without_private_autograd_gives_the_same_lora_fisher(request):
    model, batches = _tiny_lora_bert(), _batches(2)
    private = _collect_lora(model, batches)
    request.getfixturevalue("no_private_autograd")
    _assert_same_results(_collect_lora(model, batches), private)


def test_collector_without_private_autograd_follows_an_output_modified_in_place(request):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 2)), torch.randn(3, 4, 5)
    private = _collect_dense_in_place(model, x)
    request.getfixturevalue("no_private_autograd")
    fallback = _collect_dense_in_place(model, x)
    assert fallback.layer_traces["0"] > 0
    _assert_same_results(fallback, private)


def test_collector_without_private_autograd_ends_a_pass_that_missed_a_layer_when_read(no_private_autograd):
    # The second layer's output never reaches the loss: its gradient never arrives.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with FisherCollector(model, layers="linear") as fc:
        hidden = model[0](torch.randn(2, 4))
        model[1](hidden)
        hidden.sum().backward()
        assert fc.sample_scores.shape == (2,) and fc.num_samples == 2
    assert fc.layer_traces["0"] > 0 and fc.layer_traces["1"] == 0


def _unused_output_then_forward(model: nn.Sequential) -> None:
    hidden = model[0](torch.randn(2, 4))
    model[1](hidden)
    hidden.sum().backward()
    model[0](torch.randn(2, 4))


def _two_forwards_one_backward(model: nn.Sequential) -> None:
    first, second = model[0](torch.randn(2, 4)), model[0](torch.randn(2, 4))
    (first.sum() + second.sum()).backward()


def _reentrant_checkpointing(model: nn.Sequential) -> None:
    x = torch.randn(2, 4, requires_grad=True)
    hidden = checkpoint(model[0], x, use_reentrant=True)
    checkpoint(model[1], hidden, use_reentrant=True).sum().backward()


@pytest.mark.parametrize(("run", "message"), [
    (_unused_output_then_forward, "still awaited the gradients"),
    (_two_forwards_one_backward, "ran again before any gradient arrived"),
    (_reentrant_checkpointing, "ran without gradients"),
], ids=["unused-output-then-forward", "two-forwards-one-backward", "reentrant-checkpointing"])
def test_collector_without_private_autograd_refuses_what_it_cannot_tell_apart(run, message, no_private_autograd):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with FisherCollector(model, layers="linear"), pytest.raises(RuntimeError, match=message):
        run(model)


# ---- dlpack_converter ------------------------------------------------------------------------
def test_dlpack_converter_falls_back_to_torch_from_dlpack(monkeypatch):
    assert _compat.dlpack_converter() is torch._C._from_dlpack
    monkeypatch.delattr(torch._C, "_from_dlpack")
    assert _compat.dlpack_converter() is torch.from_dlpack


def test_decode_through_torch_from_dlpack_gives_the_same_tensors(monkeypatch):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "c": torch.zeros(0, 2).bfloat16()}
    payload = codec.encode(tensors, masks={"a": (torch.tensor([True, False, True]), 0)})
    private = codec.decode(payload)
    converter = torch._C._from_dlpack
    calls = []

    def public_from_dlpack(capsule):
        # This torch's from_dlpack is built on the private converter removed below; a torch
        # without that converter has a from_dlpack of its own.
        calls.append(capsule)
        return converter(capsule)

    monkeypatch.delattr(torch._C, "_from_dlpack")
    monkeypatch.setattr(torch, "from_dlpack", public_from_dlpack)
    fallback = codec.decode(payload)
    assert len(calls) == len(tensors)
    assert list(fallback) == list(private)
    for name, tensor in private.items():
        assert fallback[name].dtype == tensor.dtype
        torch.testing.assert_close(fallback[name], tensor, rtol=0, atol=0)
