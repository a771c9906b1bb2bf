"""The files a :class:`DataConfig` names: found, and checked against its ``format``, without reading a record.

Kept apart from the readers (:mod:`.sources`, which import ``datasets``) and the loader (torch), so that
``flamingo-train`` checks a config's data paths before it imports either: a typo costs a second, not a backbone
download. :func:`open_parts` in :mod:`.sources` applies the same rules when it opens the files.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from .config import DataConfig

# File suffix -> the ``datasets`` builder that reads it (flamingo_train.data.sources).
BUILDERS = {".jsonl": "text", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
TAR = ".tar"  # a WebDataset shard
# Byte-order marks of the encodings that JSON files must not use (UTF-32 first: its LE mark starts with UTF-16's).
BOMS = ((b"\xff\xfe\x00\x00", "UTF-32LE"), (b"\x00\x00\xfe\xff", "UTF-32BE"), (b"\xff\xfe", "UTF-16LE"),
        (b"\xfe\xff", "UTF-16BE"))
ENCODING_PROBE = 4096  # bytes read from the start of a JSON file to recognise UTF-16 and UTF-32


def expand_paths(config: DataConfig) -> list[str]:
    """``config.path`` (files, globs, directories) -> sorted, de-duplicated list of existing paths."""
    found: list[str] = []
    for pattern in config.paths():
        matches = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matches:
            raise ValueError(f"DataConfig {config.name!r}: path {pattern!r} matches no file or directory.")
        for match in matches:
            if os.path.isdir(match) and not is_saved_dataset(match):
                # A webdataset folder (img2dataset's layout) also holds per-shard .parquet and _stats.json metadata.
                suffixes = (TAR,) if config.format == "webdataset" else (*BUILDERS, TAR)
                inside = sorted(p for p in glob.glob(os.path.join(match, "*")) if Path(p).suffix in suffixes)
                if not inside:
                    raise ValueError(
                        f"DataConfig {config.name!r}: directory {match} holds no data files or save_to_disk dataset."
                    )
                found.extend(inside)
            else:
                found.append(match)
    return list(dict.fromkeys(found))


def is_saved_dataset(path: str) -> bool:
    """Whether ``path`` is a directory written by ``datasets``' ``save_to_disk``."""
    return os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(os.path.join(path, "state.json"))


def is_tar_shard(config: DataConfig, path: str) -> bool:
    """Whether ``path`` is read as a WebDataset shard. ``.tar`` shards go with format 'webdataset' and only they do:
    either without the other is a ValueError naming the file and the format."""
    tar = Path(path).suffix == TAR
    if tar != (config.format == "webdataset"):
        raise ValueError(
            f"DataConfig {config.name!r}: .tar shards go with format 'webdataset' and only they do; "
            f"got {path} with format {config.format!r}."
        )
    return tar


def read_as(config: DataConfig, path: str) -> str:
    """How ``path`` (one of :func:`expand_paths`) is read: "tar" (a WebDataset shard), "saved" (a ``save_to_disk``
    directory) or "file" (one of ``BUILDERS``); a ValueError naming the file if ``config`` cannot read it, or if it
    is a JSON file encoded as UTF-16 or UTF-32 (:func:`wide_encoding`)."""
    if is_tar_shard(config, path):
        return "tar"
    if os.path.isdir(path):
        return "saved"
    if Path(path).suffix in BUILDERS:
        encoding = wide_encoding(path) if Path(path).suffix in (".jsonl", ".json") else None
        if encoding is not None:
            raise ValueError(
                f"DataConfig {config.name!r}: {path} is encoded as {encoding}, not UTF-8; training data must be UTF-8. "
                f"Convert it, e.g. iconv -f {encoding.split()[0]} -t UTF-8 {path} > {Path(path).stem}.utf8"
                f"{Path(path).suffix}"
            )
        return "file"
    raise ValueError(f"DataConfig {config.name!r}: cannot read {path}; expected one of {sorted(BUILDERS)} or {TAR}.")


def wide_encoding(path: str) -> str | None:
    """How ``path`` is encoded if it is UTF-16 or UTF-32 text, which JSON files must not be (None otherwise): a
    byte-order mark, or, without one, NUL bytes mostly in the places where that encoding puts them beside ASCII
    characters (the ``{``, quotes and keys of JSON), in a text that then opens with ``{`` or ``[``. A stray NUL byte
    in a UTF-8 file is not enough: its line is one bad record, not a wrong file. Reads ``ENCODING_PROBE`` bytes.
    """
    with open(path, "rb") as f:
        head = f.read(ENCODING_PROBE)
    for bom, name in BOMS:
        if head.startswith(bom):
            return f"{name} (byte-order mark)"
    nuls = [i for i, byte in enumerate(head) if byte == 0]
    # (name, code unit width, the offsets within a unit where an ASCII character has its NUL bytes)
    for name, width, nul_offsets in (("UTF-32LE", 4, {1, 2, 3}), ("UTF-32BE", 4, {0, 1, 2}), ("UTF-16LE", 2, {1}),
                                     ("UTF-16BE", 2, {0})):
        placed = sum(i % width in nul_offsets for i in nuls)  # most: a CJK character may have a NUL byte elsewhere
        if len(nuls) < min(8, len(head) // (2 * width)) or placed < 0.8 * len(nuls):
            continue
        text = head[: len(head) - len(head) % width].decode(name, errors="replace")
        if text.lstrip()[:1] in ("{", "["):
            return f"{name} (no byte-order mark; NUL bytes between its characters)"
    return None


def check_paths(config: DataConfig) -> None:
    """Fail fast, without reading any record: every path/glob of ``config`` matches something, and each file is of a
    kind its ``format`` can read (:func:`read_as`, as :func:`flamingo_train.data.sources.open_parts` reads them)."""
    for path in expand_paths(config):
        read_as(config, path)
