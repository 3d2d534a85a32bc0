"""FibecFed on Flower 1.41 (Message API): the same Coordinator, Server and Client, over a SuperLink.

`server_app` runs `FibecFedStrategy.from_config` (the server side of one method's run, built from
the run config as the in-process engine builds it: `runner.open_coordinator`, records, a checkpoint
every round, resume) through Flower's stock `Strategy.start`: the strategy's hooks build messages
and read replies of the engine-neutral `Coordinator`'s steps; they never send. `client_app` builds
only its own node's `Client` and restores it through `Client.load_state_dict` before every message.
Every party draws everything from the run config and its seed, so a Flower run reproduces the
in-process engine's records and weights.

Run config: `FedConfig.to_run_config()` of a config naming one method (checked by
`FedConfig.from_mapping`; ConfigError names a bad key); `resume=true` continues the run saved
under `out`. Node config: `partition-id` (0..clients-1), optionally `num-partitions` (must equal
`clients`) and `state-dir` (where the node keeps its client's state for a resumed run; default
`<out>/checkpoints`, so that on one machine it lies beside the server's checkpoint).

Messages (ArrayRecord / ConfigRecord / MetricRecord only, nothing pickled; bytes travel as one
1-D uint8 Array each, so Flower's sizes count them as they are):
  query.partition     which partition does the node hold?          reply: partition-id
  train.scores        layer scores on the initial weights          reply: scores bytes, num-examples
  train               the plan and the server's payload bytes      reply: update bytes, scores bytes, metrics
  query.layer_values  values of the layers entering the GAL        reply: values bytes, num-examples
  evaluate            what every client holds from the server      reply: correct, loss-sum, count on its share
A node that replies with an error, or not within `round-timeout`, is left out of the rest of its
round and recorded under the round's "failed"; the round goes on with the others, and
`min_updates` decides whether it still aggregates. (Every node must answer the partition query
when the run starts.)
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from .. import codec
from .._checks import check_int
from ..config import ConfigError, FedConfig
from . import assembly, checkpoint, runner
from .client import Client, ClientSettings, ClientUpdate, RoundPlan
from .evaluation import Evaluator, Score
from .methods import METHODS
from .rounds import Coordinator
from .server import AggregateResult, Server
from .transport import personal_score

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
STATE_DIR = "state-dir"

PARTITION_QUERY = "query.partition"
SCORES = "train.scores"
TRAIN = "train"
LAYER_VALUES = "query.layer_values"
EVALUATE = "evaluate"

_BYTES = "fibec.bytes"  # ArrayRecord of uint8 Arrays: "payload", "scores", "values"
_TASK = "fibec.task"  # ConfigRecord: "round" (the server's 0-based round) and the plan or layers
_REPLY = "fibec.reply"  # ConfigRecord: partition-id
_METRICS = "fibec.metrics"  # MetricRecord
# Context.state between messages: the client's state_dict() as tensors plus its JSON skeleton.
_CLIENT_TENSORS = "fibec.client.tensors"
_CLIENT_STATE = "fibec.client.state"  # ConfigRecord: "skeleton" (JSON), "round" (1-based round that wrote it)
# A node keeps its client's last two states on disk, one folder per round that wrote it.
_SAVED_ROUND = "after-round-"
_KEPT_ON_DISK = 2

log = logging.getLogger(__name__)


# ---- settings ------------------------------------------------------------------------------------

def fed_config(run_config: Mapping[str, object]) -> FedConfig:
    """The run's FedConfig from Flower's run config; ConfigError naming a bad key or value."""
    cfg = FedConfig.from_mapping(dict(run_config), source="run config")
    if len(cfg.methods) != 1:
        raise ConfigError(f"run config: method must name one method per Flower run, got {cfg.method!r}")
    return cfg


def partition_id(node_config: Mapping[str, object], clients: int) -> int:
    """The partition a node holds, from its node config; ValueError naming the setting."""
    if PARTITION_ID not in node_config:
        raise ValueError(f"node config has no {PARTITION_ID!r} (start the SuperNode with "
                         f"--node-config 'partition-id=0 num-partitions={clients}')")
    try:  # a node config is a file's text, not a call: every bad value is a ValueError
        pid = check_int(f"node config: {PARTITION_ID}", node_config[PARTITION_ID], low=0, high=clients - 1)
    except TypeError as err:
        raise ValueError(str(err)) from None
    if NUM_PARTITIONS in node_config and node_config[NUM_PARTITIONS] != clients:
        raise ValueError(f"node config: {NUM_PARTITIONS}={node_config[NUM_PARTITIONS]!r} differs from the "
                         f"run's clients={clients}")
    return pid


def node_state_dir(node_config: Mapping[str, object], cfg: FedConfig, pid: int) -> Path:
    """Where a node keeps its client's state: <state-dir or out/checkpoints>/<method>/clients/<pid>."""
    root = node_config.get(STATE_DIR, "")
    if not isinstance(root, str):
        raise ValueError(f"node config: {STATE_DIR} must be a path string, got {root!r}")
    return Path(root or Path(cfg.out) / "checkpoints") / cfg.method / "clients" / str(pid)


