"""DataConfig: one dataset of the training mixture (one entry of the YAML list under ``data:``)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

FORMATS = ("simple", "obelics", "pairs", "webdataset")
SPLIT_BY = ("auto", "records", "shards")
LABELS = ("all", "answers", "last_answer")


@dataclass
class DataConfig:
    """Where one dataset lives, how its records look, and how it is batched.

    ``path``: file(s) or glob(s) of ``.jsonl`` / ``.json`` / ``.parquet`` / ``.arrow``, a ``save_to_disk`` directory,
    or ``.tar`` shards (``format="webdataset"``). ``max_tokens`` caps a sample's tokens after the ``<image>``,
    ``<|endofchunk|>``, bos and eos tokens are added; ``max_images`` caps its images. ``batch_size`` is per process.
    """

    name: str
    path: str | list[str]
    format: str = "simple"
    batch_size: int = 8
    loss_weight: float = 1.0
    max_tokens: int = 256
    max_images: int = 5
    mask_text_before_first_image: bool = True
    # "all": every text token after the first image is trained (pretraining). "answers": only each chunk's answer,
    # the text after the last of ``answer_markers`` in it, and its <|endofchunk|> (task data: captions, VQA,
    # binding); a chunk without a marker is context only. "last_answer": only the last chunk's answer, the query of
    # a task record (flamingo_train.task_data writes these; its demos are context, as at evaluation).
    # See flamingo_train.data.samples.
    labels: str = "all"
    answer_markers: list[str] = dataclasses.field(
        default_factory=lambda: ["Output:", "Short answer:", "Answer:", "This is a"])
    streaming: bool = False
    shuffle: bool = True
    shuffle_buffer: int = 1000
    num_workers: int = 2
    image_root: str | None = None
    # How a streaming dataset is divided among processes and workers. "records": every reader walks the whole stream
    # and keeps its share of each global batch (N processes see exactly what one process sees). "shards": each reader
    # streams only its own files, so reading does not grow with the number of readers (web-scale pretraining).
    # "auto": "shards" when streaming from at least as many files as readers, else "records".
    split_by: str = "auto"

    def __post_init__(self) -> None:
        where = f"DataConfig {self.name!r}"
        # Accept pathlib paths (write_synthetic_dataset returns one); store plain strings so the config stays YAML.
        self.path = os.fspath(self.path) if isinstance(self.path, os.PathLike) else self.path
        if isinstance(self.path, (list, tuple)):
            self.path = [os.fspath(p) for p in self.path]
        if self.format not in FORMATS:
            raise ValueError(f"{where}: format must be one of {FORMATS}, got {self.format!r}.")
        if not self.path:
            raise ValueError(f"{where}: path is empty; give a file, a glob, a list of them, or a directory.")
        for field, least in (("batch_size", 1), ("max_tokens", 2), ("max_images", 1), ("shuffle_buffer", 1),
                             ("num_workers", 0)):
            if getattr(self, field) < least:
                raise ValueError(f"{where}: {field} must be >= {least}, got {getattr(self, field)}.")
        if self.labels not in LABELS:
            raise ValueError(f"{where}: labels must be one of {LABELS}, got {self.labels!r}.")
        if self.labels != "all" and not any(self.answer_markers):
            raise ValueError(f"{where}: labels {self.labels!r} needs at least one non-empty answer_markers entry.")
        if self.split_by not in SPLIT_BY:
            raise ValueError(f"{where}: split_by must be one of {SPLIT_BY}, got {self.split_by!r}.")
        if self.loss_weight < 0:
            raise ValueError(f"{where}: loss_weight must be >= 0, got {self.loss_weight}.")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        """Build from a YAML/JSON mapping; unknown keys are an error that lists the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"DataConfig {data.get('name')!r}: unknown fields {unknown}; known fields are {sorted(known)}.")
        return cls(**data)

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)
