"""What FisherCollector adds to a real training step: forward, backward and AdamW of a peft LoRA model,
with and without the collector, in one process (bench/gpu.sh's collector step).

Models are random-init from a config (time does not depend on the weights): a MiniLM-size BERT
(hidden 384, 6 layers) in fp32 with LoRA r 8 on query/value, and on a GPU a LLaMA-1B-size model
(hidden 2048, 16 layers) in bf16 with LoRA r 16 on q/v and on all seven linear layers. Per case:
the median step time of each, the overhead, the host time of a step (until its last launch returns),
the host-device synchronisations per step (torch.cuda's sync debug mode counts them; on a GPU only),
and a torch.profiler summary of three steps with the collector: kernel launches a step and the ops
that take the most host and device time (issue 24: profile before changing kernels). Then the
Fisher scoring pass of the faithful curriculum (fibec.curriculum.difficulty_scores: forward and
backward with the collector, no update, scores read back once) over the same batches, against a
training step of the same batch: a client that holds n samples scores them all once, which costs
n / N times that ratio of training steps (issue 25: the scoring's cost against a round). Without
CUDA the same cases run at tiny sizes on the CPU, to check the script end to end.

    python bench/bench_collector.py [--json PATH] [--steps K]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cases(gpu: bool) -> list[dict]:
    """(name, model config, dtype, batch N x T, LoRA rank and targets) of each case."""
    from transformers import BertConfig, LlamaConfig

    if gpu:
        minilm = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                            vocab_size=30522, num_labels=2)
        llama = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                            intermediate_size=8192, vocab_size=32000, num_labels=2, pad_token_id=0)
        minilm_batch, llama_batch = (16, 128), (8, 512)
    else:
        minilm = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            vocab_size=1000, num_labels=2)
        llama = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, vocab_size=1000, num_labels=2, pad_token_id=0)
        minilm_batch, llama_batch = (4, 32), (2, 64)
    every_linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return [
        dict(name="MiniLM-size BERT fp32, LoRA r 8 on query/value", config=minilm, dtype=torch.float32,
             batch=minilm_batch, rank=8, targets=["query", "value"]),
        dict(name="LLaMA-1B-size bf16, LoRA r 16 on q/v", config=llama, dtype=torch.bfloat16, batch=llama_batch,
             rank=16, targets=["q_proj", "v_proj"]),
        dict(name="LLaMA-1B-size bf16, LoRA r 16 on all 7 linear layers", config=llama, dtype=torch.bfloat16,
             batch=llama_batch, rank=16, targets=every_linear),
    ]


def build(case: dict, device: torch.device):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(case["config"]).to(device, case["dtype"])
    model = get_peft_model(model, LoraConfig(r=case["rank"], lora_alpha=2 * case["rank"],
                                             target_modules=case["targets"], task_type="SEQ_CLS"))
    N, T = case["batch"]
    vocab = case["config"].vocab_size
    input_ids = torch.randint(1, vocab, (N, T), device=device)
    attention_mask = torch.ones(N, T, dtype=torch.long)
    attention_mask[:, T - T // 4:] = torch.rand(N, 1) > 0.5  # some padded samples
    labels = torch.randint(0, 2, (N,), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer, dict(input_ids=input_ids, attention_mask=attention_mask.to(device), labels=labels), \
        attention_mask


def training_step(model, optimizer, inputs, collector, cpu_mask):
    """One forward, backward and AdamW step, as a training loop makes it."""
    def step() -> None:
        if collector is not None:
            collector.token_mask = cpu_mask  # as a training loop hands over its batch's mask
        loss = model(**inputs).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_times(step, steps: int) -> tuple[float, float, float]:
    """(median ms per step, median ms of host time per step, host-device synchronisations per step)."""
    for _ in range(3):
        step()
    sync()
    times, host = [], []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        host.append((time.perf_counter() - start) * 1e3)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    syncs = float("nan")
    if torch.cuda.is_available():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    return statistics.median(times), statistics.median(host), syncs


def scoring_ms(model, inputs: dict, batches: int = 10, repeats: int = 3) -> float:
    """Median ms a batch of the Fisher scoring pass over `batches` batches like `inputs`, held on the
    host as a client's are."""
    from fibec.curriculum import difficulty_scores

    host = {k: v.cpu() for k, v in inputs.items()}
    N = host["input_ids"].shape[0]
    data = [host | {"index": torch.arange(i * N, (i + 1) * N)} for i in range(batches)]
    difficulty_scores(model, data[:1])
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        difficulty_scores(model, data)  # returns after reading the scores back: no sync needed after it
        times.append((time.perf_counter() - start) * 1e3 / batches)
    return statistics.median(times)


def profiled(step, steps: int = 3, top: int = 12) -> dict:
    """Kernel launches per step, and the ops with the most self host time and self device time
    per step, over `steps` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        for _ in range(steps):
            step()
        sync()
    events = prof.key_averages()

    def ranked(time_of, label: str) -> list[dict]:
        return [{"op": e.key, "calls": e.count / steps, label: time_of(e) / steps}
                for e in sorted(events, key=time_of, reverse=True)[:top] if time_of(e) > 0]

    return {"launches": sum(e.count for e in events if "LaunchKernel" in e.key) / steps,
            "host_us": ranked(lambda e: e.self_cpu_time_total, "self_host_us"),
            "device_us": ranked(lambda e: e.self_device_time_total, "self_device_us") if gpu else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    from fibec.fisher import FisherCollector

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    rows = []
    for case in cases(gpu):
        model, optimizer, inputs, cpu_mask = build(case, device)
        plain = training_step(model, optimizer, inputs, None, cpu_mask)
        plain_ms, plain_host_ms, plain_syncs = step_times(plain, args.steps)
        plain_profile = profiled(plain)
        with FisherCollector(model, "lora", loss_reduction="mean") as collector:
            collected = training_step(model, optimizer, inputs, collector, cpu_mask)
            collected_ms, collected_host_ms, collected_syncs = step_times(collected, args.steps)
            collected_profile = profiled(collected)
        score_ms = scoring_ms(model, inputs)
        row = dict(case=case["name"], batch=list(case["batch"]), plain_ms=plain_ms, with_collector_ms=collected_ms,
                   overhead=collected_ms / plain_ms - 1, plain_host_ms=plain_host_ms,
                   with_collector_host_ms=collected_host_ms, plain_syncs=plain_syncs,
                   with_collector_syncs=collected_syncs, plain_launches=plain_profile["launches"],
                   with_collector_launches=collected_profile["launches"], with_collector_profile=collected_profile,
                   scoring_ms_per_batch=score_ms, scoring_batch_per_step=score_ms / plain_ms)
        rows.append(row)
        print(f"{case['name']}: plain {plain_ms:.1f} ms (host {plain_host_ms:.1f}), with FisherCollector "
              f"{collected_ms:.1f} ms (host {collected_host_ms:.1f}, {100 * row['overhead']:+.0f}%); syncs a step "
              f"{plain_syncs} -> {collected_syncs}; kernel launches a step {plain_profile['launches']:g} -> "
              f"{collected_profile['launches']:g}; a batch of the scoring pass {score_ms:.1f} ms "
              f"({row['scoring_batch_per_step']:.2f} of a plain step)", flush=True)
        del model, optimizer
        if gpu:
            torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__, "rows": rows,
              "targets": {f"collector overhead <= 10%: {r['case']}": r["overhead"] <= 0.10 for r in rows}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
