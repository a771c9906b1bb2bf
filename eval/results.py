"""Run bookkeeping: resumable per-trial progress logs, the results JSON, and the markdown summary table.

Progress: every finished batch is appended as one JSON line ``{"batch": i, "records": [...]}`` to
``<output>.progress/<task>-<shots>shot-seed<seed>-<settings hash>.rank<r>.jsonl`` and flushed + fsynced, so a run
killed at any point loses at most the batch in flight. A rerun with the same output and settings reads every rank's
log (any earlier world size) and skips the batches found there. The hash covers everything that changes a batch
(model, data files, batch size, prompts, decoding), so changed settings never reuse stale lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from pathlib import Path

from flamingo.io import atomic_write_text


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


class ProgressLog:
    """Append-only JSONL of finished batches for one (task, shots, seed) trial, written by one process (rank)."""

    def __init__(self, directory: Path, *, name: str, rank: int):
        self.directory = Path(directory)
        self.name = name
        self.path = self.directory / f"{name}.rank{rank}.jsonl"

    def load(self) -> dict[int, list[dict]]:
        """Finished batches of this trial from every rank's log: ``{batch index: records}``."""
        done: dict[int, list[dict]] = {}
        for path in sorted(self.directory.glob(f"{self.name}.rank*.jsonl")):
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as error:
                    if number == len(lines):
                        break  # a line cut short by a kill mid-write: that batch simply runs again
                    raise ValueError(
                        f"{path}, line {number}: corrupt progress line ({error}); delete the file to redo it."
                    )
                done[int(entry["batch"])] = entry["records"]
        return done

    def append(self, batch: int, records: list[dict]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._drop_partial_line()
        with open(self.path, "a") as f:
            f.write(json.dumps({"batch": batch, "records": records}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _drop_partial_line(self) -> None:
        # A kill mid-write leaves a last line without its newline; appending after it would glue the next batch onto
        # it and make a corrupt line in the middle of the log, which a later resume refuses to read.
        if not self.path.is_file():
            return
        with open(self.path, "rb+") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                start = data.rfind(b"\n") + 1
                try:
                    json.loads(data[start:])
                    f.write(b"\n")  # killed just before the newline: the batch is complete, keep it
                except json.JSONDecodeError:
                    f.truncate(start)


def summarize(trials: list[dict]) -> list[dict]:
    """Mean and (population, as OpenFlamingo's np.nanstd) std over trials, per (task, shots, metric)."""
    groups: dict[tuple, list[float]] = {}
    for t in trials:
        if t["value"] is not None:
            groups.setdefault((t["task"], t["shots"], t["metric"]), []).append(t["value"])
    return [
        {
            "task": task,
            "shots": shots,
            "metric": metric,
            "mean": statistics.fmean(values),
            "std": statistics.pstdev(values),
            "trials": len(values),
        }
        for (task, shots, metric), values in groups.items()
    ]


def markdown_table(summary: list[dict]) -> str:
    """Rows: task (metric); columns: shots; cells: mean ± std."""
    if not summary:
        return "(no scored results)"
    shots = sorted({s["shots"] for s in summary})
    rows = {}
    for s in summary:
        rows.setdefault(f"{s['task']} ({s['metric']})", {})[s["shots"]] = f"{s['mean']:.2f} ± {s['std']:.2f}"
    lines = ["| task | " + " | ".join(f"{k}-shot" for k in shots) + " |", "|---" * (len(shots) + 1) + "|"]
    for name, cells in rows.items():
        lines.append(f"| {name} | " + " | ".join(cells.get(k, "") for k in shots) + " |")
    return "\n".join(lines)


def write_results(path: Path, *, config: dict, trials: list[dict], missing: list[dict] = ()) -> dict:
    """Write the results JSON atomically: the run config, one entry per trial, and the per-setting summary.

    ``complete`` is false while ``missing`` lists trials (``{"task", "shots", "seed"}``) not yet finished, so a file
    left by a killed or interrupted run never passes for the whole evaluation; rerun the same command to finish it.
    """
    missing = list(missing)
    results = {"config": config, "complete": not missing, "missing": missing, "trials": trials,
               "summary": summarize(trials)}
    atomic_write_text(path, json.dumps(results, indent=2, default=str) + "\n")
    return results
