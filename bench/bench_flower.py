"""Time per round of a FibecFed run on Flower against the same run in process, on one machine.

Each engine runs the same config in a fresh process (`--one`), out of a temporary folder:
  in-process         fibec's default engine;
  flower, workers    `--engine flower`: a SuperLink and one SuperNode per client, each with fibec's
                     long-lived ClientApp worker (fibec.federated.flower_worker);
  flower, per message  the same with Flower's default isolation: a new flwr-clientapp process,
                     which loads torch and the model again, for every message.
A round's time is its record's `wall_time`: from the Coordinator opening the round to its record,
so every exchange with the nodes and the server's work. The first round on Flower also holds each
node's first model build (a worker's one-time start); the figure to hold against the in-process
round is the median of the later rounds. "run" is the whole command: imports, data, starting and
stopping the SuperLink and SuperNodes. Records are checked equal across engines (times aside).

Cases: the demo's size (the embedded default data, its 6 clients, 3 a round) and 10 clients, 5 a
round, on a data set in ../shared/data (skipped where it is absent).

    python bench/bench_flower.py [--json PATH] [--rounds K] [--data NAME] [--no-per-message]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENGINES = ("in-process", "flower, workers", "flower, per message")


def case_settings(name: str, rounds: int, data: str) -> dict:
    if name == "demo":
        return dict(method="fibecfed", rounds=rounds)
    # experiments/results.toml's settings, fewer evaluation samples
    return dict(method="fibecfed", rounds=rounds, data=data, clients=10, clients_per_round=5, local_steps=10,
                eval_samples=200, threads=1)


def run_one(engine: str, settings: dict, out: str) -> None:
    """One engine's run of `settings` under `out` (in this process)."""
    from fibec.config import FedConfig
    from fibec.federated import flower_local, runner

    cfg = FedConfig.from_mapping({**settings, "out": out, "engine": "inprocess" if engine == "in-process" else "flower"})
    if engine == "in-process":
        runner.run_methods(cfg, progress=False)
        return
    if engine == "flower, per message":
        class PerMessage(flower_local.LocalFederation):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, per_message_processes=True, **kwargs)

        flower_local.LocalFederation = PerMessage
    flower_local.run_methods(cfg, progress=False)


def measure(engine: str, settings: dict) -> dict:
    from fibec.federated.recorder import without_timings

    with tempfile.TemporaryDirectory(prefix="fibec-bench-flower-") as out:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--one", engine, json.dumps(settings), out],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        run_s = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"{engine} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        records = [json.loads(line) for line in (Path(out) / f"metrics_{settings['method']}.jsonl").read_text().splitlines()]
    rounds = [r["wall_time"] for r in records]
    return dict(engine=engine, run_s=run_s, round_s=rounds, first_round_s=rounds[0],
                later_round_s=statistics.median(rounds[1:]) if len(rounds) > 1 else float("nan"),
                compute_s=[r["compute_s"] for r in records], records=[without_timings(r) for r in records])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--data", default="trec", help="the ../shared/data set of the 10-client case ('': none)")
    parser.add_argument("--no-per-message", action="store_true", help="leave out Flower's per-message processes")
    parser.add_argument("--one", nargs=3, metavar=("ENGINE", "SETTINGS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        engine, settings, out = args.one
        run_one(engine, json.loads(settings), out)
        return

    from fibec.data import load_shared

    engines = ENGINES[:2] if args.no_per_message else ENGINES
    cases = ["demo"]
    try:
        if args.data:
            load_shared(args.data)
            cases.append(f"10 clients, {args.data}")
    except FileNotFoundError as err:
        print(f"skipping the 10-client case: {err}", file=sys.stderr)
    results = []
    for case in cases:
        settings = case_settings(case, args.rounds, args.data)
        rows = [measure(engine, settings) for engine in engines]
        base = rows[0]
        print(f"\n{case}: {settings}, load before: {os.getloadavg()[0]:.1f}")
        print(f"{'engine':<22}{'run s':>8}{'round 1 s':>11}{'later rounds s (median)':>25}{'x in-process':>14}"
              f"{'same records':>14}")
        for row in rows:
            row["case"], row["settings"] = case, settings
            row["ratio"] = row["later_round_s"] / base["later_round_s"]
            row["same_records"] = row["records"] == base["records"]
            print(f"{row['engine']:<22}{row['run_s']:>8.1f}{row['first_round_s']:>11.2f}{row['later_round_s']:>25.2f}"
                  f"{row['ratio']:>14.2f}{'yes' if row['same_records'] else 'NO':>14}")
        results += rows
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "records"} for r in results], indent=1))


if __name__ == "__main__":
    main()
