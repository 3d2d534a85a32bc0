import math

import numpy as np
import pytest
import torch
from host_reads import counting_host_reads, within

from fibec.curriculum import (PACING_KINDS, CurriculumSampler, DifficultyTracker, difficulty_scores, pacing_fraction,
                              within_label_rank)


# ---- pacing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", PACING_KINDS)
@pytest.mark.parametrize("lambda0,full_at", [(0.2, 5), (1.0, 3), (0.05, 1), (0.5, 13)])
def test_pacing_starts_at_lambda0_reaches_one_at_full_at_and_never_decreases(kind, lambda0, full_at):
    values = [pacing_fraction(kind, t, lambda0=lambda0, full_at=full_at) for t in range(full_at + 5)]
    assert values[0] == pytest.approx(lambda0)
    assert all(v == 1.0 for v in values[full_at:])
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(lambda0 - 1e-12 <= v <= 1.0 for v in values)
    if lambda0 < 1 and full_at > 1:
        assert values[full_at - 1] < 1.0


@pytest.mark.parametrize("kind,t,expected", [
    ("linear", 2, 0.2 + 0.8 * 2 / 8),
    ("root", 2, math.sqrt(0.04 + 0.96 * 2 / 8)),
    ("geometric", 2, 0.2 ** (1 - 2 / 8)),
    ("step", 1, 0.2),                 # floor(4 * 1/8) = 0
    ("step", 2, 0.2 + 0.8 * 1 / 4),   # floor(4 * 2/8) = 1
    ("step", 7, 0.2 + 0.8 * 3 / 4),
])
def test_pacing_exact_values(kind, t, expected):
    assert pacing_fraction(kind, t, lambda0=0.2, full_at=8) == pytest.approx(expected, rel=1e-12)


def test_pacing_step_count_is_configurable():
    values = [pacing_fraction("step", t, lambda0=0.1, full_at=10, steps=2) for t in range(11)]
    assert sorted(set(values)) == pytest.approx([0.1, 0.55, 1.0])


def test_pacing_root_is_ahead_of_linear_and_geometric_behind():
    for t in range(1, 10):
        lin = pacing_fraction("linear", t, lambda0=0.2, full_at=10)
        assert pacing_fraction("root", t, lambda0=0.2, full_at=10) > lin > pacing_fraction("geometric", t,
                                                                                          lambda0=0.2, full_at=10)


@pytest.mark.parametrize("kwargs,arg", [
    ({"kind": "cosine"}, "kind"), ({"lambda0": 0.0}, "lambda0"), ({"lambda0": 1.5}, "lambda0"),
    ({"full_at": 0}, "full_at"), ({"round_idx": -1}, "round_idx"), ({"steps": 0}, "steps"),
    ({"lambda0": float("nan")}, "lambda0"),
])
def test_pacing_rejects_bad_arguments(kwargs, arg):
    args = {"kind": "linear", "round_idx": 0, "lambda0": 0.5, "full_at": 4, "steps": 4} | kwargs
    with pytest.raises(ValueError, match=arg) as err:
        pacing_fraction(args.pop("kind"), args.pop("round_idx"), **args)
    if arg == "kind":
        assert all(k in str(err.value) for k in PACING_KINDS)


# ---- sampler -----------------------------------------------------------------------------------

def test_sampler_draws_only_from_the_easiest_fraction():
    n = 103
    scores = torch.from_numpy(np.random.default_rng(0).permutation(n).astype(np.float32))
    sampler = CurriculumSampler(scores, batch_size=8, pacing="linear", lambda0=0.25, full_at=4, seed=1)
    for t in range(6):
        m = math.ceil(sampler.fraction(t) * n)
        easiest = set(torch.argsort(scores)[:m].tolist())
        batches = sampler.batches(t, 30)
        assert len(batches) == 30
        drawn = [i for b in batches for i in b]
        assert set(drawn) == easiest  # only the pool, and (30 * 8 >= m) all of it
        assert all(len(b) == len(set(b)) <= 8 for b in batches)
    assert math.ceil(0.25 * n) == len(sampler.pool(0)) == 26
    assert len(sampler.pool(4)) == n


