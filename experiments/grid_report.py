"""The Markdown report of a grid and its plots, read from its records: per cell and method the
accuracy, bytes and time columns; the target method against the baseline; what each piece buys;
paired comparisons; the settings each row ran with."""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from grid_file import ROOT, RUN_PLACE, Run, describe_stale, read_records, runs_of, runs_of_cell, stale_runs

# The link model of the time columns: per client, 20 Mbit/s up and 100 Mbit/s down; the clients of a
# round work in parallel, so a round takes its slowest client's download + compute + upload.
UPLINK_BYTES_PER_S = 20e6 / 8
DOWNLINK_BYTES_PER_S = 100e6 / 8
TARGET_OF_BASELINE = 0.95
TARGET_SPEEDUP = 2.0
UPLINK_SWEEP_MBIT = np.geomspace(0.01, 1000.0, 201)  # 40 rates per decade
# The paired comparisons also read accuracy after equal local work: 30 steps is what the scaled
# curriculum's first five rounds take at 10 steps a round (3 + 5 + 6 + 8 + 9 = 31), three full
# rounds of a method without it; 50 is five full rounds. A method slower in rounds but level here
# points to the steps it skipped rather than to the data it trained on.
EQUAL_LOCAL_STEPS = (30, 50)


def link_seconds(record: dict, uplink: float = UPLINK_BYTES_PER_S, downlink: float = DOWNLINK_BYTES_PER_S) -> float:
    """One round under the link model: the slowest client's download + compute + upload."""
    clients = record["clients"]
    down = record["downloaded_bytes"] / max(1, len(clients)) / downlink
    return max(down + record["client_compute_s"].get(str(c), 0.0)
               + record["client_uploaded_bytes"].get(str(c), 0) / uplink for c in clients)


def rounds_until(records: list[dict], target: float) -> list[dict] | None:
    """The rounds up to the first whose global accuracy reaches `target`; None when none does."""
    for i, r in enumerate(records):
        if r.get("global_accuracy", -1.0) >= target:
            return records[:i + 1]
    return None


def time_to(records: list[dict], target: float) -> dict[str, float]:
    """Rounds, client compute seconds and link-model seconds until the global accuracy first
    reaches `target` (nan when it never does)."""
    until = rounds_until(records, target)
    if until is None:
        return {"rounds": math.nan, "compute_s": math.nan, "link_s": math.nan}
    return {"rounds": float(until[-1]["round"]), "compute_s": sum(r["compute_s"] for r in until),
            "link_s": sum(link_seconds(r) for r in until)}


def uplink_for_speedup(records: list[dict], baseline: list[dict], target: float) -> float:
    """The fastest uplink in UPLINK_SWEEP_MBIT (Mbit/s; the downlink as many times faster as in the
    link model) at which `records` reach `target` TARGET_SPEEDUP times sooner than `baseline`
    under the link model: below it, fewer bytes pay for the time target. nan when no rate swept
    does, or either run never reaches `target`."""
    mine, base = rounds_until(records, target), rounds_until(baseline, target)
    if mine is None or base is None:
        return math.nan
    ratio = DOWNLINK_BYTES_PER_S / UPLINK_BYTES_PER_S
    for mbit in UPLINK_SWEEP_MBIT[::-1]:
        up = mbit * 1e6 / 8
        if (sum(link_seconds(r, up, up * ratio) for r in base)
                >= TARGET_SPEEDUP * sum(link_seconds(r, up, up * ratio) for r in mine)):
            return float(mbit)
    return math.nan


def accuracy_after_steps(records: list[dict], steps: float) -> float:
    """The global accuracy of the first evaluated round by which the clients' local steps (a round's
    mean over its clients) add up to `steps`; nan when the run never gets there or its records
    lack the steps."""
    done = 0.0
    for r in records:
        if "local_steps" not in r:
            return math.nan
        done += r["local_steps"]
        if done >= steps - 1e-6 and "global_accuracy" in r:
            return r["global_accuracy"]
    return math.nan


