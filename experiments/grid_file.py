"""The grid file (see grid.py for its format): the runs it names, the settings each runs with,
the records of those done, and which records no longer match what it would run."""
from __future__ import annotations

import itertools
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Run:
    data: str
    alpha: float
    seed: int
    method: str
    variant: str

    @property
    def key(self) -> str:
        return f"{self.data}-a{self.alpha:g}-s{self.seed}-{self.method}-{self.variant}"


def load_grid(path: Path) -> dict:
    """The grid of a TOML file; relative `records`, `runs` and `report` paths are taken from the
    repository root."""
    grid = tomllib.loads(path.read_text())
    for key in ("name", "seeds", "methods"):
        if key not in grid:
            raise SystemExit(f"{path}: the grid needs '{key}'")
    grid.setdefault("records", f"experiments/records/{grid['name']}.jsonl")
    grid.setdefault("runs", f"runs/experiments/{grid['name']}")
    grid.setdefault("report", f"experiments/{grid['name']}.md")
    if "cells" not in grid:
        grid["cells"] = [{"data": d, "alpha": a} for d, a in itertools.product(grid["datasets"], grid["alphas"])]
    return grid


def runs_of(grid: dict) -> list[Run]:
    variants = grid.get("variants", {})
    shared = set(grid.get("shared_methods", []))
    runs = []
    # Seeds outermost: a grid cut short still covers every cell on its first seeds.
    for seed, cell, method in itertools.product(grid["seeds"], grid["cells"], grid["methods"]):
        # A variant without `methods` applies to every method but the shared ones, which run as "-"
        # and as the variants that name them.
        names = [v for v, spec in variants.items()
                 if (method in spec["methods"] if "methods" in spec else method not in shared)
                 and cell["data"] in spec.get("datasets", [cell["data"]]) and seed in spec.get("seeds", [seed])]
        for variant in (["-"] + names if method in shared or not variants else names):
            runs.append(Run(cell["data"], float(cell["alpha"]), int(seed), method, variant))
    return runs


def records_path(grid: dict) -> Path:
    return ROOT / grid["records"]


def read_records(grid: dict) -> dict[str, dict]:
    path = records_path(grid)
    if not path.exists():
        return {}
    return {r["key"]: r for r in map(json.loads, path.read_text().splitlines())}


def config_of(grid: dict, run: Run):
    from fibec.config import FedConfig

    variant = {k: v for k, v in grid.get("variants", {}).get(run.variant, {}).items()
               if k not in ("methods", "datasets", "seeds")}
    settings = {**grid.get("settings", {}), **grid.get("method_settings", {}).get(run.method, {}), **variant}
    settings.update(data=run.data, alpha=run.alpha, seed=run.seed, method=run.method,
                    out=str(ROOT / grid["runs"] / run.key))
    return FedConfig.from_mapping(settings, source=f"grid {grid['name']}")


RUN_PLACE = ("out", "resume")  # where a run keeps its files and whether it went on from them
IGNORED_IN_STALENESS = (*RUN_PLACE, "threads")  # where and how fast a run went, not what it computed


def stale_settings(grid: dict, run: Run, record: dict) -> dict[str, tuple]:
    """{setting: (recorded value, the grid's value now)} for every setting of a recorded run that
    the grid file (or a changed default) no longer gives it; settings added since are not counted."""
    now = config_of(grid, run).to_dict()
    return {name: (value, now[name]) for name, value in record["config"].items()
            if name in now and name not in IGNORED_IN_STALENESS and value != now[name]}


def stale_runs(grid: dict, done: dict[str, dict]) -> dict[str, dict[str, tuple]]:
    """The recorded runs of the grid whose settings differ from what the grid would run now."""
    stale = {}
    for run in runs_of(grid):
        if run.key in done and (changed := stale_settings(grid, run, done[run.key])):
            stale[run.key] = changed
    return stale


def describe_stale(stale: dict[str, dict[str, tuple]]) -> list[str]:
    return [f"{key}: " + ", ".join(f"{name} {old!r} recorded, {new!r} now" for name, (old, new) in changed.items())
            for key, changed in stale.items()]



def runs_of_cell(grid: dict, cell: dict) -> list[Run]:
    """The grid's runs on one data set and alpha."""
    return [r for r in runs_of(grid) if r.data == cell["data"] and r.alpha == float(cell["alpha"])]
