"""Payload codec: fibec.codec against what a user would otherwise send, in one run, one thread.

Payloads (fp32 LoRA factors A [r, d], B [d, r] for q and v of every layer, entries ~ N(0, 0.02^2)):
- (a) lora-768:        12 layers x {q, v}, r=16, d=768, dense
- (b) lora-768-10%:    the same with 10% of neurons kept (neuron masks: columns of A, rows of B);
                       the baselines get the tensors with the dropped neurons zeroed
- (c) lora-7b:         32 layers x {q, v}, r=16, d=4096 (a LLaMA-7B-sized q,v LoRA payload), dense
- (d) lora-768-top10%: (a) with each factor's 10% largest entries kept (element masks, the client
                       upload rule of fibec.federated.client): what the real-data runs send;
                       the baselines get the tensors with the dropped entries zeroed
Methods: fibec in each value format (fp32 is lossless), fibec fp32 + zstd-3 stage, torch.save
(torch.load weights_only), safetensors, zstd-3 and lz4 on the raw bytes, blosc2 (shuffle + zstd,
clevel 5), and fp16 + zstd-3. Size is relative to the raw fp32 bytes; encode/decode GB/s are raw
fp32 bytes per second, medians over rounds. Extra peak memory (peak RSS above the inputs
during one encode + decode, in a fresh process) is measured for payload (c) in script mode.

GPU mode (--gpu-json PATH, what bench/gpu.sh runs): payload (c) as CUDA tensors. The host-device
copy rates of its bytes through one pinned host buffer (device to host, host to device) against
encode() given the CUDA tensors (fp32: each copied to pageable host memory; int8: quantised on the
GPU, one pinned copy of the bodies), encode() of views of a pinned buffer the tensors were first
copied into, decode() then .to("cuda"), decode() through the pinned buffer and decode(device=)
(int8: dequantised on the GPU after one copy of the bodies); and int8 and int4 encode() and
decode(device=) of the CUDA tensors with a client upload's masks (the top 25% and the top 10% of
each factor's entries, and 10% of neurons). GB/s of raw fp32 bytes, to PATH; the GPU's payloads are checked byte for byte
against the host encoder's.
Without CUDA the same code runs on the CPU with a d=256 payload and unpinned buffers (a dry run).

pytest mode:  pytest bench/bench_codec.py   (pytest-benchmark; size ratio in extra_info)
script mode:  python bench/bench_codec.py   (methods interleaved over rounds, in a shuffled order
              each round; table of medians)
FIBEC_BENCH_SMALL=1 shrinks (c) to d=1024; FIBEC_BENCH_ROUNDS sets the rounds (default 7);
FIBEC_BENCH_MEMORY=0 skips the peak-memory processes; FIBEC_BENCH_CLOCK=cpu times script mode
with the process CPU clock instead of the wall clock (for shared machines).
"""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch

from fibec import codec
from fibec.federated.client import largest_entries_mask

SMALL = os.environ.get("FIBEC_BENCH_SMALL", "0") not in ("", "0")
ROUNDS = int(os.environ.get("FIBEC_BENCH_ROUNDS", "7"))
# "cpu" times with the process's CPU clock (user + sys, page faults included): on a shared,
# oversubscribed machine it leaves out the time spent waiting for a core. Everything runs
# on one thread, so the two clocks agree on an idle machine.
CLOCK = time.process_time if os.environ.get("FIBEC_BENCH_CLOCK", "wall") == "cpu" else time.perf_counter
ZSTD_LEVEL = 3

Tensors = dict[str, torch.Tensor]


def lora_payload(layers: int, d: int, r: int = 16, keep: float | None = None, seed: int = 0):
    """({name: tensor}, masks or None) of a q,v LoRA update; keep = fraction of neurons kept."""
    g = torch.Generator().manual_seed(seed)
    tensors, masks = {}, {}
    for layer in range(layers):
        for proj in ("q_proj", "v_proj"):
            prefix = f"model.layers.{layer}.self_attn.{proj}"
            a = torch.randn(r, d, generator=g) * 0.02
            b = torch.randn(d, r, generator=g) * 0.02
            if keep is not None:
                cols = torch.rand(d, generator=g) < keep
                rows = torch.rand(d, generator=g) < keep
                a[:, ~cols] = 0
                b[~rows] = 0
                masks[f"{prefix}.lora_A"] = (cols, 1)
                masks[f"{prefix}.lora_B"] = (rows, 0)
            tensors[f"{prefix}.lora_A"] = a
            tensors[f"{prefix}.lora_B"] = b
    return tensors, (masks or None)


def largest_entries(tensors: Tensors, density: float) -> dict[str, torch.Tensor]:
    """A client upload's element masks: each factor's `density` share of largest entries, on its device."""
    return {name: largest_entries_mask(t.cpu(), density).to(t.device) for name, t in tensors.items()}