def test_sampler_covers_pool_once_per_pass_then_reshuffles():
    sampler = CurriculumSampler(torch.arange(20.0), batch_size=3, lambda0=0.5, full_at=2)
    batches = sampler.batches(0, 8)  # pool of 10: passes of 4 batches (3, 3, 3, 1)
    assert [len(b) for b in batches] == [3, 3, 3, 1, 3, 3, 3, 1]
    first, second = [i for b in batches[:4] for i in b], [i for b in batches[4:] for i in b]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second


def test_sampler_is_shuffled_and_seeded_by_seed_and_round():
    scores = torch.arange(64.0)
    sampler = CurriculumSampler(scores, batch_size=64, lambda0=1.0, full_at=1, seed=7)
    a = sampler.batches(3, 1)[0]
    assert a == CurriculumSampler(scores, batch_size=64, lambda0=1.0, full_at=1, seed=7).batches(3, 1)[0]
    assert a != sorted(a)
    assert a != sampler.batches(4, 1)[0]
    assert a != CurriculumSampler(scores, batch_size=64, lambda0=1.0, full_at=1, seed=8).batches(3, 1)[0]


def test_sampler_ties_break_by_index_and_nan_counts_as_hardest():
    scores = torch.tensor([1.0, 0.0, float("nan"), 1.0, 0.0, 1.0])
    sampler = CurriculumSampler(scores, batch_size=2, lambda0=0.5, full_at=3)
    assert sampler.pool(0) == [1, 4, 0]
    assert sampler.pool(3) == [1, 4, 0, 3, 5, 2]


def test_sampler_update_scores_changes_the_pool():
    sampler = CurriculumSampler(torch.arange(10.0), batch_size=2, lambda0=0.3, full_at=5)
    assert sampler.pool(0) == [0, 1, 2]
    sampler.update_scores(-torch.arange(10.0))
    assert sampler.pool(0) == [9, 8, 7]
    with pytest.raises(ValueError, match="scores"):
        sampler.update_scores(torch.arange(9.0))


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        CurriculumSampler(torch.ones(4), batch_size=0, lambda0=0.3, full_at=3)
    with pytest.raises(ValueError, match="kind"):
        CurriculumSampler(torch.ones(4), batch_size=2, lambda0=0.3, full_at=3, pacing="cosine")
    with pytest.raises(ValueError, match="full_at"):
        CurriculumSampler(torch.ones(4), batch_size=2, lambda0=0.3, full_at=0)
    with pytest.raises(ValueError, match="num_batches"):
        CurriculumSampler(torch.ones(4), batch_size=2, lambda0=0.3, full_at=3).batches(0, -1)


# ---- difficulty scores -------------------------------------------------------------------------

