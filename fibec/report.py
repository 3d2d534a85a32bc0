"""What a run leaves behind: the summary table and the PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLUMNS = (("method", "method", "{}"), ("final_accuracy", "final acc", "{:.3f}"), ("best_accuracy", "best acc", "{:.3f}"),
           ("uploaded_mb", "up MB", "{:.3f}"), ("downloaded_mb", "down MB", "{:.3f}"),
           ("wall_time_s", "time s", "{:.1f}"))


def summarise(results: dict[str, list[dict]]) -> list[dict]:
    """One row per method: final and best test accuracy, total bytes up/down (MB = 1e6 bytes), time."""
    rows = []
    for method, records in results.items():
        accuracies = [r["test_accuracy"] for r in records if "test_accuracy" in r]
        rows.append({
            "method": method,
            "rounds": len(records),
            "final_accuracy": accuracies[-1] if accuracies else float("nan"),
            "best_accuracy": max(accuracies) if accuracies else float("nan"),
            "uploaded_mb": records[-1]["cum_uploaded_bytes"] / 1e6 if records else 0.0,
            "downloaded_mb": records[-1]["cum_downloaded_bytes"] / 1e6 if records else 0.0,
            "wall_time_s": records[-1]["elapsed"] if records else 0.0,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of `summarise` rows."""
    cells = [[label for _, label, _ in COLUMNS]]
    cells += [[fmt.format(row[key]) for key, _, fmt in COLUMNS] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """accuracy_vs_round.png and accuracy_vs_uploaded.png in out_dir, one line per method."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for x_key, x_label, scale, file in (("round", "round", 1.0, "accuracy_vs_round.png"),
                                         ("cum_uploaded_bytes", "cumulative uploaded MB", 1e-6,
                                          "accuracy_vs_uploaded.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, records in results.items():
            points = [(r[x_key] * scale, r["test_accuracy"]) for r in records if "test_accuracy" in r]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=method)
        ax.set_xlabel(x_label)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
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
