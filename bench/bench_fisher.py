"""Fisher benchmarks: fibec's fused ops against what a user would otherwise run, in one run.

Groups (shapes (N,T,I,O[,r]); X [N,T,I] layer inputs, G [N,T,O] output gradients, fp32 on CPU):
- fisher:  diagonal Fisher sum_n (G_n^T X_n)**2 of an nn.Linear weight. fibec.ops.fisher_diag, the
           plain per-sample loop, torch.func vmap(grad), Opacus GradSampleModule (grad_sample,
           loss_reduction="sum") and BackPACK SumGradSquared. The library rows need the layer's
           forward+backward to see X and G, so a "fwd+bwd only" row shows that share of their time.
- sqnorms: per-sample squared gradient norms. fibec.ops.sample_sqnorms, torch.func, Opacus' ghost
           norm (compute_linear_norm_sample, T x T Grams) and BackPACK BatchL2Grad.
- lora:    both LoRA factors' diagonal Fisher and per-sample norms. fibec.ops.lora_fisher_diag, a
           plain low-rank per-sample bmm path, Opacus ghost norms on the two LoRA sub-layers (norms
           only) and torch.func.
Each method's extra peak memory is measured in its own process (RSS high-water mark on CPU,
torch.cuda.max_memory_allocated on GPU).

GPU mode (--gpu-json PATH, what bench/gpu.sh runs): the Triton kernels at LLM sizes in bf16
under triton.testing.do_bench, against a same-FLOP bf16 torch.matmul and the peers, with each
method's extra peak memory, and for fibec's ops host vs GPU-kernel time per call and the tuned
configs; the rows and the targets' ratios go to PATH. Without CUDA the same
code runs at tiny fp32 shapes on the CPU (a dry run of the script, not a measurement).

pytest mode:  pytest bench/bench_fisher.py   (pytest-benchmark; peak memory in extra_info)
script mode:  python bench/bench_fisher.py   (methods interleaved over rounds; table of medians)
FIBEC_BENCH_SMALL=1 shrinks the shapes; FIBEC_BENCH_ROUNDS sets the rounds (default 5);
FIBEC_BENCH_GROUPS=fisher,sqnorms,lora picks groups (default all).
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import grad, vmap

from fibec import ops

SMALL = os.environ.get("FIBEC_BENCH_SMALL", "0") not in ("", "0")
ROUNDS = int(os.environ.get("FIBEC_BENCH_ROUNDS", "5"))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEVICE_NAME = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
DENSE_SHAPES = [(8, 128, 384, 1536), (8, 256, 1024, 1024) if SMALL else (16, 512, 2048, 2048)]
LORA_SHAPES = [(8, 256, 768, 768, 16) if SMALL else (16, 512, 768, 768, 16)]

Runner = Callable[[], object]


def make_layer_inputs(shape, *, dtype=torch.float32, device=DEVICE):
    N, T, I, O = shape[:4]
    gen = torch.Generator(device=device).manual_seed(0)
    X = torch.randn(N, T, I, generator=gen, device=device).to(dtype)
    G = torch.randn(N, T, O, generator=gen, device=device).to(dtype)
    return X, G


def make_lora_inputs(shape, *, dtype=torch.float32, device=DEVICE):
    N, T, I, O, r = shape
    X, G = make_layer_inputs(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(1)
    A = (torch.randn(r, I, generator=gen, device=device) / I**0.5).to(dtype)
    B = torch.randn(O, r, generator=gen, device=device).to(dtype)
    return X, G, A, B, 2.0


# ---- fisher: each factory does its set-up and returns the timed call -> [O,I] -----------------
def linear_for(X: torch.Tensor, G: torch.Tensor) -> nn.Linear:
    return nn.Linear(X.shape[2], G.shape[2], bias=False, device=X.device, dtype=X.dtype)


def fibec_fisher(X, G) -> Runner:
    return lambda: ops.fisher_diag(X, G)


def loop_fisher(X, G) -> Runner:
    def run():
        fisher = torch.zeros(G.shape[2], X.shape[2], device=X.device)
        for x, g in zip(X, G):
            dW = g.T @ x
            fisher += dW**2
        return fisher
    return run


def per_sample_grads_torch_func(X, G) -> torch.Tensor:
    W = torch.zeros(G.shape[2], X.shape[2], device=X.device, dtype=X.dtype)

    def loss(W, x, g):
        return (g * nn.functional.linear(x, W)).sum()

    return vmap(grad(loss), in_dims=(None, 0, 0))(W, X, G)


def torch_func_fisher(X, G) -> Runner:
    return lambda: per_sample_grads_torch_func(X, G).square().sum(0)


def opacus_fisher(X, G) -> Runner:
    from opacus import GradSampleModule

    layer = linear_for(X, G)
    module = GradSampleModule(layer, loss_reduction="sum", batch_first=True)

    def run():
        module.zero_grad(set_to_none=True)
        (module(X) * G).sum().backward()
        return layer.weight.grad_sample.square().sum(0)
    return run


def backpack_runner(X, G, extension: str, result: str) -> Runner:
    """BackPACK's `extension` on the layer's backward; returns the weight's `result` attribute."""
    from backpack import backpack, extend, extensions

    layer = extend(linear_for(X, G))

    def run():
        layer.zero_grad(set_to_none=True)
        with backpack(getattr(extensions, extension)()):
            (layer(X) * G).sum().backward()
        return getattr(layer.weight, result)
    return run


