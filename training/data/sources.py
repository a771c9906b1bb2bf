"""Reading raw records from disk, through ``datasets`` (or ``tarfile`` for WebDataset shards).

A source is a list of parts, one per file (or ``save_to_disk`` directory), in sorted path order. Each raw record
comes with an ``origin`` ("data.jsonl line 7", "shard-00001.tar sample 000123") that errors and strict mode name.

* ``.jsonl`` files are read with the ``datasets`` "text" builder, one raw line per record, and each line is parsed
  later, in the worker that uses it. A malformed line is then one bad record, skipped and counted, instead of an
  error that stops ``datasets``' json builder for the whole file. Blank lines are ignored.
* Encoding: JSON Lines must be UTF-8 (a UTF-8 byte-order mark is accepted). The text builder reads them as
  Latin-1, which maps every byte to one character and cannot fail, and a record is the line's bytes again
  (``.encode("latin-1")``), decoded as UTF-8 in the worker: a line with a stray byte is one bad record
  (``not_utf8``), where reading as UTF-8 would fail the whole file. Line breaks are the same bytes in both. A
  UTF-16 or UTF-32 file is refused up front, naming the file and its encoding (:func:`.paths.wide_encoding`).
* ``.json`` files holding a JSON array go through the "json" builder (a malformed one is a ValueError naming the
  file); a ``.json`` file whose first line is a complete JSON object is JSON Lines and read like ``.jsonl``. ``.parquet`` / ``.arrow`` files use their builders, and a directory written by
  ``Dataset.save_to_disk`` is opened with ``load_from_disk``. Rows are read in arrow format, so ``datasets`` Image
  values stay undecoded (``{"bytes", "path"}``) until a worker decodes them.
* ``.tar`` shards (uncompressed, so members can be read by offset) are scanned header by header and grouped by
  key; see :mod:`flamingo_train.data.formats` for the layout.

Random access (``streaming=False``): every part knows its length and returns record ``j`` directly, so sharding
and resuming cost nothing. Streaming (``streaming=True``): parts are only iterated from the start, in order; this
is what web-scale data needs, at the price of every worker reading (not decoding) the records it skips.
"""

from __future__ import annotations

import bisect
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator

import datasets

from .config import DataConfig
from .paths import BUILDERS, expand_paths, read_as

READ_BATCH = 256


class Part:
    """One file's records: ``iterate()`` yields (origin, raw record) in order; random-access parts also have
    ``length`` and ``get(j) -> (origin, raw record)``. ``root`` resolves relative image paths. Parts hold no
    closures or open files, so they pickle into DataLoader workers under any start method."""

    name: str
    root: Path | None = None
    length: int | None = None  # None: streaming only

    def get(self, j: int) -> tuple[str, Any]:
        raise NotImplementedError

    def iterate(self) -> Iterator[tuple[str, Any]]:
        raise NotImplementedError


def open_parts(config: DataConfig) -> list[Part]:
    """The parts of ``config``'s data, random-access unless ``config.streaming`` (tar shards are indexed too)."""
    parts = []
    for path in expand_paths(config):
        root = Path(config.image_root) if config.image_root else Path(path).parent
        kind = read_as(config, path)  # "tar" | "saved" | "file"; a file the config cannot read is a ValueError
        if kind == "tar":
            parts.append(TarPart(path, streaming=config.streaming))
        elif kind == "saved":
            parts.append(_saved_part(path, streaming=config.streaming, root=Path(config.image_root or path)))
        else:
            parts.append(_file_part(path, root=root, streaming=config.streaming))
    return parts


def _json_lines(path: str) -> bool:
    """Whether a .json file is JSON Lines: its first non-blank line is a whole JSON object on its own."""
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    return isinstance(json.loads(line), dict)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return False
    return False


def _file_part(path: str, *, root: Path, streaming: bool) -> Part:
    builder = BUILDERS[Path(path).suffix]
    if builder == "json" and _json_lines(path):
        builder = "text"
    if builder == "text" and os.path.getsize(path) == 0:  # an empty shard; datasets' text builder fails on it
        return DatasetPart(path, datasets.Dataset.from_dict({"text": []}), root=root, lines=True)
    # Lines as Latin-1: every byte is one character, so no line fails the file (see the module docstring).
    options = {"encoding": "latin-1"} if builder == "text" else {}
    try:
        dataset = datasets.load_dataset(builder, data_files=path, split="train", streaming=streaming, **options)
    except Exception as error:  # datasets raises many types; a whole unreadable file is a configuration error
        raise ValueError(f"Cannot read {path} with the datasets {builder!r} builder: {error}") from error
    return DatasetPart(path, dataset, root=root, lines=builder == "text")


