"""Reading the official results and annotation files that ``score_files`` compares: id -> value maps.

Errors name the file, the record and the field; ids match by value (``id_key``), so 42 and "42" are one id. A file
that names an id twice is refused (``UniqueIds``): the last copy would otherwise win and change the score in silence.
An id is an int or a string, never a bool.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .files import ID_TYPES, UniqueIds, answers_of, field_of, list_field, read_json, read_jsonl_lines
from .files import id_key  # noqa: F401  (re-exported: kinds and binding match ids with it)
from .readers import karpathy_image_id


def predictions_by_id(path: Path, id_keys: Sequence[str], value_keys: Sequence[str], value_type) -> dict[str, Any]:
    """id -> value from a results file, with errors naming the file, the record and the field."""
    records = list_field(read_json(path, "predictions"), None, path)
    found: dict[str, Any] = {}
    ids = UniqueIds("id")
    for index, record in enumerate(records):
        where = f"{path}, record {index}"
        id_field = next((k for k in id_keys if isinstance(record, dict) and k in record), id_keys[0])
        value_field = next((k for k in value_keys if isinstance(record, dict) and k in record), value_keys[0])
        record_id = field_of(record, id_field, where, ID_TYPES)
        value = field_of(record, value_field, where, value_type)
        ids.add(record_id, where)
        found[id_key(record_id)] = value
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
        # Several captions per image is the format; one caption record twice (its "id" repeated) is a broken file.
        caption_ids = UniqueIds("id")
        for index, record in enumerate(list_field(data, "annotations", path)):
            where = f"{path}, annotations[{index}]"
            if isinstance(record, dict) and "id" in record:
                caption_ids.add(field_of(record, "id", where, ID_TYPES), where)
            references.setdefault(id_key(field_of(record, "image_id", where, ID_TYPES)), []).append(
                field_of(record, "caption", where, str)
            )
    elif isinstance(data, dict) and "images" in data:
        image_ids = UniqueIds("cocoid" if cocoid else "image id (the file name's stem)")
        for index, record in enumerate(list_field(data, "images", path)):
            where = f"{path}, images[{index}]"
            if field_of(record, "split", where, str) != "test":
                continue
            # The scorer takes a cocoid written as a string too (ids match by value); the reader insists on an int.
            if cocoid:
                image_id = field_of(record, "cocoid", where, ID_TYPES)
            else:
                image_id = karpathy_image_id(record, where, cocoid=False)
            image_ids.add(image_id, where)
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
        ids = UniqueIds("question_id")
        for index, record in enumerate(list_field(data, "annotations", path)):
            where = f"{path}, annotations[{index}]"
            question_id = ids.add(field_of(record, "question_id", where, ID_TYPES), where)
            answers[id_key(question_id)] = list(answers_of(record, where))
    elif isinstance(data, dict) and "data" in data:  # native TextVQA
        ids = UniqueIds("question_id")
        for index, record in enumerate(list_field(data, "data", path)):
            where = f"{path}, data[{index}]"
            question_id = ids.add(field_of(record, "question_id", where, ID_TYPES), where)
            answers[id_key(question_id)] = list(answers_of(record, where))
    elif isinstance(data, list):  # native VizWiz: one question per image, named by the image file
        ids = UniqueIds("image")
        for index, record in enumerate(data):
            where = f"{path}, [{index}]"
            answers[id_key(ids.add(field_of(record, "image", where, str), where))] = list(answers_of(record, where))
    else:
        raise ValueError(
            f"{path}: expected VQA annotations ({{'annotations': [...]}}), native TextVQA ({{'data': [...]}}) or "
            f"native VizWiz ([...]), got {type(data).__name__}"
        )
    if questions is not None:
        asked, question_ids = UniqueIds("question_id"), []
        for index, record in enumerate(list_field(read_json(questions, "questions"), "questions", Path(questions))):
            where = f"{questions}, questions[{index}]"
            question_ids.append(id_key(asked.add(field_of(record, "question_id", where, ID_TYPES), where)))
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
    ids = UniqueIds("id")
    for number, record in read_jsonl_lines(path, "annotations"):
        where = f"{path}, line {number}"
        labels[id_key(ids.add(field_of(record, "id", where, ID_TYPES), where))] = field_of(record, "label", where, int)
    return labels
