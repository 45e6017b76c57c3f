"""Console progress and tensorboard, rank 0 only.

The progress bar is tqdm on a terminal; under SLURM or a pipe (stdout not a tty) it becomes one log line every
--print_interval iterations, so job logs stay readable instead of filling with carriage returns.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")

log = logging.getLogger("segmentation")


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank{rank}] %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)


class Progress:
    """Wraps an iterable. `tick()` after each item says whether a report is due (every `print_interval` items and
    at the end); `report(scalars)` shows them on the bar's postfix or as a log line. Reading loss values costs a
    device sync, so the caller reads them only when a report is due."""

    def __init__(self, iterable: Iterable[T], total: int, desc: str, enabled: bool, print_interval: int) -> None:
        self.iterable, self.total, self.desc = iterable, total, desc
        self.enabled, self.print_interval = enabled, max(print_interval, 1)
        self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True) if enabled and sys.stdout.isatty() else None
        self.count, self.start = 0, time.perf_counter()

    def __iter__(self) -> Iterator[T]:
        for item in self.iterable:
            yield item
        if self.bar is not None:
            self.bar.close()

    def tick(self) -> bool:
        self.count += 1
        if self.bar is not None:
            self.bar.update(1)
        return self.enabled and (self.count % self.print_interval == 0 or self.count == self.total)

    def report(self, scalars: dict[str, float]) -> None:
        text = " ".join(f"{k}={v:.4f}" for k, v in scalars.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.enabled:
            rate = self.count / max(time.perf_counter() - self.start, 1e-9)
            log.info("%s %d/%d (%.2f it/s) %s", self.desc, self.count, self.total, rate, text)


def make_writer(logdir: Path, enabled: bool):
    """A tensorboard SummaryWriter on rank 0, None elsewhere."""
    if not enabled:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(logdir))
