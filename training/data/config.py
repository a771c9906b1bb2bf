"""DataConfig: one dataset of the training mixture (one entry of the YAML list under ``data:``)."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flamingo.file_access import MAX_IMAGE_PIXELS
from flamingo.typed_config import FieldError, build

FORMATS = ("simple", "obelics", "pairs", "webdataset")
SPLIT_BY = ("auto", "records", "shards")
LABELS = ("all", "answers", "last_answer")
# Whole-number fields and the least value each may take.
AT_LEAST = {"batch_size": 1, "max_tokens": 2, "max_images": 1, "shuffle_buffer": 1, "num_workers": 0}


@dataclass
class DataConfig:
    """Where one dataset lives, how its records look, and how it is batched.

    ``path``: file(s) or glob(s) of ``.jsonl`` / ``.json`` / ``.parquet`` / ``.arrow``, a ``save_to_disk`` directory,
    or ``.tar`` shards (``format="webdataset"``). ``max_tokens`` caps a sample's tokens after the ``<image>``,
    ``<|endofchunk|>``, bos and eos tokens are added; ``max_images`` caps its images. ``batch_size`` is per process.

    Records are untrusted input (see :mod:`flamingo_train.data.loader`, "Bad records"): an image path must lead to a
    file inside the data root (``image_root``, else the folder of the data file or ``save_to_disk`` directory) unless
    ``allow_outside_paths``, and an image file or bytes of more than ``max_image_pixels`` pixels (None: no limit) is
    refused from its header, before it is decoded.
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
    allow_outside_paths: bool = False  # True: read image paths that lead outside the data root (a dataset you trust)
    max_image_pixels: int | None = MAX_IMAGE_PIXELS
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
        # from_dict checks types already; a config built in Python (DataConfig(batch_size=True)) is checked here.
        for field, least in (*AT_LEAST.items(), ("max_image_pixels", 1)):
            value = getattr(self, field)
            if field == "max_image_pixels" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise FieldError(field, f"must be a whole number, got {value!r} ({type(value).__name__}).", owner=owner)
            if value < least:
                raise FieldError(field, f"must be >= {least}, got {value}.", owner=owner)
        for field in ("mask_text_before_first_image", "streaming", "shuffle", "allow_outside_paths"):
            if not isinstance(getattr(self, field), bool):
                raise FieldError(field, f"must be true or false, got {getattr(self, field)!r}.", owner=owner)
        if self.labels not in LABELS:
            raise FieldError("labels", f"must be one of {LABELS}, got {self.labels!r}.", owner=owner)
        if self.labels != "all" and not any(self.answer_markers):
            raise FieldError("answer_markers", f"labels {self.labels!r} needs at least one non-empty entry.",
                             owner=owner)
        if self.split_by not in SPLIT_BY:
            raise FieldError("split_by", f"must be one of {SPLIT_BY}, got {self.split_by!r}.", owner=owner)
        weight = self.loss_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise FieldError("loss_weight", f"must be a number, got {weight!r} ({type(weight).__name__}).", owner=owner)
        # A NaN or infinite weight makes every step's loss non-finite: each update would be skipped and the run would
        # export the untrained model, exit code 0.
        if not math.isfinite(weight) or weight < 0:
            raise FieldError("loss_weight", f"must be a finite number >= 0, got {weight}.", owner=owner)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str | None = None) -> DataConfig:
        """Build from a YAML/JSON mapping, every field's type checked (``flamingo.typed_config``); an unknown key is
        an error with the closest field name. ``where`` names the source in errors (default: the dataset's name)."""
        if where is None:
            where = f"DataConfig {data.get('name')!r}" if isinstance(data, Mapping) else "DataConfig"
        return build(cls, data, where=where)

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)