def lora_payload_top_entries(layers: int, d: int, density: float):
    """A dense payload with each factor's `density` share of largest entries kept, the rest zeroed."""
    tensors, _ = lora_payload(layers, d)
    masks = largest_entries(tensors, density)
    return {name: t * masks[name] for name, t in tensors.items()}, masks


PAYLOADS = {
    "lora-768": lambda: lora_payload(12, 768),
    "lora-768-10%": lambda: lora_payload(12, 768, keep=0.1),
    "lora-7b": lambda: lora_payload(32, 1024 if SMALL else 4096),
    "lora-768-top10%": lambda: lora_payload_top_entries(12, 768, 0.1),
}


def raw_bytes(tensors: Tensors) -> int:
    return sum(t.numel() * 4 for t in tensors.values())


# ---------------------------------------------------------------- methods: (encode, decode)

def _concat(tensors: Tensors, dtype=torch.float32) -> bytes:
    return b"".join(t.to(dtype).contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())


def _split(data: bytes | bytearray, like: Tensors, dtype=torch.float32) -> Tensors:
    flat = torch.frombuffer(bytearray(data), dtype=dtype)
    out, offset = {}, 0
    for name, t in like.items():
        out[name] = flat[offset:offset + t.numel()].view(t.shape).float()
        offset += t.numel()
    return out


def _fibec(values: str, level: int | None = None):
    def enc(tensors, masks):
        return codec.encode(tensors, masks=masks, values=values, level=level)
    return enc, lambda data, like: codec.decode(data)


def _torch_save():
    def enc(tensors, masks):
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        return buffer.getvalue()
    return enc, lambda data, like: torch.load(io.BytesIO(data), weights_only=True)


def _safetensors():
    from safetensors.torch import load, save
    return (lambda tensors, masks: save(tensors)), (lambda data, like: load(data))


def _zstd(dtype=torch.float32):
    import zstandard
    compressor, decompressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL), zstandard.ZstdDecompressor()
    return ((lambda tensors, masks: compressor.compress(_concat(tensors, dtype))),
            (lambda data, like: _split(decompressor.decompress(data), like, dtype)))


def _lz4():
    import lz4.frame
    return ((lambda tensors, masks: lz4.frame.compress(_concat(tensors))),
            (lambda data, like: _split(lz4.frame.decompress(data), like)))


def _blosc2():
    import blosc2
    blosc2.set_nthreads(1)

    def enc(tensors, masks):
        return blosc2.compress(_concat(tensors), typesize=4, clevel=5, filter=blosc2.Filter.SHUFFLE,
                               codec=blosc2.Codec.ZSTD)
    return enc, lambda data, like: _split(blosc2.decompress(data), like)


METHODS: dict[str, Callable[[], tuple]] = {
    "fibec fp32": lambda: _fibec("fp32"),
    "fibec fp16": lambda: _fibec("fp16"),
    "fibec bf16": lambda: _fibec("bf16"),
    "fibec int8": lambda: _fibec("int8"),
    "fibec int4": lambda: _fibec("int4"),
    "fibec fp32+zstd3": lambda: _fibec("fp32", ZSTD_LEVEL),
    "torch.save": _torch_save,
    "safetensors": _safetensors,
    "zstd-3 raw": _zstd,
    "lz4 raw": _lz4,
    "blosc2 shuffle+zstd": _blosc2,
    "fp16+zstd-3": lambda: _zstd(torch.float16),
}
LOSSLESS = {"fibec fp32", "fibec fp32+zstd3", "torch.save", "safetensors", "zstd-3 raw", "lz4 raw",
            "blosc2 shuffle+zstd"}


def _check(method: str, tensors: Tensors, masks, decoded: Tensors) -> None:
    """Lossless methods reproduce the (masked) tensors exactly; lossy ones stay close."""
    assert sorted(decoded) == sorted(tensors), method
    # Blockwise integer formats: q = round(x / scale), scale = block max / levels, so no entry moves
    # by more than half a step of the tensor's largest block.
    levels = next((n for values, n in codec.INTEGER_LEVELS.items() if method.startswith(f"fibec {values}")), None)
    for name, t in tensors.items():
        out = decoded[name].float()
        if method in LOSSLESS:
            assert torch.equal(out, t), (method, name)
        elif levels is not None:
            half_step = t.abs().max().item() / levels / 2
            assert (out - t).abs().max().item() <= half_step * (1 + 1e-3), (method, name)
        else:
            assert torch.allclose(out, t, rtol=2e-2, atol=t.abs().max().item() / 100), (method, name)


def _timed(fn) -> tuple[float, object]:
    start = CLOCK()
    result = fn()
    return CLOCK() - start, result