# ---- bytes and plans in records ------------------------------------------------------------------

def bytes_array(payload: bytes) -> Array:
    """`payload` as a 1-D uint8 Array (numpy serialisation, never pickled)."""
    return Array(np.frombuffer(payload, dtype=np.uint8))


def array_bytes(array: Array) -> bytes:
    """The bytes of a 1-D uint8 Array; PayloadError for anything else."""
    try:
        values = array.numpy()
    except (TypeError, ValueError) as err:
        raise codec.PayloadError(f"not a numpy Array: {err}") from None
    if values.dtype != np.uint8 or values.ndim != 1:
        raise codec.PayloadError(f"expected a 1-D uint8 array, got {values.dtype} of shape {values.shape}")
    return values.tobytes()


def _plan_task(plan: RoundPlan) -> ConfigRecord:
    return ConfigRecord({"round": plan.round_idx, "sent": list(plan.sent), "dense": list(plan.dense),
                         "want-scores": plan.want_scores})


def _plan_of(task: ConfigRecord) -> RoundPlan:
    return RoundPlan(int(task["round"]), tuple(task["sent"]), tuple(task["dense"]), bool(task["want-scores"]))


# ---- client state in records and on disk ---------------------------------------------------------

def _copied(state: dict) -> dict:
    """A deep copy of a client state_dict (loading one may keep references to its arrays)."""
    skeleton, tensors = checkpoint.flatten(state)
    return checkpoint.unflatten(skeleton, {path: t.clone() for path, t in tensors.items()})


def store_client_state(records: RecordDict, round_done: int, state: dict) -> None:
    """Put a client's state_dict (written in 1-based round `round_done`) into `records`."""
    skeleton, tensors = checkpoint.flatten(state)
    records[_CLIENT_TENSORS] = ArrayRecord({path: Array(t.numpy()) for path, t in tensors.items()})
    records[_CLIENT_STATE] = ConfigRecord({"skeleton": json.dumps(skeleton), "round": round_done})


def stored_client_state(records: RecordDict) -> tuple[int, dict] | None:
    """(round that wrote it, state_dict) kept by `store_client_state`; None if there is none."""
    if _CLIENT_STATE not in records:
        return None
    tensors = {path: torch.from_numpy(array.numpy().copy()) for path, array in records[_CLIENT_TENSORS].items()}
    meta = records[_CLIENT_STATE]
    return int(meta["round"]), checkpoint.unflatten(json.loads(meta["skeleton"]), tensors)


def _rounds_on_disk(folder: Path) -> list[int]:
    return sorted(int(p.name[len(_SAVED_ROUND):]) for p in folder.glob(f"{_SAVED_ROUND}*")
                  if p.name[len(_SAVED_ROUND):].isdigit())


