"""FibecFed on Flower (flwr 1.41, Message API): the same Client and Server, over a SuperLink.

`server_app` (ServerApp) and `client_app` (ClientApp) wrap fibec.federated.server.Server and
fibec.federated.client.Client; every party builds the run's `Simulation` from the run config
(same data split, Dirichlet partition, model initialisation and client sampling, all drawn from
the seed), so a Flower run reproduces the in-process engine's rounds, bytes and weights.

Run config: the FedConfig fields with dashes (`clients-per-round`, `gal-size`, ...; `method` is
one method name; `model` "" means the default MiniLM; `lora-targets` a comma list;
`text-pair-column` "" means none), checked like `fibec run` flags, plus `round-timeout`
(seconds to wait for nodes and replies). Node config: `partition-id` (0..clients-1) and
optionally `num-partitions` (must equal `clients`).

Messages (all content is ArrayRecord / ConfigRecord / MetricRecord; nothing is pickled):
  query.partition  server -> node: which partition do you hold?      reply: partition-id
  train.scores     initial layer scores for the first GAL ranking    reply: scores bytes
  train            plan + global payload bytes                       reply: update bytes, metrics
  evaluate         GAL + head bytes (personalised methods)          reply: accuracy, loss on its share
Payload bytes travel as one uint8 Array each, so Flower's message sizes count them as they are.
A node that replies with an error or not within `round-timeout` is left out of that round, as
Flower's strategies accept failures: its update is missing and the round's record lists it under
"failed"; a round in which no node answers stops the run. (All nodes must answer the setup query.)
A client's own state (its personalised LoRA weights, neuron importance, curriculum order) lives
in the node's Context.state between messages, since Flower runs each message in a fresh process.

The ServerApp writes config.json, metrics_<method>.jsonl (the in-process engine's record format)
and server_state_<method>.safetensors (the final global trainable state) to the run's `out`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from .. import codec
from ..curriculum import CurriculumSampler
from ..modeling import set_state
from .client import Client, ClientUpdate, RoundPlan
from .simulation import PERSONALISED, FedConfig, Simulation, evaluate, partition_for, torch_settings

ROUND_TIMEOUT = "round-timeout"
DEFAULT_ROUND_TIMEOUT = 600.0
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

_PAYLOAD = "fibec.payload"  # ArrayRecord: {"payload": uint8 Array[, "scores": uint8 Array]}
_PLAN = "fibec.plan"  # ConfigRecord
_REPLY = "fibec.reply"  # ConfigRecord: partition-id
_METRICS = "fibec.metrics"  # MetricRecord
# Context.state records of a client between messages.
_STATE, _IMPORTANCE, _ORDER, _META = "fibec.state", "fibec.importance", "fibec.order", "fibec.meta"

log = logging.getLogger(__name__)


# ---- run config ------------------------------------------------------------------------------

def run_config_of(cfg: FedConfig, method: str) -> dict[str, bool | int | float | str]:
    """Flower run config (flat, scalar values) for one method of `cfg`."""
    config = {}
    for name, value in asdict(cfg).items():
        if name == "method":
            value = method
        elif name == "lora_targets":
            value = ",".join(value)
        elif value is None:
            value = ""
        config[name.replace("_", "-")] = value
    return config


def fed_config(run_config) -> tuple[FedConfig, str]:
    """(FedConfig, method) from a Flower run config; ConfigError (a ValueError) names a bad key."""
    from ..cli import _FIELDS, ConfigError, build_config

    settings = {}
    for key, value in dict(run_config).items():
        name = key.replace("-", "_")
        if key == ROUND_TIMEOUT:
            continue
        if name not in _FIELDS:
            raise ConfigError(f"run config: unknown key {key!r}")
        if name == "lora_targets":
            value = [t.strip() for t in str(value).split(",") if t.strip()]
        elif name in ("model", "text_pair_column") and value == "":
            value = None
        settings[name] = value
    args = argparse.Namespace(command="run", config=None, fraction=None, **settings)
    cfg, methods = build_config(args)
    if len(methods) != 1:
        raise ConfigError(f"--method: a Flower run runs one method, got {methods}")
    return cfg, methods[0]


def _round_timeout(run_config) -> float:
    value = float(dict(run_config).get(ROUND_TIMEOUT, DEFAULT_ROUND_TIMEOUT))
    if not value > 0:
        raise ValueError(f"run config: {ROUND_TIMEOUT} must be > 0, got {value}")
    return value


def _build(cfg: FedConfig, method: str) -> Simulation:
    """The run's Simulation (data, partition, model, server and clients), built from the seed alone."""
    from ..cli import load_data
    from ..modeling import check_model_folder, default_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train, test = load_data(cfg)
    model_path = str(check_model_folder(cfg.model) if cfg.model else default_model_path())
    return Simulation(cfg, method, train, test, partition_for(cfg, train), model_path)


