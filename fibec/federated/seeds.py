"""Every random stream of a run, named by purpose and derived from the run's seed in one place.

Each party of a run (every engine, every resumed process) derives the same streams from the seed,
so the derivations are part of what a record means: changing one changes every later run of that
seed. They reproduce the streams the committed records were made with, which is why three
purposes (client sampling, the test split, the partition) still share the bare seed.
"""
from __future__ import annotations

import numpy as np

PURPOSES = ("client sampling", "test split", "partition", "evaluation shares", "validation split", "model init",
            "client")


def seed_for(purpose: str, seed: int, *, client: int = 0, round_idx: int = 0) -> int | list[int]:
    """The seed of `purpose`'s stream in a run of `seed`: an int, or a list for numpy's SeedSequence.

    "client" is a client's own stream in a round (its curriculum batches, dropout, shuffled
    scoring batches), from its id and the 0-based round; the other purposes are run-wide."""
    if purpose == "client":
        return (seed * 1_000_003 + client * 10_007 + round_idx) % (2**31)
    if purpose in ("client sampling", "test split", "partition", "model init"):
        return seed
    if purpose == "evaluation shares":
        return [seed, 1]
    if purpose == "validation split":
        return [seed, 2]
    raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")


def generator(purpose: str, seed: int, **where: int) -> np.random.Generator:
    """A numpy generator of `purpose`'s stream (see seed_for)."""
    return np.random.default_rng(seed_for(purpose, seed, **where))
