"""Running a run in process, fresh or resumed from its checkpoint; its folder and its checkpoints.

The run's parts come from fibec.federated.assembly. Under `out`: config.json,
metrics_<method>.jsonl, checkpoints/<method>/ (every round) and server_state_<method>.safetensors
(the final global state).
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save as save_tensors

from ..config import VALUES_BEFORE_ADDED, ConfigError, FedConfig
from . import checkpoint
from .assembly import RunData, RunModel, build_federation, load_run_data
from .client import Client
from .evaluation import Evaluator
from .recorder import Recorder
from .rounds import Coordinator, run_rounds
from .server import Server

CONFIG_FILE = "config.json"
# Settings that say how a run is executed, not what it computes: a resumed run may differ in them.
RUN_MODE_SETTINGS = ("out", "engine", "threads", "round_timeout", "resume", "device", "secure")


@contextlib.contextmanager
def torch_settings(cfg: FedConfig):
    """A run's torch settings (deterministic algorithms, cfg.threads threads), restored after."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True, warn_only=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)


# ---- run directories ---------------------------------------------------------------------------

def checkpoint_dir(out: Path, method: str) -> Path:
    return Path(out) / "checkpoints" / method


def prepare_out_dir(cfg: FedConfig, *, overwrite: bool) -> Path:
    """Create `cfg.out` for a fresh run and write its config.json. A folder that already holds a
    run is an error unless `overwrite` (then its checkpoints and metrics are removed)."""
    out = Path(cfg.out)
    existing = [p for p in (out / "checkpoints", out / CONFIG_FILE) if p.exists()]
    if existing and not overwrite:
        raise ConfigError(f"--out: {out} already holds a run ({existing[0].name}); continue it with "
                          f"`fibec run --resume {out}` or pass --overwrite to start over")
    if existing:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        for stale in out.glob("metrics_*.jsonl"):
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in cfg.to_dict().items() if k != "resume"}
    checkpoint.atomic_write(out / CONFIG_FILE, (json.dumps(settings, indent=2) + "\n").encode())
    return out


def saved_config(out: str | Path) -> FedConfig:
    """The config a run under `out` was started with (its config.json), for --resume."""
    path = Path(out) / CONFIG_FILE
    try:
        settings = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--resume: {path} does not exist: {out} holds no run to resume") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--resume: {path} is not valid JSON ({err})") from None
    return FedConfig.from_mapping({**VALUES_BEFORE_ADDED, **settings, "out": str(out), "resume": True},
                                  source=str(path))


def _same_run(saved: dict, cfg: FedConfig) -> list[str]:
    """Settings in which a checkpoint's config differs from the run's (run-mode settings aside)."""
    current = cfg.to_dict()
    saved = {**VALUES_BEFORE_ADDED, **saved}
    return sorted(k for k in set(saved) | set(current)
                  if k not in RUN_MODE_SETTINGS and saved.get(k) != current.get(k))


def read_checkpoint(directory: Path, cfg: FedConfig, method: str) -> dict:
    """A checkpoint's state, checked to belong to this run and method (CheckpointError naming the file)."""
    _, state = checkpoint.load(directory)
    where = directory / checkpoint.STATE_FILE
    if state.get("method") != method:
        raise checkpoint.CheckpointError(f"mismatched checkpoint: {where} is of method {state.get('method')!r}, "
                                         f"not {method!r}")
    differing = _same_run(state.get("config", {}), cfg)
    if differing:
        raise checkpoint.CheckpointError(f"mismatched checkpoint: {where} was written with other settings "
                                         f"({', '.join(differing[:5])}) than {Path(cfg.out) / CONFIG_FILE}")
    return state


# ---- running in process ------------------------------------------------------------------------

def saved_state(cfg: FedConfig, method: str) -> dict | None:
    """The checkpoint a resumed run of `method` continues from (None: none written yet)."""
    directory = checkpoint_dir(Path(cfg.out), method)
    return read_checkpoint(directory, cfg, method) if cfg.resume and checkpoint.exists(directory) else None