# ---- bytes in records ------------------------------------------------------------------------

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


def _plan_record(plan: RoundPlan) -> ConfigRecord:
    return ConfigRecord({"round": plan.round_idx, "sent": list(plan.sent), "dense": list(plan.dense),
                         "want-scores": plan.want_scores})


def _plan_of(record: ConfigRecord) -> RoundPlan:
    return RoundPlan(int(record["round"]), tuple(record["sent"]), tuple(record["dense"]), bool(record["want-scores"]))


# ---- client state across messages ------------------------------------------------------------

def _save_client(client: Client, state: RecordDict) -> None:
    state[_STATE] = ArrayRecord({n: Array(t.numpy()) for n, t in client.state.items()})
    state[_IMPORTANCE] = ArrayRecord({f"{layer}/{factor}": Array(F.numpy())
                                      for layer, factors in client.importance.fisher.items()
                                      for factor, F in factors.items()})
    meta = {"prepared-at": -1 if client.prepared_at is None else client.prepared_at}
    sampler = client.sampler
    if sampler is not None:
        order = np.asarray(sampler.pool(sampler.full_at), dtype=np.int64)  # the whole set, easiest first
        ranks = np.empty_like(order)
        ranks[order] = np.arange(order.size)
        state[_ORDER] = ArrayRecord({"ranks": Array(ranks)})
        meta.update({"batch-size": sampler.batch_size, "pacing": sampler.pacing, "lambda0": sampler.lambda0,
                     "full-at": sampler.full_at, "steps": sampler.steps, "seed": sampler.seed})
    state[_META] = ConfigRecord(meta)


def _load_client(client: Client, state: RecordDict) -> None:
    """Restore what `_save_client` kept; a node without saved state keeps the fresh client."""
    if _META not in state:
        return
    client.state = {n: torch.from_numpy(a.numpy().copy()) for n, a in state[_STATE].items()}
    fisher: dict[str, dict[str, torch.Tensor]] = {}
    for key, array in state[_IMPORTANCE].items():
        layer, factor = key.rsplit("/", 1)
        fisher.setdefault(layer, {})[factor] = torch.from_numpy(array.numpy().copy())
    client.importance.load_state_dict({"momentum": client.importance.momentum, "fisher": fisher})
    meta = state[_META]
    client.prepared_at = None if meta["prepared-at"] < 0 else int(meta["prepared-at"])
    if _ORDER in state:
        # Distinct integer ranks sort back into exactly the saved order.
        client.sampler = CurriculumSampler(state[_ORDER]["ranks"].numpy(), batch_size=int(meta["batch-size"]),
                                           pacing=str(meta["pacing"]), lambda0=float(meta["lambda0"]),
                                           full_at=int(meta["full-at"]), steps=int(meta["steps"]),
                                           seed=int(meta["seed"]))


# ---- ClientApp -------------------------------------------------------------------------------

client_app = ClientApp()


def _partition_id(context: Context, clients: int) -> int:
    config = dict(context.node_config)
    if PARTITION_ID not in config:
        raise ValueError(f"node config has no {PARTITION_ID!r} (start the SuperNode with "
                         f"--node-config 'partition-id=0 num-partitions={clients}')")
    pid = config[PARTITION_ID]
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < clients:
        raise ValueError(f"node config: {PARTITION_ID} must be an int in [0, {clients}), got {pid!r}")
    if NUM_PARTITIONS in config and config[NUM_PARTITIONS] != clients:
        raise ValueError(f"node config: {NUM_PARTITIONS}={config[NUM_PARTITIONS]!r} differs from the run's "
                         f"clients={clients}")
    return pid


def _client_reply(msg: Message, context: Context, work) -> Message:
    """Build the run, restore this node's client, run `work(sim, client) -> RecordDict`, save the client."""
    cfg, method = fed_config(context.run_config)
    pid = _partition_id(context, cfg.clients)
    with torch_settings(cfg):
        sim = _build(cfg, method)
        client = sim.clients[pid]
        _load_client(client, context.state)
        content = work(sim, client)
        _save_client(client, context.state)
    content[_REPLY] = ConfigRecord({PARTITION_ID: pid})
    return Message(content, reply_to=msg)


