"""Score prediction files in the official results formats against the official annotation files.

    flamingo-eval score --task coco --predictions results.json --annotations dataset_coco.json

Prediction files (what ``write_predictions`` writes, and what the benchmarks' servers take):

    coco, flickr30k   [{"image_id": 391895, "caption": "a man riding a bike"}, ...]
    vqav2, okvqa,     [{"question_id": 262148000, "answer": "yes"}, ...]
    textvqa           (VizWiz records also carry "image", the official key there; either key is read)
    vizwiz
    hateful_memes     [{"id": 42953, "score": 0.73}, ...]   (score = P("yes"); "proba" is read too)
    imagenet, custom  classification [{"id": ..., "prediction": ..., "label": ...}] -- scored in the runner

Annotation files: captions -- a COCO-format captions file ({"annotations": [{"image_id", "caption"}]}) or a Karpathy
split file (then its "test" images are the references); VQA -- the VQA v2 / OK-VQA annotations file
({"annotations": [{"question_id", "answers": [{"answer"}]}]}, with the questions file optional: if given, exactly its
questions are scored), the native TextVQA file ({"data": [...]}) or the native VizWiz file ([{"image", "answers"}]);
HatefulMemes -- the jsonl file ({"id", "label"} per line).

Every annotated item needs exactly one prediction, and every prediction must name an annotated item; ids match by
value, so 42 and "42" are the same id. Scores are percentages, as the papers report them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flamingo.io import atomic_write_text

from .data import CAPTION_TASKS, VQA_TASKS, Example, answers_of, field_of, list_field, read_json, read_jsonl
from .metrics import cider, roc_auc, vqa_accuracy

SCORED_TASKS = CAPTION_TASKS + VQA_TASKS + ("hateful_memes",)


# ------------------------------------------------------------------------------------------------ predictions
def prediction_record(task: str, example: Example, output: Any) -> dict:
    """One prediction in ``task``'s official results format. ``output``: the caption or answer (str), P("yes") for
    hateful_memes (float), or the predicted class for classification (index or name)."""
    kind = _kind(task, example)
    if kind == "caption":
        return {"image_id": example.id, "caption": str(output)}
    if kind == "vqa":
        if task == "vizwiz":  # the VizWiz server reads "image"; our scorer reads either
            return {"question_id": example.id, "image": example.id, "answer": str(output)}
        return {"question_id": example.id, "answer": str(output)}
    if kind == "hateful_memes":
        return {"id": example.id, "score": float(output), "label": example.label}
    return {"id": example.id, "prediction": output, "label": example.label}


def _kind(task: str, example: Example | None = None) -> str:
    if task in CAPTION_TASKS:
        return "caption"
    if task in VQA_TASKS:
        return "vqa"
    if task == "hateful_memes":
        return "hateful_memes"
    if task == "custom" and example is not None and example.label is None:
        return "vqa" if example.question is not None else "caption"
    return "classification"


def write_predictions(task: str, records: Sequence[dict], path: Path) -> Path:
    """Write ``records`` (from ``prediction_record``) as one JSON list, atomically."""
    records = list(records)
    if not all(isinstance(r, dict) for r in records):
        raise ValueError(f"write_predictions({task!r}): records must be dicts from prediction_record")
    path = Path(path)
    # ASCII escapes: the same JSON to every reader, and no UnicodeEncodeError where the locale is C (batch jobs).
    atomic_write_text(path, json.dumps(records))
    return path


# ------------------------------------------------------------------------------------------------ reading
def _key(value: Any) -> str:
    return str(value)


def _predictions(path: Path, id_keys: Sequence[str], value_keys: Sequence[str], value_type) -> dict[str, Any]:
    """id -> value from a results file, with errors naming the file, the record and the field."""
    records = list_field(read_json(path, "predictions"), None, path)
    found: dict[str, Any] = {}
    for index, record in enumerate(records):
        where = f"{path}, record {index}"
        id_key = next((k for k in id_keys if isinstance(record, dict) and k in record), id_keys[0])
        value_key = next((k for k in value_keys if isinstance(record, dict) and k in record), value_keys[0])
        key = _key(field_of(record, id_key, where))
        value = field_of(record, value_key, where, value_type)
        if key in found:
            raise ValueError(f"{where}: {id_key} {record[id_key]!r} appears more than once")
        found[key] = value
    return found


def _check_ids(predictions: dict[str, Any], annotations: dict[str, Any], predictions_path: Path, annotations_path: Path,
               *, subset: bool = False) -> dict[str, Any]:
    """The annotations to score against: all of them, or with ``subset`` only those that have a prediction."""
    missing = [i for i in annotations if i not in predictions]
    if missing and not subset:
        raise ValueError(
            f"{predictions_path}: no prediction for {len(missing)} of the {len(annotations)} items of "
            f"{annotations_path}, e.g. ids {missing[:5]}"
        )
    unknown = [i for i in predictions if i not in annotations]
    if unknown:
        raise ValueError(
            f"{predictions_path}: {len(unknown)} prediction(s) for ids that {annotations_path} does not have, "
            f"e.g. {unknown[:5]}"
        )
    if not predictions:
        raise ValueError(f"{predictions_path}: no predictions")
    return {i: annotations[i] for i in predictions} if subset else annotations


def caption_references(task: str, path: Path) -> dict[str, list[str]]:
    """image id -> reference captions, from a COCO-format captions file or a Karpathy split file (test split)."""
    data = read_json(path, "annotations")
    references: dict[str, list[str]] = {}
    if isinstance(data, dict) and "annotations" in data:
        for index, record in enumerate(list_field(data, "annotations", path)):
            where = f"{path}, annotations[{index}]"
            references.setdefault(_key(field_of(record, "image_id", where)), []).append(
                field_of(record, "caption", where, str)
            )
    elif isinstance(data, dict) and "images" in data:
        for index, record in enumerate(list_field(data, "images", path)):
            where = f"{path}, images[{index}]"
            if field_of(record, "split", where, str) != "test":
                continue
            if task == "coco":
                image_id: Any = field_of(record, "cocoid", where)
            else:
                stem = Path(field_of(record, "filename", where, str)).stem
                image_id = int(stem) if stem.isdigit() else stem
            sentences = field_of(record, "sentences", where, list)
            references[_key(image_id)] = [field_of(s, "raw", f"{where}, sentences[{j}]", str) for j, s in enumerate(sentences)]
    else:
        raise ValueError(
            f"{path}: expected a COCO-format captions file (with 'annotations') or a Karpathy split file "
            f"(with 'images'), got {type(data).__name__}{' with keys ' + str(sorted(data)[:8]) if isinstance(data, dict) else ''}"
        )
    if not references:
        raise ValueError(f"{path}: no reference captions found")
    return references


def vqa_answers(task: str, path: Path, questions: Path | None = None) -> dict[str, list[str]]:
    """question id -> human answers, from the VQA v2 / OK-VQA, native TextVQA or native VizWiz annotation file."""
    data = read_json(path, "annotations")
    answers: dict[str, list[str]] = {}
    if isinstance(data, dict) and "annotations" in data:
        for index, record in enumerate(list_field(data, "annotations", path)):
            where = f"{path}, annotations[{index}]"
            answers[_key(field_of(record, "question_id", where))] = list(answers_of(record, where))
    elif isinstance(data, dict) and "data" in data:  # native TextVQA
        for index, record in enumerate(list_field(data, "data", path)):
            where = f"{path}, data[{index}]"
            answers[_key(field_of(record, "question_id", where))] = list(answers_of(record, where))
    elif isinstance(data, list):  # native VizWiz: one question per image, named by the image file
        for index, record in enumerate(data):
            where = f"{path}, [{index}]"
            answers[_key(field_of(record, "image", where, str))] = list(answers_of(record, where))
    else:
        raise ValueError(
            f"{path}: expected VQA annotations ({{'annotations': [...]}}), native TextVQA ({{'data': [...]}}) or "
            f"native VizWiz ([...]), got {type(data).__name__}"
        )
    if questions is not None:
        question_ids = [
            _key(field_of(q, "question_id", f"{questions}, questions[{i}]"))
            for i, q in enumerate(list_field(read_json(questions, "questions"), "questions", Path(questions)))
        ]
        missing = [q for q in question_ids if q not in answers]
        if missing:
            raise ValueError(f"{path}: no annotation for {len(missing)} question(s) of {questions}, e.g. {missing[:5]}")
        answers = {q: answers[q] for q in question_ids}
    if not answers:
        raise ValueError(f"{path}: no annotated questions found")
    return answers


# ------------------------------------------------------------------------------------------------ scoring
def score_files(
    task: str, predictions: Path, annotations: Path, questions: Path | None = None, *, subset: bool = False
) -> dict[str, float]:
    """Score a results file: {"cider": x} (captioning), {"accuracy": x} (VQA) or {"roc_auc": x} (HatefulMemes).

    Every annotated item needs a prediction, unless ``subset``: then only the predicted items are scored (a run with
    ``--num-samples``), as COCOEvalCap does; CIDEr's document frequencies then come from those items' references.
    """
    if task not in SCORED_TASKS:
        raise ValueError(f"score_files: task must be one of {', '.join(SCORED_TASKS)}, got {task!r}")
    predictions, annotations = Path(predictions), Path(annotations)
    if task in CAPTION_TASKS:
        references = caption_references(task, annotations)
        captions = _predictions(predictions, ["image_id"], ["caption"], str)
        references = _check_ids(captions, references, predictions, annotations, subset=subset)
        return {"cider": cider(captions, references)}
    if task in VQA_TASKS:
        if task == "okvqa":  # a missing stemming package is a setup error: one line, as for a bad file
            from .metrics.okvqa_stem import require_stem_backend

            require_stem_backend()
        answers = vqa_answers(task, annotations, Path(questions) if questions is not None else None)
        id_keys = ["question_id", "image"] if task == "vizwiz" else ["question_id"]
        predicted = _predictions(predictions, id_keys, ["answer"], str)
        answers = _check_ids(predicted, answers, predictions, annotations, subset=subset)
        return {"accuracy": vqa_accuracy(predicted, answers, stem=task == "okvqa")}
    labels: dict[str, int] = {}
    for index, record in enumerate(read_jsonl(annotations, "annotations")):
        where = f"{annotations}, record {index}"
        labels[_key(field_of(record, "id", where))] = field_of(record, "label", where, int)
    scores = _predictions(predictions, ["id"], ["score", "proba"], (int, float))
    labels = _check_ids(scores, labels, predictions, annotations, subset=subset)
    ids = list(labels)
    return {"roc_auc": roc_auc([labels[i] for i in ids], [scores[i] for i in ids])}


def score_records(task: str, records: Iterable[dict], examples: Sequence[Example], *, stem: bool | None = None) -> dict[str, float]:
    """Score in-memory ``prediction_record`` dicts against the query ``examples`` they were made for.

    Same metrics as ``score_files``; classification gives {"accuracy": top-1 %}. ``stem`` defaults to OK-VQA's rule.
    """
    records = list(records)
    if not examples:
        raise ValueError(f"score_records({task!r}): no examples")
    kind = _kind(task, examples[0])
    if kind == "caption":
        return {"cider": cider({_key(r["image_id"]): r["caption"] for r in records},
                               {_key(e.id): list(e.answers) for e in examples})}
    if kind == "vqa":
        return {"accuracy": vqa_accuracy({_key(r["question_id"]): r["answer"] for r in records},
                                         {_key(e.id): list(e.answers) for e in examples},
                                         stem=(task == "okvqa") if stem is None else stem)}
    by_id = {_key(r["id"]): r for r in records}
    missing = [e.id for e in examples if _key(e.id) not in by_id]
    if missing:
        raise ValueError(f"score_records({task!r}): no prediction for {len(missing)} example(s), e.g. {missing[:5]}")
    if kind == "hateful_memes":
        return {"roc_auc": roc_auc([e.label for e in examples], [by_id[_key(e.id)]["score"] for e in examples])}
    correct = sum(1 for e in examples if by_id[_key(e.id)]["prediction"] == by_id[_key(e.id)]["label"])
    return {"accuracy": 100.0 * correct / len(examples)}
