"""Durable run state: written atomically every round as safetensors and JSON, never pickle.

A checkpoint directory holds `state.json` (format, round, the nested state with every tensor
replaced by a reference, and the SHA-256 of the tensor file) and `round-NNNN.safetensors` (the
tensors). Each file is written to a temporary name, fsynced and renamed; the tensor file first,
then the JSON that names it, then older tensor files are removed. A crash at any point leaves
the previous checkpoint or the new one, whole. Anything damaged or mismatched raises
`CheckpointError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FORMAT = "fibec-checkpoint"
VERSION = 1
STATE_FILE = "state.json"
_TENSOR = "__tensor__"


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or does not fit the run; the message names the file."""


def flatten(state: object, prefix: str = "") -> tuple[object, dict[str, torch.Tensor]]:
    """(JSON-able skeleton, {path: tensor}) of a nested dict/list state: each tensor becomes
    {"__tensor__": path}, its path the keys leading to it joined by "/"."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: object, path: str) -> object:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous()
            return {_TENSOR: path}
        if isinstance(node, dict):
            for key in node:
                if not isinstance(key, str) or "/" in key or key == _TENSOR:
                    raise ValueError(f"state key {key!r} at {path or '/'} must be a str without '/'")
            return {key: walk(value, f"{path}/{key}" if path else key) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(value, f"{path}/{i}" if path else str(i)) for i, value in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"state at {path or '/'} holds a {type(node).__name__}; only tensors, dicts, lists "
                        f"and JSON scalars can be saved")

    return walk(state, prefix), tensors


def unflatten(skeleton: object, tensors: dict[str, torch.Tensor]) -> object:
    """The nested state `flatten` took apart. KeyError names a missing tensor."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR}:
            return tensors[skeleton[_TENSOR]]
        return {key: unflatten(value, tensors) for key, value in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten(value, tensors) for value in skeleton]
    return skeleton


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory: str | Path, round_done: int, state: dict) -> Path:
    """Write `state` (nested dicts of tensors and JSON values) as the checkpoint after `round_done`
    rounds; returns the path of state.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    skeleton, tensors = flatten(state)
    blob = save_tensors(tensors)
    tensor_file = f"round-{round_done:04d}.safetensors"
    atomic_write(directory / tensor_file, blob)
    meta = {"format": FORMAT, "version": VERSION, "round": round_done, "tensors": tensor_file,
            "sha256": hashlib.sha256(blob).hexdigest(), "state": skeleton}
    atomic_write(directory / STATE_FILE, (json.dumps(meta, indent=1) + "\n").encode())
    for old in directory.glob("round-*.safetensors"):
        if old.name != tensor_file:
            old.unlink()
    return directory / STATE_FILE


def exists(directory: str | Path) -> bool:
    return (Path(directory) / STATE_FILE).is_file()


def load(directory: str | Path) -> tuple[int, dict]:
    """(rounds done, state) of the checkpoint in `directory`; CheckpointError naming the damaged file."""
    state_path = Path(directory) / STATE_FILE
    try:
        meta = json.loads(state_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint: {state_path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"damaged checkpoint: {state_path} is not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{state_path} is not a fibec checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{state_path} has checkpoint version {meta.get('version')!r}; "
                              f"this fibec reads version {VERSION}")
    tensor_name = meta.get("tensors")
    if not isinstance(tensor_name, str) or "/" in tensor_name or not isinstance(meta.get("round"), int):
        raise CheckpointError(f"damaged checkpoint: {state_path} lacks its round or tensor file name")
    tensor_path = state_path.parent / tensor_name
    try:
        blob = tensor_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"damaged checkpoint: {tensor_path} (named by {state_path}) is missing") from None
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"damaged checkpoint: {tensor_path} does not match the checksum in {state_path}")
    try:
        tensors = load_tensors(blob)
        state = unflatten(meta["state"], tensors)
    except (SafetensorError, KeyError, ValueError) as err:
        raise CheckpointError(f"damaged checkpoint: {tensor_path} cannot be read ({err})") from None
    return meta["round"], state
