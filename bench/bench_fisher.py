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
torch.cuda.max_memory_allocated on GPU). On a GPU, the Triton kernels also run at LLM sizes in
bf16 under triton.testing.do_bench against a same-FLOP bf16 torch.matmul.

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
DENSE_SHAPES = [(8, 128, 384, 1536), (8, 256, 1024, 1024) if SMALL else (16, 512, 2048, 2048)]
LORA_SHAPES = [(8, 256, 768, 768, 16) if SMALL else (16, 512, 768, 768, 16)]
GPU_DENSE_SHAPES = [(8, 512, 4096, 4096), (4, 2048, 4096, 11008)]
GPU_LORA_SHAPES = [(8, 512, 4096, 4096, 16)]

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


def gpu_cases():
    """(name, flops, {method: call}) per LLM-size case, bf16 on the GPU."""
    for shape in GPU_DENSE_SHAPES:
        X, G = make_layer_inputs(shape, dtype=torch.bfloat16)
        N, T, I, O = shape
        lhs, rhs = X.reshape(N * T, I), torch.randn(I, O, device=DEVICE, dtype=torch.bfloat16)
        yield f"fisher_diag bf16 {shape}", 2 * N * T * I * O, {
            "fibec.fisher_diag (Triton)": fibec_fisher(X, G), "torch.func": torch_func_fisher(X, G),
            "bf16 torch.matmul, same FLOPs": lambda: lhs @ rhs}
    for shape in GPU_LORA_SHAPES:
        X, G, A, B, s = make_lora_inputs(shape, dtype=torch.bfloat16)
        N, T, I, O, r = shape
        flops = 2 * N * T * r * (I + O) * 2  # projections XA, GB and the two per-sample products
        yield f"lora_fisher_diag bf16 {shape}", flops, {
            "fibec.lora_fisher_diag (Triton)": fibec_lora(X, G, A, B, s),
            "plain low-rank bmm": bmm_lora(X, G, A, B, s),
            "opacus ghost norms (norms only)": opacus_ghost_lora(X, G, A, B, s),
            "torch.func": torch_func_lora(X, G, A, B, s)}


@pytest.mark.skipif(DEVICE != "cuda", reason="Triton kernels at LLM sizes need a CUDA GPU")
def test_gpu_kernels_throughput():
    import triton.testing

    for name, flops, methods in gpu_cases():
        for method, run in methods.items():
            ms = triton.testing.do_bench(run)
            print(f"{name:44s} {method:34s} {ms:9.3f} ms {flops / ms / 1e9:8.1f} TFLOP/s")


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
    if DEVICE == "cuda":
        import triton.testing

        for name, flops, methods in gpu_cases():
            print(f"\n{name}")
            for method, run in methods.items():
                ms = triton.testing.do_bench(run)
                print(f"  {method:34s} {ms:9.3f} ms {flops / ms / 1e9:8.1f} TFLOP/s")
    else:
        print("\nGPU section skipped: no CUDA device (Triton throughput needs a GPU).")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        group, method, shape = json.loads(sys.argv[2])
        print(measure_peak_here(group, method, tuple(shape)))
    else:
        main()
