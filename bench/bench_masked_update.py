"""Masked AdamW step: fibec.ops.masked_adamw_ against what a user would otherwise run, in one run.

Methods, on fp32 parameters of 4M (2048 x 2048) and 64M (8192 x 8192) entries with masks of
density 1%, 10% and 50% (element mask; neuron masks over rows and over columns):
- fibec:        fibec.ops.masked_adamw_ (CPU: index-based torch path; CUDA: the Triton kernel)
- torch.where:  eager full AdamW update, then torch.where(mask, new, old) into p and both moments
- dense foreach / dense fused: torch.optim.AdamW(foreach=True) / (fused=True) on the whole tensor,
                the cost of ignoring the mask (shown once per size)
Effective bandwidth counts the bytes the step must move: the mask, and for each updated entry
p, grad and both moments read and p and both moments written (dense rows: every entry).
Extra peak memory (10% density and dense rows) is measured per method in its own process on CPU
(RSS high-water mark) and with torch.cuda.max_memory_allocated on GPU. On GPU the run also
measures copy bandwidth (copy_ of a 1 GiB tensor into another) and reports each method as a % of it.

GPU mode (--gpu-json PATH, what bench/gpu.sh runs): 64M entries (8192 x 8192), 10% density, each
mask kind, fibec against torch.where and dense fused AdamW, each as a % of the copy_ bandwidth
of a tensor of the same size measured in the same run; rows and targets go to PATH. Without
CUDA the same code runs at 512 x 512 on the CPU (a dry run of the script, not a measurement).

pytest mode:  pytest bench/bench_masked_update.py   (pytest-benchmark, bytes in extra_info)
script mode:  python bench/bench_masked_update.py   (methods interleaved over rounds; table of medians)
FIBEC_BENCH_SMALL=1 shrinks the sizes to 256K and 4M; FIBEC_BENCH_ROUNDS sets the rounds (default 7);
FIBEC_BENCH_THREADS sets torch's CPU threads (on a machine shared with other jobs, 1 avoids threads
spinning against each other, which makes every small op look milliseconds long).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch

from fibec import ops

SMALL = os.environ.get("FIBEC_BENCH_SMALL", "0") not in ("", "0")
ROUNDS = int(os.environ.get("FIBEC_BENCH_ROUNDS", "7"))
if os.environ.get("FIBEC_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FIBEC_BENCH_THREADS"]))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(512, 512), (2048, 2048)] if SMALL else [(2048, 2048), (8192, 8192)]
DENSITIES = [0.01, 0.1, 0.5]
MASK_KINDS = ["element", "rows", "cols"]
MASKED_METHODS = ["fibec", "torch.where"]
DENSE_METHODS = ["dense foreach", "dense fused"]
HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

Step = Callable[[], object]


def make_state(shape, device=DEVICE):
    gen = torch.Generator(device=device).manual_seed(0)
    p = torch.randn(shape, generator=gen, device=device)
    grad = torch.randn(shape, generator=gen, device=device)
    return p, grad, torch.zeros(shape, device=device), torch.rand(shape, generator=gen, device=device)


def make_mask(kind, shape, density, device=DEVICE):
    """(mask for fibec, mask_dim, the same mask broadcastable over p for torch.where)."""
    gen = torch.Generator(device=device).manual_seed(1)
    if kind == "element":
        mask = torch.rand(shape, generator=gen, device=device) < density
        return mask, None, mask
    dim = 0 if kind == "rows" else 1
    mask = torch.rand(shape[dim], generator=gen, device=device) < density
    return mask, dim, mask[:, None] if dim == 0 else mask[None, :]


def fibec_step(p, grad, exp_avg, exp_avg_sq, mask, mask_dim, _broadcast) -> Step:
    def step():
        ops.masked_adamw_(p, grad, exp_avg, exp_avg_sq, mask, step=10, mask_dim=mask_dim, **HP)
    return step


def where_step(p, grad, exp_avg, exp_avg_sq, _mask, _mask_dim, broadcast) -> Step:
    lr, (beta1, beta2), eps, wd = HP["lr"], HP["betas"], HP["eps"], HP["weight_decay"]
    bias_correction2_sqrt = (1 - beta2**10) ** 0.5
    step_size = lr / (1 - beta1**10)

    def step():
        new_p = p * (1 - lr * wd)
        new_avg = exp_avg.lerp(grad, 1 - beta1)
        new_avg_sq = exp_avg_sq * beta2
        new_avg_sq.addcmul_(grad, grad, value=1 - beta2)
        denom = (new_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        new_p.addcdiv_(new_avg, denom, value=-step_size)
        torch.where(broadcast, new_p, p, out=p)
        torch.where(broadcast, new_avg, exp_avg, out=exp_avg)
        torch.where(broadcast, new_avg_sq, exp_avg_sq, out=exp_avg_sq)
    return step


def dense_step(method, p, grad, exp_avg, exp_avg_sq) -> Step | None:
    """torch.optim.AdamW on the whole tensor, its state preset so no step allocates it lazily."""
    param = torch.nn.Parameter(p)
    param.grad = grad
    flag = {"dense foreach": "foreach", "dense fused": "fused"}[method]
    try:
        optimizer = torch.optim.AdamW([param], **{flag: True}, **HP)
        optimizer.state[param] = {"step": torch.tensor(9.0, device=p.device if flag == "fused" else "cpu"),
                                  "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
        optimizer.step()
    except (RuntimeError, ValueError):
        return None
    return optimizer.step


def selected_entries(mask, mask_dim, shape) -> int:
    count = int(mask.sum())
    return count if mask_dim is None else count * shape[1 - mask_dim]


def moved_bytes(shape, mask=None, mask_dim=None) -> int:
    """Bytes the step must move: the mask, then 4 fp32 reads and 3 fp32 writes per updated entry."""
    if mask is None:
        return shape[0] * shape[1] * 7 * 4
    return mask.numel() * mask.element_size() + selected_entries(mask, mask_dim, shape) * 7 * 4


def build(method, shape, kind=None, density=None) -> tuple[Step | None, int]:
    state = make_state(shape)
    if method in DENSE_METHODS:
        return dense_step(method, *state), moved_bytes(shape)
    mask, mask_dim, broadcast = make_mask(kind, shape, density)
    make = fibec_step if method == "fibec" else where_step
    return make(*state, mask, mask_dim, broadcast), moved_bytes(shape, mask, mask_dim)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def median_ms(step: Step) -> float:
    if DEVICE == "cuda":
        import triton.testing

        return triton.testing.do_bench(step, return_mode="median")
    step()
    times = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def copy_bandwidth_gbs(numel: int) -> float:
    """GB/s of dst.copy_(src) between fp32 tensors of `numel` entries, bytes read plus written."""
    src = torch.empty(numel, device=DEVICE)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: (dst.copy_(src), sync()))
    return 2 * numel * 4 / ms / 1e6


def extra_peak_mib(method, shape, kind=None, density=None) -> float:
    """Memory one step needs beyond its inputs, measured in a fresh process on CPU."""
    if DEVICE == "cuda":
        step, _ = build(method, shape, kind, density)
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    spec = json.dumps([method, list(shape), kind, density])
    out = subprocess.run([sys.executable, __file__, "--peak", spec], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def _peak_child(spec: str) -> None:
    method, shape, kind, density = json.loads(spec)
    step, _ = build(method, tuple(shape), kind, density)
    if step is None:
        print("nan")
        return
    # Reset the RSS high-water mark so the set-up's temporaries do not hide the step's.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _peak_rss_kib()
    step()
    print((_peak_rss_kib() - before) / 1024)


# ---- pytest mode ---------------------------------------------------------------------------
MASKED_CASES = [(shape, kind, density, method) for shape in SHAPES for kind in MASK_KINDS
                for density in DENSITIES for method in MASKED_METHODS]


@pytest.mark.parametrize("shape,kind,density,method", MASKED_CASES,
                         ids=[f"{s[0]}x{s[1]}-{k}-{d}-{m}" for s, k, d, m in MASKED_CASES])
def test_masked_adamw_step(benchmark, shape, kind, density, method):
    step, nbytes = build(method, shape, kind, density)
    benchmark.group = f"masked_adamw {shape[0]}x{shape[1]} {kind} {density:.0%}"
    benchmark.extra_info["bytes"] = nbytes
    benchmark(lambda: (step(), sync()))


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}x{s[1]}" for s in SHAPES])
@pytest.mark.parametrize("method", DENSE_METHODS)
def test_dense_adamw_step(benchmark, shape, method):
    step, nbytes = build(method, shape)
    if step is None:
        pytest.skip(f"torch.optim.AdamW({method.split()[1]}=True) is not available on {DEVICE}")
    benchmark.group = f"dense adamw {shape[0]}x{shape[1]}"
    benchmark.extra_info["bytes"] = nbytes
    benchmark(lambda: (step(), sync()))


# ---- script mode ---------------------------------------------------------------------------
def main() -> None:
    copy_gbs = copy_bandwidth_gbs(2**28) if DEVICE == "cuda" else None
    print(f"device={DEVICE} torch={torch.__version__} threads={torch.get_num_threads()} rounds={ROUNDS} "
          f"small={SMALL}" + (f" copy_bandwidth={copy_gbs:.0f} GB/s" if copy_gbs else ""))
    header = f"{'size':>10} {'mask':>8} {'density':>7} {'method':>14} {'median ms':>10} {'GB/s':>8}"
    header += f" {'% copy':>7}" if copy_gbs else ""
    header += f" {'vs where':>9} {'extra peak MiB':>15}"
    print(header)
    for shape in SHAPES:
        size = f"{shape[0] * shape[1] / 2**20:.2g}M"
        for method in DENSE_METHODS:
            step, nbytes = build(method, shape)
            if step is None:
                print(f"{size:>10} {'none':>8} {'100%':>7} {method:>14}   (not available on {DEVICE})")
                continue
            ms = median_ms(lambda: (step(), sync()))
            del step
            row = f"{size:>10} {'none':>8} {'100%':>7} {method:>14} {ms:>10.2f} {nbytes / ms / 1e6:>8.1f}"
            row += f" {100 * nbytes / ms / 1e6 / copy_gbs:>6.0f}%" if copy_gbs else ""
            print(row + f" {'':>9} {extra_peak_mib(method, shape):>15.0f}", flush=True)
        for kind in MASK_KINDS:
            for density in DENSITIES:
                built = {method: build(method, shape, kind, density) for method in MASKED_METHODS}
                times = {method: [] for method in MASKED_METHODS}
                for _ in range(3):  # interleave methods so machine noise hits both alike
                    for method, (step, _) in built.items():
                        times[method].append(median_ms(lambda: (step(), sync())))
                medians = {method: statistics.median(ts) for method, ts in times.items()}
                del built
                for method in MASKED_METHODS:
                    ms = medians[method]
                    nbytes = moved_bytes(shape, *make_mask(kind, shape, density)[:2])
                    row = f"{size:>10} {kind:>8} {density:>7.0%} {method:>14} {ms:>10.2f} {nbytes / ms / 1e6:>8.1f}"
                    row += f" {100 * nbytes / ms / 1e6 / copy_gbs:>6.0f}%" if copy_gbs else ""
                    row += f" {medians['torch.where'] / ms:>8.2f}x"
                    peak = extra_peak_mib(method, shape, kind, density) if density == 0.1 else float("nan")
                    print(row + f" {peak:>15.0f}", flush=True)


# ---- GPU mode ------------------------------------------------------------------------------
GPU_SHAPE, DRY_SHAPE = (8192, 8192), (512, 512)


def run_gpu_mode(json_path: str) -> None:
    shape = GPU_SHAPE if DEVICE == "cuda" else DRY_SHAPE
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    copy_gbs = copy_bandwidth_gbs(shape[0] * shape[1])
    print(f"masked_adamw_ at {shape[0]} x {shape[1]} fp32, 10% density, on {device_name}: "
          f"copy_ {copy_gbs:.0f} GB/s (read + written)")
    rows = []
    cases = [(kind, method) for kind in MASK_KINDS for method in MASKED_METHODS] + [(None, "dense fused")]
    for kind, method in cases:
        step, nbytes = build(method, shape, kind, None if kind is None else 0.1)
        row = {"method": method, "mask": kind or "none", "density": 0.1 if kind else 1.0, "shape": list(shape),
               "device": device_name, "bytes": nbytes}
        if step is None:
            row["error"] = f"not available on {DEVICE}"
        else:
            row["ms"] = median_ms(lambda: (step(), sync()))
            row["gbs"] = nbytes / row["ms"] / 1e6
            row["percent_of_copy"] = 100 * row["gbs"] / copy_gbs
        del step
        rows.append(row)
        print(f"  {row['mask']:>8} {method:>12}: " + (row["error"] if "error" in row else
              f"{row['ms']:8.3f} ms {row['gbs']:8.1f} GB/s {row['percent_of_copy']:5.1f}% of copy_"), flush=True)
    targets = {f"masked_adamw_ {kind} mask, 10%: % of copy_ (>= 80)": next(
        (r.get("percent_of_copy") for r in rows if r["mask"] == kind and r["method"] == "fibec"), None)
        for kind in MASK_KINDS}
    with open(json_path, "w") as out:
        json.dump({"device": device_name, "copy_gbs": copy_gbs, "rows": rows, "targets": targets}, out, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        _peak_child(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "--gpu-json":
        run_gpu_mode(sys.argv[2])
    else:
        main()
