"""The example type every reader returns, and the file helpers whose errors name the file, record and field.

    Example(id, image, question=..., answers=(...), text=..., label=..., choices=(...), demos=(...))
    TaskData(task, support=[Example], query=[Example], class_names=[...] | None, files={layout key: Path})

Every reader (``flamingo_eval.readers``, ``flamingo_eval.binding``) reports a bad file through these helpers, so each
error reads ``<file>, <record or line>: missing field 'x'`` whatever the benchmark.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# torchvision's ImageFolder extensions; compared case-insensitively (ImageNet's files end in .JPEG).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Example:
    """One image with its text. ``answers`` holds the reference captions (captioning) or the human answers (VQA)."""

    id: int | str  # COCO/Flickr: image id; VQA: question_id; HatefulMemes: id; classification: relative image path
    image: Path
    question: str | None = None
    answers: tuple[str, ...] = ()  # binding: (the word bound to the query image,)
    text: str | None = None  # HatefulMemes OCR text
    label: int | None = None  # HatefulMemes 0/1; classification: class index
    choices: tuple[str, ...] = ()  # binding: the words the query is ranked over
    demos: tuple[Example, ...] = ()  # binding: the episode's own demos (image, answers=(word,)), in file order


@dataclass
class TaskData:
    """A benchmark's demo pool (``support``, from the train split) and evaluated split (``query``)."""

    task: str
    support: list[Example]
    query: list[Example]
    class_names: list[str] | None = None
    files: dict[str, Path] = field(default_factory=dict)  # the resolved layout (what was read)


def describe(layout: dict[str, Path | None]) -> str:
    """``key=path, ...``: the files a task read, for error messages."""
    return ", ".join(f"{key}={path}" for key, path in layout.items())


def need_path(path: Path, what: str, *, folder: bool = False) -> Path:
    """``path`` itself, or a ValueError naming ``what`` (the layout key) and the missing file or folder."""
    if folder and not path.is_dir():
        raise ValueError(f"{what}: folder {path} not found")
    if not folder and not path.is_file():
        raise ValueError(f"{what}: file {path} not found")
    return path


def read_json(path: Path, what: str = "file") -> Any:
    """Parse a JSON file; ValueError naming the file if it is missing or malformed."""
    path = need_path(Path(path), what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what}: {path} is not valid JSON: {error}") from error


def read_jsonl(path: Path, what: str = "file") -> list[dict]:
    """Parse a JSON-lines file (blank lines skipped); ValueError naming the file and line."""
    return [record for _number, record in read_jsonl_lines(path, what)]


def read_jsonl_lines(path: Path, what: str = "file") -> list[tuple[int, dict]]:
    """``(line number, record)`` per non-blank line of a JSON-lines file, for errors that name the line."""
    path = need_path(Path(path), what)
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON: {error}") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            records.append((number, record))
    return records


def field_of(record: Any, key: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """``record[key]``, or a ValueError that names the file/record (``where``) and the missing or mistyped field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{where}: missing field {key!r} (has {sorted(record)[:8]})")
    value = record[key]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field {key!r} should be {names}, got {type(value).__name__}")
    return value


def list_field(data: Any, key: str | None, path: Path) -> list:
    """The top-level list of a file (``data`` itself, or ``data[key]``), with an error naming the file if it is not."""
    if key is not None:
        data = field_of(data, key, str(path), list)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def answers_of(record: dict, where: str) -> tuple[str, ...]:
    """The human answers of a VQA record: ``answers`` as [{"answer": ...}] (VQA v2, VizWiz) or [str] (TextVQA)."""
    raw = field_of(record, "answers", where, list)
    return tuple(field_of(a, "answer", f"{where}, answer {i}", str) if isinstance(a, dict) else str(a) for i, a in enumerate(raw))