def save_on_disk(folder: Path, round_done: int, state: dict) -> None:
    """Keep a client's state written in round `round_done` under `folder`, with the one before it.

    Two are kept because the server may be one round behind: it checkpoints after a round ends, so
    a node that trained in the round a crash interrupted has already saved that round's state.
    """
    checkpoint.save(folder / f"{_SAVED_ROUND}{round_done:04d}", round_done, state)
    for old in _rounds_on_disk(folder)[:-_KEPT_ON_DISK]:
        shutil.rmtree(folder / f"{_SAVED_ROUND}{old:04d}")


def saved_on_disk(folder: Path, rounds_done: int) -> tuple[int, dict] | None:
    """The latest state under `folder` written in a round the server has finished (<= rounds_done)."""
    finished = [r for r in _rounds_on_disk(folder) if r <= rounds_done]
    if not finished:
        return None
    return checkpoint.load(folder / f"{_SAVED_ROUND}{finished[-1]:04d}")


# ---- ClientApp -----------------------------------------------------------------------------------

@dataclass
class _Party:
    """What one node builds for its partition: the model, its client, the evaluation shares."""

    model: torch.nn.Module
    client: Client
    evaluator: Evaluator
    initial: dict  # the client's state_dict before any round


def _build_party(cfg: FedConfig, pid: int) -> _Party:
    data = assembly.load_run_data(cfg)
    model, tokenizer, layout, initial = assembly.RunModel(cfg, data.train.num_labels).fresh()
    client = Client(pid, data.client_data(pid), tokenizer, layout, initial, ClientSettings.of(cfg),
                    METHODS[cfg.method])
    return _Party(model, client, assembly.build_evaluator(cfg, data, tokenizer), client.state_dict())


class _Parties:
    """The parties one ClientApp has built, by (run, run config, partition); only the latest run's.

    A SuperNode may run every message in a fresh process, where each message builds its party;
    where messages share a process (a loopback grid, Flower's in-process modes) it is built once.
    The client's state is restored before every message either way, so keeping it changes no result.
    """

    def __init__(self) -> None:
        self._built: dict[tuple[int, str, int], _Party] = {}

    def get(self, context: Context, cfg: FedConfig, pid: int) -> _Party:
        key = (context.run_id, json.dumps(dict(context.run_config), sort_keys=True), pid)
        if key not in self._built:
            self._built = {k: party for k, party in self._built.items() if k[:2] == key[:2]}
            self._built[key] = _build_party(cfg, pid)
            log.info("partition %d: built its model and client for run %d", pid, context.run_id)
        return self._built[key]


def _client_state(context: Context, cfg: FedConfig, pid: int, rounds_done: int,
                  party: _Party) -> tuple[int, dict]:
    """(round that wrote it, state) this node's client continues from.

    Within a run, the node's Context.state. A run's first message to the node: the state saved on
    disk after the server's last finished round when resuming; else the initial state (and what an
    earlier run left on disk is dropped, so that a later resume cannot pick it up).
    """
    stored = stored_client_state(context.state)
    if stored is not None:
        return stored
    folder = node_state_dir(context.node_config, cfg, pid)
    if cfg.resume:
        saved = saved_on_disk(folder, rounds_done)
        if saved is not None:
            return saved
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return 0, _copied(party.initial)


def _serve(parties: _Parties, msg: Message, context: Context,
           work: Callable[[_Party, ConfigRecord], RecordDict], *, trains: bool) -> Message:
    """Restore this node's client, run `work(party, task) -> reply content`, keep the client's state
    (in Context.state, and on disk when `trains`: the message changed it)."""
    cfg = fed_config(context.run_config)
    pid = partition_id(context.node_config, cfg.clients)
    task = msg.content[_TASK]
    rounds_done = int(task["round"])
    party = parties.get(context, cfg, pid)
    with runner.torch_settings(cfg):
        written_in, state = _client_state(context, cfg, pid, rounds_done, party)
        party.client.load_state_dict(state)
        content = work(party, task)
        if trains:
            written_in, state = rounds_done + 1, party.client.state_dict()
            save_on_disk(node_state_dir(context.node_config, cfg, pid), written_in, state)
    if trains or _CLIENT_STATE not in context.state:
        store_client_state(context.state, written_in, state)
    return Message(content, reply_to=msg)


