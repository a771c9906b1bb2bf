"""File reads and writes for saved models.

Writes are atomic: a reader (or a resumed run) sees the old file or the new one, never half of one. Reads turn a
damaged file into a ValueError that names it, instead of a traceback from inside json or safetensors. A write that
fails because the disk is full says so, naming the folder (:func:`naming_a_full_disk`), instead of torch's
``basic_ios::clear``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch and safetensors are imported by the two functions that need them: reading or writing a config must not pay
# for torch (the command lines check configs before it loads).


def _default_file_mode() -> int:
    """The mode ``open()`` gives a new file (0o666 less the umask); mkstemp's private 0o600 would otherwise stay."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_file_mode())
        with open(tmp, "rb") as written:  # on disk before the rename, so a crash cannot leave an empty file
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    # UTF-8 whatever the locale (a C-locale batch job would otherwise fail on the first non-ASCII caption).
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared or non-contiguous storage; our tensors are small, so clone them.
    tensors = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    _atomic_replace(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; a syntax error names the file, line and column (a hand edit or a half-copied file)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}."
        ) from error


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors in ``path``; a truncated or damaged file (an interrupted download or copy) is named as such."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise ValueError(
            f"{path} is truncated or corrupt ({error}); download it again or re-save it with save_pretrained."
        ) from error


_CHECK_SLICE = 1 << 24  # elements per slice in check_finite


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], *, source: str | Path) -> None:
    """Raise a ValueError naming ``source`` and the first tensor that holds a NaN or an infinity.

    Loaded weights are checked here, so that a damaged file (or one saved from a diverged run) is named when it is
    read, instead of the first forward's NaN being blamed on the input. Large tensors are checked in slices, so the
    check needs little memory beyond the weights themselves.
    """
    for name, tensor in named_tensors:
        if not tensor.is_floating_point():
            continue
        flat = tensor.detach().reshape(-1)
        for start in range(0, flat.numel(), _CHECK_SLICE):
            part = flat[start : start + _CHECK_SLICE]
            if not bool(part.isfinite().all()):
                bad = int((~flat.isfinite()).sum())
                raise ValueError(
                    f"{source}: the weight {name} holds {bad:,} NaN or infinite value(s) of {flat.numel():,}; the "
                    "file is damaged, or was saved from a run that diverged. Load an earlier checkpoint."
                )


class RefusedPickle(ValueError):
    """A weights file that torch's ``weights_only`` unpickler refused (it holds code, not only tensors)."""


def refused_pickle(field: str, value: str, error: Exception) -> str:
    """The message for a weights file that torch's ``weights_only`` unpickler refused, naming the field and file."""
    # torch's message is a paragraph of advice, the reason ("unsupported GLOBAL posix.system"), then a link; show
    # the reason. For display only: other wordings fall back to the first paragraph.
    paragraphs = [part.strip() for part in str(error).split("\n\n") if part.strip()] or [type(error).__name__]
    reason = next((part for part in paragraphs[1:] if not part.startswith("Check the documentation")), paragraphs[0])
    reason = reason.split("WeightsUnpickler error:")[-1].strip()
    return (
        f"{field}: {value} holds a pickle that torch refuses to load with weights_only=True, because loading it "
        f"could run code ({reason.rstrip('.')}). Only plain weights are read: convert the file to safetensors, or, if "
        "you trust it, load it yourself and save it again."
    )


# After a write failed, less free space than this on the folder's filesystem means that the disk filled up: a write
# fills the last free blocks before it fails, and nothing frees them in between.
LOW_FREE_SPACE = 16 * 2**20
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def naming_a_full_disk(folder: str | Path, what: str) -> Iterator[None]:
    """Re-raise an error of the writes inside as ``OSError(ENOSPC)`` naming ``folder`` and ``what`` was being written
    when the disk is full; any other error passes unchanged.

    Our own writes fail with errno ENOSPC and safetensors says "os error 28", but torch.save's writer only says
    ``unexpected pos`` or ``basic_ios::clear``: for those, the space left on ``folder``'s filesystem decides.
    """
    try:
        yield
    except Exception as error:
        if not (_says_disk_full(error) or _free_bytes(Path(folder)) < LOW_FREE_SPACE):
            raise
        raise OSError(errno.ENOSPC, f"No space left on device: writing {what} into {folder} failed") from error


def _says_disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, or one it was raised from, is a write refused for want of space."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):  # safetensors' Rust io::Error
            return True
        error = error.__cause__ or error.__context__
    return False


def _free_bytes(folder: Path) -> float:
    """Free bytes on the filesystem of ``folder`` (or of its nearest existing parent); infinite if unknown."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return float("inf")
    return float("inf")