@client_app.query("partition")
def client_partition(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (read from the node config only)."""
    cfg, _ = fed_config(context.run_config)
    return Message(RecordDict({_REPLY: ConfigRecord({PARTITION_ID: _partition_id(context, cfg.clients)})}),
                   reply_to=msg)


@client_app.train("scores")
def client_scores(msg: Message, context: Context) -> Message:
    """Layer scores on the initial weights (Client.initial_scores) for the first GAL ranking."""
    def work(sim: Simulation, client: Client) -> RecordDict:
        scores = client.initial_scores(sim.model)
        return RecordDict({_PAYLOAD: ArrayRecord({"scores": bytes_array(scores)}),
                           _METRICS: MetricRecord({"num-examples": len(client)})})

    return _client_reply(msg, context, work)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Client.fit on the server's payload and plan; answers with the update bytes and metrics."""
    def work(sim: Simulation, client: Client) -> RecordDict:
        update = client.fit(sim.model, array_bytes(msg.content[_PAYLOAD]["payload"]), _plan_of(msg.content[_PLAN]))
        metrics = {"num-examples": update.num_samples, **{k: float(v) for k, v in update.metrics.items()}}
        return RecordDict({_PAYLOAD: ArrayRecord({"payload": bytes_array(update.payload),
                                                  "scores": bytes_array(update.scores)}),
                           _METRICS: MetricRecord(metrics)})

    return _client_reply(msg, context, work)


@client_app.evaluate()
def client_evaluate(msg: Message, context: Context) -> Message:
    """Accuracy and loss of this client's personalised model (its layers + the received GAL and
    head) on its share of the fixed test subset (the in-process engine's `Simulation.shares`)."""
    def work(sim: Simulation, client: Client) -> RecordDict:
        shared = codec.decode(array_bytes(msg.content[_PAYLOAD]["payload"]))
        bad = sorted(n for n, t in shared.items()
                     if n not in client.state or tuple(t.shape) != tuple(client.state[n].shape))
        if bad:
            raise codec.PayloadError(f"evaluation payload has unknown or misshapen tensors {bad[:3]}")
        share = sim.shares[client.cid]
        accuracy = loss = 0.0
        if share is not None:
            set_state(sim.model, client.state)
            set_state(sim.model, shared)
            accuracy, loss = evaluate(sim.model, share, sim.tokenizer, batch_size=sim.cfg.batch_size * 4,
                                      max_length=sim.cfg.max_length)
        return RecordDict({_METRICS: MetricRecord({"accuracy": accuracy, "loss": loss,
                                                   "num-examples": 0 if share is None else len(share)})})

    return _client_reply(msg, context, work)


# ---- ServerApp -------------------------------------------------------------------------------

server_app = ServerApp()


class _Nodes:
    """The grid's nodes by the partition they hold, and round trips to chosen partitions."""

    def __init__(self, grid: Grid, clients: int, timeout: float) -> None:
        self.grid, self.timeout = grid, timeout
        deadline = time.monotonic() + timeout
        while len(list(grid.get_node_ids())) < clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {clients} nodes connected "
                                   f"within {timeout:.0f}s")
            time.sleep(0.5)
        self.by_partition: dict[int, int] = {}
        self.failures: dict[int, str] = {}
        node_ids = list(grid.get_node_ids())
        replies, failed = self._exchange({n: RecordDict() for n in node_ids}, "query.partition", "0")
        if failed:
            raise RuntimeError("; ".join(f"node {n} {reason}" for n, reason in failed.items()))
        for node_id, reply in replies.items():
            pid = int(reply.content[_REPLY][PARTITION_ID])
            if pid in self.by_partition:
                raise ValueError(f"nodes {self.by_partition[pid]} and {node_id} both hold partition {pid}")
            self.by_partition[pid] = node_id
        missing = sorted(set(range(clients)) - set(self.by_partition))
        if missing:
            raise ValueError(f"no connected node holds partitions {missing[:5]}")

    def _exchange(self, contents: dict[int, RecordDict], message_type: str,
                  group: str) -> tuple[dict[int, Message], dict[int, str]]:
        """({node: reply}, {node: why it gave none}) for one message to each node in `contents`."""
        messages = [Message(content, node_id, message_type, group_id=group) for node_id, content in contents.items()]
        replies, failed = {}, {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                failed[node_id] = f"failed on {message_type}: {reply.error.reason}"
            else:
                replies[node_id] = reply
        for node_id in contents:
            if node_id not in replies and node_id not in failed:
                failed[node_id] = f"no reply to {message_type} within {self.timeout:.0f}s"
        return replies, failed

    def ask(self, partitions: list[int], content_of, message_type: str, round_idx: int) -> dict[int, Message]:
        """{partition: reply} for `content_of(partition) -> RecordDict` sent to each partition's node.

        A node that fails or does not answer in time leaves its partition out of this round (as
        Flower's strategies accept failures), noted in `failures`; a round needs one reply at least.
        """
        contents = {self.by_partition[p]: content_of(p) for p in partitions}
        replies, failed = self._exchange(contents, message_type, str(round_idx + 1))
        partition_of = {node: p for p, node in self.by_partition.items()}
        for node_id, reason in failed.items():
            self.failures[partition_of[node_id]] = f"node {node_id} {reason}"
            log.warning("round %d: partition %d (node %d) %s", round_idx + 1, partition_of[node_id], node_id, reason)
        if not replies:
            raise RuntimeError(f"round {round_idx + 1}: no node answered {message_type}: "
                               + "; ".join(self.failures[partition_of[n]] for n in failed))
        return {int(r.content[_REPLY][PARTITION_ID]): r for r in replies.values()}

    def take_failures(self) -> dict[int, str]:
        """{partition: reason} of the nodes that failed since the last call."""
        failures, self.failures = self.failures, {}
        return failures


class _FlowerTransport:
    """Simulation.run's client calls (see Simulation.initial_scores / fit / evaluate_round), each a
    Flower message round trip; bytes in the records are the lengths of the arrays that travel."""

    def __init__(self, sim: Simulation, nodes: _Nodes) -> None:
        self.sim, self.nodes = sim, nodes

    def initial_scores(self, chosen: list[int], round_idx: int) -> list[tuple[int, bytes, float]]:
        replies = self.nodes.ask(chosen, lambda p: RecordDict(), "train.scores", round_idx)
        return [(pid, array_bytes(replies[pid].content[_PAYLOAD]["scores"]),
                 float(replies[pid].content[_METRICS]["num-examples"])) for pid in chosen if pid in replies]

    def fit(self, chosen: list[int], payload: bytes, plan: RoundPlan) -> list[ClientUpdate]:
        content = RecordDict({_PAYLOAD: ArrayRecord({"payload": bytes_array(payload)}), _PLAN: _plan_record(plan)})
        replies = self.nodes.ask(chosen, lambda p: content, "train", plan.round_idx)
        updates = []
        for pid in (p for p in chosen if p in replies):
            record, metrics = replies[pid].content[_PAYLOAD], dict(replies[pid].content[_METRICS])
            num_samples = metrics.pop("num-examples")
            updates.append(ClientUpdate(pid, array_bytes(record["payload"]), array_bytes(record["scores"]),
                                        int(num_samples), metrics))
        return updates

    def evaluate_round(self, round_idx: int) -> tuple[float, float]:
        """Simulation.evaluate with each personalised client evaluated on its own node."""
        sim = self.sim
        if sim.method_name not in PERSONALISED:
            return sim.evaluate()
        shared_names = sim.layout.param_names(sim.server.gal) + list(sim.layout.head)
        shared = codec.encode({n: sim.server.state[n] for n in shared_names})
        content = RecordDict({_PAYLOAD: ArrayRecord({"payload": bytes_array(shared)})})
        replies = self.nodes.ask(list(range(len(sim.clients))), lambda p: content, "evaluate", round_idx)
        correct = loss = count = 0.0
        for pid in sorted(replies):  # over the test shares of the nodes that answered
            metrics = replies[pid].content[_METRICS]
            correct += metrics["accuracy"] * metrics["num-examples"]
            loss += metrics["loss"] * metrics["num-examples"]
            count += metrics["num-examples"]
        if not count:
            return float("nan"), float("nan")
        return correct / count, loss / count

    def take_failures(self) -> dict[int, str]:
        return self.nodes.take_failures()


def run_rounds(sim: Simulation, nodes: _Nodes, metrics_path: Path | None = None) -> list[dict]:
    """The in-process engine's rounds and records, every client call a Flower message round trip."""
    return sim.run(metrics_path, progress=False, transport=_FlowerTransport(sim, nodes))


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """The whole FibecFed run: wait for the nodes, run every round, write the results to cfg.out."""
    from safetensors.torch import save_file

    cfg, method = fed_config(context.run_config)
    timeout = _round_timeout(context.run_config)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    with torch_settings(cfg):
        sim = _build(cfg, method)
        nodes = _Nodes(grid, cfg.clients, timeout)
        run_rounds(sim, nodes, out_dir / f"metrics_{method}.jsonl")
    save_file({n: t.contiguous() for n, t in sim.server.state.items()},
              str(out_dir / f"server_state_{method}.safetensors"))