def _weighted_reply(name: str, payload: bytes, client: Client) -> RecordDict:
    """One payload named `name` and the client's sample count, its weight (read by `_weighted_bytes`)."""
    return RecordDict({_BYTES: ArrayRecord({name: bytes_array(payload)}),
                       _METRICS: MetricRecord({"num-examples": len(client)})})


def make_client_app() -> ClientApp:
    """fibec's ClientApp: it answers the strategy's five message types (see the module docstring).

    Each app keeps the parties it built (`_Parties`); a new app starts with none, as a fresh process.
    """
    app = ClientApp()
    parties = _Parties()

    @app.query("partition")
    def answer_partition(msg: Message, context: Context) -> Message:
        """The partition this node holds (from its node config alone). The node builds its party
        now, while the server meets the nodes: where messages share a process (fibec's worker) a
        node first sampled in a later round would otherwise build its model inside that round."""
        cfg = fed_config(context.run_config)
        pid = partition_id(context.node_config, cfg.clients)
        parties.get(context, cfg, pid)
        return Message(RecordDict({_REPLY: ConfigRecord({PARTITION_ID: pid})}), reply_to=msg)

    @app.train("scores")
    def answer_scores(msg: Message, context: Context) -> Message:
        """Layer scores on the initial weights, for the first GAL (Client.initial_scores)."""
        def work(party: _Party, task: ConfigRecord) -> RecordDict:
            return _weighted_reply("scores", party.client.initial_scores(party.model), party.client)

        return _serve(parties, msg, context, work, trains=True)

    @app.train()
    def answer_train(msg: Message, context: Context) -> Message:
        """Client.fit on the server's payload and plan: the update bytes and metrics."""
        def work(party: _Party, task: ConfigRecord) -> RecordDict:
            update = party.client.fit(party.model, array_bytes(msg.content[_BYTES]["payload"]), _plan_of(task))
            return RecordDict({_BYTES: ArrayRecord({"payload": bytes_array(update.payload),
                                                    "scores": bytes_array(update.scores)}),
                               _METRICS: MetricRecord({"num-examples": update.num_samples, **update.metrics})})

        return _serve(parties, msg, context, work, trains=True)

    @app.query("layer_values")
    def answer_layer_values(msg: Message, context: Context) -> Message:
        """The current values of the layers entering the GAL (Client.layer_values)."""
        def work(party: _Party, task: ConfigRecord) -> RecordDict:
            return _weighted_reply("values", party.client.layer_values(tuple(task["layers"])), party.client)

        return _serve(parties, msg, context, work, trains=False)

    @app.evaluate()
    def answer_evaluate(msg: Message, context: Context) -> Message:
        """This client's model (its own layers + what every client holds from the server) on its share."""
        def work(party: _Party, task: ConfigRecord) -> RecordDict:
            shared = codec.decode(array_bytes(msg.content[_BYTES]["payload"]))
            score = personal_score(party.model, party.client, shared, party.evaluator)
            return RecordDict({_METRICS: MetricRecord({"correct": score.correct, "loss-sum": score.loss_sum,
                                                       "count": score.count})})

        return _serve(parties, msg, context, work, trains=False)

    return app


client_app = make_client_app()


# ---- the strategy --------------------------------------------------------------------------------

def _examples_and_metrics(content: RecordDict) -> tuple[int, dict[str, int | float]]:
    """(num-examples, the other metrics) of a reply."""
    metrics = dict(content[_METRICS])
    return int(metrics.pop("num-examples")), metrics


