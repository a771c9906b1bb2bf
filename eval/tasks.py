"""The evaluation tasks: each one :class:`Task` object, all registered here and only here.

A task holds everything that differs between benchmarks -- its files (``layout``, ``alternatives``, the reader
``read``), its prompt and decoding (``spec``, a :class:`flamingo_eval.prompts.TaskSpec`), its kind (``kind``: how
answers are decoded, written to the predictions file and scored; ``flamingo_eval.kinds``) and its fixture writer
(``write_fixture``, ``flamingo_eval.fixtures``). Generic code (runner, CLI, ``load_task_data``, ``score_files``,
``write_fixture_data``) looks a task up here and asks it; no other module lists task names.

Adding a task is one ``register`` call (in this file for a built-in one)::

    register(Task(name="nocaps", kind=Captioning(cocoid=True), spec=caption_spec("nocaps"),
                  layout={"captions": "nocaps_val_4500_captions.json", "image_dir": "images"},
                  read=read_nocaps, write_fixture=write_nocaps))     # its reader and fixture writer

and from then on ``--tasks nocaps`` (with ``--nocaps-captions FILE``), ``load_task_data("nocaps", ...)``, the
runner, ``score_records`` / ``score_files`` and ``write_fixture_data`` all know it (``tests/test_eval_registry.py``).

``custom`` is one name with several tasks, told apart by ``custom_kind`` (``--custom-kind``): "caption", "vqa",
"binding". ``get_task(name, custom_kind=...)`` finds either sort; a named benchmark ignores ``custom_kind``.
Custom caption and VQA files are scored as written: ``score_files`` reads their ``test.jsonl`` as the annotations
(the kind's ``reference_file``), and their decoding budget comes from the data (``spec_for_data``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .binding import Binding, read_binding
from .files import Example, TaskData
from .fixtures import (
    write_binding,
    write_coco,
    write_coco_vqa,
    write_custom,
    write_flickr30k,
    write_hateful_memes,
    write_imagenet,
    write_textvqa,
    write_vizwiz,
)
from .kinds import Captioning, Classification, Kind, Vqa
from .prompts import HATEFUL_TEMPLATE, TaskSpec, binding_spec, caption_spec, classification_spec, vqa_spec
from .readers import (
    read_coco,
    read_coco_vqa,
    read_custom_caption_references,
    read_custom_captions,
    read_custom_vqa,
    read_custom_vqa_references,
    read_flickr30k,
    read_hateful_memes,
    read_imagenet,
    read_textvqa,
    read_vizwiz,
)

__all__ = [
    "Task",
    "TaskSpec",
    "register",
    "get_task",
    "get_task_spec",
    "spec_for_data",
    "task_names",
    "custom_kinds",
    "REGISTRY",
]
CUSTOM_ANSWER_MARGIN = 2  # new tokens past the longest custom reference: <|endofchunk|> and one of slack


@dataclass(frozen=True)
class Task:
    """One evaluation task.

    layout: layout key -> default file or folder name inside the task folder ("." = the folder itself); the keys
        are what ``paths`` / ``--path TASK.KEY=FILE`` override.
    alternatives: layout key -> another release's name, used when the documented one is absent.
    optional_paths: keys that may be given as "" (no such file, e.g. the answers of a test-dev split); the reader
        then gets None for them.
    read: ``layout (key -> Path | None) -> TaskData``.
    write_fixture: ``(folder, rng, images, num_support, num_query) -> None`` (``flamingo_eval.fixtures``).
    custom_kind: the ``--custom-kind`` that selects this task under its shared name, or None for a named benchmark.
    folder: the sub-folder of a ``--data-dir`` root that holds the task's files (default: ``name``).
    """

    name: str
    kind: Kind
    spec: TaskSpec
    layout: Mapping[str, str]
    read: Callable[[dict[str, Path | None]], TaskData]
    write_fixture: Callable[..., None]
    alternatives: Mapping[str, str] = field(default_factory=dict)
    optional_paths: frozenset[str] = frozenset()
    custom_kind: str | None = None
    folder: str | None = None

    def __post_init__(self):
        # One source of truth: the spec's kind and metric strings (recorded in results) must be the kind object's.
        if (self.spec.kind, self.spec.metric) != (self.kind.name, self.kind.metric):
            raise ValueError(
                f"Task {self.name!r}: spec says kind {self.spec.kind!r} / metric {self.spec.metric!r}, but its kind "
                f"object is {self.kind.name!r} / {self.kind.metric!r}"
            )
        unknown = sorted((set(self.alternatives) | set(self.optional_paths)) - set(self.layout))
        if unknown:
            raise ValueError(f"Task {self.name!r}: alternatives / optional_paths name keys {unknown} not in its layout")

    @property
    def data_folder(self) -> str:
        return self.folder or self.name

    @property
    def label(self) -> str:
        """``coco``, or ``custom (binding)``: for messages."""
        return self.name if self.custom_kind is None else f"{self.name} ({self.custom_kind})"


# ---------------------------------------------------------------------------------------------------- registry
REGISTRY: dict[tuple[str, str | None], Task] = {}  # (name, custom_kind) -> task, in registration order


def register(task: Task, *, replace_existing: bool = False) -> Task:
    """Add ``task`` to the registry (the CLI, readers, scorers and fixtures all find it from then on)."""
    key = (task.name, task.custom_kind)
    if key in REGISTRY and not replace_existing:
        raise ValueError(f"Task {task.label!r} is already registered")
    if any(name == task.name and (kind is None) != (task.custom_kind is None) for name, kind in REGISTRY):
        raise ValueError(f"Task name {task.name!r} cannot be both a named benchmark and a custom_kind family")
    REGISTRY[key] = task
    return task


def task_names() -> tuple[str, ...]:
    """Every registered name (``--tasks`` choices), in registration order; ``custom`` once."""
    return tuple(dict.fromkeys(name for name, _ in REGISTRY))


def tasks_named(name: str) -> list[Task]:
    """The tasks registered under ``name``: one for a benchmark, one per custom_kind for ``custom``."""
    return [task for (n, _), task in REGISTRY.items() if n == name]


def custom_kinds(name: str = "custom") -> tuple[str, ...]:
    """The custom_kind values registered under ``name``."""
    return tuple(kind for n, kind in REGISTRY if n == name and kind is not None)


def get_task(task: str | Task, *, custom_kind: str | None = None) -> Task:
    """The registered task called ``task`` (a Task is returned as is). For a name registered per custom_kind
    (``custom``), ``custom_kind`` picks one; a named benchmark ignores it (one config may hold both)."""
    if isinstance(task, Task):
        return task
    if (task, None) in REGISTRY:
        return REGISTRY[(task, None)]
    kinds = custom_kinds(task)
    if not kinds:
        raise ValueError(f"Unknown task {task!r}; expected one of {', '.join(task_names())}")
    if custom_kind not in kinds:
        raise ValueError(f"Task {task!r} needs custom_kind (--custom-kind) in {kinds}; got {custom_kind!r}.")
    return REGISTRY[(task, custom_kind)]


def get_task_spec(task: str | Task, *, custom_kind: str | None = None, class_names=None) -> TaskSpec:
    """The prompt/decoding spec of a task; ``class_names`` (from the task's data) fills in a classification task
    whose classes come with the dataset (ImageNet-style folders)."""
    spec = get_task(task, custom_kind=custom_kind).spec
    if spec.kind == "classification" and class_names is not None and spec.class_names is None:
        spec = replace(spec, class_names=tuple(class_names))
    return spec


def spec_for_data(task: str | Task, data: TaskData, tokenizer, *, custom_kind: str | None = None) -> TaskSpec:
    """The spec for one loaded dataset: ``get_task_spec`` with the data's class names, and -- where the spec sets
    ``answer_margin_tokens`` (custom caption / VQA) -- ``max_new_tokens`` = the longest reference answer of the
    evaluated split (else of the demo pool) in ``tokenizer`` tokens, plus the margin. Without any reference answers
    the spec's own ``max_new_tokens`` stays."""
    spec = get_task_spec(task, custom_kind=custom_kind, class_names=data.class_names)
    if spec.answer_margin_tokens is None:
        return spec
    longest = longest_answer_tokens(data.query, tokenizer) or longest_answer_tokens(data.support, tokenizer)
    if not longest:
        return spec
    return replace(spec, max_new_tokens=longest + spec.answer_margin_tokens)


def longest_answer_tokens(examples: list[Example], tokenizer) -> int:
    """The token count of the longest (stripped) reference answer of ``examples``, as the demos show it; 0 if none."""
    answers = list(dict.fromkeys(a.strip() for e in examples for a in e.answers))
    if not answers:
        return 0
    return max(len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------------- built-ins
def _coco_vqa_layout(prefix: str) -> dict[str, str]:
    return {
        "train_questions": f"{prefix}OpenEnded_mscoco_train2014_questions.json",
        "train_annotations": f"{prefix}mscoco_train2014_annotations.json",
        "train_image_dir": "train2014",
        "test_questions": f"{prefix}OpenEnded_mscoco_val2014_questions.json",
        "test_annotations": f"{prefix}mscoco_val2014_annotations.json",
        "test_image_dir": "val2014",
    }


_CUSTOM_LAYOUT = {"train_jsonl": "train.jsonl", "test_jsonl": "test.jsonl"}

# Registration order is the --tasks order and the fixture seed order (each folder's data depends on its position).
for _task in (
    Task(
        name="coco",
        kind=Captioning(cocoid=True),
        spec=caption_spec("coco"),
        layout={"karpathy_json": "dataset_coco.json", "image_dir": "."},
        read=read_coco,
        write_fixture=write_coco,
    ),
    Task(
        name="flickr30k",
        kind=Captioning(cocoid=False),
        spec=caption_spec("flickr30k"),
        layout={"karpathy_json": "dataset_flickr30k.json", "image_dir": "flickr30k_images"},
        alternatives={"image_dir": "flickr30k-images"},  # the official archive's folder name
        read=read_flickr30k,
        write_fixture=write_flickr30k,
    ),
    Task(
        name="vqav2",
        kind=Vqa(),
        spec=vqa_spec("vqav2"),
        layout=_coco_vqa_layout("v2_"),
        optional_paths=frozenset({"test_annotations"}),
        read=read_coco_vqa("vqav2"),
        write_fixture=write_coco_vqa("v2_OpenEnded_mscoco_{}_questions.json", "v2_mscoco_{}_annotations.json"),
    ),
    Task(
        name="okvqa",
        kind=Vqa(),
        spec=vqa_spec("okvqa", stem=True),
        layout=_coco_vqa_layout(""),
        optional_paths=frozenset({"test_annotations"}),
        read=read_coco_vqa("okvqa"),
        write_fixture=write_coco_vqa("OpenEnded_mscoco_{}_questions.json", "mscoco_{}_annotations.json"),
    ),
    Task(
        name="textvqa",
        kind=Vqa(),
        spec=vqa_spec("textvqa", max_new_tokens=10),
        layout={"train_json": "TextVQA_0.5.1_train.json", "test_json": "TextVQA_0.5.1_val.json", "image_dir": "train_images"},
        read=read_textvqa,
        write_fixture=write_textvqa,
    ),
    Task(
        name="vizwiz",
        kind=Vqa(image_key=True),  # the VizWiz server reads "image"
        spec=vqa_spec("vizwiz"),
        layout={"train_json": "train.json", "test_json": "val.json", "train_image_dir": "train", "test_image_dir": "val"},
        alternatives={"train_json": "Annotations/train.json", "test_json": "Annotations/val.json"},  # Annotations.zip
        read=read_vizwiz,
        write_fixture=write_vizwiz,
    ),
    Task(
        name="hateful_memes",
        kind=Classification(positive="yes"),
        spec=classification_spec("hateful_memes", template=HATEFUL_TEMPLATE, metric="roc_auc", class_names=("no", "yes")),
        layout={"train_jsonl": "train.jsonl", "test_jsonl": "test_seen.jsonl", "image_dir": "."},
        alternatives={"test_jsonl": "dev_seen.jsonl"},
        read=read_hateful_memes,
        write_fixture=write_hateful_memes,
    ),
    Task(
        name="imagenet",
        kind=Classification(),
        spec=classification_spec("imagenet"),
        layout={"train_dir": "train", "test_dir": "val", "class_names": "class_names.json"},
        read=read_imagenet,
        write_fixture=write_imagenet,
    ),
    Task(
        name="custom",
        custom_kind="caption",
        kind=Captioning(reference_file=read_custom_caption_references),
        spec=caption_spec("custom", answer_margin_tokens=CUSTOM_ANSWER_MARGIN),
        layout=_CUSTOM_LAYOUT,
        read=read_custom_captions,
        write_fixture=write_custom,
    ),
    Task(
        name="custom",
        custom_kind="vqa",
        kind=Vqa(reference_file=read_custom_vqa_references),
        spec=vqa_spec("custom", answer_margin_tokens=CUSTOM_ANSWER_MARGIN),
        layout=_CUSTOM_LAYOUT,
        read=read_custom_vqa,
        write_fixture=write_custom,  # the same folder: its records carry both the caption and the VQA fields
    ),
    Task(
        name="custom",
        custom_kind="binding",
        kind=Binding(),
        spec=binding_spec("custom"),
        layout=_CUSTOM_LAYOUT,
        optional_paths=frozenset({"train_jsonl"}),  # episodes bring their own demos; train.jsonl is only checked
        read=read_binding,
        write_fixture=write_binding,
        folder="binding",
    ),
):
    register(_task)
del _task
