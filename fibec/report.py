"""What a run leaves behind: the summary table and the PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Global: the shared model on the pooled evaluation set. Personal: each client's own model on its
# own share, beside its trivial baseline (each client's majority label).
COLUMNS = (("method", "method", "{}"), ("final_global_accuracy", "global acc", "{:.3f}"),
           ("final_personal_accuracy", "personal acc", "{:.3f}"), ("majority_accuracy", "majority", "{:.3f}"),
           ("best_global_accuracy", "best global", "{:.3f}"), ("uploaded_mb", "up MB", "{:.3f}"),
           ("downloaded_mb", "down MB", "{:.3f}"), ("compute_s", "compute s", "{:.1f}"),
           ("wall_time_s", "time s", "{:.1f}"))


def _evaluated(records: list[dict], key: str) -> list[float]:
    return [r[key] for r in records if key in r]


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    """One row per method: final and best accuracy under both protocols, the majority-label
    baseline, total bytes up/down (MB = 1e6 bytes), client compute and wall time."""
    rows = []
    for method, records in results.items():
        global_acc = _evaluated(records, "global_accuracy")
        personal_acc = _evaluated(records, "personal_accuracy")
        last = records[-1] if records else {}
        rows.append({
            "method": method,
            "rounds": len(records),
            "eval_split": last.get("eval_split", ""),
            "final_global_accuracy": global_acc[-1] if global_acc else math.nan,
            "best_global_accuracy": max(global_acc) if global_acc else math.nan,
            "final_personal_accuracy": personal_acc[-1] if personal_acc else math.nan,
            "majority_accuracy": _evaluated(records, "majority_accuracy")[-1] if personal_acc else math.nan,
            "uploaded_mb": last.get("cum_uploaded_bytes", 0) / 1e6,
            "downloaded_mb": last.get("cum_downloaded_bytes", 0) / 1e6,
            "compute_s": last.get("cum_compute_s", 0.0),
            "wall_time_s": last.get("elapsed", 0.0),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of `summarise` rows, with a line saying what was evaluated."""
    cells = [[label for _, label, _ in COLUMNS]]
    cells += [[fmt.format(row[key]) for key, _, fmt in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    split = rows[0]["eval_split"] if rows else ""
    lines.append(f"accuracy on the {split} split; global: the shared model on all evaluation samples; personal: "
                 f"each client's model on its own share; majority: each client predicting its majority label")
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """accuracy_vs_round.png and accuracy_vs_uploaded.png in out_dir: per method, the global
    accuracy (solid) and, for personalised methods, the personal accuracy (dashed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for x_key, x_label, scale, file in (("round", "round", 1.0, "accuracy_vs_round.png"),
                                         ("cum_uploaded_bytes", "cumulative uploaded MB", 1e-6,
                                          "accuracy_vs_uploaded.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, records in results.items():
            for key, style, label in (("global_accuracy", "-", "global"), ("personal_accuracy", "--", "personal")):
                points = [(r[x_key] * scale, r[key]) for r in records if key in r]
                if key == "personal_accuracy" and all(r[key] == r["global_accuracy"] for r in records if key in r):
                    continue  # no personal layers: the same figure as the global one
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, style, marker="o", markersize=3, label=f"{method} ({label})")
        ax.set_xlabel(x_label)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / file
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_summary(rows: list[dict], out_dir: Path) -> Path:
    path = out_dir / "summary.json"
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path
