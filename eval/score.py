"""Score prediction files in the official results formats against the official annotation files.

    flamingo-eval score --task coco --predictions results.json --annotations dataset_coco.json
    flamingo-eval score --task custom --custom-kind vqa --predictions preds/custom-4shot-seed42.json \
        --annotations my-data/test.jsonl            # the custom file the run read is the annotation file

Prediction files (what ``write_predictions`` writes, and what the benchmarks' servers take):

    coco, flickr30k   [{"image_id": 391895, "caption": "a man riding a bike"}, ...]
    vqav2, okvqa,     [{"question_id": 262148000, "answer": "yes"}, ...]
    textvqa           (VizWiz records also carry "image", the official key there; either key is read)
    vizwiz
    hateful_memes     [{"id": 42953, "score": 0.73}, ...]   (score = P("yes"); "proba" is read too)
    custom caption    as coco; custom vqa as vqav2 (the runner writes these)
    imagenet, custom  classification [{"id": ..., "prediction": ..., "label": ...}] -- scored in the runner
    custom binding    [{"id": "ep0", "prediction": "dax", "answer": "dax"}]           -- scored in the runner

Each format, and its metric, belongs to the task's kind (``flamingo_eval.kinds``); the functions here look the task
up in the registry (``flamingo_eval.tasks``) and ask it. ``score_files`` takes the tasks whose kind reads an
official annotation file (``scored_tasks()``).

Annotation files: captions -- a COCO-format captions file ({"annotations": [{"image_id", "caption"}]}) or a Karpathy
split file (then its "test" images are the references); VQA -- the VQA v2 / OK-VQA annotations file
({"annotations": [{"question_id", "answers": [{"answer"}]}]}, with the questions file optional: if given, exactly its
questions are scored), the native TextVQA file ({"data": [...]}) or the native VizWiz file ([{"image", "answers"}]);
HatefulMemes -- the jsonl file ({"id", "label"} per line); custom caption / VQA -- the task's own ``test.jsonl``, as
``flamingo-eval run --tasks custom`` reads it (``flamingo_eval.data``: ids, captions, answers from its records).

VQA scores name the accuracy rule beside the accuracy: ``{"accuracy": x, "vqa_rule": "official-10" |
"exact-match-any" | "mixed", "vqa_rule_counts": {...}}`` -- the official formula with ten answers per question,
exact match against any answer with fewer (custom data; ``flamingo_eval.metrics.vqa``).

Every annotated item needs exactly one prediction, and every prediction must name an annotated item; ids match by
value, so 42 and "42" are the same id. Scores are percentages, as the papers report them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flamingo.io import atomic_write_text

from .files import Example
from .official import caption_references, vqa_answers  # noqa: F401  (re-exported)
from .tasks import REGISTRY, Task, custom_kinds, get_task, task_names


def scored_tasks() -> tuple[str, ...]:
    """The task names ``score_files`` accepts: those with a kind that reads an annotation file (``custom`` once)."""
    return tuple(dict.fromkeys(t.name for t in REGISTRY.values() if t.kind.scores_files))


def scored_custom_kinds() -> tuple[str, ...]:
    """The ``custom_kind`` values whose tasks ``score_files`` accepts (caption, vqa; not binding)."""
    return tuple(dict.fromkeys(t.custom_kind for t in REGISTRY.values() if t.custom_kind and t.kind.scores_files))


# ------------------------------------------------------------------------------------------------ predictions
def prediction_record(task: str | Task, example: Example, output: Any, *, custom_kind: str | None = None) -> dict:
    """One prediction in ``task``'s official results format. ``output``: the caption or answer (str), P("yes") for
    hateful_memes (float), the predicted class for classification (index or name), or the chosen word (binding)."""
    return get_task(task, custom_kind=custom_kind).kind.prediction_record(example, output)


def write_predictions(task: str | Task, records: Sequence[dict], path: Path) -> Path:
    """Write ``records`` (from ``prediction_record``) as one JSON list, atomically."""
    records = list(records)
    if not all(isinstance(r, dict) for r in records):
        name = task.label if isinstance(task, Task) else task
        raise ValueError(f"write_predictions({name!r}): records must be dicts from prediction_record")
    path = Path(path)
    # ASCII escapes: the same JSON to every reader, and no UnicodeEncodeError where the locale is C (batch jobs).
    atomic_write_text(path, json.dumps(records))
    return path


# ------------------------------------------------------------------------------------------------ scoring
def score_files(
    task: str | Task,
    predictions: Path,
    annotations: Path,
    questions: Path | None = None,
    *,
    subset: bool = False,
    custom_kind: str | None = None,
) -> dict:
    """Score a results file: {"cider": x} (captioning), {"accuracy": x, "vqa_rule": ..., "vqa_rule_counts": ...}
    (VQA) or {"roc_auc": x} (HatefulMemes).

    ``custom_kind`` picks the custom task (caption | vqa), whose ``annotations`` is its ``test.jsonl``.
    Every annotated item needs a prediction, unless ``subset``: then only the predicted items are scored (a run with
    ``--num-samples``), as COCOEvalCap does; CIDEr's document frequencies then come from those items' references.
    """
    if not isinstance(task, Task) and task not in task_names():
        raise ValueError(f"score_files: task must be one of {', '.join(scored_tasks())}, got {task!r}")
    found = get_task(task, custom_kind=custom_kind)  # custom without a custom_kind: a message naming the kinds
    if not found.kind.scores_files:
        kinds = f" (custom_kind {' | '.join(scored_custom_kinds())})" if custom_kinds(found.name) else ""
        raise ValueError(f"score_files: task must be one of {', '.join(scored_tasks())}{kinds}, got {found.label!r}")
    return found.kind.score_files(
        Path(predictions), Path(annotations), questions, subset=subset, stem=found.spec.stem
    )


def score_records(
    task: str | Task,
    records: Iterable[dict],
    examples: Sequence[Example],
    *,
    stem: bool | None = None,
    custom_kind: str | None = None,
) -> dict[str, float]:
    """Score in-memory ``prediction_record`` dicts against the query ``examples`` they were made for.

    Same metrics as ``score_files``; classification and binding give {"accuracy": top-1 %}. ``stem`` defaults to the
    task's rule (OK-VQA's).
    """
    task = get_task(task, custom_kind=custom_kind)
    if not examples:
        raise ValueError(f"score_records({task.label!r}): no examples")
    return task.kind.score_records(list(records), examples, stem=task.spec.stem if stem is None else stem)


def trial_scores(task: Task, records: Sequence[dict], examples: Sequence[Example], *, stem: bool) -> dict:
    """A runner trial's score fields: ``{"value": the metric's %}`` plus whatever else the metric reports (VQA:
    ``"vqa_rule"``, ``"vqa_rule_counts"``). ``value`` is None when the examples carry no references (a test-dev
    export: predictions only)."""
    if not task.kind.has_references(examples):
        return {"value": None}
    scores = dict(score_records(task, records, examples, stem=stem))
    return {"value": scores.pop(task.kind.metric), **scores}