def measure(payload: str, rounds: int = ROUNDS) -> list[dict]:
    """Per method: size ratio and median encode/decode GB/s; methods interleaved per round,
    in a shuffled order (seeded by the round)."""
    tensors, masks = PAYLOADS[payload]()
    raw = raw_bytes(tensors)
    methods = {name: make() for name, make in METHODS.items()}
    times = {name: ([], []) for name in methods}
    sizes = {}
    for name, (enc, dec) in methods.items():
        data = enc(tensors, masks)
        _check(name, tensors, masks, dec(data, tensors))
        sizes[name] = len(data)
    order = list(methods)
    for round_ in range(rounds):
        # A fixed order would give one method every round the slot right after the heaviest
        # baseline has evicted the caches; a shuffled order spreads that slot over all.
        random.Random(round_).shuffle(order)
        for name in order:
            enc, dec = methods[name]
            t_enc, data = _timed(lambda: enc(tensors, masks))
            t_dec, _ = _timed(lambda: dec(data, tensors))
            times[name][0].append(t_enc)
            times[name][1].append(t_dec)
    return [{
        "payload": payload, "method": name, "raw_mb": raw / 1e6, "ratio": sizes[name] / raw,
        "encode_gbs": raw / statistics.median(times[name][0]) / 1e9,
        "decode_gbs": raw / statistics.median(times[name][1]) / 1e9,
    } for name in methods]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def extra_peak_mb(payload: str, method: str) -> float:
    """In this (fresh) process: the peak RSS above the inputs of one encode + decode (MB): the
    payload, the decoded tensors and every temporary. Linux (resets VmHWM via clear_refs)."""
    tensors, masks = PAYLOADS[payload]()
    enc, dec = METHODS[method]()
    base = _status_kb("VmRSS:")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    decoded = dec(enc(tensors, masks), tensors)
    peak = _status_kb("VmHWM:")
    del decoded
    return (peak - base) / 1024