def _saved_part(path: str, *, streaming: bool, root: Path) -> Part:
    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise ValueError(f"{path} is a DatasetDict with splits {list(dataset)}; point DataConfig.path at one split.")
        dataset = dataset["train"]
    part = DatasetPart(path, dataset, root=root, lines=False)
    if streaming:
        part.length = None
    return part


class DatasetPart(Part):
    """A ``datasets`` Dataset or IterableDataset, read in arrow format so Image values stay undecoded.

    ``lines``: the records are raw JSON Lines (the "text" builder's column, read as Latin-1), numbered from 1 as
    lines; each is returned as the line's bytes.
    """

    def __init__(self, name: str, dataset, *, root: Path, lines: bool):
        self.name, self.root, self.lines = name, root, lines
        self.arrow = dataset.with_format("arrow")
        self.length = None if isinstance(dataset, datasets.IterableDataset) else len(dataset)

    def _origin(self, j: int) -> str:
        return f"{self.name} line {j + 1}" if self.lines else f"{self.name} row {j}"

    def _unwrap(self, row: dict) -> Any:
        return row["text"].encode("latin-1") if self.lines else row

    def get(self, j: int) -> tuple[str, Any]:
        return self._origin(j), self._unwrap(self.arrow[j].to_pylist()[0])

    def iterate(self) -> Iterator[tuple[str, Any]]:
        j = 0
        for table in self.arrow.iter(batch_size=READ_BATCH):
            for row in table.to_pylist():
                yield self._origin(j), self._unwrap(row)
                j += 1


# ------------------------------------------------------------------------------------------------ tar shards
def _split_member(name: str) -> tuple[str, str]:
    """WebDataset keys: 'dir/000123.0.jpg' -> ('dir/000123', '0.jpg')."""
    directory, _, base = name.rpartition("/")
    key, _, field = base.partition(".")
    return (f"{directory}/{key}" if directory else key), field


def _scan_tar(path: str) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {field: (data offset, size)}) per sample, in shard order; only headers are read."""
    key, fields = None, {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            member_key, field = _split_member(info.name)
            if member_key != key and key is not None:
                yield key, fields
                fields = {}
            key = member_key
            fields[field] = (info.offset_data, info.size)
    if key is not None:
        yield key, fields


class TarPart(Part):
    """WebDataset samples of one uncompressed shard. Random access indexes member offsets up front (headers only);
    streaming scans as it goes. Raw records are :class:`LazySample`, read only when a worker uses them."""

    def __init__(self, path: str, *, streaming: bool):
        self.name, self.root = path, None
        self.index = None
        if not streaming:
            try:
                self.index = list(_scan_tar(path))
            except (tarfile.TarError, OSError) as error:
                raise ValueError(f"Cannot read tar shard {path}: {error}") from error
            self.length = len(self.index)

    def get(self, j: int) -> tuple[str, Any]:
        key, fields = self.index[j]
        return f"{self.name} sample {key}", LazySample(self.name, key, fields)

    def iterate(self) -> Iterator[tuple[str, Any]]:
        for key, fields in self.index if self.index is not None else _scan_tar(self.name):
            yield f"{self.name} sample {key}", LazySample(self.name, key, fields)


class LazySample:
    """A tar sample whose member bytes are read only when needed: skipped records cost a header scan."""

    def __init__(self, path: str, key: str, fields: dict[str, tuple[int, int]]):
        self.path, self.key, self.fields = path, key, fields

    def load(self) -> dict[str, Any]:
        sample: dict[str, Any] = {"__key__": self.key}
        with open(self.path, "rb") as f:
            for field, (offset, size) in self.fields.items():
                f.seek(offset)
                sample[field] = f.read(size)
        return sample


# ------------------------------------------------------------------------------------------------ the whole source
class RandomAccess:
    """All parts of a non-streaming source behind one index: record ``i`` -> (origin, raw record, image root)."""

    def __init__(self, parts: list[Part]):
        self.parts = parts
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + part.length)

    def __len__(self) -> int:
        return self.starts[-1]

    def get(self, i: int) -> tuple[str, Any, Path | None]:
        p = bisect.bisect_right(self.starts, i) - 1
        origin, raw = self.parts[p].get(i - self.starts[p])
        return origin, raw, self.parts[p].root
