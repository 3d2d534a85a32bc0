#!/usr/bin/env bash
# The GPU run of fibec's kernels, in one call on a GPU machine (H100/H200, 16 cores); everything
# it writes goes under $OUT (8 files; bench/README.md, "GPU run"):
#   gpu.log             everything printed, step by step
#   env.txt             nvidia-smi, CPU, Python and package versions, the commit
#   fisher.json         fisher_diag / lora_fisher_diag at LLM sizes vs matmul and the peers (bench_fisher.py)
#   masked_update.json  masked_adamw_ at 64M entries vs copy_ bandwidth (bench_masked_update.py)
#   codec.json          codec on CUDA tensors through pinned buffers vs host-device copies (bench_codec.py)
#   collector.json      a LoRA training step with and without FisherCollector: host time, syncs, launches, profile;
#                       a batch of the Fisher scoring pass against a step (bench_collector.py)
#   rounds.json         `fibec compare` time per round with MiniLM on real data (bench_rounds.py)
#   summary.json        each step's exit code and seconds, and every target's measured ratio
# Steps, each under its own time limit, in order of importance: set-up, versions, the op tests on CUDA
# tensors (compiled kernels, no interpreter), the three benchmarks, the rounds. A step that
# fails is recorded and the next one runs; a step that would pass the 570 s budget (GPU_BUDGET_S)
# is skipped, and so is a step not named in GPU_STEPS when that is set (a short rerun).
# Without CUDA (a dry run: OUT=/tmp/gpu-dry bash bench/gpu.sh) the tests run in the Triton
# interpreter and the benchmarks at tiny shapes on the CPU, to check the script end to end.
# Needs .gpu-carry/ (bench/gpu_carry.sh) for the peers' wheels, MiniLM and the data set.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1

BUDGET_S=${GPU_BUDGET_S:-570}
CARRY=.gpu-carry
SITE=/tmp/fibec-site
if [ -x .venv/bin/python ]; then PY=${PY:-.venv/bin/python}; else PY=${PY:-python3}; fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))") || { echo "no torch in $PY"; exit 1; }
if [ "$GPU" = 1 ]; then
    unset TRITON_INTERPRET
    JOBS=8 WORKERS=8 ROUNDS=3 THREADS=0
else
    echo "no CUDA device: dry run (interpreter tests, tiny CPU benchmarks)"
    JOBS=0 WORKERS=1 ROUNDS=1 THREADS=1
fi
STEPS=()

# step NAME LIMIT_S COMMAND...: run COMMAND under a time limit unless the budget is spent; record it.
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    if [ -n "${GPU_STEPS:-}" ] && [[ " $GPU_STEPS " != *" $name "* ]]; then
        echo "=== $name: skipped, not in GPU_STEPS"
        STEPS+=("$name skipped 0")
        return
    fi
    if (( SECONDS + limit > BUDGET_S )); then
        echo "=== $name: skipped, ${SECONDS}s spent of ${BUDGET_S}s"
        STEPS+=("$name skipped 0")
        return
    fi
    echo "=== $name (limit ${limit}s, at ${SECONDS}s)"
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    STEPS+=("$name $rc $((SECONDS - start))")
}

environment() {
    {
        nvidia-smi || echo "nvidia-smi: not available"
        echo "--- cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
        echo "--- commit: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed paths"
        "$PY" - <<'EOF'
import importlib.metadata as md, platform, sys, torch
print("python", sys.version.split()[0], platform.platform())
print("torch", torch.__version__, "cuda", torch.version.cuda, "device",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
for name in ("triton", "transformers", "peft", "opacus", "backpack-for-pytorch", "pytest", "pytest-xdist", "numpy"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
    } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
}

setup() {
    if [ -d "$CARRY/wheels" ]; then
        # One at a time: the CPython 3.12 wheels (the GPU image's) do not install in a dry run elsewhere.
        local wheel
        for wheel in "$CARRY"/wheels/*.whl; do
            "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "$wheel" \
                || echo "$(basename "$wheel"): not installed"
        done
    else
        echo "no $CARRY/wheels (bench/gpu_carry.sh): the Opacus and BackPACK rows will fail"
    fi
    if ! "$PY" -c "import fibec._codec, fibec.kernels.fisher" 2>/dev/null; then
        "$PY" -m pip install -q --no-deps --no-build-isolation -e . || return 1
    fi
    "$PY" -c "import fibec._codec, fibec.kernels.fisher; print('fibec from', fibec.__file__)"
}

# `timeout` runs programs: the two functions run in a child bash, which inherits them.
export -f environment setup
export PY OUT CARRY SITE
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
step setup 120 bash -c setup
step environment 30 bash -c environment
# The op tests pin one config per kernel (FIBEC_AUTOTUNE=0): autotuning every test shape would
# compile the whole space again and again; test_fisher_ops_splits.py checks every config and,
# on a GPU, one autotuned launch over the whole space.
step tests 150 env FIBEC_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider -n "$JOBS" \
    tests/test_fisher_ops.py tests/test_fisher_ops_errors.py tests/test_fisher_ops_splits.py tests/test_masked_update.py \
    tests/test_codec_on_device.py tests/test_codec_decode_on_device.py
step fisher 180 "$PY" bench/bench_fisher.py --gpu-json "$OUT/fisher.json" "$WORKERS"
step collector 75 "$PY" bench/bench_collector.py --json "$OUT/collector.json"
step masked_update 40 "$PY" bench/bench_masked_update.py --gpu-json "$OUT/masked_update.json"
step codec 45 "$PY" bench/bench_codec.py --gpu-json "$OUT/codec.json"
if [ -f "$CARRY/minilm/model.safetensors" ] && [ -d "$CARRY/data/sms_spam" ]; then
    step rounds 120 "$PY" bench/bench_rounds.py --json "$OUT/rounds.json" --model "$CARRY/minilm" \
        --data sms_spam --data-root "$CARRY/data" --rounds "$ROUNDS" --threads "$THREADS"
else
    echo "=== rounds: skipped, no $CARRY/minilm or $CARRY/data/sms_spam (bench/gpu_carry.sh)"
    STEPS+=("rounds skipped 0")
fi

"$PY" - "$OUT" "$SECONDS" "${STEPS[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, seconds, steps = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
summary = {"seconds": seconds, "steps": {}, "targets": {}}
for entry in steps:
    name, rc, spent = entry.split()
    summary["steps"][name] = {"exit": rc, "seconds": int(spent)}
for name in ("fisher", "collector", "masked_update", "codec"):
    path = out / f"{name}.json"
    if path.exists():
        figures = json.loads(path.read_text())
        summary["device"] = figures["device"]
        summary["targets"].update(figures["targets"])
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
failed = [n for n, s in summary["steps"].items() if s["exit"] not in ("0", "skipped")]
print(f"gpu.sh: {seconds}s; failed steps: {', '.join(failed) or 'none'}")
sys.exit(1 if failed else 0)
EOF
