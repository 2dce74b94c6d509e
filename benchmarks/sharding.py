"""What the benchmark campaigns share: ``--jobs``, ``--out``, ``--summary`` and ``--shard I/N``, which runs only
every N-th run of a fixed list, starting at I.

A batch scheduler that sets an index (a Slurm job array: ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``)
spreads a campaign over machines with no coordinator: each shard takes its slice of the *full* run list (finished or
not, in a fixed order), so shards are disjoint and together cover every run exactly once; results are files, merged by
the reports. Used by ``returns/suite.py``, ``continual/study.py`` and ``tuning/tune.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
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


def add_campaign_arguments(parser: argparse.ArgumentParser, default_out: Path, summary: bool = True) -> None:
    """``--jobs``, ``--out``, ``--summary`` (if the campaign has one) and ``--shard``."""
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel on this machine (one process each)")
    parser.add_argument("--out", type=Path, default=default_out)
    if summary:
        parser.add_argument("--summary", action="store_true", help="print the table of finished runs and exit")
    add_shard_argument(parser)


def run_parallel(launch: Callable[[Run], None], runs: Sequence[Run], jobs: int) -> None:
    """``launch(run)`` for every run, ``jobs`` at a time (each launch starts and waits for its own process)."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(launch, runs))


def parse_campaign_arguments(
    parser: argparse.ArgumentParser, summary: Callable[[argparse.Namespace], str] | None = None
) -> argparse.Namespace | None:
    """Parse the command line (``--out`` made absolute); with ``--summary``, print ``summary(args)`` and return
    ``None`` (nothing to run)."""
    args = parser.parse_args()
    args.out = args.out.resolve()
    if summary is not None and args.summary:
        print(summary(args))
        return None
    return args
