"""DataConfig: one dataset of the training mixture (one entry of the YAML list under ``data:``)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flamingo.typed_config import FieldError, build

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
        owner = f"DataConfig {self.name!r}"
        # Accept pathlib paths (write_synthetic_dataset returns one); store plain strings so the config stays YAML.
        self.path = os.fspath(self.path) if isinstance(self.path, os.PathLike) else self.path
        if isinstance(self.path, (list, tuple)):
            self.path = [os.fspath(p) for p in self.path]
        if self.format not in FORMATS:
            raise FieldError("format", f"must be one of {FORMATS}, got {self.format!r}.", owner=owner)
        if not self.path:
            raise FieldError("path", "is empty; give a file, a glob, a list of them, or a directory.", owner=owner)
        for field, least in (("batch_size", 1), ("max_tokens", 2), ("max_images", 1), ("shuffle_buffer", 1),
                             ("num_workers", 0)):
            if getattr(self, field) < least:
                raise FieldError(field, f"must be >= {least}, got {getattr(self, field)}.", owner=owner)
        if self.labels not in LABELS:
            raise FieldError("labels", f"must be one of {LABELS}, got {self.labels!r}.", owner=owner)
        if self.labels != "all" and not any(self.answer_markers):
            raise FieldError("answer_markers", f"labels {self.labels!r} needs at least one non-empty entry.",
                             owner=owner)
        if self.split_by not in SPLIT_BY:
            raise FieldError("split_by", f"must be one of {SPLIT_BY}, got {self.split_by!r}.", owner=owner)
        if self.loss_weight < 0:
            raise FieldError("loss_weight", f"must be >= 0, got {self.loss_weight}.", owner=owner)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str | None = None) -> DataConfig:
        """Build from a YAML/JSON mapping, every field's type checked (``flamingo.typed_config``); an unknown key is
        an error with the closest field name. ``where`` names the source in errors (default: the dataset's name)."""
        if where is None:
            where = f"DataConfig {data.get('name')!r}" if isinstance(data, Mapping) else "DataConfig"
        return build(cls, data, where=where)

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)
