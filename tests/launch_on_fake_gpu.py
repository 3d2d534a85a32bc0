"""fibec's kernel launchers on a stand-in CUDA driver: what the cached launch passes, and its host time.

Without a GPU the kernels run in the interpreter, where Triton's launch path (autotuner, JIT
specialisation, compiled kernel, launcher) never runs. Here Triton runs its CUDA path on a machine
without one: a stand-in driver reports an sm_90 device, Triton compiles every kernel for it
(ptxas included), and the launcher records its arguments instead of launching. Each op runs twice
on the same inputs, then on a view that is not 16-byte aligned:

- the first launch of each kernel goes through Triton, the second takes the cached path and
  passes the launcher exactly what Triton passed (grid, stream, kernel, metadata, every argument);
- the misaligned view is a new signature: Triton again, with a kernel compiled without the
  alignment assumption;
- no op reads a tensor's value on the host (a synchronisation on a GPU), and none allocates more
  than its outputs and a few scratch buffers (counted by a TorchDispatchMode);
- the on-disk tuning cache round-trips an autotuner's choices (--tuning-cache);
- with --time, the host time per call of each op on both paths (the launcher does nothing).

Must run without TRITON_INTERPRET. Prints one line per check; exits 1 on any failure.

    python tests/launch_on_fake_gpu.py [--time] [--tuning-cache]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("launch_on_fake_gpu.py: unset TRITON_INTERPRET (the interpreter has no launch path)")
os.environ["FIBEC_AUTOTUNE"] = "0"  # one config per kernel: nothing to time on a stand-in device
TUNING_DIR = tempfile.TemporaryDirectory(prefix="fibec-tuning-")
os.environ["FIBEC_CACHE_DIR"] = TUNING_DIR.name

import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402

SHARED_MEMORY = 232448  # sm_90, per block with opt-in


class RecordingLauncher:
    """Stands in for Triton's CUDA launcher of one compiled kernel: records each call."""

    calls: list = []

    def __init__(self, src, metadata) -> None:
        self.name = src.fn.__name__ if hasattr(src, "fn") else str(src)

    def __call__(self, *launch) -> None:
        RecordingLauncher.calls.append((self.name, launch))


class StandInUtils:
    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": SHARED_MEMORY, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    loaded = 0

    def load_binary(self, name, kernel, shared, device):
        StandInUtils.loaded += 1  # each compiled kernel its own function handle
        return object(), StandInUtils.loaded, 64, 0, 1024  # module, function, registers, spills, max threads

    def unload_module(self, module) -> None:
        pass


class StandInCudaDriver(DriverBase):
    """An sm_90 device 0 with stream 0, whose launches are recorded."""

    launcher_cls = RecordingLauncher

    def __init__(self) -> None:
        self.utils = StandInUtils()

    @classmethod
    def is_active(cls) -> bool:
        return True

    def map_python_to_cpp_type(self, ty: str) -> str:
        return ty

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("nothing is timed on the stand-in device")

    def get_current_device(self) -> int:
        return 0

    def set_current_device(self, device) -> None:
        pass

    def get_current_stream(self, device) -> int:
        return 0


triton.runtime.driver.set_active(StandInCudaDriver())

from fibec.kernels import _cache, fisher, masked_update  # noqa: E402

_cache._device_identity = lambda: "stand-in sm_90"
LAUNCHERS = {"fisher": ("_dense_outer", "_lora_outer", "_projection", "_reduce_splits"),
             "masked_update": ("_masked_adamw", "_masked_sgd")}
MODULES = {"fisher": fisher, "masked_update": masked_update}
failures = 0


def check(ok: bool, what: str) -> None:
    global failures
    failures += not ok
    print(("ok      " if ok else "FAILED  ") + what, flush=True)


def cached_launches() -> int:
    return sum(getattr(MODULES[m], name).cached for m, names in LAUNCHERS.items() for name in names)


def same_argument(x, y) -> bool:
    """Tensors: the same dtype, shape, strides and 16-byte alignment (the op allocates its outputs and
    scratch anew each call); anything else: equal."""
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                and x.shape == y.shape and x.stride() == y.stride() and x.data_ptr() % 16 == y.data_ptr() % 16)
    return x == y or x is y


