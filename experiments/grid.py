"""Experiment grids on real data: data set x alpha x seed x method (x variant), resumable, with a report.

    python experiments/grid.py run experiments/<grid>.toml       # runs what is missing, one run at a time
    python experiments/grid.py report experiments/<grid>.toml    # the Markdown report and its plots

A grid file (TOML) names the runs:

    name = "results"                       # records: experiments/records/<name>.jsonl
    report = "docs/RESULTS.md"             # where `report` writes (plots beside it, in <stem>_plots/)
    # records = "...", runs = "..."        # optional: other places for the records file and run folders
    cells = [{data = "trec", alpha = 0.5}, {data = "sst2", alpha = 0.5}]   # or: datasets = [...], alphas = [...]
    seeds = [0, 1, 2]
    methods = ["fibecfed", "fedavg"]
    baseline = "fedavg"                    # the reference of the time-to-accuracy and upload-ratio columns
    baseline_variant = "-"                 # which of its variants (when it has several)
    target_method = "fibecfed"             # optional: a table of it against the baseline, per cell
    transport_baseline_variant = "transport"   # optional: the baseline with the target's transport
    credit = [["fedavg", "-"], ["fibecfed", "-"]]  # optional: "What each piece buys", these rows per cell
    pairs = [["no-sparse", "-", "fibecfed", "-"]]  # optional: paired differences, method/variant A minus B
    findings = "experiments/results_findings.md"   # optional: hand-written text placed after it
    [settings]                             # FedConfig settings of every run
    clients = 10
    [variants.fisher]                      # optional: named overrides, each run for every method
    gal_ranker = "fisher"                  # but those in `shared_methods` (run once, variant "-")
    # methods = ["fibecfed"]               # a variant may name the methods it applies to (a shared
                                           # method too: it then runs as "-" and as this variant)
    # datasets = ["trec"]                  # and the data sets
    # seeds = [0, 1]                       # and the seeds
    [method_settings.fedavg]               # optional: settings of one method (under the variants')
    values = "fp32"

Every run is a `fibec` run in this process under runs/experiments/<name>/<key>/ with a checkpoint
per round: a killed grid resumes inside the run it was in, and a finished run (one line in the
records file, with its config and every round's metrics) is never repeated. Several grid processes
may run side by side (`--only` splits the work): each claims a run by a lock on runs/<name>/<key>.lock
and skips one that another holds or has recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from grid_file import ROOT, Run, config_of, describe_stale, load_grid, read_records, records_path, runs_of, stale_runs
from grid_report import report


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


def run_grid(grid: dict, only: str | None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    done = read_records(grid)
    todo = [r for r in runs_of(grid) if r.key not in done and (only is None or only in r.key)]
    print(f"{grid['name']}: {len(done)} runs recorded, {len(todo)} to run", flush=True)
    for line in describe_stale(stale_runs(grid, done)):
        # A record is never rerun on its own: say which no longer match, so none passes for the new settings.
        print(f"warning: recorded under other settings, kept as recorded (delete its line to rerun it, "
              f"or pin the setting in the grid file): {line}", flush=True)
    records_path(grid).parent.mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(todo, 1):
        with claim(ROOT / grid["runs"] / f"{run.key}.lock") as mine:
            # Grid processes whose --only overlap share the records file and the run folders.
            if not mine or run.key in read_records(grid):
                why = "running in another process" if not mine else "recorded by another process"
                print(f"[{i}/{len(todo)}] {run.key}: {why}, skipped", flush=True)
                continue
            seconds = run_one(grid, run, f"[{i}/{len(todo)}]")
        recorded = read_records(grid)
        print(progress_line(run.key, seconds, recorded, [r for r in todo[i:] if r.key not in recorded]), flush=True)


def progress_line(key: str, seconds: float, recorded: dict[str, dict], left: list[Run]) -> str:
    """After a run: its time, the grid's count, and the hours of runs left (hours_left)."""
    return (f"  {key}: recorded in {seconds / 60:.1f} min; {len(recorded)} runs recorded, {len(left)} left: "
            f"{hours_left(recorded, left):.1f} h of runs (a grid shared by k processes takes about 1/k of that)")


def hours_left(recorded: dict[str, dict], left: list[Run]) -> float:
    """Hours the runs `left` take, each at the median time of the recorded runs of its data set,
    method and variant, or of all recorded runs where none is: a data set or method that runs
    three times longer than another counts so. A resumed run records only its last part, so
    where many were resumed the figure runs low."""
    times: dict[tuple[str, str, str], list[float]] = {}
    for r in recorded.values():
        times.setdefault((r["data"], r["method"], r["variant"]), []).append(r["wall_s_this_process"])
    overall = float(np.median([t for kind in times.values() for t in kind])) if times else math.nan
    return sum(float(np.median(times.get((r.data, r.method, r.variant), [overall]))) for r in left) / 3600


@contextlib.contextmanager
def claim(lock: Path):
    """Whether this process holds an exclusive lock on `lock`; the lock goes with the process,
    however it ends (even SIGKILL), so a stale one never blocks a later grid."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def run_one(grid: dict, run: Run, tag: str) -> float:
    """One run (resumed from its checkpoint when it has one of the same settings; started afresh
    over one the grid file has since moved away from), then its line in the records file; returns
    the seconds it took in this process (the line's wall_s_this_process)."""
    from fibec.federated import checkpoint, runner

    cfg = config_of(grid, run)
    directory = runner.checkpoint_dir(Path(cfg.out), run.method)
    resume = checkpoint.exists(directory)
    if resume:
        try:
            runner.read_checkpoint(directory, cfg, run.method)
        except checkpoint.CheckpointError as err:
            print(f"{tag} {run.key}: {err}; starting it afresh", flush=True)
            resume = False
    cfg = cfg.replace(resume=resume)
    print(f"{tag} {run.key}{' (resumed)' if resume else ''}", flush=True)
    start = time.perf_counter()
    records = runner.run_methods(cfg, overwrite=True, progress=sys.stderr.isatty())[run.method]
    line = {"key": run.key, "data": run.data, "alpha": run.alpha, "seed": run.seed, "method": run.method,
            "variant": run.variant, "config": cfg.to_dict(), "rounds": records, "machine": machine(),
            "wall_s_this_process": time.perf_counter() - start,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    # One write of the whole line to an O_APPEND file: grids split with --only may share the file.
    fd = os.open(records_path(grid), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return line["wall_s_this_process"]



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "report"))
    parser.add_argument("grid", type=Path)
    parser.add_argument("--only", help="run only the runs whose key contains this")
    args = parser.parse_args(argv)
    grid = load_grid(args.grid)
    if args.command == "run":
        run_grid(grid, args.only)
    print(f"report: {report(grid)}")


if __name__ == "__main__":
    main()
