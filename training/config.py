"""The training config: a YAML file of sections (model, data, optim, schedule, run, and the optional eval) plus
``key.sub=value`` overrides.

Example::

    config = load_config("training/configs/tiny_cpu.yaml", overrides=["run.max_steps=20", "data.0.batch_size=4"])

Each section is a dataclass, built by ``flamingo.typed_config``: a typo in a YAML key is a ValueError naming the file
and the field, with the closest known one (``tiny_cpu.yaml: run.log_evry: unknown field; did you mean log_every?
...``), not a silently ignored setting. Every number must be finite and in its field's range (:data:`NUMBER_RANGES`:
``tiny_cpu.yaml: run.max_grad_norm: must be a finite number > 0 (null: no clipping), got -1.0.``), values are checked
across fields too, and with
``check_paths=True`` the data paths (every file or glob exists, of a kind its format reads), so a bad config fails
before any model loads. A ``data`` entry is addressed in overrides by its index or its ``name``
(``data.coco.loss_weight=2``).

Light on purpose (no torch, no datasets): ``flamingo-train`` loads and checks the whole config before it imports the
training loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flamingo.configuration import DTYPE_NAMES, CrossAttentionConfig, PerceiverConfig
from flamingo.typed_config import apply_override, build, field_default, to_plain
from flamingo_eval.config import EvalConfig
from flamingo_train.data.config import DataConfig
from flamingo_train.data.paths import check_paths as check_dataset_paths

__all__ = [
    "NUMBER_RANGES", "InLoopEvalConfig", "ModelConfig", "OptimConfig", "Range", "RunConfig", "ScheduleConfig",
    "TrainConfig", "apply_override", "check_data_paths", "check_numbers", "config_from_dict", "eval_metric_key",
    "eval_metric_keys", "load_config", "validate", "validate_eval",
]


@dataclass
class ModelConfig:
    """Either ``pretrained`` (a directory written by ``save_pretrained``) or the fields of a fresh build, which go to
    ``flamingo.create_model_and_processor`` (``perceiver``/``cross_attention`` are PerceiverConfig/CrossAttentionConfig
    fields)."""

    pretrained: str | None = None
    vision_model: str | None = None
    vision_pretrained: str | None = None
    lang_model: str | None = None
    tokenizer: str | None = None
    vision_feature_stage: int | None = None  # ResNet towers: the stage whose feature map gives the tokens
    cross_attn_every_n_layers: int = 1
    perceiver: dict = field(default_factory=dict)
    cross_attention: dict = field(default_factory=dict)
    trust_remote_code: bool = False
    # The frozen language model's weights: "bfloat16" halves their memory (an 8B LM: 16 GB instead of 32 GB). The
    # trainable Flamingo modules and the vision tower stay float32, so the optimiser still works in full precision.
    lang_model_dtype: str = "float32"


@dataclass
class OptimConfig:
    """AdamW over the trainable modules. A parameter gets no weight decay if it has fewer than 2 dimensions (biases,
    norm scales, tanh gates: decaying a gate would pull it shut) or its name contains one of ``no_decay``."""

    lr: float = 1e-4
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Learned tables, not projections: decaying them only shrinks the latents / token rows toward zero.
    no_decay: list[str] = field(default_factory=lambda: ["latents", "frame_embeddings", "added_tokens"])
    # The weight of each auxiliary loss the model reports (FlamingoOutput.aux_losses, e.g. a mixture-of-experts
    # balance loss) in the training objective. A reported loss without a weight here is an error; 0 logs it only.
    aux_loss_weights: dict[str, float] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    """Learning-rate multiplier per OPTIMISER step: linear warmup (``1/warmup_steps`` on the first step, up to 1),
    then ``kind`` down to ``min_lr_ratio``."""

    kind: str = "cosine"  # cosine | linear | constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0


@dataclass
class RunConfig:
    """Where the run writes, how long it runs, and how often it logs and saves."""

    output_dir: str = "runs/flamingo"
    max_steps: int = 1000  # optimiser steps
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0  # None: no clipping
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    gradient_checkpointing: bool = False
    save_every: int = 500  # optimiser steps; 0 disables intermediate checkpoints
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    strict: bool = False  # a bad record raises instead of being skipped and counted
    report_to: str | None = "all"  # accelerate trackers: "all" (those installed), "tensorboard", "wandb", None
    resume: str | None = None  # "auto" (latest complete checkpoint in output_dir, if any) | a checkpoint dir | None
    # This many steps in a row skipped (a non-finite loss or gradient) end the run with an error: it has diverged.
    max_consecutive_skipped_steps: int = 20
    # Export output_dir/final with copies of the backbones (self-contained) instead of references to them.
    export_backbones: bool = False


@dataclass
class InLoopEvalConfig(EvalConfig):
    """Few-shot evaluation of the model being trained: a ``flamingo-eval run`` (:class:`flamingo_eval.config.EvalConfig`,
    every field of which it takes, with the same meaning) before the first step, every ``every`` optimiser steps and
    after the last one (``every: 0``: only after the last). See in_loop_eval.py.

    Example (YAML)::

        eval:
          every: 200
          tasks: [custom]
          custom_kind: vqa          # what a ``custom`` task holds: caption | vqa | binding
          data_dir: data/my-vqa     # flamingo-eval's --data-dir layout
          shots: [0]
          seeds: [42]               # draw the query subset and the demos, the same at every evaluation
          num_samples: 64           # a seeded random subset of the queries; null: all of them
          batch_size: 8
          keep_best: true           # export output_dir/best/ at the best score of ``best_metric``

    Each score is logged as ``eval/<task>/<shots>shot`` (``custom`` is ``custom_<kind>``), e.g.
    ``eval/custom_vqa/0shot``, in the task's metric (VQA accuracy, CIDEr, ROC AUC; higher is better), averaged over
    ``seeds``. ``num_beams``, ``max_new_tokens``, ``demo_separator`` left at None take the task's own setting (as
    ``flamingo-eval run``), so the scores match an evaluation of the export.
    """

    # Set by the trainer, so not in YAML (validate_eval): the model in memory, and output_dir/eval/step-N.json.
    model: Path | None = None
    output: Path | None = None
    # Defaults that differ from flamingo-eval's: a quick check, not a benchmark run.
    tasks: list[str] = field(default_factory=list)
    shots: list[int] = field(default_factory=lambda: [0])
    num_samples: int | None = 64
    every: int = 0
    keep_best: bool = False
    best_metric: str | None = None  # a metric key; None: the first task's first shot count

    def run_config(self, *, output: Path) -> EvalConfig:
        """The ``flamingo-eval run`` of one evaluation: every EvalConfig field as configured, the model in memory."""
        shared = {name: getattr(self, name) for name in EvalConfig.__dataclass_fields__}
        return EvalConfig(**{**shared, "model": None, "output": Path(output)})


@dataclass
class TrainConfig:
    """The whole training config: one field per section of the YAML file (``data`` is a list of datasets)."""

    model: ModelConfig
    data: list[DataConfig]
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: InLoopEvalConfig | None = None  # no section: no evaluation during training

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as strings), ready for JSON or YAML."""
        return to_plain(self)


