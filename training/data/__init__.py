"""Training data: record formats, tokenisation with image-aware truncation, loaders and mixtures.

* :mod:`.config` ``DataConfig``: one dataset of the mixture.
* :mod:`.paths`: the files a DataConfig names, found and checked without reading them (no torch, no datasets).
* :mod:`.formats`: simple / OBELICS / pairs / WebDataset records -> ``Document``.
* :mod:`.samples`: the text layout, truncation and label rules.
* :mod:`.sources`: reading files through ``datasets`` (and tar shards).
* :mod:`.loader` ``build_dataloader`` / ``PositionTracker``: endless, sharded, resumable batches.
* :mod:`.synthetic` ``write_synthetic_dataset``: a small learnable dataset in every format.

Task data (an evaluation task's examples laid out as its few-shot prompts, with their answers) is written in the
simple format by :mod:`flamingo_train.task_data`.

The loader's names are imported on first use (PEP 562): the config and the path checks, which ``flamingo-train``
runs before anything else, must not pull in torch and ``datasets``.
"""

import importlib as _importlib
from typing import TYPE_CHECKING

from .config import DataConfig

_LAZY = {"PositionTracker": "loader", "build_dataloader": "loader", "write_synthetic_dataset": "synthetic"}

__all__ = ["DataConfig", "PositionTracker", "build_dataloader", "write_synthetic_dataset"]

if TYPE_CHECKING:
    from .loader import PositionTracker, build_dataloader
    from .synthetic import write_synthetic_dataset


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | {name for name in globals() if not name.startswith("_") and name != "TYPE_CHECKING"}
                  | {name for name in globals() if name.startswith("__")})