def tiny_lora_bert(vocab_size: int, *, dropout: float = 0.1, seed: int = 0):
    """A 2-layer BERT classifier (hidden 32) with random LoRA A and B on query/value."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=3, lora_alpha=6, lora_dropout=dropout,
                      target_modules=["query", "value"], init_lora_weights=False)
    return get_peft_model(BertForSequenceClassification(config), lora)


@pytest.fixture(scope="module")
def task(tokenizer):
    from fibec.data import default_task, make_batches

    data, _ = default_task(seed=0, n_train=13, n_test=2)
    return data, lambda: make_batches(data, tokenizer, None, 5, max_length=24)


def lora_params(model):
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def per_sample_sqnorm_oracle(model, batches):
    """||d loss_n / d theta_LoRA||^2 per sample via torch.func.grad on one-sample batches."""
    from torch.func import functional_call, grad

    from fibec.data import model_inputs

    params = {n: p.detach() for n, p in lora_params(model).items()}

    def loss(p, inputs):
        return functional_call(model, p, args=(), kwargs=inputs, strict=False).loss

    out = {}
    model.eval()
    for batch in batches:
        inputs = model_inputs(batch)
        for row, index in enumerate(batch["index"].tolist()):
            one = {k: v[row:row + 1] for k, v in inputs.items()}
            grads = grad(loss)(params, one)
            out[index] = sum(float(g.detach().double().square().sum()) for g in grads.values())
    return torch.tensor([out[i] for i in sorted(out)], dtype=torch.float64)


def test_difficulty_scores_equal_per_sample_squared_gradient_norms(task, tokenizer):
    data, batches = task
    model = tiny_lora_bert(len(tokenizer))
    scores = difficulty_scores(model, batches())
    expected = per_sample_sqnorm_oracle(tiny_lora_bert(len(tokenizer)), batches())
    assert scores.shape == (len(data),) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and (scores > 0).all()
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=1e-10)


def test_difficulty_scores_land_at_batch_index_positions(task, tokenizer):
    from fibec.data import make_batches

    data, batches = task
    model = tiny_lora_bert(len(tokenizer))
    in_order = difficulty_scores(model, batches())
    shuffled = difficulty_scores(model, make_batches(data, tokenizer, None, 4, max_length=24, shuffle=True, seed=3))
    torch.testing.assert_close(shuffled, in_order, rtol=1e-5, atol=0)
    partial = difficulty_scores(model, make_batches(data, tokenizer, [0, 5], 2, max_length=24), num_samples=len(data))
    assert torch.isnan(partial[[1, 2, 3, 4]]).all()
    torch.testing.assert_close(partial[[0, 5]], in_order[[0, 5]], rtol=1e-5, atol=0)


def test_difficulty_scores_read_the_scores_back_once_not_once_a_batch(task, tokenizer):
    """A read of a device tensor on the host waits for a GPU: the scoring pass reads its scores back
    once, whatever its number of batches (counted in everything the pass calls, the model
    included; the batches' int64 indices are the host's own)."""
    from fibec.data import make_batches

    data, _ = task
    model = tiny_lora_bert(len(tokenizer))
    per_batch_size = {}
    for batch_size in (2, 7):
        with counting_host_reads(lambda frame, tensor: within(frame, "difficulty_scores")
                                 and tensor.dtype != torch.int64) as reads:
            difficulty_scores(model, make_batches(data, tokenizer, None, batch_size, max_length=24))
        per_batch_size[batch_size] = reads
    # Everything the pass reads (the scores in one piece, the layer traces once) whatever its batches.
    assert per_batch_size[2] == per_batch_size[7]
    assert [n for name, n in per_batch_size[2] if name == "cpu"] == [len(data)]


def test_difficulty_scores_are_deterministic_restore_mode_and_grads(task, tokenizer):
    _, batches = task
    model = tiny_lora_bert(len(tokenizer), dropout=0.5)
    model.train()
    params = lora_params(model)
    first_name = next(iter(params))
    params[first_name].grad = torch.full_like(params[first_name], 3.0)
    first = difficulty_scores(model, batches())
    second = difficulty_scores(model, batches())
    assert torch.equal(first, second)  # dropout 0.5 is off while scoring
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(params[first_name].grad, torch.full_like(params[first_name], 3.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != first_name)


def test_difficulty_scores_return_fisher_matches_scores(task, tokenizer):
    from fibec.modeling import AdapterLayout

    _, batches = task
    model = tiny_lora_bert(len(tokenizer))
    scores, fisher, traces = difficulty_scores(model, batches(), return_fisher=True)
    assert sorted(fisher) == sorted(traces) == sorted(AdapterLayout.of(model).layers)
    layer = next(iter(fisher))
    a = dict(model.named_modules())[layer].lora_A["default"].weight
    assert fisher[layer]["lora_A"].shape == a.shape
    # Sum over samples of the Fisher trace == sum of the per-layer traces == sum of the diagonals.
    total = float(scores.double().sum())
    assert sum(traces.values()) == pytest.approx(total, rel=1e-4)
    for layer, factors in fisher.items():  # each layer's trace is the sum of its diagonal Fisher
        assert traces[layer] == pytest.approx(float(sum(f.double().sum() for f in factors.values())), rel=1e-4)


# ---- adaptive re-scoring -------------------------------------------------------------------------

def order_of(tracker: DifficultyTracker) -> list[int]:
    return np.argsort(tracker.ranking(), kind="stable").tolist()


def test_tracker_orders_unscored_samples_by_length_then_index():
    tracker = DifficultyTracker([5, 3, 9, 3, 1])
    assert order_of(tracker) == [4, 1, 3, 0, 2]
    assert sorted(tracker.ranking().tolist()) == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_tracker_places_unscored_samples_at_the_score_quantile_of_their_length():
    lengths = [10, 20, 30, 40, 50, 25, 45]
    tracker = DifficultyTracker(lengths)
    # Scored: lengths 10..50 with scores that fall as length grows (so length alone would mislead).
    tracker.observe([0, 1, 2, 3, 4], [5.0, 4.0, 3.0, 2.0, 1.0])
    ranking = tracker.ranking()
    # Length 25 sits between the scored 20 and 30, at quantile 0.4, so its estimate is the
    # 0.4-quantile of the scores (2.6): between the samples scored 3.0 and 2.0.
    assert ranking[3] < ranking[5] < ranking[2]
    # Length 45 is at quantile 0.8: estimate 4.2, between the scores 4.0 and 5.0.
    assert ranking[1] < ranking[6] < ranking[0]


def test_tracker_maps_lengths_within_each_group_and_ignores_non_finite_scores():
    tracker = DifficultyTracker([1, 2, 3, 4], groups=[0, 0, 1, 1])
    tracker.observe(torch.tensor([0, 1, 2]), torch.tensor([9.0, float("nan"), float("inf")]))
    assert tracker.scored.tolist() == [True, False, False, False]
    # Group 1 has no score yet: its samples keep their length order among themselves.
    ranking = tracker.ranking()
    assert ranking[2] < ranking[3]
    with pytest.raises(ValueError, match="indices must lie in range"):
        tracker.observe([4], [1.0])
    with pytest.raises(ValueError, match="entries"):
        tracker.observe([0, 1], [1.0])


def test_tracker_state_round_trips():
    tracker = DifficultyTracker([3, 1, 2], groups=[1, 0, 1])
    tracker.observe([1], [0.5])
    restored = DifficultyTracker([1, 1, 1])
    restored.load_state_dict(tracker.state_dict())
    assert np.array_equal(restored.ranking(), tracker.ranking())
    assert np.array_equal(restored.scored, tracker.scored)


def test_within_label_rank_interleaves_labels_by_their_own_order():
    ranked = within_label_rank(np.array([5.0, 1.0, 3.0, 100.0, 200.0]), [0, 0, 0, 1, 1])
    np.testing.assert_allclose(ranked, [5 / 6, 1 / 6, 3 / 6, 1 / 4, 3 / 4])


def test_sampler_state_round_trips_and_gives_the_same_batches():
    sampler = CurriculumSampler(np.array([3.0, 1.0, 2.0, 0.5, 9.0]), batch_size=2, pacing="root", lambda0=0.4,
                                full_at=3, seed=7)
    restored = CurriculumSampler(np.zeros(5), batch_size=1, lambda0=1.0, full_at=1)
    restored.load_state_dict(sampler.state_dict())
    assert all(restored.batches(t, 3) == sampler.batches(t, 3) for t in range(4))
    bad = {**sampler.state_dict(), "order": torch.tensor([0, 0, 1, 2, 3])}
    with pytest.raises(ValueError, match="permutation"):
        restored.load_state_dict(bad)
