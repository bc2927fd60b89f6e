"""Progress of a run, on a terminal or in a log file.

On a terminal (stderr is a TTY): one bar per step, as before. Anywhere else (`nohup`, SLURM,
`> log`): a plain line through the `curate` logger every `every` seconds and at the end, with
no carriage returns or cursor codes:

    progress: download 12/40, score 10/40, write 9/40 shards; 4,500 rows (150/s), 3,200 images written (107/s), ETA 3m10s

Rows and images are counted from each finished shard's stats, not only shards: one shard of
10,000 rows can take minutes. While csv/tsv/jsonl input is still being cut the number of shards
is not known yet: the total grows (`set_total`), is shown as `12+`, and no ETA is given.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Optional

log = logging.getLogger("curate")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts shards per step and rows / images; renders as bars or as periodic log lines."""

    def __init__(self, steps: list[str], total_shards: int, enabled: bool = True, every: float = 30.0,
                 terminal: Optional[bool] = None, clock=time.monotonic, final: bool = True):
        self.steps, self.total, self.final = steps, total_shards, final
        self.done = {step: 0 for step in steps}
        self.rows = self.images = 0
        self.every, self.clock = every, clock
        self.started = self._last = clock()
        self.enabled = enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self._bars = {}
        if enabled and self.terminal:
            from tqdm import tqdm

            self._bars = {step: tqdm(total=total_shards, desc=f"{step:8s}", unit="shard") for step in steps}

    def set_total(self, total_shards: int, final: bool = True) -> None:
        """The number of shards as now known; `final` once it can no longer grow."""
        self.final = final
        if total_shards != self.total:
            self.total = total_shards
            for bar in self._bars.values():
                bar.total = total_shards
                bar.refresh()

    def shard_done(self, step: str, stats: Optional[dict] = None) -> None:
        """One shard finished `step`; its stats give the rows (download) and images (write) counted."""
        self.done[step] += 1
        if stats:
            if step == self.steps[0]:
                self.rows += int(stats.get("rows", 0))
            if step == "write":
                self.images += int(stats.get("written", 0))
        if step in self._bars:
            self._bars[step].update(1)
        elif self.enabled and not self.terminal and self.clock() - self._last >= self.every:
            self._last = self.clock()
            log.info(self.line())

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        total = f"{self.total}" if self.final else f"{self.total}+"
        shards = ", ".join(f"{step} {self.done[step]}/{total}" for step in self.steps)
        last = self.done[self.steps[-1]]
        eta = ""
        if self.final and 0 < last < self.total:
            eta = f", ETA {_duration(elapsed / last * (self.total - last))}"
        return (f"progress: {shards} shards; {self.rows:,} rows ({self.rows / elapsed:,.0f}/s), "
                f"{self.images:,} images written ({self.images / elapsed:,.0f}/s){eta}")

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        if self.enabled and not self.terminal:
            log.info(self.line())
