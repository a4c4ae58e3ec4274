"""Metrics of a run: one JSON object per step in ``metrics.jsonl`` and TensorBoard events in the
same run directory (``tensorboard --logdir RUN_DIR``), plus the progress bar's summary.

Resuming truncates the JSONL to the steps before the resumed one, so a stopped and resumed run
has the same file as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


@contextlib.contextmanager
def timed_into(totals: dict, key: str, *, cuda_sync: bool = False):
    """Add the block's wall seconds to ``totals[key]`` (summed over repeated blocks).

    Args:
        totals: the dict of running totals (a step's timings, a round's summary).
        key: the entry to add to (created at 0.0).
        cuda_sync: wait for queued CUDA work before reading the clock (GPU work is asynchronous).
    """
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if cuda_sync:
            import torch

            torch.cuda.synchronize()
        totals[key] = totals.get(key, 0.0) + time.perf_counter() - t0


def _scalar(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, bool):
        return int(v)
    return v if isinstance(v, (int, float)) else None


class MetricsLogger:
    """Writes scalar metrics per step.

    Args:
        run_dir: the run directory (created if missing).
        tensorboard: also write TensorBoard events (needs the ``tensorboard`` package; without it a
            warning says so and only the JSONL is written).
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.run_dir))
            except ImportError:
                warnings.warn("MetricsLogger: the tensorboard package is missing; writing metrics.jsonl only "
                              "(pip install tensorboard)", stacklevel=2)

    def truncate_after(self, step: int) -> None:
        """Keep only the records of steps <= ``step`` (resuming from a checkpoint at ``step``)."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict) -> dict:
        """Record the scalars of ``metrics`` (tensors and numbers; others are skipped) at ``step``.
        Returns the record written."""
        record = {"step": int(step)}
        for k, v in metrics.items():
            s = _scalar(v)
            if s is not None:
                record[k] = s if not (isinstance(s, float) and math.isnan(s)) else None
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self._writer.add_scalar(k, v, step)
            self._writer.flush()
        return record

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
