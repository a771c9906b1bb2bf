"""Run bookkeeping: resumable per-trial progress logs, the results JSON, and the markdown summary table.

Progress: every finished batch is appended as one JSON line ``{"batch": i, "records": [...]}`` to
``<output>.progress/<task>-<shots>shot-seed<seed>-<settings hash>.rank<r>.jsonl`` and flushed + fsynced, so a run
killed at any point loses at most the batch in flight. A rerun with the same output and settings reads every rank's
log (any earlier world size) and skips the batches found there. The hash covers everything that changes a batch
(model, data files, batch size, prompts, decoding), so changed settings never reuse stale lines.

Before any work: ``check_output_paths`` fails at once, naming the flag, where the results, progress logs or
predictions could not be written (a folder given as ``--output``, a path below a file, a folder this user cannot
write in), instead of after hours of generation. ``OutputLock`` (``<output>.lock``) keeps a second run off the
same output while the first one runs: two runs appending to the same progress logs and replacing each other's
results file would leave a results file that neither computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import statistics
import tempfile
import warnings
from pathlib import Path

from flamingo.io import atomic_write_text

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None


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
    """Rows: task (metric); columns: shots; cells: mean ± std over the trials (seeds), or the one trial's score."""
    if not summary:
        return "(no scored results)"
    shots = sorted({s["shots"] for s in summary})
    rows = {}
    for s in summary:
        # One trial has no spread: "± 0.00" would read as a measured one.
        cell = f"{s['mean']:.2f} ± {s['std']:.2f}" if s["trials"] > 1 else f"{s['mean']:.2f}"
        rows.setdefault(f"{s['task']} ({s['metric']})", {})[s["shots"]] = cell
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


# ---------------------------------------------------------------------------------------------------- outputs
def check_output_paths(output: Path, *, predictions_dir: Path | None = None, rices_cache_dir: Path | None = None):
    """Fail now (ValueError naming the flag) unless the run can write its results file ``output``, the progress logs
    beside it and the ``predictions_dir`` / ``rices_cache_dir`` folders (None: not written)."""
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"--output {output}: is a folder; name the results file, e.g. {output / 'results.json'}")
    if output.exists() and not output.is_file():
        raise ValueError(f"--output {output}: is not a regular file (a device or a FIFO); name a results file")
    _check_writable_folder(output.parent, f"--output {output}")
    progress = Path(f"{output}.progress")
    if progress.exists():
        _check_writable_folder(progress, f"--output {output}: its progress folder {progress}")
    for flag, folder in (("--predictions-dir", predictions_dir), ("--rices-cache-dir", rices_cache_dir)):
        if folder is not None:
            _check_writable_folder(Path(folder), f"{flag} {folder}")


def _check_writable_folder(folder: Path, label: str) -> None:
    """A ValueError starting with ``label`` unless files can be made in ``folder`` (or, if it does not exist yet,
    in the folder that will hold it). Tried, not read off the permission bits, which root ignores and which say
    nothing of a read-only file system."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise ValueError(f"{label}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".flamingo-eval-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ValueError(f"{label}: cannot write in {existing} ({error.strerror or error})") from None


class OutputLock:
    """The one run allowed on an output: an exclusive ``flock`` on ``<output>.lock``, from ``acquire()`` (before the
    model loads) until ``release()`` (when the run ends).

    The kernel drops an flock when its holder exits, crashed or killed included, so a stale lock never outlives
    its run; the file itself stays (removing it would race with a run opening it) and names the last holder.
    """

    def __init__(self, output: Path):
        self.output = Path(output)
        self.path = Path(f"{output}.lock")
        self._file = None

    def acquire(self) -> OutputLock:
        if fcntl is None or self._file is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock_file = open(self.path, "a+", encoding="utf-8")
        except OSError as error:
            raise ValueError(f"--output {self.output}: cannot open its lock {self.path} ({error.strerror})") from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip()
            lock_file.close()
            raise ValueError(
                f"--output {self.output}: another run is using it: its lock {self.path} is held"
                f"{f' ({holder})' if holder else ''}; wait for that run to end, or give another --output."
            ) from None
        except OSError as error:  # a file system without locks (some cluster mounts): run, but say so
            lock_file.close()
            warnings.warn(f"{self.path}: cannot lock ({error.strerror}); a second run on {self.output} would not be stopped")
            return self
        lock_file.truncate(0)
        lock_file.write(f"by pid {os.getpid()} on {socket.gethostname()}\n")
        lock_file.flush()
        self._file = lock_file
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
