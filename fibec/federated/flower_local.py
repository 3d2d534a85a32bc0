"""`fibec run --engine flower`: the run on Flower on this machine, fibec starting and stopping it.

For each method, `LocalFederation` starts a SuperLink and one SuperNode per client (node config
`partition-id` / `num-partitions`), each with a long-lived ClientApp worker beside it
(fibec.federated.flower_worker), on 127.0.0.1 on free ports: insecure, or with `--secure` over
TLS with SuperNode authentication (a throwaway CA, a certificate for the SuperLink and a key per
SuperNode, made by fibec.federated.credentials; each key registered before its SuperNode starts,
so that the SuperLink admits no other); `flwr run --stream`
submits a temporary app whose pyproject.toml is generated from the run's FedConfig
(`app_pyproject`: fibec.federated.flower's ServerApp and ClientApp, one method). Every Flower
process runs in this working directory, so relative paths (`out`, `model`, `data`) mean the same.
Progress is read from the metrics file the ServerApp writes as rounds land. Every process is
stopped when the method's run ends, fails or is interrupted (Ctrl-C). The Flower logs are kept
under <out>/flower/<method>/.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..config import FedConfig, flower_app_config
from . import credentials, runner
from .recorder import Recorder

# How long a process may take to start listening, or to stop after SIGTERM.
START_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0
_POLL_S = 0.5

_APP_HEADER = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fibec-flower"
version = "0.1.0"
description = "FibecFed (fibec) on Flower"
# fibec[flower] must be installed where the SuperLink and the SuperNodes run.
dependencies = []

[tool.flwr.app]
publisher = "fibec"

[tool.flwr.app.components]
serverapp = "fibec.federated.flower:server_app"
clientapp = "fibec.federated.flower:client_app"

"""


def app_pyproject(cfg: FedConfig, *, out: str | None = None) -> str:
    """pyproject.toml of a Flower app that runs `cfg` (one method) with fibec's apps; `out`
    overrides cfg.out in its run config."""
    return _APP_HEADER + flower_app_config(cfg, out=out)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


