"""Tiny datasets in the benchmarks' official formats, for tests and CPU dry runs of the evaluation.

``write_fixture_data(root)`` writes every registered task under ``root/<task folder>/`` in the layout documented in
``flamingo_eval.data``, so ``load_task_data(task, data_dir=root)`` works for each of them. Each task's own writer
(``Task.write_fixture``, in ``flamingo_eval.fixtures``) does the writing; tasks that share a folder share one
writer, run once. Images are small random pictures saved under their official file names.

The ``custom`` folder's records carry both the caption and the VQA fields, so it loads with either custom_kind;
custom_kind="binding" gets its own folder, ``root/binding/`` (episodes of 4 demos over two words).

    .venv/bin/python -m flamingo_eval.testing /tmp/eval-fixture    # write one to look at
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from pathlib import Path

from .fixtures import FixtureImages
from .tasks import task_names, tasks_named


def write_fixture_data(
    data_dir: Path, *, tasks: Sequence[str] | None = None, num_support: int = 8, num_query: int = 6, seed: int = 0
) -> Path:
    """Write ``tasks`` (default: every registered name) under ``data_dir/<folder>/`` with ``num_support`` train and
    ``num_query`` evaluated examples each (binding: episodes). Returns ``data_dir``. Deterministic in ``seed``."""
    names = task_names() if tasks is None else tuple(tasks)
    unknown = [t for t in names if t not in task_names()]
    if unknown:
        raise ValueError(f"Unknown tasks {unknown}; expected some of {task_names()}")
    if num_support < 2 or num_query < 2:
        raise ValueError(f"num_support and num_query must be >= 2 (got {num_support}, {num_query})")
    writers = {}  # folder -> writer, in task order; a folder shared by tasks is written once
    for name in names:
        for task in tasks_named(name):
            writers.setdefault(task.data_folder, task.write_fixture)
    data_dir = Path(data_dir)
    for offset, (folder, write) in enumerate(writers.items()):
        # Seeded by the folder's position in the list: the same tasks and seed write the same files.
        rng = random.Random(seed * 1000 + offset)
        images = FixtureImages(seed * 100_000 + offset * 1000)
        write(data_dir / folder, rng, images, num_support, num_query)
    return data_dir


if __name__ == "__main__":
    print(write_fixture_data(Path(sys.argv[1] if len(sys.argv) > 1 else "eval-fixture")))
