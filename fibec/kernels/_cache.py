"""Launching Triton kernels at the host cost of a cached launch, and tuned configs kept on disk.

Triton's own launch path costs tens of microseconds of host time a call: the autotuner's key and
config lookup, then the JIT's binding and specialisation of every argument and its cache key. On
a GPU that was several times the kernels' own time at the layer sizes fibec ships (bench/RESULTS.md),
and a new process spent tens of seconds timing configs it had timed before. Imports nothing from
fibec.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch
import triton
from triton.compiler import CompiledKernel
from triton.runtime.interpreter import InterpretedFunction


def _signature(args: tuple, constants: dict) -> tuple:
    """What Triton's choices for a launch can depend on: each tensor's dtype and 16-byte alignment
    (Triton specialises pointers on it), every other argument's value, and the constants. Floats
    are passed as fp32 and never specialised, so only their type counts."""
    return (*[(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
              else float if isinstance(a, float) else a for a in args], *constants.items())


def _hooked(hook) -> bool:
    """Whether a launch hook would do anything (Triton keeps them as chains, often empty)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class CachedLaunch:
    """A Triton kernel, plain or autotuned, launched as `launcher[grid](*args, **constants)`.

    The first launch of each argument signature (`_signature`) goes through Triton: the
    autotuner's choice of config (tuned, or read from the on-disk TuningCache), the JIT's
    specialisation and compilation, the launch. The compiled kernel, its grid and its
    compile-time constants are kept; a later launch of the same signature calls the compiled
    kernel's launcher directly with the arguments Triton itself would pass, but for the launch
    metadata and the hooks: None, as no hook is set. The grid must be a function of the
    arguments and constants (a callable grid is called with all of them).

    Triton's path is taken every time in the interpreter, when a launch hook is set (profilers),
    and on backends other than CUDA. `launches` counts the calls, `cached` those that took the
    cached path.
    """

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        # Under TRITON_INTERPRET=1 (read when triton.jit ran) the kernel is an interpreted function.
        self._interpreted = isinstance(self.jit, InterpretedFunction)
        self._compiled: dict[tuple, tuple] = {}
        self.launches = self.cached = 0

    @functools.cached_property
    def _constant_params(self) -> list:
        """The tl.constexpr parameters, which the launcher takes after the run-time arguments (the
        JIT's own parameters: the interpreter's functions have none)."""
        params = list(self.jit.params)
        first = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))
        if any(not p.is_constexpr for p in params[first:]):
            raise TypeError(f"{self.jit.__name__}: a cached launch needs every tl.constexpr parameter after the "
                            "run-time ones")
        return params[first:]

    def __getitem__(self, grid):
        return lambda *args, **constants: self.launch(grid, args, constants)

    def launch(self, grid, args: tuple, constants: dict):
        self.launches += 1
        if self._interpreted:
            return self.kernel[grid](*args, **constants)
        knobs = triton.knobs.runtime
        if _hooked(knobs.launch_enter_hook) or _hooked(knobs.launch_exit_hook) or self.jit.pre_run_hooks:
            return self.kernel[grid](*args, **constants)
        driver = triton.runtime.driver.active
        device = driver.get_current_device()
        key = (device, _signature(args, constants))
        entry = self._compiled.get(key)
        if entry is None:
            return self._first_launch(key, grid, args, constants, driver)
        compiled, (grid_0, grid_1, grid_2), tail = entry
        self.cached += 1
        compiled.run(grid_0, grid_1, grid_2, driver.get_current_stream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *tail)
        return compiled

    def forget(self) -> None:
        """Drop the compiled kernels kept: call it after changing the autotuner's configs or choices."""
        self._compiled.clear()

    def _first_launch(self, key: tuple, grid, args: tuple, constants: dict, driver):
        tuned = isinstance(self.kernel, triton.runtime.Autotuner)
        tuning = tuned and len(self.kernel.configs) > 1
        if tuning:
            tuning_cache().restore(self.kernel)
            entries = len(self.kernel.cache)
        compiled = self.kernel[grid](*args, **constants)
        if tuning and len(self.kernel.cache) > entries:
            tuning_cache().save(self.kernel)
        if (not isinstance(compiled, CompiledKernel) or driver.get_current_target().backend != "cuda"
                or len(args) + len(self._constant_params) != len(self.jit.params)):
            return compiled
        chosen = self.kernel.best_config.kwargs if tuned else {}
        constant_values = {**constants, **chosen}
        tail = tuple(constant_values[p.name] if p.name in constant_values else p.default
                     for p in self._constant_params)
        if callable(grid):
            grid = grid({**dict(zip((p.name for p in self.jit.params), args)), **constant_values})
        grid = (*grid, 1, 1)[:3]
        self._compiled[key] = (compiled, grid, tail)
        return compiled


# ---- tuned configs on disk ----------------------------------------------------------------------


class TuningCache:
    """The autotuners' choices, kept on disk so that a new process does not time the configs again.

    One JSON file per device, Triton, torch and kernel source (`path`), under $FIBEC_CACHE_DIR or
    ~/.cache/fibec: {kernel name: [[autotuner key, config], ...]}. Written atomically after a
    launch that tuned a new key (several processes may share the file: each merges what is there).
    """

    def __init__(self, directory: Path, identity: str) -> None:
        self.path = directory / f"autotune-{hashlib.sha256(identity.encode()).hexdigest()[:20]}.json"
        self.identity = identity
        self._restored: set[int] = set()

    def _read(self) -> dict:
        try:
            content = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return content.get("kernels", {}) if content.get("identity") == self.identity else {}

    def restore(self, kernel) -> None:
        """Put the file's choices for `kernel` into its autotuner cache (once per process)."""
        if id(kernel) in self._restored:
            return
        self._restored.add(id(kernel))
        for key, config in self._read().get(_tuned_name(kernel), []):
            kernel.cache.setdefault(tuple(key), triton.Config(**config))

    def save(self, kernel) -> None:
        """Merge `kernel`'s autotuner cache into the file."""
        content = self._read()
        entries = {tuple(key): config for key, config in content.get(_tuned_name(kernel), [])}
        for key, config in kernel.cache.items():
            entries[tuple(key)] = {k: v for k, v in vars(config).items() if k != "pre_hook"}
        content[_tuned_name(kernel)] = [[list(key), config] for key, config in entries.items()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps({"identity": self.identity, "kernels": content}))
        os.replace(partial, self.path)


def _tuned_name(kernel) -> str:
    """An autotuned kernel's name in the file: its function and its tuning space (two autotuners
    may wrap one function)."""
    return f"{kernel.fn.__name__}/{hashlib.sha256(repr(kernel.configs).encode()).hexdigest()[:12]}"


def _device_identity() -> str:
    """The current device's name and compute capability, and the versions that decide a config."""
    index = torch.cuda.current_device()
    name = torch.cuda.get_device_name(index)
    major, minor = torch.cuda.get_device_capability(index)
    return f"{name} sm_{major}{minor} triton {triton.__version__} torch {torch.__version__}"


@functools.cache
def _kernel_sources() -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))).hexdigest()


_TUNING_CACHES: dict[str, TuningCache] = {}


def tuning_cache() -> TuningCache:
    """The TuningCache of the current device (and these versions and kernel sources)."""
    identity = f"{_device_identity()} kernels {_kernel_sources()}"
    if identity not in _TUNING_CACHES:
        directory = Path(os.environ.get("FIBEC_CACHE_DIR") or Path.home() / ".cache" / "fibec")
        _TUNING_CACHES[identity] = TuningCache(directory, identity)
    return _TUNING_CACHES[identity]
