"""The example type every reader returns, and the file helpers whose errors name the file, record and field.

    Example(id, image, question=..., answers=(...), text=..., label=..., choices=(...), demos=(...), where=...)
    TaskData(task, support=[Example], query=[Example], class_names=[...] | None, files={layout key: Path})

Every reader (``flamingo_eval.readers``, ``flamingo_eval.binding``) reports a bad file through these helpers, so each
error reads ``<file>, <record or line>: missing field 'x'`` whatever the benchmark.

Evaluation files are UTF-8 (a leading UTF-8 byte order mark is accepted, as Windows tools write one); any other
encoding, or one bad byte, is refused with the file and line, never decoded by guesswork: a line dropped or
mangled in silence would change a score.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flamingo.file_access import open_regular_file

# torchvision's ImageFolder extensions; compared case-insensitively (ImageNet's files end in .JPEG).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
ID_TYPES = (int, str)  # what an id field may hold (never a bool, though Python counts one as an int)


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
    where: str | None = field(default=None, compare=False, repr=False)  # "<file>, line 3": named in errors


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
        kind = "is a folder, not a file" if path.is_dir() else "is not a regular file" if path.exists() else "not found"
        raise ValueError(f"{what}: file {path} {kind}")
    return path


def id_key(value: Any) -> str:
    """Ids match by value whatever their JSON type: 42 and "42" are one id."""
    return str(value)


class UniqueIds:
    """The ids of one file's records: ``add`` refuses an id the file named before, naming the file, both records and
    the id. An official file that repeats an id would otherwise be scored wrong in silence (the last copy wins)."""

    def __init__(self, field_name: str):
        self.field_name = field_name
        self._first: dict[str, str] = {}  # id_key -> where it was first seen

    def add(self, value: Any, where: str) -> Any:
        key = id_key(value)
        if key in self._first:
            raise ValueError(
                f"{where}: {self.field_name} {value!r} appears more than once (first at {self._first[key]}); every "
                "record needs its own id"
            )
        self._first[key] = where
        return value


# Byte order marks of the encodings that JSON files are sometimes saved in by mistake (Windows "Unicode" is UTF-16).
_WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32 (little-endian)"),  # before UTF-16 LE: its BOM starts the same way
    (codecs.BOM_UTF32_BE, "UTF-32 (big-endian)"),
    (codecs.BOM_UTF16_LE, "UTF-16 (little-endian)"),
    (codecs.BOM_UTF16_BE, "UTF-16 (big-endian)"),
)


def _wide_encoding(data: bytes) -> str | None:
    """The UTF-16/32 encoding ``data`` is in, by its BOM or, without one, by where the zero bytes of its first ASCII
    characters fall (the rule of RFC 4627: JSON text starts with ASCII); None for anything else."""
    for bom, name in _WIDE_BOMS:
        if data.startswith(bom):
            return name
    head = data[:4]
    if len(head) == 4 and head[:3] == b"\0\0\0" and head[3]:
        return "UTF-32 (big-endian)"
    if len(head) == 4 and head[0] and head[1:] == b"\0\0\0":
        return "UTF-32 (little-endian)"
    if len(head) >= 2 and not head[0] and head[1]:
        return "UTF-16 (big-endian)"
    if len(head) >= 2 and head[0] and not head[1]:
        return "UTF-16 (little-endian)"
    return None


def read_text(path: Path, what: str = "file") -> str:
    """The text of a UTF-8 evaluation file (a UTF-8 BOM dropped); a ValueError naming the file and, for a bad byte,
    its line, or for a UTF-16/32 file its encoding."""
    path = need_path(Path(path), what)
    with open_regular_file(path) as f:
        data = f.read()
    wide = _wide_encoding(data)
    if wide is not None:
        raise ValueError(f"{path}: the file is encoded in {wide}, not UTF-8; convert it to UTF-8 (e.g. with iconv).")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line, column = data.count(b"\n", 0, error.start) + 1, error.start - data.rfind(b"\n", 0, error.start)
        raise ValueError(
            f"{path}, line {line}: not valid UTF-8 (byte 0x{data[error.start]:02x} at byte {column} of the line); "
            "evaluation files must be UTF-8."
        ) from None


def read_json(path: Path, what: str = "file") -> Any:
    """Parse a JSON file; ValueError naming the file if it is missing, malformed or not UTF-8."""
    path = Path(path)
    text = read_text(path, what)
    try:
        return json.loads(text)
    except ValueError as error:  # malformed, or an integer of more digits than Python converts
        raise ValueError(f"{what}: {path} is not valid JSON: {error}") from error
    except RecursionError:  # "[[[[..." nested past the interpreter's limit
        raise ValueError(f"{what}: {path} is not valid JSON: nested too deeply") from None


def read_jsonl(path: Path, what: str = "file") -> list[dict]:
    """Parse a JSON-lines file (blank lines skipped); ValueError naming the file and line."""
    return [record for _number, record in read_jsonl_lines(path, what)]


def read_jsonl_lines(path: Path, what: str = "file") -> list[tuple[int, dict]]:
    """``(line number, record)`` per non-blank line of a JSON-lines file, for errors that name the line."""
    path = Path(path)
    records = []
    # Split on "\n" only: a JSON string may hold U+2028 and other characters that str.splitlines() breaks at.
    for number, line in enumerate(read_text(path, what).split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON: {error}") from error
        except RecursionError:
            raise ValueError(f"{path}, line {number}: not valid JSON: nested too deeply") from None
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
    kinds = (kind,) if isinstance(kind, type) else kind
    # JSON's true is a Python bool, and a bool is an int: a question_id or label of true must not pass as 1.
    if kinds is not None and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
        names = " or ".join(k.__name__ for k in kinds)
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

