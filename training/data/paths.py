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
    directory) or "file" (one of ``BUILDERS``); a ValueError naming the file if ``config`` cannot read it."""
    if is_tar_shard(config, path):
        return "tar"
    if os.path.isdir(path):
        return "saved"
    if Path(path).suffix in BUILDERS:
        return "file"
    raise ValueError(f"DataConfig {config.name!r}: cannot read {path}; expected one of {sorted(BUILDERS)} or {TAR}.")


def check_paths(config: DataConfig) -> None:
    """Fail fast, without reading any record: every path/glob of ``config`` matches something, and each file is of a
    kind its ``format`` can read (:func:`read_as`, as :func:`flamingo_train.data.sources.open_parts` reads them)."""
    for path in expand_paths(config):
        read_as(config, path)