def _weighted_bytes(name: str) -> Callable[[RecordDict], tuple[bytes, float]]:
    """Reads (the bytes named `name`, weight = num-examples) from a reply."""
    def read(content: RecordDict) -> tuple[bytes, float]:
        return array_bytes(content[_BYTES][name]), float(_examples_and_metrics(content)[0])

    return read


def _read_update(content: RecordDict) -> tuple[bytes, bytes, int, dict[str, int | float]]:
    num_samples, metrics = _examples_and_metrics(content)
    return array_bytes(content[_BYTES]["payload"]), array_bytes(content[_BYTES]["scores"]), num_samples, metrics


def _read_score(content: RecordDict) -> Score:
    metrics = content[_METRICS]
    return Score(float(metrics["correct"]), float(metrics["loss-sum"]), int(metrics["count"]))


def _read_partition(content: RecordDict) -> int:
    return int(content[_REPLY][PARTITION_ID])


@dataclass(frozen=True)
class Exchange:
    """One message of `message_type` to the node of each of `partitions`, and how to read a reply."""

    message_type: str
    partitions: tuple[int, ...]
    content: RecordDict
    read: Callable[[RecordDict], object]


# A FibecFed round is at most four exchanges (layer scores in the first round, train, the values of
# layers entering the GAL, the personalised evaluation): the train and the evaluate step of two
# Flower rounds. The first Flower round asks every node which partition it holds.
FLOWER_ROUNDS_PER_ROUND = 2
_SLOTS_PER_ROUND = 2 * FLOWER_ROUNDS_PER_ROUND


