"""The micro model shipped inside the package, and the one rule that turns the name ``"micro"`` into its folder.

``Flamingo.from_pretrained("micro")`` and ``FlamingoProcessor.from_pretrained("micro")`` load it with no network::

    model = flamingo.Flamingo.from_pretrained("micro").eval()       # 64 x 64 images; its size: docs/micro.md
    processor = flamingo.FlamingoProcessor.from_pretrained("micro")

The folder (``MICRO_MODEL_DIR``) is what ``save_pretrained(dir, save_backbones=True)`` plus the processor write:
``config.json``, ``model.safetensors``, ``vision_model.safetensors``, ``language_model/``, the tokenizer files and
``preprocessor_config.json``. It is made by the micro recipe (``flamingo_train.recipes.micro``), trained on the
synthetic world of :mod:`flamingo.micro.world`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

MICRO_MODEL_NAME = "micro"
MICRO_MODEL_DIR = Path(__file__).resolve().parent / "model"
# What loading reads; checked up front so that a missing file is named, not met as a KeyError deep in a loader.
MICRO_MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "vision_model.safetensors",
    "language_model/config.json",
    "language_model/model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
)
REBUILD = (
    "python -m flamingo_train.recipes.micro --output DIR, then copy DIR/flamingo/final/. into {directory}"
)


def resolve_model_path(name_or_path: str | Path) -> Path:
    """The folder a model name or path means.

    ``"micro"`` is a reserved name: it always means the shipped model (``MICRO_MODEL_DIR``), never a folder of that
    name in the working directory, so that a planted folder cannot stand in for it (and run its code). Such a folder
    is still loaded when named as a path, ``"./micro"``; while it exists, loading ``"micro"`` warns which one it took.
    Any other name is returned as a path unchanged (the loaders then say what is missing there).

    Raises FileNotFoundError naming the missing files, and how to rebuild them, if the shipped model is incomplete.
    """
    if str(name_or_path) != MICRO_MODEL_NAME:
        return Path(name_or_path)
    if Path(MICRO_MODEL_NAME).is_dir():
        warnings.warn(
            f"A folder named {MICRO_MODEL_NAME!r} exists in the working directory ({Path.cwd()}); "
            f"{MICRO_MODEL_NAME!r} means the shipped micro model, so that folder is not loaded. "
            f"To load it, name it as a path: './{MICRO_MODEL_NAME}'.",
            UserWarning,
            stacklevel=3,
        )
    directory = MICRO_MODEL_DIR  # read at call time, so tests can point it elsewhere
    missing = [name for name in MICRO_MODEL_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The shipped micro model is incomplete: {directory} lacks {', '.join(missing)}. Reinstall the package, "
            f"or rebuild the model: {REBUILD.format(directory=directory)}."
        )
    return directory


def is_shipped_model(directory: Path) -> bool:
    """Whether ``directory`` is the shipped micro model's folder."""
    return Path(directory).resolve() == MICRO_MODEL_DIR.resolve()