def open_coordinator(cfg: FedConfig, method: str, server: Server, evaluator: Evaluator, model: torch.nn.Module, *,
                     clients: list[Client], saved: dict | None = None, progress: bool = True) -> Coordinator:
    """`method`'s Coordinator under cfg.out: records in metrics_<method>.jsonl and, after every round,
    a checkpoint of the coordinator and of `clients` (all of them in process; none on a Flower
    server, whose clients keep their state on their nodes). Restored from `saved` (its checkpoint's
    state) if given. The caller closes `coordinator.recorder`."""
    out = Path(cfg.out)
    directory = checkpoint_dir(out, method)

    def save(coordinator: Coordinator) -> None:
        checkpoint.save(directory, coordinator.rounds_done, {
            "method": method, "config": cfg.to_dict(), "coordinator": coordinator.state_dict(),
            "clients": {str(c.cid): c.state_dict() for c in clients}})

    records = saved["coordinator"]["records"] if saved else []
    recorder = Recorder(out / f"metrics_{method}.jsonl", method, cfg.rounds, progress=progress, records=records)
    coordinator = Coordinator(cfg, method, server, evaluator, model, recorder, on_round_end=save)
    if saved:
        try:
            coordinator.load_state_dict(saved["coordinator"])
            for client in clients:
                client.load_state_dict(saved["clients"][str(client.cid)])
        except (KeyError, ValueError, TypeError) as err:
            raise checkpoint.CheckpointError(f"mismatched checkpoint: {directory / checkpoint.STATE_FILE} does "
                                             f"not fit this run ({err})") from None
    return coordinator


def run_method(cfg: FedConfig, method: str, data: RunData, run_model: RunModel, *, saved: dict | None = None,
               progress: bool = True) -> list[dict]:
    """One method's rounds in process, under cfg.out; from `saved` (its checkpoint's state) if given."""
    fed = build_federation(cfg, method, data, run_model)
    coordinator = open_coordinator(cfg, method, fed.server, fed.evaluator, fed.model, clients=fed.clients,
                                   saved=saved, progress=progress)
    try:
        with torch_settings(cfg):
            run_rounds(coordinator, fed.transport)
    finally:
        coordinator.recorder.close()
    save_server_state(Path(cfg.out), method, fed.server.state)
    return coordinator.records


def save_server_state(out: Path, method: str, state: dict[str, torch.Tensor]) -> Path:
    """The final global trainable state as safetensors."""
    path = Path(out) / f"server_state_{method}.safetensors"
    checkpoint.atomic_write(path, save_tensors({n: t.contiguous() for n, t in state.items()}))
    return path


def prepare_run(cfg: FedConfig, *, overwrite: bool = False) -> tuple[RunData, RunModel, dict[str, dict | None]]:
    """Check what cfg's run needs before anything is written (each method's checkpoint when resuming,
    the data, the model), then create cfg.out for a fresh run. Returns the run's data, its model
    (loaded once for every method) and each method's saved state (None: start at round 1).

    Fresh (cfg.resume False): cfg.out must not hold a run (unless `overwrite`). Resumed: each
    method continues from its checkpoint; one that has none starts at round 1 (it had not
    finished a round).
    """
    saved = {method: saved_state(cfg, method) for method in cfg.methods}
    data = load_run_data(cfg)
    run_model = RunModel(cfg, data.train.num_labels)  # a bad --model or --gal-size fails before anything is written
    if not cfg.resume:
        prepare_out_dir(cfg, overwrite=overwrite)
    return data, run_model, saved


def run_methods(cfg: FedConfig, *, overwrite: bool = False, progress: bool = True) -> dict[str, list[dict]]:
    """Every method of cfg on the same data, partition and seed, in process; returns {method: records}
    (see `prepare_run` for fresh and resumed runs)."""
    data, run_model, saved = prepare_run(cfg, overwrite=overwrite)
    return {method: run_method(cfg, method, data, run_model, saved=saved[method], progress=progress)
            for method in cfg.methods}