class FibecFedStrategy(Strategy):
    """FibecFed's rounds as a flwr Strategy, for a stock `Strategy.start` on any Grid.

        strategy = FibecFedStrategy.from_config(cfg)          # or from an open Coordinator
        try:
            strategy.start(grid, strategy.global_arrays(), num_rounds=strategy.flower_rounds(),
                           timeout=strategy.timeout)
        finally:
            strategy.close()

    The hooks only build messages and read replies; Strategy.start sends them. Flower round 1 waits
    (up to `timeout`) for `cfg.clients` nodes and asks each which partition it holds. Each FibecFed
    round then takes the next two Flower rounds: its exchanges (`Exchange`, from `_round`, a
    generator that steps the run's `Coordinator` as the in-process engine's `run_rounds` does) fill
    their train and evaluate steps in order, and steps left over send nothing. The round's record and
    checkpoint are written as its last exchange is read (the Coordinator evaluates the global model),
    and the final global state is saved after the last round. Every message's group id is its
    FibecFed round (1-based).

    A node that fails, or does not reply within `timeout`, is left out of the rest of its round and
    recorded under the round's "failed"; so is a partition no node holds.
    """

    def __init__(self, coordinator: Coordinator, timeout: float) -> None:
        self.coordinator = coordinator
        self.timeout = timeout
        self.nodes: dict[int, int] | None = None  # partition -> node id, once the nodes have answered
        self._steps: Generator[Exchange, dict, dict] | None = None  # the open FibecFed round
        self._pending: Exchange | None = None
        self._asked: dict[int, int] = {}  # node id -> partition of the messages in flight
        self._queried: list[int] = []  # the nodes asked which partition they hold
        self._failures: dict[int, str] = {}

    @classmethod
    def from_config(cls, cfg: FedConfig) -> "FibecFedStrategy":
        """The server side of `cfg`'s one-method run, built as the in-process engine builds it:
        records in metrics_<method>.jsonl and a checkpoint every round under `cfg.out`; with
        `cfg.resume`, continued from that checkpoint. ConfigError if `out` holds a run and `resume`
        is not set."""
        if len(cfg.methods) != 1:
            raise ConfigError(f"method must name one method per Flower run, got {cfg.method!r}")
        method = cfg.method
        directory = runner.checkpoint_dir(Path(cfg.out), method)
        if not cfg.resume and checkpoint.exists(directory):
            raise ConfigError(f"run config: out={cfg.out!r} already holds a run of {method} ({directory}); "
                              f"set resume=true to continue it, or choose another out")
        saved = runner.saved_state(cfg, method)
        if saved is not None and saved["clients"]:  # the nodes could not take their clients' states from it
            raise checkpoint.CheckpointError(f"{directory / checkpoint.STATE_FILE} holds every client's state: "
                                             f"the in-process engine wrote it; continue it with `fibec run --resume`")
        data = assembly.load_run_data(cfg)
        model, tokenizer, layout, initial = assembly.RunModel(cfg, data.train.num_labels).fresh()
        server = Server(layout, initial, cfg, METHODS[method])
        coordinator = runner.open_coordinator(cfg, method, server, assembly.build_evaluator(cfg, data, tokenizer),
                                              model, clients=[], saved=saved, progress=False)
        return cls(coordinator, cfg.round_timeout)

    def close(self) -> None:
        """Close the run's records file."""
        self.coordinator.recorder.close()

    def flower_rounds(self) -> int:
        """The Flower rounds Strategy.start must run for the rounds left: one to meet the nodes, then
        FLOWER_ROUNDS_PER_ROUND per FibecFed round."""
        return 1 + FLOWER_ROUNDS_PER_ROUND * (self.coordinator.cfg.rounds - self.coordinator.rounds_done)

    def summary(self) -> None:
        cfg = self.coordinator.cfg
        log.info("FibecFed strategy: %s, %d of %d clients per round, %d rounds (%d done), %d Flower rounds",
                 self.coordinator.method, cfg.clients_per_round, cfg.clients, cfg.rounds,
                 self.coordinator.rounds_done, self.flower_rounds())

    def global_arrays(self) -> ArrayRecord:
        """The server's global trainable state (LoRA factors and head)."""
        return ArrayRecord(torch_state_dict=self.coordinator.server.state)

    # ---- one FibecFed round as exchanges -------------------------------------------------------

    def _exchange(self, message_type: str, partitions: Iterable[int], content: RecordDict,
                  read: Callable[[RecordDict], object]) -> Exchange:
        """An exchange with those of `partitions` that have not failed this round (a node that failed
        is asked nothing more in its round: a dead node would cost another timeout)."""
        return Exchange(message_type, tuple(p for p in partitions if p not in self._failures), content, read)

    def _task(self) -> ConfigRecord:
        return ConfigRecord({"round": self.coordinator.rounds_done})

    def _round(self) -> Generator[Exchange, dict, dict]:
        """The next FibecFed round: yields its exchanges, is sent {partition: read reply} for each,
        returns the round's record."""
        coordinator = self.coordinator
        start = coordinator.begin()
        if start.needs_initial_scores:
            scores = yield self._exchange(SCORES, start.chosen, RecordDict({_TASK: self._task()}),
                                          _weighted_bytes("scores"))
            coordinator.select_initial([(pid, payload, weight) for pid, (payload, weight) in scores.items()])
        plan, payload = coordinator.plan()
        content = RecordDict({_BYTES: ArrayRecord({"payload": bytes_array(payload)}), _TASK: _plan_task(plan)})
        replies = yield self._exchange(TRAIN, start.chosen, content, _read_update)
        result = coordinator.aggregate([ClientUpdate(pid, payload, scores, num_samples, metrics)
                                        for pid, (payload, scores, num_samples, metrics) in replies.items()])
        if result.entering:
            task = ConfigRecord({"round": coordinator.rounds_done, "layers": list(result.entering)})
            values = yield self._exchange(LAYER_VALUES, result.accepted, RecordDict({_TASK: task}),
                                          _weighted_bytes("values"))
            coordinator.enter([(pid, payload, weight) for pid, (payload, weight) in values.items()])
        personal = None
        if coordinator.evaluates_personal and coordinator.personalised:
            content = RecordDict({_BYTES: ArrayRecord({"payload": bytes_array(coordinator.shared_payload())}),
                                  _TASK: self._task()})
            with_share = [pid for pid, share in enumerate(coordinator.evaluator.shares) if share is not None]
            personal = sum((yield self._exchange(EVALUATE, with_share, content, _read_score)).values(), Score())
        failures, self._failures = self._failures, {}
        record = coordinator.finish(personal, failures)
        if coordinator.done:
            runner.save_server_state(Path(coordinator.cfg.out), coordinator.method, coordinator.server.state)
        return record

    def _advance(self, received: dict | None) -> dict | None:
        """Step the open round with `received` (None: open the next round); its record if it ended."""
        try:
            with runner.torch_settings(self.coordinator.cfg):
                if received is None:
                    self._steps = self._round()
                    self._pending = next(self._steps)
                else:
                    self._pending = self._steps.send(received)
        except StopIteration as end:
            self._steps = self._pending = None
            return end.value
        return None

    # ---- messages and replies ------------------------------------------------------------------

    def _fail(self, pid: int, reason: str) -> None:
        log.warning("round %d: partition %d %s", self.coordinator.rounds_done + 1, pid, reason)
        self._failures.setdefault(pid, reason)  # the first failure of a round is its cause

    def _messages(self, exchange: Exchange) -> list[Message]:
        reachable = []
        for pid in exchange.partitions:
            if pid in self.nodes:
                reachable.append(pid)
            else:
                self._fail(pid, "has no node: its SuperNode never connected (refused, or not started)")
        self._asked = {self.nodes[p]: p for p in reachable}
        group = str(self.coordinator.rounds_done + 1)
        return [Message(exchange.content, self.nodes[p], exchange.message_type, group_id=group) for p in reachable]

    def _collect(self, replies: Iterable[Message], exchange: Exchange) -> dict:
        """{partition: exchange.read(reply content)} in partition order; every error reply,
        unreadable reply and missing reply is recorded as that partition's failure."""
        asked, self._asked = self._asked, {}
        received = {}
        kind = exchange.message_type
        for reply in replies:
            node = reply.metadata.src_node_id
            pid = asked.get(node)
            if pid is None:
                log.warning("ignoring a %s reply from node %d, which was not asked", kind, node)
            elif reply.has_error():
                self._fail(pid, f"(node {node}) failed {kind}: {reply.error.reason}")
            else:
                try:
                    received[pid] = exchange.read(reply.content)
                except (KeyError, TypeError, ValueError) as err:  # PayloadError is a ValueError
                    self._fail(pid, f"(node {node}) sent an unreadable {kind} reply: {err!r}")
        for node, pid in asked.items():
            if pid not in received and pid not in self._failures:
                self._fail(pid, f"(node {node}) did not reply to {kind} within {self.timeout:g}s")
        return dict(sorted(received.items()))

    def _configure(self, server_round: int, step: int, grid: Grid) -> list[Message]:
        """The messages of step `step` (0 train, 1 evaluate) of Flower round `server_round`."""
        if self.nodes is None:
            return self._meet_nodes(grid) if step == 0 else []
        slot = (server_round - 2) % FLOWER_ROUNDS_PER_ROUND * 2 + step
        if slot == 0:
            if self._steps is not None:
                raise RuntimeError("a FibecFed round took more than its Flower rounds")
            if self.coordinator.done:
                raise RuntimeError(f"Strategy.start ran more than flower_rounds() Flower rounds: all "
                                   f"{self.coordinator.cfg.rounds} rounds are done")
            self._advance(None)
        return [] if self._pending is None else self._messages(self._pending)

    def _aggregate(self, replies: Iterable[Message]) -> MetricRecord | None:
        """Read the replies to the pending exchange; the round's numbers if that ended it."""
        if self.nodes is None:
            self.nodes = self._known_nodes(replies)
            return MetricRecord({"nodes": len(self.nodes)})
        if self._pending is None:
            return None
        record = self._advance(self._collect(replies, self._pending))
        if record is None:
            return None
        return MetricRecord({key: value for key, value in record.items() if type(value) in (int, float)})

    # ---- meeting the nodes ---------------------------------------------------------------------

    def _meet_nodes(self, grid: Grid) -> list[Message]:
        """Wait until all `clients` nodes are connected, or `timeout`; ask each its partition."""
        clients = self.coordinator.cfg.clients
        deadline = time.monotonic() + self.timeout
        while len(list(grid.get_node_ids())) < clients and time.monotonic() < deadline:
            time.sleep(0.5)
        node_ids = sorted(grid.get_node_ids())
        if not node_ids:
            raise TimeoutError(f"no node connected within round-timeout={self.timeout:g}s")
        self._queried = node_ids
        return [Message(RecordDict(), node, PARTITION_QUERY, group_id="0") for node in node_ids]

    def _known_nodes(self, replies: Iterable[Message]) -> dict[int, int]:
        """{partition: node id} from the partition query's replies. A partition no node holds (its
        SuperNode was refused, or never came) is recorded as failed in every round that samples it."""
        queried, self._queried = self._queried, []
        nodes: dict[int, int] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in queried:
                log.warning("ignoring a %s reply from node %d, which was not asked", PARTITION_QUERY, node)
                continue
            if reply.has_error():
                raise RuntimeError(f"node {node} failed {PARTITION_QUERY}: {reply.error.reason}")
            pid = _read_partition(reply.content)
            if pid in nodes:
                raise ValueError(f"nodes {nodes[pid]} and {node} both hold partition {pid}")
            nodes[pid] = node
        silent = sorted(set(queried) - set(nodes.values()))
        if silent:
            raise TimeoutError(f"nodes {silent[:5]} did not say which partition they hold within {self.timeout:g}s")
        clients = self.coordinator.cfg.clients
        missing = sorted(set(range(clients)) - set(nodes))
        if missing:
            log.warning("no node holds partitions %s (%d of %d nodes connected within round-timeout=%gs): they are "
                        "recorded as failed in every round that samples them", missing, len(nodes), clients,
                        self.timeout)
        return dict(sorted(nodes.items()))

    # ---- Strategy hooks ------------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        return self._configure(server_round, 0, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        metrics = self._aggregate(replies)
        return (None if metrics is None else self.global_arrays()), metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        return self._configure(server_round, 1, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self._aggregate(replies)


# ---- ServerApp -----------------------------------------------------------------------------------

class GridWrapper(Grid):
    """A Grid that passes every call to `grid`: subclass it and override what you change."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class PromptGrid(GridWrapper):
    """`grid`, asking the SuperLink for replies every `poll_s` seconds instead of flwr 1.41's 3 s.

    Each of a round's exchanges waits for its slowest reply; with a 3 s poll that wait alone is
    longer than a round's work at fibec's sizes. A reply pull is one small request to the SuperLink.
    """

    def __init__(self, grid: Grid, poll_s: float = 0.1) -> None:
        super().__init__(grid)
        self.poll_s = poll_s

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`; the replies that came within `timeout` seconds (None: wait for all)."""
        waiting = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            pulled = list(self.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_s)
        return replies


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """One method's run on the grid's nodes: `FibecFedStrategy.from_config` of the run config, its
    remaining rounds run by a stock Strategy.start over the grid as a PromptGrid; the final global
    state is saved as server_state_<method>.safetensors under `out`."""
    strategy = FibecFedStrategy.from_config(fed_config(context.run_config))
    try:
        strategy.start(PromptGrid(grid), strategy.global_arrays(), num_rounds=strategy.flower_rounds(),
                       timeout=strategy.timeout)
    finally:
        strategy.close()
