"""EvalConfig: everything one few-shot evaluation run needs, and the one source of its defaults.

``flamingo-eval run`` fills it from its flags (whose defaults are read from these fields), the runner
(``flamingo_eval.runner.Evaluator``) runs it, and training's in-loop evaluation extends it
(``flamingo_train.config.InLoopEvalConfig``). Light on purpose: it imports no torch, so the command line checks its
flags before any model stack loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flamingo.configuration import DTYPE_NAMES
from flamingo.micro.shipped import resolve_model_path
from flamingo.typed_config import FieldError


@dataclass
class EvalConfig:
    """Which model, which tasks, and how they are prompted, decoded and batched.

    Example::

        config = EvalConfig(model=Path("my-flamingo"), tasks=["coco"], shots=[0, 4], data_dir=Path("data"))
    """

    model: Path | None  # a directory written by save_pretrained, or "micro"; None: a model passed to the Evaluator
    tasks: list[str]
    shots: list[int] = field(default_factory=lambda: [0, 4, 8, 16, 32])
    seeds: list[int] = field(default_factory=lambda: [42])  # one trial per seed: the query subset and the demos
    data_dir: Path | None = None
    paths: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> {layout key: file} overrides
    custom_kind: str | None = None
    rices: bool = False
    rices_vision_model: str | None = None  # None: the model's own vision tower
    rices_vision_pretrained: str | None = None
    rices_cache_dir: Path | None = None  # None: <output>.rices/
    query_set_size: int = 2048
    num_samples: int | None = None  # None: every query
    batch_size: int = 8
    class_batch_size: int = 8
    output: Path = Path("results.json")
    predictions_dir: Path | None = None
    num_beams: int | None = None  # None: the task's default (3)
    max_new_tokens: int | None = None  # None: the task's default
    demo_separator: str | None = None  # None: the task's default ("\n" captioning/VQA/binding, "" classification)
    zero_shot_text_demos: int | None = None  # None: the task's (2 text-only demos at 0 shots, as OpenFlamingo)
    dtype: str = "float32"
    media_cache: bool = True  # encode each distinct image once per run (False re-encodes every batch)
    # Run the language model's own Python code from the model folder (only if its config says it needs it).
    trust_remote_code: bool = False
    # Read image paths in the data files that lead outside their data folder (flamingo.file_access).
    allow_outside_paths: bool = False

    def __post_init__(self):
        if self.model is not None:  # "micro": the shipped model (a reserved name; "./micro" is a local folder)
            self.model = resolve_model_path(self.model)
        if not self.tasks:
            from .tasks import task_names  # here: the registry imports this module's neighbours

            raise FieldError("tasks", f"name at least one task of {list(task_names())}.", owner="EvalConfig")
        if any(k < 0 for k in self.shots):
            raise FieldError("shots", f"must be >= 0, got {self.shots}.", owner="EvalConfig")
        for name in ("batch_size", "class_batch_size", "num_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FieldError(name, f"must be >= 1, got {value}.", owner="EvalConfig")
        if self.dtype not in DTYPE_NAMES:
            raise FieldError("dtype", f"must be one of {list(DTYPE_NAMES)}, got {self.dtype!r}.", owner="EvalConfig")