def summary(record: dict, baseline: dict | None) -> dict[str, float]:
    """A run's figures; with the baseline run of the same seed, also its time to 95% of the
    baseline's final global accuracy and how many times fewer bytes it uploaded."""
    rounds = record["rounds"]
    last = rounds[-1]
    evaluated = [r for r in rounds if "global_accuracy" in r]
    row = {"global": evaluated[-1]["global_accuracy"], "personal": evaluated[-1]["personal_accuracy"],
           "global_last3": float(np.mean([r["global_accuracy"] for r in evaluated[-3:]])),
           "global_second_half": float(np.mean([r["global_accuracy"] for r in evaluated
                                                if 2 * r["round"] > len(rounds)] or [math.nan])),
           "global_eval1": evaluated[0]["global_accuracy"],
           "global_eval2": evaluated[1]["global_accuracy"] if len(evaluated) > 1 else math.nan,
           "majority": evaluated[-1]["majority_accuracy"], "best_global": max(r["global_accuracy"] for r in evaluated),
           "up_mb": last["cum_uploaded_bytes"] / 1e6, "down_mb": last["cum_downloaded_bytes"] / 1e6,
           "up_mb_round": last["cum_uploaded_bytes"] / 1e6 / len(rounds),
           "down_mb_round": last["cum_downloaded_bytes"] / 1e6 / len(rounds),
           "compute_s": last["cum_compute_s"], "cpu_s": last.get("cum_cpu_s", math.nan),
           "scoring_s": sum(r.get("scoring_s", math.nan) for r in rounds),
           "link_s": sum(link_seconds(r) for r in rounds),
           **{f"global_after_{steps}_steps": accuracy_after_steps(rounds, steps) for steps in EQUAL_LOCAL_STEPS}}
    if baseline is not None:
        base = summary(baseline, None)
        row.update({f"to95_{k}": v for k, v in time_to(rounds, TARGET_OF_BASELINE * base["global"]).items()})
        row["up_ratio"] = base["up_mb"] / row["up_mb"]
    return row


def over_seeds(values: list[float], several: Callable[[list[float]], str], one: Callable[[float], str]) -> str:
    """One figure per seed (nan: the seed never got one) as text: `several` of the finite ones, or
    `one` when only one is; "never" when none is, and how many are when some are missing."""
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return "never"
    text = several(finite) if len(finite) > 1 else one(finite[0])
    return text + (f" ({len(finite)}/{len(values)})" if len(finite) < len(values) else "")


def median_range(values: list[float]) -> str:
    """For figures spread over orders of magnitude, where one seed would carry a mean."""
    return over_seeds(values, lambda v: f"{np.median(v):.3g} ({min(v):.3g}-{max(v):.3g})", "{:.3g}".format)