@dataclass(frozen=True)
class Range:
    """The numbers a field accepts: finite ones from ``low`` to ``high``; ``open_low``/``open_high`` leave that end out.
    ``null`` says what None means, where the field's type allows it."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False
    null: str = ""

    def admits(self, value: float) -> bool:
        return (
            (isinstance(value, int) or math.isfinite(value))  # an int is finite, and may be too big for a float
            and (value > self.low if self.open_low else value >= self.low)
            and (value < self.high if self.open_high else value <= self.high)
        )

    def __str__(self) -> str:
        low, high = (int(x) if float(x).is_integer() else x for x in (self.low, self.high))
        if self.high == math.inf:
            text = f"a finite number {'>' if self.open_low else '>='} {low}"
        else:
            text = f"in {'(' if self.open_low else '['}{low}, {high}{')' if self.open_high else ']'}"
        return f"{text} (null: {self.null})" if self.null else text


POSITIVE, AT_LEAST_0, AT_LEAST_1 = Range(0, open_low=True), Range(0), Range(1)
SEED = Range(0, 2**32 - 1)  # numpy's seed range (accelerate's set_seed seeds numpy too)

# Every number of the training config, by its dotted path: a list's items and a mapping's values each (betas[1],
# aux_loss_weights.<name>). NaN and infinities are refused everywhere: a NaN max_grad_norm or lr would fill the
# weights with NaN, and a negative max_grad_norm flips the gradient. tests/test_hostile_training.py checks that every
# numeric field of the sections is here. (DataConfig checks its own numbers.)
NUMBER_RANGES: dict[str, Range] = {
    "model.vision_feature_stage": Range(1, 4, null="the last"),
    "model.cross_attn_every_n_layers": AT_LEAST_1,
    "optim.lr": POSITIVE,
    "optim.weight_decay": AT_LEAST_0,
    "optim.betas": Range(0, 1, open_high=True),
    "optim.eps": POSITIVE,
    "optim.aux_loss_weights": AT_LEAST_0,  # 0: logged, not trained on
    "schedule.warmup_steps": AT_LEAST_0,
    "schedule.min_lr_ratio": Range(0, 1),
    "run.max_steps": AT_LEAST_1,
    "run.grad_accum_steps": AT_LEAST_1,
    "run.max_grad_norm": Range(0, open_low=True, null="no clipping"),
    "run.save_every": AT_LEAST_0,  # 0: no checkpoints
    "run.keep_last": AT_LEAST_1,
    "run.log_every": AT_LEAST_1,
    "run.seed": SEED,
    "run.max_consecutive_skipped_steps": AT_LEAST_1,
    "eval.every": AT_LEAST_0,  # 0: only after the last step
    "eval.shots": AT_LEAST_0,
    "eval.seeds": SEED,
    "eval.query_set_size": AT_LEAST_1,
    "eval.num_samples": Range(1, null="every query"),
    "eval.batch_size": AT_LEAST_1,
    "eval.class_batch_size": AT_LEAST_1,
    # flamingo-eval reads 0 as "the task's own setting"; in a config file that is null, so 0 is a typo here.
    "eval.num_beams": Range(1, null="the task's own"),
    "eval.max_new_tokens": Range(1, null="the task's own"),
    "eval.zero_shot_text_demos": Range(0, null="the task's own"),
}


def check_numbers(config: TrainConfig, *, where: str = "config") -> None:
    """Every number of ``config`` is finite and in its field's range (:data:`NUMBER_RANGES`); else a ValueError naming
    ``where``, the field and the range. The types are already checked (a bool or a string is no number there)."""
    for path, allowed in NUMBER_RANGES.items():
        section, name = path.split(".")
        owner = getattr(config, section)
        if owner is None:  # no eval section
            continue
        value = getattr(owner, name)
        if isinstance(value, list):
            items = {f"{path}[{i}]": item for i, item in enumerate(value)}
        elif isinstance(value, dict):
            items = {f"{path}.{key}": item for key, item in value.items()}
        else:
            items = {path: value}
        for field_path, item in items.items():
            if item is not None and not allowed.admits(item):
                raise ValueError(f"{where}: {field_path}: must be {allowed}, got {item!r}.")


def load_config(path: str | Path, *, overrides: list[str] = (), check_paths: bool = False) -> TrainConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides (values parsed as YAML), build and validate it; with
    ``check_paths`` also check that its data files exist (:func:`check_data_paths`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Config file {path} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a mapping of sections (model, data, optim, schedule, run, eval).")
    for override in overrides:
        apply_override(raw, override, where=str(path))
    config = config_from_dict(raw, where=str(path))
    if check_paths:
        check_data_paths(config, where=str(path))
    return config


def config_from_dict(raw: dict, *, where: str = "config") -> TrainConfig:
    """Build and validate a config from its parsed YAML (sections as mappings); ``where`` names it in errors."""
    config = build(TrainConfig, raw, where=where)
    validate(config, where=where)
    return config


def validate(config: TrainConfig, *, where: str = "config") -> None:
    """Cross-field checks the types cannot express. Each error names ``where`` and the field."""
    model, run, schedule, optim = config.model, config.run, config.schedule, config.optim
    if model.pretrained is None and (model.vision_model is None or model.lang_model is None):
        raise ValueError(f"{where}: model: needs either 'pretrained' or both 'vision_model' and 'lang_model'.")
    if model.pretrained is not None and (model.vision_model or model.lang_model):
        raise ValueError(f"{where}: model.pretrained: excludes vision_model/lang_model (it names its own backbones).")
    # Kept as mappings (train() passes them to flamingo.create_model_and_processor); checked as the sections they are.
    build(PerceiverConfig, model.perceiver, where=where, path="model.perceiver")
    build(CrossAttentionConfig, model.cross_attention, where=where, path="model.cross_attention")
    if model.lang_model_dtype not in DTYPE_NAMES:
        raise ValueError(f"{where}: model.lang_model_dtype: must be one of {list(DTYPE_NAMES)}, got "
                         f"{model.lang_model_dtype!r}.")
    if schedule.kind not in ("cosine", "linear", "constant"):
        raise ValueError(f"{where}: schedule.kind: must be cosine, linear or constant, got {schedule.kind!r}.")
    if len(optim.betas) != 2:
        raise ValueError(f"{where}: optim.betas: must be two numbers in [0, 1), got {optim.betas}.")
    # Checked here rather than by torch's AdamW, which would only complain after the model has loaded, and would
    # accept a NaN anyway.
    check_numbers(config, where=where)
    if run.mixed_precision not in ("no", "fp16", "bf16"):
        raise ValueError(f"{where}: run.mixed_precision: must be no, fp16 or bf16, got {run.mixed_precision!r}.")
    if not config.data:  # each entry's own values are checked by DataConfig
        raise ValueError(f"{where}: data: must list at least one dataset.")
    names = [d.name for d in config.data]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: data: entries need distinct names, got {names}.")
    if config.eval is not None:
        validate_eval(config.eval, where=where)


def check_data_paths(config: TrainConfig, *, where: str = "config") -> None:
    """Every data entry's files and globs exist and are of a kind its format reads; reads no record. Kept apart from
    :func:`validate` so that a config (a shipped one) loads on a machine without its data; ``flamingo-train`` and
    ``train()`` call both before any model loads, so a typo never costs a backbone download first."""
    for i, d in enumerate(config.data):
        try:
            check_dataset_paths(d)
        except ValueError as error:
            raise ValueError(f"{where}: data[{i}].path: {error}") from None


def validate_eval(config: InLoopEvalConfig, *, where: str = "config") -> None:
    """The eval section, checked at load time, so that a typo fails before a model loads, not at the first eval.
    (EvalConfig checks what flamingo-eval checks too: tasks given, shots >= 0, batch sizes >= 1, the dtype name.)"""
    from flamingo_eval.tasks import custom_kinds, task_names  # the task registry only; loads no model

    for name, why in (("model", "the model being trained"), ("output", "<run.output_dir>/eval/step-N.json")):
        if getattr(config, name) is not None:
            raise ValueError(f"{where}: eval.{name}: set by the trainer ({why}); remove it.")
    if config.dtype != field_default(EvalConfig, "dtype"):
        raise ValueError(f"{where}: eval.dtype: the model is evaluated in memory, in the dtypes it trains in "
                         f"(model.lang_model_dtype); remove it.")
    for task in config.tasks:
        if task not in task_names():
            raise ValueError(f"{where}: eval.tasks: unknown task {task!r}; expected some of {list(task_names())}.")
        kinds = custom_kinds(task)
        if kinds and config.custom_kind not in kinds:
            raise ValueError(f"{where}: eval.custom_kind: must be one of {list(kinds)} for task {task!r}, got "
                             f"{config.custom_kind!r}.")
    if len(set(config.tasks)) != len(config.tasks):
        raise ValueError(f"{where}: eval.tasks: lists a task twice: {config.tasks}.")
    # The ranges of every number (every, shots, seeds, num_beams, ...) are checked with the other sections'.
    if not config.shots or len(set(config.shots)) != len(config.shots):
        raise ValueError(f"{where}: eval.shots: must be distinct numbers >= 0, got {config.shots}.")
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"{where}: eval.seeds: must be distinct numbers, got {config.seeds}.")
    if config.data_dir is None:
        raise ValueError(f"{where}: eval.data_dir: required (a folder in flamingo-eval's --data-dir layout).")
    if not Path(config.data_dir).is_dir():
        raise ValueError(f"{where}: eval.data_dir: {config.data_dir}: directory not found.")
    keys = eval_metric_keys(config)
    if config.best_metric is not None and config.best_metric not in keys:
        raise ValueError(f"{where}: eval.best_metric: must be one of {keys}, got {config.best_metric!r}.")


def eval_metric_key(task: str, shots: int, *, custom_kind: str | None = None) -> str:
    """The name of one in-loop score in metrics.jsonl and the trackers: ``eval/<task>/<shots>shot``, where a task
    registered per custom_kind is ``<task>_<kind>`` (``eval/custom_vqa/0shot``)."""
    from flamingo_eval.tasks import custom_kinds

    label = f"{task}_{custom_kind}" if custom_kinds(task) else task
    return f"eval/{label}/{shots}shot"


def eval_metric_keys(config: InLoopEvalConfig) -> list[str]:
    """Every score one evaluation logs, in order (tasks, then shots); the first is the default ``best_metric``."""
    return [eval_metric_key(t, k, custom_kind=config.custom_kind) for t in config.tasks for k in config.shots]
