"""``--shard I/N`` for the benchmark campaigns: run only every N-th run of a fixed list, starting at I.

A batch scheduler that sets an index (a Slurm job array: ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)
spreads a campaign over machines with no coordinator: each shard takes its slice of the *full* run list (finished or
not, in a fixed order), so shards are disjoint and together cover every run exactly once; results are files, merged by
the reports. Used by ``returns/suite.py``, ``continual/study.py`` and ``tuning/tune.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TypeVar

Run = TypeVar("Run")


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` with integers ``0 <= I < N`` → ``(I, N)`` (an ``argparse`` type)."""
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard must be I/N with integers 0 <= I < N, got {spec!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"--shard must be I/N with integers 0 <= I < N, got {spec!r}")
    return index, count


def add_shard_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--shard I/N`` (default ``0/1``: every run)."""
    parser.add_argument(
        "--shard",
        type=parse_shard,
        default=(0, 1),
        metavar="I/N",
        help="run only every N-th run of the full list, starting at I (one shard per machine, e.g. a Slurm array)",
    )


def select_shard(runs: Sequence[Run], shard: tuple[int, int]) -> list[Run]:
    """The runs of ``shard`` = ``(I, N)``: ``runs[I], runs[I + N], …`` of the full, fixed-order list."""
    index, count = shard
    return list(runs[index::count])
