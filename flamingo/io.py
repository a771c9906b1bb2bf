"""File reads and writes for saved models.

Writes are atomic: a reader (or a resumed run) sees the old file or the new one, never half of one. Reads turn a
damaged file into a ValueError that names it, instead of a traceback from inside json or safetensors.
"""

from __future__ import annotations

import json
import os
import tempfile
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
