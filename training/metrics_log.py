"""A run's ``metrics.jsonl``: what one optimiser step reports, the window of steps since the last line, the lines
themselves (also sent to the trackers), and the picture drawn from them at the end.

One line per logged step, e.g. ``{"loss": 2.31, "loss/laion": 2.4, "aux/<name>": 0.01, "stats/<name>": 0.5,
"tokens_per_s": 9100.0, "images_per_s": 700.0, "step": 200, "lr": 1e-4, "skipped_steps": 0, "grad_norm": 1.3}``
(``aux/`` and ``stats/`` only when the model reports them), and one per in-loop evaluation (in_loop_eval.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from flamingo.io import atomic_write_text, naming_a_full_disk
from flamingo_train.plot import plot_metrics

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
PLOT = "metrics.png"


@dataclass
class StepStats:
    """What one optimiser step reports: this process's values, detached, not yet reduced across processes."""

    loss_sums: torch.Tensor  # (datasets,) next-token cross-entropy summed over the label tokens of finite micro-batches
    counts: torch.Tensor  # (datasets,) label tokens
    aux: dict[str, torch.Tensor]  # auxiliary loss name -> its mean over the step's forwards, unweighted
    stats: dict[str, torch.Tensor]  # statistic name -> its mean over the step's forwards
    trained: bool  # False: a loss (on some process) or the gradient norm was non-finite; no process updated weights
    grad_norm: torch.Tensor | None  # before clipping; None when not trained (or under DeepSpeed, which clips itself)
    lr: float  # the learning rate this step used


class Window:
    """Per-process sums since the last log line; reduced across processes only when logging.

    A skipped (non-finite) step's losses and statistics stay out of the means, also those of its finite
    micro-batches; its tokens still count for throughput. ``aux/<name>`` and ``stats/<name>`` are means over the
    window's trained steps of each step's mean over its forwards. Every process must report the same names (a model
    reports by its structure, not its data), since their sums are reduced as one tensor.
    """

    def __init__(self, names: list[str], device: torch.device):
        self.names, self.device = names, device
        # Every name reported so far: a window that trained no step logs NaN for it, as for the loss.
        self.aux_names: set[str] = set()
        self.stat_names: set[str] = set()
        self._reset()

    def _reset(self) -> None:
        n = len(self.names)
        self.loss_sums, self.counts = torch.zeros(n, device=self.device), torch.zeros(n, device=self.device)
        self.aux: dict[str, torch.Tensor] = {}
        self.stats: dict[str, torch.Tensor] = {}
        self.trained_steps = 0
        self.tokens = self.images = 0
        self.start = time.perf_counter()

    def add(self, step: StepStats, micro_batches: list[list[dict]], media_token_id: int) -> None:
        self.loss_sums += step.loss_sums * step.trained
        self.counts += step.counts * step.trained
        self.aux_names.update(step.aux)
        self.stat_names.update(step.stats)
        if step.trained:
            self.trained_steps += 1
            accumulate(self.aux, step.aux)
            accumulate(self.stats, step.stats)
        for batches in micro_batches:
            for batch in batches:
                self.tokens += int(batch["attention_mask"].sum())
                self.images += int((batch["input_ids"] == media_token_id).sum())

    def flush(self, accelerator: Accelerator, weights: torch.Tensor) -> dict:
        """The window's metrics (all processes together), and a fresh window. Collective: every process calls it."""
        throughput = torch.tensor([self.tokens, self.images], device=self.device, dtype=torch.float32)
        aux_names, stat_names = sorted(self.aux_names), sorted(self.stat_names)
        means = [self.aux.get(k, torch.zeros((), device=self.device)) for k in aux_names]
        means += [self.stats.get(k, torch.zeros((), device=self.device)) for k in stat_names]
        parts = [self.loss_sums, self.counts, throughput]
        if means:  # no extra tensor for a model that reports nothing
            parts.append(torch.stack([m.float() for m in means]))
        totals = accelerator.reduce(torch.cat(parts), reduction="sum")
        n = len(self.names)
        sums, counts = totals[:n], totals[n : 2 * n]
        per_dataset = torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)  # exact global token means
        elapsed = time.perf_counter() - self.start
        # NaN when no step of the window was trained (all skipped as non-finite).
        metrics = {"loss": float((weights * per_dataset)[counts > 0].sum()) if (counts > 0).any() else float("nan")}
        metrics.update({f"loss/{name}": float(v) for name, v in zip(self.names, per_dataset)})
        # Every process trained the same steps: the mean over them all is the sum over trained_steps * processes.
        steps = self.trained_steps * accelerator.num_processes
        keys = [f"aux/{k}" for k in aux_names] + [f"stats/{k}" for k in stat_names]
        metrics.update({key: float(v) / steps if steps else float("nan") for key, v in zip(keys, totals[2 * n + 2 :])})
        metrics["tokens_per_s"] = float(totals[2 * n]) / elapsed
        metrics["images_per_s"] = float(totals[2 * n + 1]) / elapsed
        self._reset()
        return metrics


def accumulate(into: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """Add each named value to its running sum in ``into`` (the first one is the sum)."""
    for name, value in values.items():
        into[name] = into[name] + value if name in into else value


def log_metrics(accelerator: Accelerator, output_dir: Path, metrics: dict) -> None:
    """One line of metrics.jsonl, and the same values to the trackers (main process only)."""
    if accelerator.is_main_process:
        accelerator.log(metrics, step=metrics["step"])
        with naming_a_full_disk(output_dir, METRICS), open(output_dir / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")


def sum_counters(per_rank: list[dict], names: list[str]) -> list[Counter]:
    """Each dataset's skip counts (reason -> count), summed over the processes' ``{name: {reason: count}}``."""
    out = [Counter() for _ in names]
    for rank_counts in per_rank:
        for i, name in enumerate(names):
            out[i].update(rank_counts.get(name, {}))
    return out


def truncate_metrics(path: Path, *, after_step: int) -> None:
    """On resume, drop lines logged after the checkpoint (they will be logged again), so each step appears once."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if _logged_step(line) <= after_step]
    with naming_a_full_disk(path.parent, path.name):
        atomic_write_text(path, "".join(line + "\n" for line in lines))


def _logged_step(line: str) -> float:
    """The step of a metrics line; a blank or partial line (the job was killed while writing it) is dropped."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def plot_run(output_dir: Path) -> None:
    """``output_dir/metrics.png``; a run that trained must not fail over its picture, so a problem is a warning."""
    try:
        plot_metrics(output_dir / METRICS, output_dir / PLOT)
    except ValueError as error:  # matplotlib missing, or nothing logged (a resume at max_steps)
        logger.warning("no %s: %s", PLOT, error)
