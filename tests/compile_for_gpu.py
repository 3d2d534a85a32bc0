"""Compile every Triton kernel launch of fibec's ops for an NVIDIA GPU, on a machine without one.

Without a GPU the kernels only ever run in the interpreter, which accepts code the compiler
rejects (and ignores shared memory). Here each launcher runs on CPU tensors with its kernels
replaced by recorders; every distinct recorded launch (argument dtypes and compile-time
constants) is then compiled by Triton's CUDA backend, ptxas included, for the target
architecture: with the fixed config (FIBEC_AUTOTUNE=0 and the interpreter use it) and with the
largest config the autotuner's pruner keeps for that GPU. A compiled kernel must fit the GPU's
shared memory, and a kernel launched without fp fusion (the int8 quantiser, which must round as the
C++ encoder does) must hold no fused multiply-add. Must run without TRITON_INTERPRET (the interpreter's kernels cannot be compiled).

    python tests/compile_for_gpu.py [--arch 90] [--every-config]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_for_gpu.py: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
os.environ["FIBEC_AUTOTUNE"] = "1"  # the autotuners hold their whole search space

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fibec.kernels import fisher, masked_update, quantize  # noqa: E402

# Per GPU architecture: (SMs, shared memory per block with opt-in, in bytes).
DEVICES = {80: (108, 166912), 90: (132, 232448)}
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
                torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class Recorder:
    """Stands in for a JIT kernel or an autotuner: `kernel[grid](*args, **constants)` is recorded."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches
        self.configs = getattr(kernel, "configs", None)

    def __getitem__(self, grid):
        return lambda *args, **constants: self.launches.append((self.kernel, args, constants))


def record_launches(sms: int, shared: int) -> list:
    """Every launch the ops make over dtypes, masks, split plans, LoRA ranks and update masks."""
    launches: list = []
    fisher._split_budget = lambda device: (4 * sms, 128)
    fisher._max_shared_memory = lambda device: shared
    # Each launcher is a CachedLaunch: its `kernel` is the JIT function or autotuner to compile.
    for name in ("_dense_outer", "_lora_outer", "_projection", "_reduce_splits"):
        setattr(fisher, name, Recorder(getattr(fisher, name).kernel, launches))
    for name in ("_masked_adamw", "_masked_sgd"):
        setattr(masked_update, name, Recorder(getattr(masked_update, name).kernel, launches))
    quantize._LAUNCHERS = {name: Recorder(launcher.kernel, launches) for name, launcher in quantize._LAUNCHERS.items()}

    # (N, T): many samples (whole samples per split) and few long ones (token chunks, second pass).
    for dtype, (N, T), masked in itertools.product(FLOATS, [(64, 16), (2, 1024)], [False, True]):
        X, G = torch.zeros(N, T, 96, dtype=dtype), torch.zeros(N, T, 80, dtype=dtype)
        mask = torch.ones(N, T, dtype=torch.bool) if masked else None
        fisher.fisher_diag(X, G, mask)
        fisher.fisher_diag(X, G, mask, out=torch.zeros(80, 96), accumulate=True)
        fisher.fisher_diag(X, G, mask, with_sqnorms=True)
        fisher.sample_sqnorms(X, G, mask)
        for rank in (5, 16, 64):
            A, B = torch.zeros(rank, 96, dtype=dtype), torch.zeros(80, rank, dtype=dtype)
            fisher.lora_fisher_diag(X, G, A, B, 0.5, mask)
    for dtype, (mask, mask_dim) in itertools.product(FLOATS, [(None, None), (torch.ones(40, 24, dtype=torch.bool), None),
                                                              (torch.ones(40, dtype=torch.bool), 0),
                                                              (torch.ones(24, dtype=torch.bool), 1)]):
        p, state = torch.zeros(40, 24, dtype=dtype), torch.zeros(40, 24)
        masked_update.masked_adamw(p, p, state, state, mask, mask_dim, step=1, lr=1e-3, beta1=0.9, beta2=0.999,
                                   eps=1e-8, weight_decay=0.01)
        for momentum, nesterov in ((0.0, False), (0.9, False), (0.9, True)):
            masked_update.masked_sgd(p, p, mask, mask_dim, lr=1e-3, momentum=momentum, buf=state,
                                     weight_decay=0.0, nesterov=nesterov)
    for dtype, values in itertools.product(FLOATS, quantize.FORMATS):
        quantize.quantise_blocks(torch.zeros(1000, dtype=dtype), values)
    return launches


def triton_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    return "fp32"


def variants(launches: list, every_config: bool) -> set:
    """{(kernel, signature, constants, warps, stages)} over the distinct launches and configs."""
    found = set()
    for kernel, args, launch_kwargs in launches:
        tuned = isinstance(kernel, triton.runtime.Autotuner)
        jit = kernel.fn if tuned else kernel
        named = dict(zip(jit.arg_names, args))
        # Keyword arguments that name no parameter are compile options (enable_fp_fusion).
        constants = {k: v for k, v in launch_kwargs.items() if k in jit.arg_names}
        options = tuple(sorted((k, v) for k, v in launch_kwargs.items() if k not in jit.arg_names))
        configs = [None]
        if tuned:
            kept = kernel.early_config_prune(kernel.configs, {**named, **constants}, **constants)
            if not kept:
                raise AssertionError(f"{jit.__name__}: the pruner keeps no config for {constants}")
            largest = max(kept, key=lambda c: (c.num_stages * sum(v for v in c.kwargs.values()), c.num_warps))
            configs = kept if every_config else [kernel.configs[0], largest]
        for config in configs:
            all_constants = {**constants, **(config.kwargs if config else {})}
            signature = tuple((name, "constexpr" if param.is_constexpr else triton_type(named[name]))
                              for name, param in zip(jit.arg_names, jit.params))
            key = (jit, signature, tuple(sorted(all_constants.items())),
                   config.num_warps if config else 4, config.num_stages if config else 3, options)
            found.add(key)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(DEVICES), help="compute capability x 10")
    parser.add_argument("--every-config", action="store_true", help="every config the pruner keeps (slow)")
    args = parser.parse_args()
    sms, shared = DEVICES[args.arch]
    target = GPUTarget("cuda", args.arch, 32)
    found = variants(record_launches(sms, shared), args.every_config)
    start, failures = time.perf_counter(), 0
    for jit, signature, constants, warps, stages, options in sorted(found, key=str):
        label = f"{jit.__name__} {dict(signature)} {dict(constants)} warps={warps} stages={stages} {dict(options)}"
        try:
            compiled = triton.compile(ASTSource(jit, dict(signature), dict(constants)), target=target,
                                      options={"num_warps": warps, "num_stages": stages, **dict(options)})
        except Exception as err:  # noqa: BLE001 (report every failing variant, then fail)
            failures += 1
            print(f"FAILED {label}: {type(err).__name__}: {str(err).strip()[:2000]}", flush=True)
            continue
        if dict(options).get("enable_fp_fusion") is False and "fma." in compiled.asm["ptx"]:
            failures += 1
            print(f"FAILED {label}: compiled without fp fusion, yet its PTX holds a fused multiply-add")
        if compiled.metadata.shared > shared:
            failures += 1
            print(f"FAILED {label}: {compiled.metadata.shared} bytes of shared memory, sm_{args.arch} has {shared}")
    print(f"sm_{args.arch}: {len(found) - failures} of {len(found)} kernel variants compiled "
          f"in {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
