"""NeuronImportance (momentum-smoothed per-neuron Fisher) and select_neurons (top-rho neuron masks)."""
import math
from fractions import Fraction

import pytest
import torch

from fibec.selection import NeuronImportance, select_neurons


def _fisher(gen, layers=("enc.0.query", "enc.1.value"), r=3, I=11, O=7):
    return {name: {"lora_A": torch.rand(r, I, generator=gen), "lora_B": torch.rand(O, r, generator=gen)}
            for name in layers}


def test_first_update_is_taken_as_is_then_momentum_smooths():
    gen = torch.Generator().manual_seed(0)
    rounds = [_fisher(gen) for _ in range(3)]
    importance = NeuronImportance(momentum=0.75)
    for fisher in rounds:
        importance.update(fisher)
    for layer in rounds[0]:
        for factor in ("lora_A", "lora_B"):
            F1, F2, F3 = (fisher[layer][factor].double() for fisher in rounds)
            expected = 0.75 * (0.75 * F1 + 0.25 * F2) + 0.25 * F3
            torch.testing.assert_close(importance.fisher[layer][factor].double(), expected, rtol=1e-6, atol=1e-7)


def test_update_does_not_alias_the_callers_tensors():
    fisher = {"l": {"lora_A": torch.ones(2, 3), "lora_B": torch.ones(4, 2)}}
    importance = NeuronImportance(momentum=0.5)
    importance.update(fisher)
    importance.update({"l": {"lora_A": torch.zeros(2, 3), "lora_B": torch.zeros(4, 2)}})
    assert torch.equal(fisher["l"]["lora_A"], torch.ones(2, 3))
    assert torch.equal(importance.fisher["l"]["lora_A"], torch.full((2, 3), 0.5))


def test_scores_sum_columns_of_A_and_rows_of_B():
    F_A = torch.arange(12.0).view(3, 4)   # r=3, I=4
    F_B = torch.arange(10.0).view(5, 2)   # O=5, r=2
    importance = NeuronImportance()
    importance.update({"layer": {"lora_A": F_A, "lora_B": F_B.to(torch.bfloat16)}})
    scores = importance.scores["layer"]
    assert torch.equal(scores["lora_A"], torch.tensor([12.0, 15.0, 18.0, 21.0]))
    assert torch.equal(scores["lora_B"], torch.tensor([1.0, 5.0, 9.0, 13.0, 17.0]))
    assert scores["lora_B"].dtype == torch.float32