def peak_memory_mb(payload: str, method: str) -> float:
    """extra_peak_mb in a fresh process, so earlier methods' freed memory does not hide it."""
    code = ("import sys; sys.path.insert(0, 'bench'); import bench_codec as b; "
            f"print(b.extra_peak_mb({payload!r}, {method!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(result.stdout.split()[-1])


# ---------------------------------------------------------------- pytest-benchmark mode

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("direction", ["encode", "decode"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_codec_speed(benchmark, payload, method, direction):
    tensors, masks = PAYLOADS[payload]()
    enc, dec = METHODS[method]()
    data = enc(tensors, masks)
    _check(method, tensors, masks, dec(data, tensors))
    raw = raw_bytes(tensors)
    benchmark.extra_info.update(ratio=len(data) / raw, raw_bytes=raw)
    fn = (lambda: enc(tensors, masks)) if direction == "encode" else (lambda: dec(data, tensors))
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=1, warmup_rounds=1)


# ---------------------------------------------------------------- script mode

def main() -> None:
    torch.set_num_threads(1)
    memory = os.environ.get("FIBEC_BENCH_MEMORY", "1") not in ("", "0")
    clock = "process CPU" if CLOCK is time.process_time else "wall"
    print(f"fibec codec benchmark: one thread, {ROUNDS} rounds, medians, {clock} clock; GB/s of raw fp32 bytes")
    header = f"{'payload':<14} {'method':<21} {'size/raw':>9} {'enc GB/s':>9} {'dec GB/s':>9}"
    print(header + (f" {'peak MB':>8}" if memory else ""))
    for payload in PAYLOADS:
        for row in measure(payload):
            line = (f"{row['payload']:<14} {row['method']:<21} {row['ratio']:>9.4f} "
                    f"{row['encode_gbs']:>9.2f} {row['decode_gbs']:>9.2f}")
            if memory and payload == "lora-7b":
                line += f" {peak_memory_mb(payload, row['method']):>8.1f}"
            print(line, flush=True)
        print(f"{'':<14} (raw fp32: {row['raw_mb']:.1f} MB)")


# ---------------------------------------------------------------- GPU mode

class PinnedStage:
    """One pinned host buffer laid out like `tensors`; its views stand in for them on the host."""

    def __init__(self, tensors: Tensors):
        cuda = torch.cuda.is_available()
        total = sum(t.numel() for t in tensors.values())
        self.flat = torch.empty(total, dtype=torch.float32, pin_memory=cuda)
        self.views, offset = {}, 0
        for name, t in tensors.items():
            self.views[name] = self.flat[offset:offset + t.numel()].view(t.shape)
            offset += t.numel()

    def download(self, tensors: Tensors) -> Tensors:
        """Device -> pinned host views, asynchronous copies, one wait."""
        for name, t in tensors.items():
            self.views[name].copy_(t, non_blocking=True)
        _sync()
        return self.views

    def upload(self, device: str) -> Tensors:
        """Pinned views -> `device`, asynchronous copies, one wait."""
        out = {name: view.to(device, non_blocking=True) for name, view in self.views.items()}
        _sync()
        return out

    def upload_from(self, host: Tensors, device: str) -> Tensors:
        """Host tensors -> pinned views -> `device`."""
        for name, t in host.items():
            self.views[name].copy_(t)
        return self.upload(device)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_gbs(fn, raw: int, rounds: int = ROUNDS) -> float:
    fn()
    times = []
    for _ in range(rounds):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return raw / statistics.median(times) / 1e9


def run_gpu_mode(json_path: str) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    host_tensors, _ = lora_payload(32, 4096 if device == "cuda" else 256)
    tensors = {name: t.to(device) for name, t in host_tensors.items()}
    raw = raw_bytes(tensors)
    stage = PinnedStage(tensors)
    rates = {
        "device->host copy, pinned": _median_gbs(lambda: stage.download(tensors), raw),
        "host->device copy, pinned": _median_gbs(lambda: stage.upload(device), raw),
    }
    for values in ("fp32", "int8"):
        payload = codec.encode(tensors, values=values)
        decoded = {name: t.to(device) for name, t in codec.decode(payload).items()}
        _check(f"fibec {values}", tensors, None, decoded)
        rates[f"encode {values}, CUDA tensors given"] = _median_gbs(lambda: codec.encode(tensors, values=values), raw)
        rates[f"encode {values}, through pinned"] = _median_gbs(
            lambda: codec.encode(stage.download(tensors), values=values), raw)
        rates[f"decode {values}, then .to(device)"] = _median_gbs(
            lambda: {name: t.to(device) for name, t in codec.decode(payload).items()}, raw)
        rates[f"decode {values}, through pinned"] = _median_gbs(
            lambda: stage.upload_from(codec.decode(payload), device), raw)
        _check(f"fibec {values}, decode(device=)", tensors, None, codec.decode(payload, device=device))
        rates[f"decode {values}, device= given"] = _median_gbs(lambda: codec.decode(payload, device=device), raw)
    neuron_masks = lora_payload(32, 4096 if device == "cuda" else 256, keep=0.1)[1]
    for values, (label, masks) in itertools.product(("int8", "int4"), (("top-25% entries", largest_entries(tensors, 0.25)),
                                                                       ("top-10% entries", largest_entries(tensors, 0.1)),
                                                                       ("10% neurons", neuron_masks))):
        on_device = {name: (m[0].to(device), m[1]) if isinstance(m, tuple) else m for name, m in masks.items()}
        on_host = {name: (m[0].cpu(), m[1]) if isinstance(m, tuple) else m.cpu() for name, m in masks.items()}
        payload = codec.encode(tensors, masks=on_device, values=values)
        if payload != codec.encode(host_tensors, masks=on_host, values=values):
            raise SystemExit(f"{values} encode of CUDA tensors, {label}: bytes differ from the host encoder's")
        rates[f"encode {values}, {label}, CUDA tensors given"] = _median_gbs(
            lambda: codec.encode(tensors, masks=on_device, values=values), raw)
        on_gpu, on_cpu = codec.decode(payload, device=device), codec.decode(payload)
        if any(not torch.equal(on_gpu[name].cpu(), on_cpu[name]) for name in on_cpu):
            raise SystemExit(f"{values} decode to {device}, {label}: values differ from the host decoder's")
        rates[f"decode {values}, {label}, device= given"] = _median_gbs(
            lambda: codec.decode(payload, device=device), raw)
    print(f"codec on {device_name}: payload (c), {raw / 1e6:.1f} MB raw fp32, GB/s of raw bytes, medians of {ROUNDS}")
    for name, gbs in rates.items():
        print(f"  {name:<52} {gbs:7.2f} GB/s")
    targets = {f"{direction} {values} through pinned / {copy} rate (>= 1)":
               rates[f"{direction} {values}, through pinned"] / rates[copy]
               for values in ("fp32", "int8")
               for direction, copy in (("encode", "device->host copy, pinned"),
                                       ("decode", "host->device copy, pinned"))}
    # Issue 24's target for int8 (and int4) encode and decode of CUDA tensors: 25 GB/s of input bytes.
    targets.update({f"{name} / 25 GB/s (>= 1)": rates[name] / 25.0 for name in rates
                    if name.startswith(("encode int8", "decode int8", "encode int4", "decode int4"))
                    and name.endswith(("CUDA tensors given", "device= given"))})
    with open(json_path, "w") as out:
        json.dump({"device": device_name, "raw_bytes": raw, "gbs": rates, "targets": targets}, out, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--gpu-json":
        run_gpu_mode(sys.argv[2])
    else:
        main()
