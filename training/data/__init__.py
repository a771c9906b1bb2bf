"""Training data: record formats, tokenisation with image-aware truncation, loaders and mixtures.

* :mod:`.config` ``DataConfig``: one dataset of the mixture.
* :mod:`.formats`: simple / OBELICS / pairs / WebDataset records -> ``Document``.
* :mod:`.samples`: the text layout, truncation and label rules.
* :mod:`.sources`: reading files through ``datasets`` (and tar shards).
* :mod:`.loader` ``build_dataloader`` / ``PositionTracker``: endless, sharded, resumable batches.
* :mod:`.synthetic` ``write_synthetic_dataset``: a small learnable dataset in every format.

Task data (an evaluation task's examples laid out as its few-shot prompts, with their answers) is written in the
simple format by :mod:`flamingo_train.task_data`.
"""

from .config import DataConfig
from .loader import PositionTracker, build_dataloader
from .synthetic import write_synthetic_dataset

__all__ = ["DataConfig", "PositionTracker", "build_dataloader", "write_synthetic_dataset"]