def backpack_fisher(X, G) -> Runner:
    return backpack_runner(X, G, "SumGradSquared", "sum_grad_squared")


def forward_backward_only(X, G) -> Runner:
    layer = linear_for(X, G)

    def run():
        layer.zero_grad(set_to_none=True)
        (layer(X) * G).sum().backward()
    return run


# ---- sqnorms: -> [N] -----------------------------------------------------------------------
def fibec_sqnorms(X, G) -> Runner:
    return lambda: ops.sample_sqnorms(X, G)


def torch_func_sqnorms(X, G) -> Runner:
    return lambda: per_sample_grads_torch_func(X, G).square().sum((1, 2))


def opacus_ghost_sqnorms(X, G) -> Runner:
    from opacus.grad_sample.linear import compute_linear_norm_sample

    layer = linear_for(X, G)
    return lambda: compute_linear_norm_sample(layer, [X], G)[layer.weight].square()


def backpack_sqnorms(X, G) -> Runner:
    return backpack_runner(X, G, "BatchL2Grad", "batch_l2")


# ---- lora: -> (F_A [r,I], F_B [O,r], sqnorm [N]); Opacus ghost norms give sqnorm only -----
def fibec_lora(X, G, A, B, s) -> Runner:
    return lambda: ops.lora_fisher_diag(X, G, A, B, s)


def bmm_lora(X, G, A, B, s) -> Runner:
    def run():
        dA = s * torch.bmm((G @ B).transpose(1, 2), X)
        dB = s * torch.bmm(G.transpose(1, 2), X @ A.T)
        sq_A, sq_B = dA.square(), dB.square()
        return sq_A.sum(0), sq_B.sum(0), sq_A.sum((1, 2)) + sq_B.sum((1, 2))
    return run


def opacus_ghost_lora(X, G, A, B, s) -> Runner:
    from opacus.grad_sample.linear import compute_linear_norm_sample

    r, I, O = A.shape[0], A.shape[1], B.shape[0]
    lora_A = nn.Linear(I, r, bias=False, device=X.device, dtype=X.dtype)
    lora_B = nn.Linear(r, O, bias=False, device=X.device, dtype=X.dtype)

    def run():
        # Sub-layer inputs/output-gradients as peft's hooks would see them: x -> A -> B, scaled by s.
        norm_A = compute_linear_norm_sample(lora_A, [X], s * (G @ B))[lora_A.weight]
        norm_B = compute_linear_norm_sample(lora_B, [X @ A.T], s * G)[lora_B.weight]
        return None, None, norm_A.square() + norm_B.square()
    return run


