"""A long-lived ClientApp process for a SuperNode started with `--isolation process`.

Flower 1.41's SuperNode runs each message in a new `flwr-clientapp` process (flower-superexec
starts one per message), which imports torch and transformers and builds the model again: at
fibec's sizes that is most of a Flower round. With `--isolation process` the SuperNode leaves
running ClientApps to a process started beside it. This is one: it acquires the node's tasks from
the SuperNode's Runtime API one after another and runs each as `flwr-clientapp` would (pull the
message, context, run and FAB; install the FAB; run the ClientApp; push the reply and the
context; a ClientApp exception becomes an error reply), but in this process, keeping the
installed FAB and the loaded ClientApp between tasks, so fibec's ClientApp keeps the party it
built (model and client). Each message still restores the client from the node's context, so the
records are those of the per-message processes.

    flower-supernode --isolation process --host 127.0.0.1 --port 9094 ... &
    python -m fibec.federated.flower_worker --runtime-api-address 127.0.0.1:9094

The Runtime API is the SuperNode's local one (plain HTTP on loopback, as between the SuperNode
and flwr-clientapp). The worker exits on SIGTERM or SIGINT, or when `--parent-pid` exits.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

# How often an idle worker asks the SuperNode for a task (flower-superexec asks every 1 s), and how
# often it checks that its SuperNode still runs.
POLL_S = 0.1
PARENT_CHECK_S = 0.2

log = logging.getLogger(__name__)


def _runtime_client(address: str, *interceptors) -> RuntimeHttpClient:
    version = RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=[version, *interceptors],
                                                 retry_invoker=make_simple_http_retry_invoker())


class Worker:
    """Runs the tasks of the SuperNode whose Runtime API is at `address`, one at a time.

    `apps` holds the ClientApp of each FAB (by hash) this worker has run, installed and loaded once.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.apps: dict[str, ClientApp] = {}
        self.tasks_run = 0

    def _client_app(self, fab, run) -> ClientApp:
        if fab.hash_str not in self.apps:
            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return self.apps[fab.hash_str]

    def run_task(self, token: str) -> None:
        """The task `token` names: its message through the FAB's ClientApp, the reply and the
        context pushed back; the ClientApp's exception as an error reply, as flwr-clientapp does."""
        client = _runtime_client(self.address, RuntimeTokenHttpInterceptor(token))
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed"
        try:
            message, context, run, fab = pull_task_input(client)
            reply = self._client_app(fab, run)(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # as flwr-clientapp: the server gets the error, the node goes on
            log.exception("ClientApp raised an exception")
            details = f"{type(err)}:<'{err}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            finally:
                push_task_output(client=client, context=context, sub_status=status, details=details)
                heartbeat.stop()
                client.close()
                self.tasks_run += 1
                log.info("task %d done (%s)", self.tasks_run, status)

    def serve(self, stop: threading.Event, poll_s: float = POLL_S) -> None:
        """Acquire and run tasks until `stop` is set."""
        client = _runtime_client(self.address)
        try:
            while not stop.is_set():
                task = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                if task.HasField("task") and task.token:
                    self.run_task(task.token)
                else:
                    stop.wait(poll_s)
        finally:
            client.close()


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs: it exists and, where /proc tells, is not a zombie (a killed
    SuperNode that its parent has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def exit_with(pid: int) -> None:
    """Exit this process as soon as process `pid` stops running. At once, even mid-task: the task's
    reply could not be delivered, and what a task writes to disk is written atomically."""
    def watch() -> None:
        while process_alive(pid):
            time.sleep(PARENT_CHECK_S)
        log.warning("the SuperNode (pid %d) is gone: exiting", pid)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="supernode-watch").start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, host:port (its --host and --port)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll otherwise
    if args.parent_pid is not None:
        exit_with(args.parent_pid)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    Worker(args.runtime_api_address).serve(stop)


if __name__ == "__main__":
    main()
