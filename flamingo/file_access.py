"""Where data files may be read from, and how: paths stay inside their data folder, and only regular files are read.

A dataset (training JSONL, an evaluation annotation file) names its images by path. Taken as written, ``../``, an
absolute path or a symlink would let a dataset downloaded from the web read any image on the machine into training
or into a prediction file. So a record's path is *confined* to its data root by default: it is resolved (symlinks
followed) and refused when the result lies outside the root. ``allow_outside=True`` (``data.allow_outside_paths``
in training, ``--allow-outside-paths`` in ``flamingo-eval``) reads such paths as they are, for a dataset you wrote
yourself that points at images kept elsewhere.

A path that is a FIFO or a device would make a reader wait forever (or read forever), so only regular files are
opened; :func:`open_regular_file` checks the file it has opened, not the name, so a file swapped in between cannot
slip past.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO


# The default pixel limit (width x height) for image files and bytes: a 24-megapixel camera photo passes, a 12000 x
# 12000 PNG (a few kB that would decode to 432 MB) does not. Here, not in flamingo.images, because configs read it
# without importing torch.
MAX_IMAGE_PIXELS = 40_000_000


class OutsideDataRoot(ValueError):
    """A record's path that leads outside its data folder (``..``, an absolute path, or a symlink)."""


def confined_path(value: str | Path, root: str | Path, *, allow_outside: bool = False, what: str = "path") -> Path:
    """``value`` read relative to ``root`` (an absolute ``value`` stays as it is).

    Unless ``allow_outside``, the path with symlinks resolved must lie inside ``root`` (also resolved), or this raises
    :class:`OutsideDataRoot` naming ``what``, the value and the root. Returns the unresolved path (``root / value``),
    so messages and ids keep the names the dataset uses.
    """
    root = Path(root)
    path = Path(value)
    full = path if path.is_absolute() else root / path
    if allow_outside:
        return full
    real_root = root.resolve()
    real = full.resolve()
    if real != real_root and real_root not in real.parents:
        via = " through a symlink" if _lexically_inside(full, root) else ""
        raise OutsideDataRoot(
            f"{what} {str(value)!r} leads outside the data folder {root}{via} (to {real}); paths in a dataset are "
            "confined to its folder. If you trust this dataset, allow outside paths (training: "
            "data.allow_outside_paths: true; flamingo-eval: --allow-outside-paths)."
        )
    return full


def _lexically_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` is inside ``root`` by its name alone (``..`` collapsed, symlinks not followed)."""
    normal, normal_root = Path(os.path.normpath(os.path.abspath(path))), Path(os.path.normpath(os.path.abspath(root)))
    return normal == normal_root or normal_root in normal.parents


def open_regular_file(path: str | Path) -> BinaryIO:
    """``path`` opened for binary reading; ValueError if it is not a regular file (a FIFO, a device, a directory).

    Opened without blocking and then checked with ``fstat``, so a FIFO with no writer neither hangs this call nor
    gets read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except IsADirectoryError as error:
        raise ValueError(f"{path} is a directory, not a file.") from error
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
            raise ValueError(f"{path} is {kind}, not a regular file; only regular files are read.")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