def torch_func_lora(X, G, A, B, s) -> Runner:
    def loss(A, B, x, g):
        return s * (g * (x @ A.T @ B.T)).sum()

    def run():
        dA, dB = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(A, B, X, G)
        sq_A, sq_B = dA.square(), dB.square()
        return sq_A.sum(0), sq_B.sum(0), sq_A.sum((1, 2)) + sq_B.sum((1, 2))
    return run


GROUPS = {
    "fisher": (make_layer_inputs, DENSE_SHAPES, {
        "fibec.fisher_diag": fibec_fisher, "per-sample loop": loop_fisher, "torch.func": torch_func_fisher,
        "opacus GradSampleModule": opacus_fisher, "backpack SumGradSquared": backpack_fisher,
        "fwd+bwd only (no Fisher)": forward_backward_only}),
    "sqnorms": (make_layer_inputs, DENSE_SHAPES, {
        "fibec.sample_sqnorms": fibec_sqnorms, "torch.func": torch_func_sqnorms,
        "opacus ghost norm": opacus_ghost_sqnorms, "backpack BatchL2Grad": backpack_sqnorms}),
    "lora": (make_lora_inputs, LORA_SHAPES, {
        "fibec.lora_fisher_diag": fibec_lora, "plain low-rank bmm": bmm_lora,
        "opacus ghost norms (norms only)": opacus_ghost_lora, "torch.func": torch_func_lora}),
}
BASELINE = {"fisher": "per-sample loop", "sqnorms": "torch.func", "lora": "plain low-rank bmm"}
SELECTED = os.environ.get("FIBEC_BENCH_GROUPS", ",".join(GROUPS)).split(",")


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def check_agrees(result, expected) -> None:
    """Every method must compute the same thing as the baseline, or its time means nothing."""
    results = result if isinstance(result, tuple) else (result,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    for got, want in zip(results, expecteds):
        if got is not None:
            torch.testing.assert_close(got.float(), want.float(), rtol=1e-3, atol=1e-3 * want.abs().max().item())


# ---- extra peak memory, one process per method ---------------------------------------------
def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def measure_peak_here(group: str, method: str, shape) -> int:
    """Extra peak bytes of one warm call of `method`, above what was resident before it."""
    make_inputs, _, methods = GROUPS[group]
    run = methods[method](*make_inputs(shape))
    run()
    synchronize()
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = _rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets the VmHWM high-water mark to the current RSS
    run()
    return _rss_bytes("VmHWM") - before


def measure_peak(group: str, method: str, shape) -> int:
    """Run measure_peak_here in a fresh process; malloc returns large blocks to the OS at once so
    RSS follows what the method really holds."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    cmd = [sys.executable, __file__, "--peak", json.dumps([group, method, list(shape)])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


# ---- pytest-benchmark mode ---------------------------------------------------------------
CASES = [(group, method, shape) for group, (_, shapes, methods) in GROUPS.items() if group in SELECTED
         for shape in shapes for method in methods]


@pytest.mark.parametrize("group,method,shape", CASES, ids=[f"{g}-{m}-{s}" for g, m, s in CASES])
def test_fisher_benchmark(benchmark, group, method, shape):
    make_inputs, _, methods = GROUPS[group]
    inputs = make_inputs(shape)
    run = methods[method](*inputs)
    if method != "fwd+bwd only (no Fisher)":
        check_agrees(run(), methods[BASELINE[group]](*inputs)())
    benchmark.group = f"{group} {shape}"
    benchmark.extra_info["extra_peak_MB"] = round(measure_peak(group, method, shape) / 2**20, 1)

    def timed():
        run()
        synchronize()
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)


# ---- GPU mode ------------------------------------------------------------------------------
# Per case (N,T,I,O[,r]): the peers timed besides fibec (dense cases also get the same-FLOP matmul).
GPU_DENSE = {
    (8, 512, 4096, 4096): ("torch.func", "opacus GradSampleModule", "backpack SumGradSquared"),
    (4, 2048, 4096, 11008): (),
    (8, 4096, 64, 64): ("torch.func",),  # one tile, many tokens: the split (sample, token) loop
}
GPU_LORA = {(8, 512, 4096, 4096, 16): ("plain low-rank bmm", "opacus ghost norms (norms only)", "torch.func")}
DRY_DENSE = {(2, 40, 96, 80): GPU_DENSE[(8, 512, 4096, 4096)], (2, 300, 16, 16): ("torch.func",)}
DRY_LORA = {(2, 40, 96, 80, 4): GPU_LORA[(8, 512, 4096, 4096, 16)]}
MATMUL = "bf16 torch.matmul, same FLOPs"
AGREEMENT = {torch.bfloat16: 5e-2, torch.float32: 1e-3}  # peers in bf16 round per-sample grads to bf16


# A diagnostic row: the same op with each tile's (sample, token) loop left whole, so no second
# pass and one launch fewer (two instead of three). The op was bound by its launches at the LoRA
# case's shape (host 0.45 ms a call with six launches, its kernels 0.08 ms on an H200); this row
# shows what one launch fewer buys there.
UNSPLIT_LORA = "fibec.lora_fisher_diag, loops unsplit"


# Diagnostic rows: what a dense layer costs the Fisher collector, which needs the Fisher and the
# per-sample norms: two ops (the collector before 2026-11-27) against one pass.
FISHER_AND_NORMS_TWO_OPS = "fibec.fisher_diag + sample_sqnorms (two ops)"
FISHER_AND_NORMS_ONE_OP = "fibec.fisher_diag(with_sqnorms=True)"


def unsplit(run: Runner) -> Runner:
    """`run` with the Fisher kernels' split budget at one program per tile."""
    from fibec.kernels import fisher as kernels

    def call():
        split_budget = kernels._split_budget
        kernels._split_budget = lambda device: (1, 1)
        try:
            return run()
        finally:
            kernels._split_budget = split_budget
    return call


def gpu_plan() -> tuple[dict, dict, torch.dtype]:
    """(dense cases, LoRA cases, dtype): LLM sizes in bf16 on CUDA, tiny fp32 stand-ins on the CPU."""
    return (GPU_DENSE, GPU_LORA, torch.bfloat16) if DEVICE == "cuda" else (DRY_DENSE, DRY_LORA, torch.float32)


def time_ms(run: Runner) -> float:
    """Median ms: triton.testing.do_bench on CUDA (its first call autotunes), else 3 timed calls."""
    if DEVICE == "cuda":
        import triton.testing

        return triton.testing.do_bench(run, return_mode="median")
    run()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def extra_peak_mib(run: Runner) -> float | None:
    """CUDA memory one warm call allocates above what was allocated before it (None on the CPU)."""
    if DEVICE != "cuda":
        return None
    run()
    synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = run()
    synchronize()
    del result
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def launch_profile(run: Runner, calls: int = 20) -> dict:
    """Where one warm call's time goes on CUDA: host ms per call (Python, checks and launches, calls
    queued back to back), GPU ms per call summed over its kernels (torch.profiler), and the
    kernels' names with their us per call. A host figure above the GPU figure means the op is
    bound by its launches at this shape, not by its kernels."""
    from torch.profiler import ProfilerActivity, profile

    run()
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        run()
    host_ms = (time.perf_counter() - start) / calls * 1e3
    synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        synchronize()
    kernels = {event.key[:80]: event.self_device_time_total / calls for event in prof.key_averages()
               if event.self_device_time_total > 0}
    return {"host_ms": host_ms, "gpu_kernels_ms": sum(kernels.values()) / 1e3,
            "kernels_us": dict(sorted(kernels.items(), key=lambda item: -item[1]))}


def tuned_configs() -> dict[str, dict[str, str]]:
    """The configs the autotuners chose, per kernel and tuning key."""
    from fibec.kernels import fisher as kernels

    return {name: {str(key): str(config) for key, config in getattr(kernels, name).kernel.cache.items()}
            for name in ("_dense_outer", "_lora_outer", "_projection")}


def relative_error(result, expected) -> float:
    """Largest |difference| over the largest |expected|, over the outputs both have."""
    results = result if isinstance(result, tuple) else (result,)
    expecteds = expected if isinstance(expected, tuple) else (expected,)
    return max(((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
               for got, want in zip(results, expecteds) if got is not None)


def gpu_case_methods(shape, peers, dtype) -> tuple[str, int, int, dict[str, Callable[[], Runner]]]:
    """(case name, FLOPs, bytes of fibec's outputs, {method: factory of its call}); fibec comes first."""
    if len(shape) == 4:
        X, G = make_layer_inputs(shape, dtype=dtype)
        N, T, I, O = shape
        rhs = torch.randn(I, O, device=DEVICE, dtype=dtype)
        methods = {"fibec.fisher_diag": lambda: fibec_fisher(X, G),
                   MATMUL: lambda: lambda: X.reshape(N * T, I) @ rhs,
                   FISHER_AND_NORMS_TWO_OPS: lambda: lambda: (ops.fisher_diag(X, G), ops.sample_sqnorms(X, G)),
                   FISHER_AND_NORMS_ONE_OP: lambda: lambda: ops.fisher_diag(X, G, with_sqnorms=True)}
        methods.update({peer: (lambda make=GROUPS["fisher"][2][peer]: make(X, G)) for peer in peers})
        return f"fisher_diag {shape}", 2 * N * T * I * O, 4 * O * I, methods
    inputs = make_lora_inputs(shape, dtype=dtype)
    N, T, I, O, r = shape
    methods = {"fibec.lora_fisher_diag": lambda: fibec_lora(*inputs),
               UNSPLIT_LORA: lambda: unsplit(fibec_lora(*inputs))}
    methods.update({peer: (lambda make=GROUPS["lora"][2][peer]: make(*inputs)) for peer in peers})
    # projections XA, GB and the two per-sample products
    return f"lora_fisher_diag {shape}", 2 * N * T * r * (I + O) * 2, 4 * (r * I + O * r + N), methods


def measure_gpu_case(shape, peers, dtype) -> list[dict]:
    """One row per method: median ms, TFLOP/s, extra peak MiB, time relative to fibec, and its
    relative error against fibec (or the error it raised)."""
    name, flops, output_bytes, methods = gpu_case_methods(shape, peers, dtype)
    expected = next(iter(methods.values()))()()
    rows = []
    for method, make in methods.items():
        row = {"case": name, "method": method, "dtype": str(dtype).removeprefix("torch."), "device": DEVICE_NAME}
        try:
            run = make()
            if method != MATMUL:
                row["relative_error"] = relative_error(run(), expected)
                row["agrees"] = row["relative_error"] <= AGREEMENT[dtype]
            row["ms"] = time_ms(run)
            row["tflops"] = flops / row["ms"] / 1e9
            row["extra_peak_mib"] = extra_peak_mib(run)
            if DEVICE == "cuda" and method.startswith("fibec"):
                try:
                    row.update(launch_profile(run))
                except Exception as err:  # noqa: BLE001 - the timing above stands without it
                    row["profile_error"] = f"{type(err).__name__}: {err}"[:300]
        except Exception as err:  # a peer that cannot run this case is reported, not fatal
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        rows.append(row)
        gc.collect()
    fibec_ms = rows[0].get("ms")
    for row in rows:
        if fibec_ms and "ms" in row:
            row["x_fibec"] = row["ms"] / fibec_ms
    rows[0]["output_mib"] = output_bytes / 2**20
    return rows


def gpu_targets(rows: list[dict]) -> dict[str, float | None]:
    """The issue's GPU targets as measured ratios (None where a row is missing or failed)."""
    def ms(case, method):
        return next((r.get("ms") for r in rows if r["case"].startswith(case) and r["method"] == method), None)

    def ratio(a, b):
        return a / b if a and b else None

    dense, dense_shape = "fisher_diag", next(iter(gpu_plan()[0]))
    lora = "lora_fisher_diag"
    fibec_dense = next((r for r in rows if r["case"] == f"{dense} {dense_shape}" and r["method"].startswith("fibec")), {})
    return {
        "fisher_diag rate / matmul rate (>= 0.6)": ratio(ms(f"{dense} {dense_shape}", MATMUL), fibec_dense.get("ms")),
        **{f"fisher_diag: {peer} time / fibec time (>= 5)": ratio(ms(f"{dense} {dense_shape}", peer),
                                                              fibec_dense.get("ms"))
           for peer in GPU_DENSE[(8, 512, 4096, 4096)]},
        "fisher_diag extra memory / Fisher buffer (= 1)": ratio(fibec_dense.get("extra_peak_mib"),
                                                               fibec_dense.get("output_mib")),
        "lora_fisher_diag time / low-rank bmm time (<= 1.3)": ratio(ms(lora, "fibec.lora_fisher_diag"),
                                                                    ms(lora, "plain low-rank bmm")),
        "lora: opacus ghost norms time / fibec time (>= 10)": ratio(ms(lora, "opacus ghost norms (norms only)"),
                                                                  ms(lora, "fibec.lora_fisher_diag")),
    }


def _precompile_slice(job: tuple[int, int]) -> int:
    """Worker: pin the tuned kernels to every `workers`-th config of their spaces and run the ops
    once at the GPU shapes, so each config's binary lands in Triton's disk cache. Returns the
    number of launches that failed (configs past the device's resources)."""
    from fibec.kernels import fisher as kernels

    worker, workers = job
    spaces = [(kernels._dense_outer, kernels._outer_space(tiled_columns=True)),
              (kernels._lora_outer, kernels._outer_space(tiled_columns=False)),
              (kernels._projection, kernels._project_space())]
    dense, lora, dtype = gpu_plan()
    inputs = [make_layer_inputs(shape, dtype=dtype) for shape in dense] + \
             [make_lora_inputs(shape, dtype=dtype) for shape in lora]
    failed = 0
    for index in range(worker, max(len(space) for _, space in spaces), workers):
        for launcher, space in spaces:
            launcher.kernel.configs = [space[index % len(space)]]
            launcher.forget()
        for args in inputs:
            try:
                (ops.fisher_diag if len(args) == 2 else ops.lora_fisher_diag)(*args)
            except Exception:  # noqa: BLE001 - a config the pruner would drop on this device
                failed += 1
    synchronize()
    return failed


def precompile(workers: int) -> None:
    """Compile the autotuning spaces in `workers` processes first: the autotuner then loads each
    config's binary from the disk cache instead of compiling ~100 configs one after another."""
    import multiprocessing

    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        failed = sum(pool.map(_precompile_slice, [(w, workers) for w in range(workers)]))
    print(f"precompiled the tuning spaces in {workers} processes: {time.perf_counter() - start:.0f} s "
          f"({failed} launches past the device's resources)", flush=True)


def run_gpu_mode(json_path: str, workers: int) -> None:
    dense, lora, dtype = gpu_plan()
    if DEVICE == "cuda" and workers > 1:
        precompile(workers)
    else:
        print(f"dry run on {DEVICE}: tiny fp32 shapes, torch path, no precompilation")
    rows = []
    for shape, peers in [*dense.items(), *lora.items()]:
        start = time.perf_counter()
        case_rows = measure_gpu_case(shape, peers, dtype)
        rows += case_rows
        print(f"\n{case_rows[0]['case']} {case_rows[0]['dtype']} on {DEVICE_NAME} ({time.perf_counter() - start:.0f} s)")
        for row in case_rows:
            if "error" in row:
                print(f"  {row['method']:34s} failed: {row['error']}")
                continue
            peak = "" if row["extra_peak_mib"] is None else f" {row['extra_peak_mib']:9.1f} MiB"
            error = f"  rel.err {row['relative_error']:.1e}" if "relative_error" in row else ""
            print(f"  {row['method']:34s} {row['ms']:9.3f} ms {row['tflops']:8.1f} TFLOP/s {row['x_fibec']:6.2f}x"
                  f"{peak}{error}", flush=True)
            if "host_ms" in row:
                top = ", ".join(f"{name.split('(')[0]} {us:.0f} us" for name, us in list(row["kernels_us"].items())[:4])
                print(f"  {'':34s} per call: host {row['host_ms']:.3f} ms, GPU kernels {row['gpu_kernels_ms']:.3f} ms"
                      f" ({top})", flush=True)
    targets = gpu_targets(rows)
    print()
    for target, value in targets.items():
        print(f"  {target}: {'n/a' if value is None else f'{value:.3f}'}")
    with open(json_path, "w") as out:
        json.dump({"device": DEVICE_NAME, "torch": torch.__version__, "rows": rows, "targets": targets,
                   "tuned_configs": tuned_configs() if DEVICE == "cuda" else {}}, out, indent=1)


@pytest.mark.skipif(DEVICE != "cuda", reason="Triton kernels at LLM sizes need a CUDA GPU")
def test_gpu_kernels_throughput(tmp_path):
    run_gpu_mode(str(tmp_path / "fisher_gpu.json"), workers=1)


# ---- script mode ---------------------------------------------------------------------------
def interleaved_medians(methods: dict[str, Runner], rounds: int) -> dict[str, float]:
    """Median seconds per method; each round runs every method once, so load noise hits all."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    for run in methods.values():
        run()
    for _ in range(rounds):
        for method, run in methods.items():
            synchronize()
            start = time.perf_counter()
            run()
            synchronize()
            times[method].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def main() -> None:
    print(f"device={DEVICE} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"rounds={ROUNDS} small={SMALL}")
    for group, (make_inputs, shapes, factories) in GROUPS.items():
        for shape in shapes if group in SELECTED else ():
            inputs = make_inputs(shape)
            methods = {m: f(*inputs) for m, f in factories.items()}
            expected = methods[BASELINE[group]]()
            for method, run in methods.items():
                if method != "fwd+bwd only (no Fisher)":
                    check_agrees(run(), expected)
            medians = interleaved_medians(methods, ROUNDS)
            del inputs, methods, expected
            gc.collect()
            fibec_method = next(m for m in factories if m.startswith("fibec"))
            peaks = {m: measure_peak(group, m, shape) for m in factories}
            print(f"\n{group} (N,T,I,O{',r' if group == 'lora' else ''})={shape}")
            print(f"  {'method':34s} {'median ms':>10s} {'x fibec':>8s} {'extra peak MB':>14s} {'peak x fibec':>12s}")
            for method in factories:
                print(f"  {method:34s} {medians[method] * 1e3:10.1f} {medians[method] / medians[fibec_method]:8.2f} "
                      f"{peaks[method] / 2**20:14.1f} {peaks[method] / max(peaks[fibec_method], 1):12.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        group, method, shape = json.loads(sys.argv[2])
        print(measure_peak_here(group, method, tuple(shape)))
    elif len(sys.argv) >= 3 and sys.argv[1] == "--gpu-json":
        run_gpu_mode(sys.argv[2], workers=int(sys.argv[3]) if len(sys.argv) > 3 else 1)
    else:
        main()
