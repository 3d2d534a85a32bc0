"""What a run leaves as it goes: one JSONL line per round, and a progress bar."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import atomic_write

# The fields of a round's record that measure time: identical runs differ in them and nowhere else.
TIMING_FIELDS = ("wall_time", "elapsed", "compute_s", "cum_compute_s", "client_compute_s", "scoring_s", "cpu_s",
                 "cum_cpu_s", "client_cpu_s")


def without_timings(record: dict) -> dict:
    """A round's record without its TIMING_FIELDS, to compare runs."""
    return {k: v for k, v in record.items() if k not in TIMING_FIELDS}


class Recorder:
    """Appends each round's record to `path` (flushed and fsynced) and moves the progress bar.

    `records` are the rounds already done (a resumed run): the file is rewritten to hold exactly
    those first, so that no round is recorded twice or lost, whatever the crash left in it.
    """

    def __init__(self, path: Path | None, method: str, rounds: int, *, progress: bool = True,
                 records: list[dict] = ()) -> None:
        self.path = path
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())
            self._file = path.open("a")
        self._bar = tqdm(total=rounds, initial=len(records), desc=f"{method:>13}", unit="round",
                         disable=not progress, dynamic_ncols=True)

    def add(self, record: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        postfix = {"up": f"{record['cum_uploaded_bytes'] / 1e6:.2f}MB"}
        for key, label in (("global_accuracy", "acc"), ("personal_accuracy", "personal")):
            if key in record:
                postfix[label] = f"{record[key]:.3f}"
        self._bar.set_postfix(postfix)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()
        if self._file is not None:
            self._file.close()
            self._file = None