@pytest.mark.parametrize("n", [1, 2, 7, 30, 1003])
@pytest.mark.parametrize("rho", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_top_rho_keeps_ceil_rho_n_neurons_at_least_one_and_the_best_ones(n, rho):
    gen = torch.Generator().manual_seed(n)
    score = torch.randperm(n, generator=gen).float()
    masks = select_neurons({"l": {"lora_A": score, "lora_B": score.flip(0)}}, rho)["l"]
    k = max(1, math.ceil(Fraction(str(rho)) * n))  # exact: 0.1 * 30 is 3, not 3.0000000000000004
    for factor, dim in (("lora_A", 1), ("lora_B", 0)):
        mask, mask_dim = masks[factor]
        assert mask.dtype == torch.bool and mask.shape == (n,) and mask_dim == dim
        assert int(mask.sum()) == k
    chosen = masks["lora_A"][0]
    assert score[chosen].min() > score[~chosen].max() if k < n else chosen.all()


def test_ties_go_to_the_lower_index_and_selection_is_deterministic():
    score = torch.tensor([1.0, 3.0, 2.0, 3.0, 3.0, 0.0, 3.0])
    masks = select_neurons({"l": {"lora_B": score}}, 0.4)  # ceil(2.8) = 3 of the four 3.0s
    assert masks["l"]["lora_B"][0].tolist() == [False, True, False, True, True, False, False]
    again = select_neurons({"l": {"lora_B": score.clone()}}, 0.4)
    assert torch.equal(again["l"]["lora_B"][0], masks["l"]["lora_B"][0])


@pytest.mark.parametrize("per_layer", [True, False])
@pytest.mark.parametrize("flat_value", [0.0, 2.5])
def test_a_factor_with_all_equal_scores_keeps_every_neuron(per_layer, flat_value):
    """No score tells its neurons apart (peft's B = 0 makes A's Fisher 0): it stays dense, the others do not."""
    gen = torch.Generator().manual_seed(3)
    scores = {"a": {"lora_A": torch.full((11,), flat_value), "lora_B": torch.rand(7, generator=gen)},
              "b": {"lora_A": torch.rand(11, generator=gen), "lora_B": torch.full((7,), flat_value)}}
    masks = select_neurons(scores, 0.3, per_layer=per_layer)
    assert masks["a"]["lora_A"][0].all() and masks["a"]["lora_A"][1] == 1
    assert masks["b"]["lora_B"][0].all() and masks["b"]["lora_B"][1] == 0
    # The other factor of each layer is informative and keeps ceil(0.3 * n); globally it is the
    # only one of its kind left to rank, so the count is the same.
    assert int(masks["a"]["lora_B"][0].sum()) == math.ceil(0.3 * 7) == 3
    assert int(masks["b"]["lora_A"][0].sum()) == math.ceil(0.3 * 11) == 4
    assert [list(factors) for factors in masks.values()] == [list(factors) for factors in scores.values()]


@pytest.mark.parametrize("per_layer", [True, False])
def test_a_factor_with_a_single_nonzero_score_is_ranked(per_layer):
    score = torch.zeros(9)
    score[5] = 1e-30
    masks = select_neurons({"l": {"lora_A": score}, "m": {"lora_A": torch.zeros(4)}}, 0.3, per_layer=per_layer)
    # ceil(0.3 * 9) = 3: the nonzero neuron, then the tie among zeros goes to the lowest indices.
    assert masks["l"]["lora_A"][0].tolist() == [True, True, False, False, False, True, False, False, False]
    assert masks["m"]["lora_A"][0].tolist() == [True] * 4


def test_fresh_peft_lora_keeps_A_dense_until_B_moves(tiny_bert):
    """peft's B = 0 gives A an all-zero Fisher: A keeps all its columns, B gets top-rho rows."""
    from fibec.fisher import FisherCollector
    from fibec.modeling import load_classifier

    model, tokenizer = load_classifier(tiny_bert, 2)
    batch = tokenizer(["a short one", "and a somewhat longer sentence"], padding=True, return_tensors="pt")
    importance = NeuronImportance()
    with FisherCollector(model, "lora", loss_reduction="mean") as collector:
        collector.token_mask = batch["attention_mask"]
        model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    importance.update(collector.fisher)
    masks = select_neurons(importance, 0.25)
    assert masks and all(factors["lora_A"][0].all() for factors in masks.values())
    assert all(int(factors["lora_B"][0].sum()) == math.ceil(0.25 * factors["lora_B"][0].numel())
               for factors in masks.values())


def test_global_ranking_pools_each_factor_across_layers_and_keeps_one_per_tensor():
    scores = {"a": {"lora_A": torch.tensor([10.0, 9.0, 8.0, 7.0]), "lora_B": torch.tensor([1.0, 2.0])},
              "b": {"lora_A": torch.tensor([0.1, 0.2, 0.3, 0.4]), "lora_B": torch.tensor([5.0, 0.5])}}
    masks = select_neurons(scores, 0.5, per_layer=False)
    assert masks["a"]["lora_A"][0].tolist() == [True, True, True, True]       # 4 of 8 pooled lora_A scores
    assert masks["b"]["lora_A"][0].tolist() == [False, False, False, True]    # none made it: its best one
    assert masks["a"]["lora_B"][0].tolist() == [False, True]                  # 2 of 4 pooled: 5.0 and 2.0
    assert masks["b"]["lora_B"][0].tolist() == [True, False]
    per_layer = select_neurons(scores, 0.5)
    assert per_layer["b"]["lora_A"][0].tolist() == [False, False, True, True]


def test_select_neurons_accepts_the_importance_object():
    gen = torch.Generator().manual_seed(1)
    importance = NeuronImportance()
    importance.update(_fisher(gen))
    from_object, from_scores = select_neurons(importance, 0.3), select_neurons(importance.scores, 0.3)
    assert all(torch.equal(from_object[layer][f][0], from_scores[layer][f][0])
               for layer in importance.fisher for f in ("lora_A", "lora_B"))


def test_state_dict_round_trip_continues_identically():
    gen = torch.Generator().manual_seed(2)
    rounds = [_fisher(gen) for _ in range(4)]
    straight = NeuronImportance(0.6)
    for fisher in rounds:
        straight.update(fisher)
    first = NeuronImportance(0.6)
    for fisher in rounds[:2]:
        first.update(fisher)
    resumed = NeuronImportance()
    resumed.load_state_dict(first.state_dict())
    assert resumed.momentum == 0.6
    for fisher in rounds[2:]:
        resumed.update(fisher)
    for layer in straight.fisher:
        for factor in ("lora_A", "lora_B"):
            assert torch.equal(straight.fisher[layer][factor], resumed.fisher[layer][factor])


@pytest.mark.parametrize("call,error,message", [
    (lambda: NeuronImportance(momentum=1.0), ValueError, "momentum must be in"),
    (lambda: NeuronImportance(momentum=-0.1), ValueError, "momentum must be in"),
    (lambda: NeuronImportance().update([torch.ones(2, 2)]), TypeError, "fisher must be a dict"),
    (lambda: NeuronImportance().update({"l": {"bias": torch.ones(2, 2)}}), ValueError, "has key 'bias'"),
    (lambda: NeuronImportance().update({"l": {"lora_A": torch.ones(2)}}), ValueError, "must be a 2-D float tensor"),
    (lambda: NeuronImportance().update({"l": torch.ones(2, 2)}), TypeError, r"fisher\['l'\] must be a dict"),
    (lambda: select_neurons({"l": {"lora_A": torch.ones(3)}}, 0.0), ValueError, "rho must be in"),
    (lambda: select_neurons({"l": {"lora_A": torch.ones(3)}}, 1.5), ValueError, "rho must be in"),
    (lambda: select_neurons({"l": {"lora_A": torch.ones(3)}}, float("nan")), ValueError, "rho must be"),
    (lambda: select_neurons({"l": {"lora_A": torch.ones(3, 2)}}, 0.5), ValueError, "must be a non-empty 1-D"),
    (lambda: select_neurons({"l": {"lora_A": torch.tensor([1.0, float("nan")])}}, 0.5), ValueError, "contains NaN"),
    (lambda: select_neurons([1.0], 0.5), TypeError, "importance_or_scores must be"),
])
def test_bad_input_raises_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_changing_shape_between_updates_is_rejected_and_leaves_state_intact():
    importance = NeuronImportance()
    importance.update({"l": {"lora_A": torch.ones(2, 3)}})
    with pytest.raises(ValueError, match=r"has shape \(2, 4\), earlier updates had \(2, 3\)"):
        importance.update({"m": {"lora_A": torch.ones(1, 1)}, "l": {"lora_A": torch.ones(2, 4)}})
    assert list(importance.fisher) == ["l"]