def mean_std(values: list[float]) -> str:
    """Mean ± the sample standard deviation (ddof 1) over the seeds."""
    return over_seeds(values, lambda v: f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}", "{:.3f}".format)


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The `level` Student-t confidence interval of the mean of `values` (per-seed paired differences)."""
    from scipy import stats

    n = len(values)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n)
    return float(np.mean(values) - half), float(np.mean(values) + half)


def paired_interval(values: list[float]) -> str:
    """Mean [95% t-interval] of per-seed paired differences, and on how many seeds the difference
    is positive."""
    def several(v: list[float]) -> str:
        low, high = t_interval(v)
        return f"{np.mean(v):+.3f} [{low:+.3f}, {high:+.3f}], {sum(x > 0 for x in v)}/{len(v)} above 0"

    return over_seeds(values, several, "{:+.3f}".format)


COLUMNS = (("global", "global acc"), ("global_last3", "global acc, last 3"),
           ("global_second_half", "global acc, 2nd half"), ("global_eval1", "global acc, 1st eval"),
           ("global_eval2", "global acc, 2nd eval"), ("personal", "personal acc"),
           ("majority", "majority"), ("up_mb", "up MB"), ("up_ratio", "baseline up ÷ up"), ("up_mb_round", "up MB/round"), ("down_mb", "down MB"),
           ("down_mb_round", "down MB/round"), ("compute_s", "compute s"), ("cpu_s", "CPU s"),
           ("scoring_s", "scoring s"), ("to95_rounds", "rounds to 95%"),
           ("to95_compute_s", "compute s to 95%"), ("to95_link_s", "link s to 95%"))


def report(grid: dict) -> Path:
    done = read_records(grid)
    baseline = grid.get("baseline", "fedavg")
    out = ROOT / grid["report"]
    plots = out.parent / f"{out.stem}_plots"
    plots.mkdir(parents=True, exist_ok=True)
    lines = [f"# {grid.get('title', grid['name'])}", "",
             f"Generated by `python experiments/grid.py report experiments/{grid['name']}.toml` from "
             f"{grid['records']} ({len(done)} of {len(runs_of(grid))} runs).", "",
             "Accuracy columns: mean ± sample std (ddof 1) over seeds, final round (and the mean of the last three "
             "evaluations, which moves less from round to round; *2nd half*: the mean over the evaluations of "
             "the run's second half; *1st eval*, *2nd eval*: the first two "
             "evaluations, where a slow start shows). *global*: the shared model on the pooled "
             "evaluation set; *personal*: each client's model on its own share; *majority*: each client "
             "predicting its majority training label on its share (the trivial personalised baseline). "
             f"Time to 95%: until the global accuracy first reaches {TARGET_OF_BASELINE:.0%} of {baseline}'s final "
             f"global accuracy on the same seed; *baseline up ÷ up*: how many times fewer bytes than {baseline} "
             "were uploaded on the same seed; link model: 20 Mbit/s up, 100 Mbit/s down per client, the "
             "clients of a round in parallel, compute as measured; *uplink for 2x*: the fastest uplink "
             f"(downlink 5x it) at which the link-model speed-up to 95% reaches {TARGET_SPEEDUP:g}x, out of "
             f"{UPLINK_SWEEP_MBIT[0]:g}-{UPLINK_SWEEP_MBIT[-1]:g} Mbit/s, from the same measured compute and "
             "payload lengths: the links on which fewer bytes would pay for the time target. The link-model "
             "speed-up depends only on the link rates relative to the clients' compute speed: clients k times "
             "faster than the machine that measured the compute reach the same speed-up at k times the "
             "uplink. *compute s*: the clients' wall-clock seconds of local work (scoring, training, "
             "encoding), summed; *CPU s*: the CPU seconds of the same work, which a shared or paused machine "
             "does not inflate (recorded since 2026-12-05; one thread per run); *scoring s*: the part of "
             "*compute s* the Fisher scoring passes over the clients' whole local data took (wall-clock).", ""]
    # Columns no recorded run of the grid has (figures added to the records later) are left out.
    columns = [(k, label) for k, label in COLUMNS
               if any(not math.isnan(summary(r, None).get(k, 0.0)) for r in done.values())]
    if grid.get("target_method"):
        lines += targets(grid, done, grid["target_method"], baseline)
    if grid.get("credit"):
        lines += credit(grid, done, baseline)
    if grid.get("pairs"):
        lines += paired_comparisons(grid, done)
    if grid.get("findings"):
        lines += [(ROOT / grid["findings"]).read_text().strip(), ""]
    for cell in grid["cells"]:
        cell_runs = runs_of_cell(grid, cell)
        baselines = baseline_runs(grid, cell_runs, done, baseline)
        lines += [f"## {cell['data']}, Dirichlet alpha {cell['alpha']:g}", "",
                  "| method | variant | seeds | " + " | ".join(label for _, label in columns) + " |",
                  "|---|---|---|" + "---|" * len(columns)]
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in cell_runs:
            if r.key in done:
                groups.setdefault((r.method, r.variant), []).append(summary(done[r.key], baselines.get(r.seed)))
        lines += [method_row(method, variant, rows, columns) for (method, variant), rows in groups.items()]
        lines.append("")
        plot_cell(grid, cell, cell_runs, done, plots)
        lines += [f"![accuracy vs round]({plots.name}/{cell['data']}-a{cell['alpha']:g}-round.png) "
                  f"![accuracy vs uploaded MB]({plots.name}/{cell['data']}-a{cell['alpha']:g}-upload.png)", ""]
    machines = {json.dumps(r["machine"], sort_keys=True) for r in done.values()}
    wall = sum(r["rounds"][-1]["elapsed"] for r in done.values())
    lines += ["## How these figures were made", "",
              f"- Command: `python experiments/grid.py run experiments/{grid['name']}.toml` then `report`; "
              f"one row's runs alone: `--only <data>-a<alpha>-s<seed>-<method>` (for example "
              f"`--only {runs_of(grid)[0].key}`), with the settings in the grid file.",
              f"- Machine(s): {'; '.join(machines)}.",
              f"- Wall time of the recorded runs: {wall / 3600:.2f} h.", "", *settings_each_row_ran_with(done)]
    stale = describe_stale(stale_runs(grid, done))
    if stale:
        lines += ["Recorded under settings the grid file no longer gives (their rows show what was run, "
                  "not what the command above would run now):", "", *(f"- {line}" for line in stale), ""]
    out.write_text("\n".join(lines))
    return out


def method_row(method: str, variant: str, rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """One method and variant's row of a cell's table from its seeds' summaries. A time to 95% that
    no seed has was never reached; any other figure that none has was not recorded by its runs (a
    figure added to the records after they ran), which the row says rather than "never"."""
    def figure(key: str) -> str:
        values = [row.get(key, math.nan) for row in rows]
        if not key.startswith("to95_") and all(math.isnan(v) for v in values):
            return "not recorded"
        return mean_std(values)

    return f"| {method} | {variant} | {len(rows)} | " + " | ".join(figure(k) for k, _ in columns) + " |"


# What names a run (its row and cell) or places it, rather than configures it.
NOT_SETTINGS = ("data", "alpha", "seed", "method", *RUN_PLACE)


def settings_each_row_ran_with(done: dict) -> list[str]:
    """The settings of the recorded runs, read from their configs: those every run shared, those
    that go with the data set (one value per data set), then per method and variant those its runs
    shared and some other row did not."""
    if not done:
        return []
    rows: dict[tuple[str, str], list[dict]] = {}
    by_data: dict[str, list[dict]] = {}
    for record in done.values():
        config = {k: v for k, v in record["config"].items() if k not in NOT_SETTINGS}
        rows.setdefault((record["method"], record["variant"]), []).append(config)
        by_data.setdefault(record["config"]["data"], []).append(config)

    def common(of: list[dict]) -> dict:
        return {k: v for k, v in of[0].items() if all(c.get(k) == v for c in of)}

    def listed(settings: dict) -> str:
        return ", ".join(f"{k} = {json.dumps(v)}" for k, v in sorted(settings.items())) or "none besides the shared"

    shared = common([c for row in rows.values() for c in row])
    with_data = sorted(set.intersection(*(set(common(of)) for of in by_data.values())) - set(shared))
    lines = ["Settings, as the records give them (a method ignores those it has no use for, as fedavg the "
             "curriculum's and the GAL's):", "", f"- every run: {listed(shared)}."]
    if with_data:
        lines.append(f"- one value per data set: {', '.join(with_data)}.")
    for (method, variant), row in sorted(rows.items()):
        own = {k: v for k, v in common(row).items() if k not in shared and k not in with_data}
        lines.append(f"- {method} {variant}: {listed(own)}.")
    return lines + [""]


def baseline_runs(grid: dict, cell_runs: list[Run], done: dict, baseline: str,
                  variant: str | None = None) -> dict[int, dict]:
    """{seed: the record of the baseline's `variant` (default: the grid's baseline_variant)} of one cell."""
    variant = variant or grid.get("baseline_variant", "-")
    return {r.seed: done[r.key] for r in cell_runs if r.method == baseline and r.variant == variant and r.key in done}


TARGETS = (("global_diff", "global acc − baseline"), ("global_diff_ci", "global acc − baseline: paired mean [95% CI]"),
           ("personal_diff", "personal acc − baseline"),
           ("personal_over_majority", "personal acc − majority"), ("up_ratio", "baseline up ÷ up"),
           ("updown_ratio", "baseline up+down ÷ up+down"), ("rounds_speedup", "speed-up to 95%, rounds"), ("compute_s_speedup", "speed-up to 95%, compute"),
           ("link_s_speedup", "speed-up to 95%, link model"),
           ("uplink_for_2x", "uplink for 2x, Mbit/s: median (range)"))
# With `transport_baseline_variant`: the baseline run with the target's transport, on the same seed.
SAME_TRANSPORT_TARGETS = (("transport_global_diff", "global acc − baseline, same transport: paired mean [95% CI]"),
                          ("transport_up_ratio", "baseline, same transport: up ÷ up"),
                          ("transport_updown_ratio", "baseline, same transport: up+down ÷ up+down"))
TARGET_FORMATS = {"uplink_for_2x": median_range, "global_diff_ci": paired_interval,
                  "transport_global_diff": paired_interval}


def transport_variant(grid: dict, variant: str) -> str | None:
    """The baseline's variant that sends what the target's `variant` sends: the grid's
    `transport_baseline_variant`, or with "same" the baseline's run of that variant (or the one
    `transport_of` names for it)."""
    same_transport = grid.get("transport_baseline_variant")
    if same_transport != "same":
        return same_transport
    return grid.get("transport_of", {}).get(variant, variant)


def targets(grid: dict, done: dict, target: str, baseline: str) -> list[str]:
    """Per cell and variant of `target`, against `baseline` on the seeds both finished: the accuracy
    differences under both protocols, the upload and upload+download ratios and how many times sooner
    it reaches 95% of the baseline's final global accuracy (baseline's time ÷ target's; never reached:
    nan, shown as "never" when no seed reached it), and the uplink below which that is TARGET_SPEEDUP
    times sooner under the link model. With `transport_baseline_variant`, also the accuracy difference
    and byte ratios against the baseline with the target's transport (its seeds only; see
    transport_variant), so that the bytes the transport saves are not credited to the method. Variants
    are never pooled: each is its own row; with `pooled = true`, each variant also gets a row over all
    cells' pairs (the mean of the per-run figures)."""
    same_transport = grid.get("transport_baseline_variant")
    columns = TARGETS + (SAME_TRANSPORT_TARGETS if same_transport else ())
    described = ("the same variant" + (" (or the one `transport_of` names)" if grid.get("transport_of") else "")
                 if same_transport == "same" else same_transport)
    lines = [f"## {target} against {baseline}", "",
             f"Mean ± sample std (ddof 1) over the seeds on which both finished; the paired columns give the "
             f"mean of the per-seed differences with its 95% Student-t interval. Targets: global accuracy within 1 point "
             f"of {baseline} or better; personal accuracy not below {baseline}'s and above the majority "
             f"baseline; >= 10x fewer uploaded bytes; >= 2x sooner to 95% of {baseline}'s final accuracy."
             + (f" *Same transport*: {baseline} {described}, which sends what {target} sends (value format, "
                f"upload density, error feedback): the bytes {target} saves beyond it are its own." if same_transport
                else ""), "",
             "| data | alpha | variant | seeds | " + " | ".join(label for _, label in columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    pooled: dict[str, list[dict]] = {}
    for cell in grid["cells"]:
        cell_runs = runs_of_cell(grid, cell)
        baselines = baseline_runs(grid, cell_runs, done, baseline)
        baseline_summaries = {seed: summary(record, record) for seed, record in baselines.items()}
        rows_of_variant: dict[str, list[dict]] = {}
        for r in cell_runs:
            if r.method == target and r.key in done and r.seed in baselines:
                mine, base = summary(done[r.key], baselines[r.seed]), baseline_summaries[r.seed]
                row = {"global_diff": mine["global"] - base["global"], "global_diff_ci": mine["global"] - base["global"],
                       "personal_diff": mine["personal"] - base["personal"],
                       "personal_over_majority": mine["personal"] - mine["majority"],
                       "up_ratio": mine["up_ratio"],
                       "updown_ratio": (base["up_mb"] + base["down_mb"]) / (mine["up_mb"] + mine["down_mb"]),
                       **{f"{k}_speedup": base[f"to95_{k}"] / mine[f"to95_{k}"] if mine[f"to95_{k}"] else math.nan
                          for k in ("rounds", "compute_s", "link_s")},
                       "uplink_for_2x": uplink_for_speedup(done[r.key]["rounds"], baselines[r.seed]["rounds"],
                                                           TARGET_OF_BASELINE * base["global"]),
                       "transport_global_diff": math.nan, "transport_up_ratio": math.nan,
                       "transport_updown_ratio": math.nan}
                transported = (baseline_runs(grid, cell_runs, done, baseline, transport_variant(grid, r.variant))
                               if same_transport else {})
                if r.seed in transported:
                    other = summary(transported[r.seed], None)
                    row["transport_global_diff"] = mine["global"] - other["global"]
                    row["transport_up_ratio"] = other["up_mb"] / mine["up_mb"]
                    row["transport_updown_ratio"] = (other["up_mb"] + other["down_mb"]) / (mine["up_mb"] + mine["down_mb"])
                rows_of_variant.setdefault(r.variant, []).append(row)
                pooled.setdefault(r.variant, []).append(row)
        for variant, rows in rows_of_variant.items():
            lines.append(target_row(cell["data"], f"{cell['alpha']:g}", variant, rows, columns))
    if grid.get("pooled"):
        for variant, rows in pooled.items():
            lines.append(target_row("all cells", "-", variant, rows, columns))
    return lines + [""]


def target_row(data: str, alpha: str, variant: str, rows: list[dict], columns: tuple) -> str:
    def figure(key: str) -> str:
        # A same-transport figure is nan only where the baseline has no run with that transport.
        if key.startswith("transport_") and all(math.isnan(row[key]) for row in rows):
            return "no such run"
        return TARGET_FORMATS.get(key, mean_std)([row[key] for row in rows])

    return f"| {data} | {alpha} | {variant} | {len(rows)} | " + " | ".join(figure(k) for k, _ in columns) + " |"


def credit(grid: dict, done: dict, baseline: str) -> list[str]:
    """'What each piece buys': per cell, over the seeds on which every `credit` row and both baselines
    finished, each row's upload and upload+download ratios against the baseline as published
    (baseline_variant) and its global accuracy's paired difference to it and to the baseline with
    the target's transport (transport_baseline_variant), so that each saving is credited to the
    piece that makes it."""
    same_transport = grid["transport_baseline_variant"]
    rows = [tuple(row) for row in grid["credit"]]
    lines = ["## What each piece buys", "",
             f"Per cell, over the seeds on which every row below finished: uploaded and downloaded MB over the "
             f"run, how many times fewer than {baseline} as published (variant {grid.get('baseline_variant', '-')!r}), and "
             f"the global accuracy's paired difference (points; mean [95% t-interval] over the seeds) to {baseline} "
             f"and to {baseline} {same_transport}, which sends what {grid['target_method']} sends.", "",
             f"| data | alpha | seeds | method | variant | up MB | {baseline} up ÷ up | down MB | "
             f"{baseline} up+down ÷ up+down | global acc | − {baseline}, points | − {baseline} {same_transport}, points |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for cell in grid["cells"]:
        cell_runs = runs_of_cell(grid, cell)
        base = baseline_runs(grid, cell_runs, done, baseline)
        transported = baseline_runs(grid, cell_runs, done, baseline, same_transport)
        by_row = {(r.method, r.variant, r.seed): done[r.key] for r in cell_runs if r.key in done}
        seeds = sorted(s for s in base if s in transported and all((m, v, s) in by_row for m, v in rows))
        if not seeds:
            continue

        def of(record: dict) -> dict:
            return summary(record, None)

        base_up = np.mean([of(base[s])["up_mb"] for s in seeds])
        base_all = base_up + np.mean([of(base[s])["down_mb"] for s in seeds])
        for method, variant in rows:
            mine = [of(by_row[(method, variant, s)]) for s in seeds]
            up, down = np.mean([m["up_mb"] for m in mine]), np.mean([m["down_mb"] for m in mine])
            to_base = [100 * (m["global"] - of(base[s])["global"]) for m, s in zip(mine, seeds)]
            to_transport = [100 * (m["global"] - of(transported[s])["global"]) for m, s in zip(mine, seeds)]
            is_base = (method, variant) == (baseline, grid.get("baseline_variant", "-"))
            is_transport = (method, variant) == (baseline, same_transport)
            lines.append(f"| {cell['data']} | {cell['alpha']:g} | {len(seeds)} | {method} | {variant} | {up:.2f} | "
                         f"{base_up / up:.1f}x | {down:.2f} | {base_all / (up + down):.1f}x | "
                         f"{mean_std([m['global'] for m in mine])} | "
                         f"{'' if is_base else points_interval(to_base)} | "
                         f"{'' if is_base or is_transport else points_interval(to_transport)} |")
    return lines + [""]


def paired_comparisons(grid: dict, done: dict) -> list[str]:
    """Per cell and `pairs` entry [A method, A variant, B method, B variant]: A's global accuracy
    minus B's on each seed both finished, at the last round, as the mean over the evaluations of
    the run's second half (which one round's evaluation moves less), and after each of
    EQUAL_LOCAL_STEPS local steps (whether a slow start is the steps or the data)."""
    moments = [("global", "last round"), ("global_second_half", "second half")] + [
        (f"global_after_{steps}_steps", f"after {steps} local steps") for steps in EQUAL_LOCAL_STEPS]
    lines = ["## Paired comparisons", "",
             "Global accuracy, A minus B in points on each seed both finished: mean [95% t-interval] over the "
             "seeds, and on how many seeds A is ahead; at the last round, as the mean over the evaluations "
             "of the run's second half, and at the first evaluation by which each run's clients took "
             f"{' and '.join(map(str, EQUAL_LOCAL_STEPS))} local steps (a curriculum that scales its steps "
             "with its share of the data takes fewer steps in its first rounds: level there, its lost rounds "
             "point to the steps rather than to the data it trained on).", "",
             "| data | alpha | A | B | seeds | " + " | ".join(f"{name} | seeds A ahead" for _, name in moments) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(moments)]
    for cell in grid["cells"]:
        by_row = {(r.method, r.variant, r.seed): summary(done[r.key], None)
                  for r in runs_of_cell(grid, cell) if r.key in done}
        for a_method, a_variant, b_method, b_variant in grid["pairs"]:
            seeds = [s for s in grid["seeds"]
                     if (a_method, a_variant, s) in by_row and (b_method, b_variant, s) in by_row]
            if not seeds:
                continue
            cells = []
            for key, _ in moments:
                diffs = [100 * (by_row[(a_method, a_variant, s)][key] - by_row[(b_method, b_variant, s)][key])
                         for s in seeds]
                diffs = [d for d in diffs if not math.isnan(d)]
                cells += [points_interval(diffs), f"{sum(d > 0 for d in diffs)}/{len(diffs)}"] if diffs else ["", ""]
            lines.append(f"| {cell['data']} | {cell['alpha']:g} | {a_method} {a_variant} | {b_method} {b_variant} | "
                         f"{len(seeds)} | " + " | ".join(cells) + " |")
    return lines + [""]


def points_interval(values: list[float]) -> str:
    """Mean [95% t-interval] of per-seed differences in points."""
    if len(values) < 2:
        return f"{values[0]:+.1f}"
    low, high = t_interval(values)
    return f"{np.mean(values):+.1f} [{low:+.1f}, {high:+.1f}]"


def plot_cell(grid: dict, cell: dict, runs: list[Run], done: dict, plots: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = f"{cell['data']}-a{cell['alpha']:g}"
    for x_key, label, scale, suffix in (("round", "round", 1.0, "round"),
                                        ("cum_uploaded_bytes", "cumulative uploaded MB", 1e-6, "upload")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        groups: dict[str, list[list[dict]]] = {}
        for r in runs:
            if r.key in done:
                groups.setdefault(f"{r.method} {r.variant}".replace(" -", ""), []).append(done[r.key]["rounds"])
        for group, seeds in groups.items():
            xs = np.mean([[rec[x_key] * scale for rec in s if "global_accuracy" in rec] for s in seeds], axis=0)
            ys = np.mean([[rec["global_accuracy"] for rec in s if "global_accuracy" in rec] for s in seeds], axis=0)
            ax.plot(xs, ys, marker="o", markersize=2, label=group)
        ax.set_xlabel(label)
        ax.set_ylabel("global accuracy (mean over seeds)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plots / f"{name}-{suffix}.png", dpi=100)
        plt.close(fig)