class LocalFederation:
    """A SuperLink and `clients` SuperNodes on 127.0.0.1, as a context manager that stops them all.

    Each process leads its own process group (so that the ServerApp and ClientApp processes Flower
    spawns stop with it; the terminal's Ctrl-C does not reach them) and writes its log under `logs`.
    `superlink` and `supernodes` are the Popen objects; `submit` runs `flwr run` against the
    SuperLink. While it is open, SIGTERM to this process exits through the context manager too, so
    that no Flower process outlives fibec.

    secure: TLS and SuperNode authentication, with throwaway credentials under the federation's
    temporary home; the SuperNodes of `unregistered` partitions get a key the SuperLink was never
    told of (the SuperLink refuses them: a test of the refusal).

    Each SuperNode (fibec.federated.flower_supernode: flwr's, with waits of 0.2 s instead of 3 s)
    runs with `--isolation process` beside a long-lived ClientApp process, `workers`
    (fibec.federated.flower_worker), which keeps the model it built between messages.
    `per_message_processes`: Flower's defaults instead, flower-supernode starting a process (which
    loads the model) for every message (bench/bench_flower.py compares the two).
    """

    def __init__(self, clients: int, logs: Path, *, secure: bool = False, unregistered: tuple[int, ...] = (),
                 per_message_processes: bool = False) -> None:
        self.clients = clients
        self.per_message_processes = per_message_processes
        self.workers: list[subprocess.Popen] = []
        self.logs = Path(logs)
        self.secure = secure
        self.unregistered = set(unregistered)
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self._processes: list[subprocess.Popen] = []
        self._previous_sigterm = None
        self._home = tempfile.TemporaryDirectory(prefix="fibec-flower-")
        self.credentials: credentials.LocalCredentials | None = None
        bin_dir = Path(sys.executable).parent  # flower-superexec and flwr-*app are found on PATH
        self.env = {**os.environ, "FLWR_HOME": str(Path(self._home.name) / "flwr"), "HF_HUB_OFFLINE": "1",
                    "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}

    def _start(self, name: str, *command: str) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("w") as log:
            process = subprocess.Popen([str(Path(sys.executable).parent / command[0]), *command[1:]], env=self.env,
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self._processes.append(process)
        return process

    def __enter__(self) -> LocalFederation:
        self.logs.mkdir(parents=True, exist_ok=True)
        if threading.current_thread() is threading.main_thread():  # only it may set signal handlers
            self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            link, *node_ports = _free_ports(1 + self.clients)
            home = Path(self.env["FLWR_HOME"])
            home.mkdir()
            if self.secure:
                self.credentials = credentials.make_local(Path(self._home.name) / "credentials", self.clients)
                channel = f'root-certificates = "{self.credentials.ca}"'
                link_security = ("--ssl-ca-certfile", str(self.credentials.ca), "--ssl-certfile",
                                 str(self.credentials.superlink_certificate), "--ssl-keyfile",
                                 str(self.credentials.superlink_key), "--enable-supernode-auth")
            else:
                channel, link_security = "insecure = true", ("--insecure",)
            (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n[superlink.local]\n'
                                              f'address = "127.0.0.1:{link}"\n{channel}\n')
            # fibec is installed here: no per-run dependency install of the app.
            self.superlink = self._start("superlink", "flower-superlink", *link_security,
                                         "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                         "--port", str(link))
            self._wait_for_port(link)
            if self.per_message_processes:
                supernode = ("flower-supernode", "--isolation", "subprocess")
            else:
                supernode = (Path(sys.executable).name, "-m", "fibec.federated.flower_supernode", "--isolation",
                             "process")
            self.supernodes = [self._start(f"supernode-{pid}", *supernode, *self._node_security(pid),
                                           "--superlink", f"127.0.0.1:{link}",
                                           "--host", "127.0.0.1", "--port", str(port), "--node-config",
                                           f"partition-id={pid} num-partitions={self.clients}")
                               for pid, port in enumerate(node_ports)]
            if not self.per_message_processes:
                self.workers = [self._start(f"worker-{pid}", Path(sys.executable).name, "-m",
                                            "fibec.federated.flower_worker", "--runtime-api-address",
                                            f"127.0.0.1:{port}", "--parent-pid", str(node.pid))
                                for pid, (port, node) in enumerate(zip(node_ports, self.supernodes))]
        except BaseException:
            self.stop()
            raise
        return self

    def _node_security(self, pid: int) -> tuple[str, ...]:
        """A SuperNode's flags: --insecure, or the CA it trusts and its key (registered first)."""
        if not self.secure:
            return ("--insecure",)
        private, public = self.credentials.supernode_keys[pid]
        if pid in self.unregistered:
            private, _ = credentials.make_supernode_key(private.parent / "unregistered", f"supernode-{pid}")
        else:
            self._register(pid, public)
        return "--root-certificates", str(self.credentials.ca), "--auth-supernode-private-key", str(private)

    def _register(self, pid: int, public_key: Path) -> None:
        """`flwr supernode register` of a SuperNode's public key with the running SuperLink."""
        log = self.logs / f"register-{pid}.log"
        with log.open("w") as out:
            done = subprocess.run([str(Path(sys.executable).parent / "flwr"), "supernode", "register",
                                   str(public_key), "local"], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=START_TIMEOUT)
        if done.returncode:
            raise RuntimeError(f"registering SuperNode {pid}'s key failed (exit code {done.returncode}); "
                               f"{log} ends:\n{_tail(log)}")

    def exited_supernodes(self) -> dict[int, str]:
        """{partition: why, from its log} of the SuperNodes that exited: refused or crashed. Flower logs
        the cause as ERROR lines, followed by the shutdown of the node's helpers."""
        exited = {}
        for pid, process in enumerate(self.supernodes):
            if process.poll() is not None:
                lines = _tail(self.logs / f"supernode-{pid}.log", 20000).splitlines()
                first_error = next((i for i, line in enumerate(lines) if "ERROR" in line), max(0, len(lines) - 8))
                exited[pid] = "\n".join(lines[first_error:first_error + 8])
        return exited

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_for_port(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline and self.superlink.poll() is None:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(_POLL_S)
        raise RuntimeError(f"the SuperLink did not listen on 127.0.0.1:{port} (exit code {self.superlink.poll()}); "
                           f"its log {self.logs / 'superlink.log'} ends:\n{_tail(self.logs / 'superlink.log')}")

    def submit(self, pyproject: str) -> subprocess.Popen:
        """`flwr run --stream` of an app made of `pyproject` (its text); its output goes to flwr-run.log."""
        app = Path(self._home.name) / "app"
        app.mkdir(exist_ok=True)
        (app / "pyproject.toml").write_text(pyproject)
        return self._start("flwr-run", "flwr", "run", str(app), "local", "--stream")

    def stop(self) -> None:
        """SIGTERM to each process group still running, SIGKILL after STOP_TIMEOUT.

        The SuperLink goes first: it stops the ServerApp (which Flower runs in a session of its own),
        and a ServerApp that outlived the SuperNodes would record its remaining rounds as failed.
        """
        first = [self.superlink] if self.superlink is not None else []
        for process in first + [p for p in reversed(self._processes) if p is not self.superlink]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        self._home.cleanup()
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


def read_records(path: Path) -> list[dict]:
    """The complete lines of a metrics file being written (a partial last line is left out)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def run_method(cfg: FedConfig, done: list[dict], *, progress: bool = True) -> list[dict]:
    """cfg's one method as a Flower run on a LocalFederation; `done` are the rounds its checkpoint
    holds (a resumed run). Returns its records; RuntimeError, with the logs' ends, if it fails."""
    out = Path(cfg.out)
    metrics = out / f"metrics_{cfg.method}.jsonl"
    final_state = out / f"server_state_{cfg.method}.safetensors"
    written_before = _mtime(final_state)
    logs = out / "flower" / cfg.method
    recorder = Recorder(None, cfg.method, cfg.rounds, progress=progress, records=done)
    shown = len(done)
    reported: set[int] = set()
    try:
        with LocalFederation(cfg.clients, logs, secure=cfg.secure) as federation:
            submitted = federation.submit(app_pyproject(cfg))
            while submitted.poll() is None:
                for pid, log_end in federation.exited_supernodes().items():
                    if pid not in reported:  # the run goes on without it: its rounds record the partition as failed
                        reported.add(pid)
                        print(f"fibec: the SuperNode of partition {pid} exited; its log "
                              f"{logs / f'supernode-{pid}.log'} ends:\n{log_end}", file=sys.stderr)
                if federation.superlink.poll() is not None:
                    raise RuntimeError(f"the SuperLink exited (code {federation.superlink.returncode}) during the "
                                       f"run; its log {logs / 'superlink.log'} ends:\n{_tail(logs / 'superlink.log')}")
                # A resumed ServerApp first rewrites the file to its checkpoint's rounds: count by round number.
                for record in read_records(metrics):
                    if record["round"] > shown:
                        recorder.add(record)
                        shown = record["round"]
                time.sleep(_POLL_S)
    finally:
        recorder.close()
    records = read_records(metrics)
    if len(records) != cfg.rounds or _mtime(final_state) in (None, written_before):
        raise RuntimeError(f"the Flower run of {cfg.method} did not finish ({len(records)} of {cfg.rounds} rounds "
                           f"recorded, `flwr run` exit code {submitted.returncode}); logs in {logs}/, "
                           f"flwr-run.log ends:\n{_tail(logs / 'flwr-run.log')}")
    return records


def run_methods(cfg: FedConfig, *, overwrite: bool = False, progress: bool = True) -> dict[str, list[dict]]:
    """Every method of cfg, each as one Flower run on this machine; returns {method: records}.

    The contract of runner.run_methods: the same checks first, a fresh run refuses an `out` that
    holds one (unless `overwrite`), a resumed run continues each method from its checkpoint.
    """
    _, _, saved = runner.prepare_run(cfg, overwrite=overwrite)
    return {method: run_method(cfg.replace(method=method),
                               saved[method]["coordinator"]["records"] if saved[method] else [], progress=progress)
            for method in cfg.methods}


_EXAMPLE_NOTE = """\
# A Flower app running FibecFed with fibec's ServerApp and ClientApp (fibec.federated.flower).
# Generated from fibec.config.FedConfig by `python -m fibec.federated.flower_local <this file>`
# (tests/test_flower.py checks that they agree): every key of [tool.flwr.app.config] is a `fibec run`
# setting, with dashes, and `flwr run --run-config` may override any of them. One method per run;
# `resume = true` continues the run saved under `out`. The ServerApp and the SuperNodes resolve a
# relative `out` (and `model`, `data`) against the working directory they were started in.
"""

if __name__ == "__main__":
    # Regenerates the example app after a FedConfig change.
    Path(sys.argv[1]).write_text(_EXAMPLE_NOTE + app_pyproject(FedConfig(engine="flower"), out="runs/fibec-flower"))
