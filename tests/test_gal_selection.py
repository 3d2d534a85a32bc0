import math

import pytest
import torch

from fibec.selection import combine_layer_scores, layer_fisher_traces, layer_sensitivity, lora_layer_names, select_gal


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


def random_batches(num: int, *, n: int = 6, t: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(num):
        lengths = torch.randint(3, t + 1, (n,), generator=g)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, 50, (n, t), generator=g) * mask
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=g),
                    "index": torch.arange(b * n, (b + 1) * n)})
    return out


@pytest.fixture(scope="module")
def model():
    return tiny_lora_llama()


def effective_weight(module) -> torch.Tensor:
    """W + s * B @ A of a peft lora.Linear (its output is linear in its input, plus bias)."""
    return module.base_layer.weight + module.scaling["default"] * module.lora_B["default"].weight @ \
        module.lora_A["default"].weight


def test_sensitivity_matches_its_definition_for_linear_layers(model):
    """For y = W_eff x + b, delta = sigma rms(x) eps gives S = rms(W_eff eps) ~ ||W_eff||_F / sqrt(O)."""
    scores = layer_sensitivity(model, random_batches(4, n=16, t=16), num_batches=4)
    modules = dict(model.named_modules())
    assert sorted(scores) == sorted(lora_layer_names(model)) and len(scores) == 4
    for name, value in scores.items():
        w = effective_weight(modules[name]).detach()
        expected = float(w.square().sum() / w.shape[0]) ** 0.5
        assert value == pytest.approx(expected, rel=0.05)


def test_sensitivity_ranks_a_layer_with_scaled_up_lora_weights_first():
    model = tiny_lora_llama()
    before = layer_sensitivity(model, random_batches(2))
    target = min(before, key=before.get)
    with torch.no_grad():
        dict(model.named_modules())[target].lora_B["default"].weight.mul_(30.0)
    after = layer_sensitivity(model, random_batches(2))
    assert max(after, key=after.get) == target and after[target] > 5 * before[target]
    assert select_gal(after, 1) == [target]
    # q_proj and v_proj of one block read the same input, which the change cannot reach.
    sibling = target.replace("v_proj", "q_proj") if target.endswith("v_proj") else target.replace("q_proj", "v_proj")
    assert after[sibling] == before[sibling]


def test_sensitivity_is_deterministic_seeded_and_restores_the_model(model):
    model.train()
    batches = random_batches(3)
    first = layer_sensitivity(model, batches, seed=1)
    assert first == layer_sensitivity(model, batches, seed=1)  # dropout 0.3 is off while ranking
    assert first != layer_sensitivity(model, batches, seed=2)
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    layer_sensitivity(model, batches)
    assert not model.training


def test_sensitivity_uses_only_num_batches_and_the_named_layers(model):
    taken = []

    def stream():
        for batch in random_batches(5):
            taken.append(batch)
            yield batch

    layers = lora_layer_names(model)[:2]
    scores = layer_sensitivity(model, stream(), layers=layers, num_batches=2)
    assert len(taken) == 2 and list(scores) == layers
    everything = layer_sensitivity(model, random_batches(5), num_batches=None)
    assert everything != layer_sensitivity(model, random_batches(5), num_batches=2)


@pytest.mark.parametrize("kwargs,arg", [({"noise_scale": 0.0}, "noise_scale"), ({"num_batches": 0}, "num_batches"),
                                        ({"layers": ["nope"]}, "layers")])
def test_sensitivity_rejects_bad_arguments(model, kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        layer_sensitivity(model, random_batches(1), **kwargs)


def test_layer_fisher_traces_sum_both_factors():
    fisher = {"l1": {"lora_A": torch.full((2, 3), 0.5), "lora_B": torch.ones(4, 2)},
              "l2": {"lora_A": torch.zeros(2, 3), "lora_B": torch.tensor([[1.0, 2.0]])},
              "dense": {"weight": torch.full((2, 2), 0.25)}}
    assert layer_fisher_traces(fisher) == {"l1": 3.0 + 8.0, "l2": 3.0, "dense": 1.0}
    with pytest.raises(TypeError, match="fisher"):
        layer_fisher_traces({"l1": torch.ones(2)})


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