def differences(triton_launch: tuple, cached_launch: tuple) -> list:
    """Where a cached launch passes the launcher other than what Triton passed: the kernel, grid,
    stream, function, packed metadata and every argument must agree. Where Triton passes launch
    metadata and its (empty) hook chains (positions 6-8), the cached launch passes None."""
    (name_a, launch_a), (name_b, launch_b) = triton_launch, cached_launch
    if name_a != name_b or len(launch_a) != len(launch_b):
        return ["kernel or argument count"]
    wrong = [i for i, (x, y) in enumerate(zip(launch_a, launch_b)) if i not in (6, 7, 8) and not same_argument(x, y)]
    if launch_b[6:9] != (None, None, None) or any(getattr(hook, "calls", None) for hook in launch_a[7:9]):
        wrong.append("hooks")
    return wrong


def cases(dtype: torch.dtype, N: int = 3, T: int = 37, I: int = 48, O: int = 40, rank: int = 5):
    """(name, op) for every launch sequence the ops make, on CPU tensors."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(N, T, I, generator=gen).to(dtype)
    G = torch.randn(N, T, O, generator=gen).to(dtype)
    mask = torch.rand(N, T, generator=gen) > 0.3
    A, B = torch.randn(rank, I, generator=gen).to(dtype), torch.randn(O, rank, generator=gen).to(dtype)
    out = torch.zeros(O, I)
    p = torch.randn(O, I, generator=gen).to(dtype)
    state = [torch.zeros(O, I) for _ in range(3)]
    rows, columns = torch.rand(O, generator=gen) > 0.5, torch.rand(I, generator=gen) > 0.5
    elements = torch.rand(O, I, generator=gen) > 0.5
    adamw = dict(step=2, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    return [
        ("fisher_diag", lambda: fisher.fisher_diag(X, G, mask)),
        ("fisher_diag out+=", lambda: fisher.fisher_diag(X, G, None, out=out, accumulate=True)),
        ("fisher_diag with_sqnorms", lambda: fisher.fisher_diag(X, G, mask, with_sqnorms=True)),
        ("lora_fisher_diag", lambda: fisher.lora_fisher_diag(X, G, A, B, 0.5, mask)),
        ("sample_sqnorms", lambda: fisher.sample_sqnorms(X, G, mask)),
        ("masked_adamw rows", lambda: masked_update.masked_adamw(p, p, state[0], state[1], rows, 0, **adamw)),
        ("masked_adamw columns", lambda: masked_update.masked_adamw(p, p, state[0], state[1], columns, 1, **adamw)),
        ("masked_adamw elements", lambda: masked_update.masked_adamw(p, p, state[0], state[1], elements, None,
                                                                     **adamw)),
        ("masked_sgd momentum", lambda: masked_update.masked_sgd(p, p, rows, 0, lr=0.1, momentum=0.9, buf=state[2],
                                                                 weight_decay=0.0, nesterov=False)),
    ], X


def forget_all() -> None:
    for module, names in LAUNCHERS.items():
        for name in names:
            getattr(MODULES[module], name).forget()


def run_once(op) -> list:
    start = len(RecordingLauncher.calls)
    op()
    return RecordingLauncher.calls[start:]


def check_cached_launches() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        ops, X = cases(dtype)
        for name, op in ops:
            label = f"{name} {str(dtype).removeprefix('torch.')}"
            forget_all()
            cached_before = cached_launches()
            first = run_once(op)
            check(cached_launches() == cached_before and first, f"{label}: first call through Triton "
                  f"({len(first)} launches)")
            second = run_once(op)
            check(cached_launches() - cached_before == len(second) == len(first),
                  f"{label}: second call cached ({cached_launches() - cached_before} of {len(second)})")
            differing = {a[0]: differences(a, b) for a, b in zip(first, second) if differences(a, b)}
            check(not differing, f"{label}: the cached launches pass what Triton passed {differing or ''}")
    # A view one element in is not 16-byte aligned: a new signature, compiled without that assumption.
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(3 * 37 * 48 + 1, generator=gen)[1:].view(3, 37, 48)
    G = torch.randn(3, 37, 40, generator=gen)
    aligned_X = X.clone()
    forget_all()
    run_once(lambda: fisher.fisher_diag(aligned_X, G))
    aligned = run_once(lambda: fisher.fisher_diag(aligned_X, G))
    cached_before = cached_launches()
    misaligned = run_once(lambda: fisher.fisher_diag(X, G))
    check(cached_launches() - cached_before < len(misaligned), "a misaligned input is a new signature: through Triton")
    check(misaligned[0][1][4] != aligned[0][1][4], "the misaligned input runs another compiled kernel than the "
          "aligned one")


class TensorCalls(TorchDispatchMode):
    """Counts the torch calls an op makes: allocations, and reads of a tensor's value on the host
    (item(), bool(), tolist(): each a host-device synchronisation on a GPU)."""

    ALLOCATING = ("empty", "zeros", "ones", "full", "new_empty", "new_zeros", "sum", "clone", "stack")
    READING = ("_local_scalar_dense", "is_nonzero", "equal")

    def __init__(self) -> None:
        super().__init__()
        self.allocations, self.reads = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.allocations += name in self.ALLOCATING
        self.reads += name in self.READING
        return func(*args, **(kwargs or {}))


OUTPUTS = {"fisher_diag": 1, "fisher_diag out+=": 0, "fisher_diag with_sqnorms": 2, "lora_fisher_diag": 3,
           "sample_sqnorms": 1}


def check_torch_calls() -> None:
    """No op reads a tensor's value on the host. Besides its outputs an op allocates at most three
    scratch buffers: LoRA's projections, a split's partial sums, the per-tile norms (summed into
    the output norms). The masked updates allocate nothing."""
    ops, _ = cases(torch.float32)
    for name, op in ops:
        op()
        with TensorCalls() as calls:
            op()
        check(calls.reads == 0, f"{name}: no host read of a tensor's value ({calls.reads})")
        scratch = calls.allocations - OUTPUTS.get(name, 0)
        check(scratch <= (3 if name in OUTPUTS else 0), f"{name}: {scratch} scratch allocations a call")


def check_tuning_cache() -> None:
    """An autotuner's choices saved and restored through the file (no timing: choices set by hand)."""
    launcher = fisher._dense_outer
    tuner = launcher.kernel
    space = fisher._outer_space(tiled_columns=True)
    cache = _cache.tuning_cache()
    tuner.configs, tuner.cache = space, {(384, 384, 0, "torch.bfloat16"): space[5], (96, 64, 0, "torch.float32"): space[7]}
    cache.save(tuner)
    tuner.cache = {}
    fresh = _cache.TuningCache(cache.path.parent, cache.identity)
    fresh.restore(tuner)
    check({k: str(c) for k, c in tuner.cache.items()} == {(384, 384, 0, "torch.bfloat16"): str(space[5]),
                                                         (96, 64, 0, "torch.float32"): str(space[7])},
          "the tuning cache restores an autotuner's choices in a new process")
    other = _cache.TuningCache(cache.path.parent, cache.identity + " another device")
    tuner.cache = {}
    other.restore(tuner)
    check(tuner.cache == {}, "another device's file gives nothing")
    tuner.configs = space[:1]


def host_time_per_call(op, path: str, calls: int = 300) -> float:
    """Microseconds of host time per call of `op` with launches that do nothing."""
    forget = path == "triton"
    op()
    start = time.perf_counter()
    for _ in range(calls):
        if forget:
            forget_all()
        op()
    return (time.perf_counter() - start) / calls * 1e6


def report_host_time() -> None:
    ops, _ = cases(torch.bfloat16, N=16, T=128, I=384, O=384, rank=8)
    print("host us per call (stand-in launcher, this CPU): cached path | Triton's path")
    for name, op in ops:
        cached, triton_path = host_time_per_call(op, "cached"), host_time_per_call(op, "triton")
        print(f"  {name:24s} {cached:7.1f} | {triton_path:7.1f}  ({triton_path / cached:.1f}x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--time", action="store_true", help="report host time per call on both paths")
    parser.add_argument("--tuning-cache", action="store_true", help="check the on-disk tuning cache too")
    args = parser.parse_args()
    check_cached_launches()
    check_torch_calls()
    if args.tuning_cache:
        check_tuning_cache()
    if args.time:
        report_host_time()
    print(f"{failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
