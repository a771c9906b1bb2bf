"""Reading the official results and annotation files that ``score_files`` compares: id -> value maps.

Errors name the file, the record and the field; ids match by value (``id_key``), so 42 and "42" are one id.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import answers_of, field_of, list_field, read_json, read_jsonl
from .readers import karpathy_image_id


def id_key(value: Any) -> str:
    """Ids match by value whatever their JSON type: 42 and "42" are one id."""
    return str(value)


def predictions_by_id(path: Path, id_keys: Sequence[str], value_keys: Sequence[str], value_type) -> dict[str, Any]:
    """id -> value from a results file, with errors naming the file, the record and the field."""
    records = list_field(read_json(path, "predictions"), None, path)
    found: dict[str, Any] = {}
    for index, record in enumerate(records):
        where = f"{path}, record {index}"
        id_field = next((k for k in id_keys if isinstance(record, dict) and k in record), id_keys[0])
        value_field = next((k for k in value_keys if isinstance(record, dict) and k in record), value_keys[0])
        key = id_key(field_of(record, id_field, where))
        value = field_of(record, value_field, where, value_type)
        if key in found:
            raise ValueError(f"{where}: {id_field} {record[id_field]!r} appears more than once")
        found[key] = value
    return found


def check_ids(predictions: dict[str, Any], annotations: dict[str, Any], predictions_path: Path, annotations_path: Path,
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


def caption_references(path: Path, *, cocoid: bool) -> dict[str, list[str]]:
    """image id -> reference captions, from a COCO-format captions file or a Karpathy split file (test split; ids
    by ``karpathy_image_id``: the cocoid for COCO, else the file name's stem)."""
    data = read_json(path, "annotations")
    references: dict[str, list[str]] = {}
    if isinstance(data, dict) and "annotations" in data:
        for index, record in enumerate(list_field(data, "annotations", path)):
            where = f"{path}, annotations[{index}]"
            references.setdefault(id_key(field_of(record, "image_id", where)), []).append(
                field_of(record, "caption", where, str)
            )
    elif isinstance(data, dict) and "images" in data:
        for index, record in enumerate(list_field(data, "images", path)):
            where = f"{path}, images[{index}]"
            if field_of(record, "split", where, str) != "test":
                continue
            # The scorer takes any JSON cocoid (ids match by value); the reader insists on an int.
            image_id = field_of(record, "cocoid", where) if cocoid else karpathy_image_id(record, where, cocoid=False)
            sentences = field_of(record, "sentences", where, list)
            references[id_key(image_id)] = [field_of(s, "raw", f"{where}, sentences[{j}]", str) for j, s in enumerate(sentences)]
    else:
        raise ValueError(
            f"{path}: expected a COCO-format captions file (with 'annotations') or a Karpathy split file "
            f"(with 'images'), got {type(data).__name__}{' with keys ' + str(sorted(data)[:8]) if isinstance(data, dict) else ''}"
        )
    if not references:
        raise ValueError(f"{path}: no reference captions found")
    return references


def vqa_answers(path: Path, questions: Path | None = None) -> dict[str, list[str]]:
    """question id -> human answers, from the VQA v2 / OK-VQA, native TextVQA or native VizWiz annotation file."""
    data = read_json(path, "annotations")
    answers: dict[str, list[str]] = {}
    if isinstance(data, dict) and "annotations" in data:
        for index, record in enumerate(list_field(data, "annotations", path)):
            where = f"{path}, annotations[{index}]"
            answers[id_key(field_of(record, "question_id", where))] = list(answers_of(record, where))
    elif isinstance(data, dict) and "data" in data:  # native TextVQA
        for index, record in enumerate(list_field(data, "data", path)):
            where = f"{path}, data[{index}]"
            answers[id_key(field_of(record, "question_id", where))] = list(answers_of(record, where))
    elif isinstance(data, list):  # native VizWiz: one question per image, named by the image file
        for index, record in enumerate(data):
            where = f"{path}, [{index}]"
            answers[id_key(field_of(record, "image", where, str))] = list(answers_of(record, where))
    else:
        raise ValueError(
            f"{path}: expected VQA annotations ({{'annotations': [...]}}), native TextVQA ({{'data': [...]}}) or "
            f"native VizWiz ([...]), got {type(data).__name__}"
        )
    if questions is not None:
        question_ids = [
            id_key(field_of(q, "question_id", f"{questions}, questions[{i}]"))
            for i, q in enumerate(list_field(read_json(questions, "questions"), "questions", Path(questions)))
        ]
        missing = [q for q in question_ids if q not in answers]
        if missing:
            raise ValueError(f"{path}: no annotation for {len(missing)} question(s) of {questions}, e.g. {missing[:5]}")
        answers = {q: answers[q] for q in question_ids}
    if not answers:
        raise ValueError(f"{path}: no annotated questions found")
    return answers


def jsonl_labels(path: Path) -> dict[str, int]:
    """id -> label, from a jsonl annotation file of ``{"id", "label"}`` lines (HatefulMemes)."""
    labels: dict[str, int] = {}
    for index, record in enumerate(read_jsonl(path, "annotations")):
        where = f"{path}, record {index}"
        labels[id_key(field_of(record, "id", where))] = field_of(record, "label", where, int)
    return labels
