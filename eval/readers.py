"""Readers for the benchmarks' official file formats, one per task: ``read(layout) -> TaskData``.

``layout`` maps each key of the task's layout (``flamingo_eval.tasks``; documented in ``flamingo_eval.data``) to the
resolved file or folder, or to None where the key is optional and was given as "". A reader opens nothing but its
annotation files and the image folders; image files are opened later, by ``flamingo.processing.load_image``.

Each Example carries ``where`` (the file and record it came from), so that later checks (``load_task_data`` keeps
images inside the task's data folders) can name the record. An id that a file repeats is refused (``UniqueIds``):
scores and demo pools are keyed by id, and the last copy would otherwise win in silence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .files import (
    ID_TYPES,
    IMAGE_EXTENSIONS,
    Example,
    TaskData,
    UniqueIds,
    answers_of,
    field_of,
    list_field,
    need_path,
    read_json,
    read_jsonl_lines,
    read_text,
)


def karpathy_image_id(record: dict, where: str, *, cocoid: bool) -> int | str:
    """The id of a Karpathy-split image: its ``cocoid`` (COCO), else its file name's stem as OpenFlamingo uses it
    (Flickr30K's "1000092795"), as an int when it is all digits so it matches the COCO-format reference files."""
    if cocoid:
        return field_of(record, "cocoid", where, int)
    stem = Path(field_of(record, "filename", where, str)).stem
    return int(stem) if stem.isdigit() else stem


def _karpathy(layout, splits: dict[str, tuple[str, ...]], task: str, *, cocoid: bool) -> TaskData:
    path = layout["karpathy_json"]
    images = list_field(read_json(path, "karpathy_json"), "images", path)
    image_dir = need_path(layout["image_dir"], "image_dir", folder=True)
    found: dict[str, list[Example]] = {name: [] for name in splits}
    ids = UniqueIds("cocoid" if cocoid else "image id (the file name's stem)")
    for index, record in enumerate(images):
        where = f"{path}, images[{index}]"
        split = field_of(record, "split", where, str)
        target = next((name for name, accepted in splits.items() if split in accepted), None)
        if target is None:
            continue
        filename = field_of(record, "filename", where, str)
        captions = tuple(field_of(s, "raw", f"{where}, sentences[{j}]", str) for j, s in enumerate(field_of(record, "sentences", where, list)))
        # COCO's files sit in per-split folders named by "filepath"; Flickr30K's all sit in one folder.
        image = image_dir / field_of(record, "filepath", where, str) / filename if cocoid else image_dir / filename
        image_id = ids.add(karpathy_image_id(record, where, cocoid=cocoid), where)
        found[target].append(Example(id=image_id, image=image, answers=captions, where=where))
    return TaskData(task=task, support=found["support"], query=found["query"])


def read_coco(layout) -> TaskData:
    # Karpathy's "restval" images are val2014 images outside his val/test splits; they are training data.
    return _karpathy(layout, {"support": ("train", "restval"), "query": ("test",)}, "coco", cocoid=True)


def read_flickr30k(layout) -> TaskData:
    return _karpathy(layout, {"support": ("train",), "query": ("test",)}, "flickr30k", cocoid=False)


def _vqa_split(questions_path: Path, annotations_path: Path | None, image_dir: Path, what: str) -> list[Example]:
    questions_data = read_json(questions_path, f"{what}_questions")
    questions = list_field(questions_data, "questions", questions_path)
    image_dir = need_path(image_dir, f"{what}_image_dir", folder=True)
    # The questions file names its COCO subset ("train2014"); OpenFlamingo reads it off the folder name instead.
    subtype = questions_data.get("data_subtype") or image_dir.name
    if not isinstance(subtype, str):
        raise ValueError(f"{questions_path}: field 'data_subtype' should be str, got {type(subtype).__name__}")
    if subtype.startswith("test-dev"):  # test-dev2015 is a subset of test2015, whose files are COCO_test2015_*.jpg
        subtype = "test" + subtype[len("test-dev") :]
    answers: dict[Any, tuple[str, ...]] = {}
    if annotations_path is not None:
        annotations = list_field(read_json(annotations_path, f"{what}_annotations"), "annotations", annotations_path)
        annotated = UniqueIds("question_id")
        for index, record in enumerate(annotations):
            where = f"{annotations_path}, annotations[{index}]"
            question_id = annotated.add(field_of(record, "question_id", where, ID_TYPES), where)
            answers[question_id] = answers_of(record, where)
    examples = []
    asked = UniqueIds("question_id")
    for index, record in enumerate(questions):
        where = f"{questions_path}, questions[{index}]"
        question_id = asked.add(field_of(record, "question_id", where, ID_TYPES), where)
        image_id = field_of(record, "image_id", where, int)
        if annotations_path is not None and question_id not in answers:
            raise ValueError(f"{annotations_path}: no annotation for question_id {question_id} ({where})")
        examples.append(
            Example(
                id=question_id,
                image=image_dir / f"COCO_{subtype}_{image_id:012d}.jpg",
                question=field_of(record, "question", where, str),
                answers=answers.get(question_id, ()),
                where=where,
            )
        )
    return examples


def read_coco_vqa(task: str) -> Callable[[dict], TaskData]:
    """The reader of a COCO-based VQA task (VQAv2, OK-VQA): questions and annotations files per split."""

    def read(layout) -> TaskData:
        support = _vqa_split(layout["train_questions"], layout["train_annotations"], layout["train_image_dir"], "train")
        query = _vqa_split(layout["test_questions"], layout["test_annotations"], layout["test_image_dir"], "test")
        return TaskData(task=task, support=support, query=query)

    return read


def read_textvqa(layout) -> TaskData:
    image_dir = need_path(layout["image_dir"], "image_dir", folder=True)

    def split(key: str) -> list[Example]:
        path = layout[key]
        records = list_field(read_json(path, key), "data", path)
        examples = []
        ids = UniqueIds("question_id")
        for index, record in enumerate(records):
            where = f"{path}, data[{index}]"
            examples.append(
                Example(
                    id=ids.add(field_of(record, "question_id", where, ID_TYPES), where),
                    image=image_dir / f"{field_of(record, 'image_id', where, str)}.jpg",
                    question=field_of(record, "question", where, str),
                    answers=answers_of(record, where) if "answers" in record else (),  # the test split has none
                    where=where,
                )
            )
        return examples

    return TaskData(task="textvqa", support=split("train_json"), query=split("test_json"))


def read_vizwiz(layout) -> TaskData:
    def split(key: str, image_key: str) -> list[Example]:
        path = layout[key]
        records = list_field(read_json(path, key), None, path)
        image_dir = need_path(layout[image_key], image_key, folder=True)
        examples = []
        ids = UniqueIds("image")  # VizWiz has one question per image: the image names the question
        for index, record in enumerate(records):
            where = f"{path}, [{index}]"
            image = ids.add(field_of(record, "image", where, str), where)
            examples.append(
                Example(
                    id=image,
                    image=image_dir / image,
                    question=field_of(record, "question", where, str),
                    answers=answers_of(record, where) if "answers" in record else (),  # the test split has none
                    where=where,
                )
            )
        return examples

    return TaskData(
        task="vizwiz", support=split("train_json", "train_image_dir"), query=split("test_json", "test_image_dir")
    )


def read_hateful_memes(layout) -> TaskData:
    image_dir = need_path(layout["image_dir"], "image_dir", folder=True)

    def split(key: str) -> list[Example]:
        path = layout[key]
        examples = []
        lines = read_jsonl_lines(path, key)
        first = str(lines[0][1].get("img", "")) if lines else ""
        # "img" is relative to the dataset folder ("img/01235.png"); OpenFlamingo instead points image_dir at the
        # img/ folder itself and keeps only the file name. Accept both, decided once per file.
        by_name = bool(lines) and not (image_dir / first).is_file() and (image_dir / Path(first).name).is_file()
        ids = UniqueIds("id")
        for number, record in lines:
            where = f"{path}, line {number}"
            label = field_of(record, "label", where, int)
            if label not in (0, 1):
                raise ValueError(f"{where}: field 'label' should be 0 or 1, got {label!r}")
            img = field_of(record, "img", where, str)
            examples.append(
                Example(
                    id=ids.add(field_of(record, "id", where, ID_TYPES), where),
                    image=image_dir / (Path(img).name if by_name else img),
                    text=field_of(record, "text", where, str),
                    label=label,
                    where=where,
                )
            )
        return examples

    return TaskData(
        task="hateful_memes", support=split("train_jsonl"), query=split("test_jsonl"), class_names=["no", "yes"]
    )


def read_class_names(path: Path, class_dirs: list[str]) -> dict[str, str]:
    """class_dir -> readable name, from a JSON object, from "<class_dir> <name>" lines (LOC_synset_mapping.txt), or
    from a JSON list of names in the order of the sorted ``class_dirs`` (OpenFlamingo's / CLIP's ImageNet list)."""
    path = need_path(Path(path), "class_names")
    if path.suffix == ".json":
        names = read_json(path, "class_names")
        if isinstance(names, list) and all(isinstance(v, str) for v in names):
            if len(names) != len(class_dirs):
                raise ValueError(f"{path}: lists {len(names)} class names for {len(class_dirs)} class folders")
            return dict(zip(class_dirs, names))
        if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
            raise ValueError(
                f"{path}: expected a JSON object mapping class folder names to class names, or a list of class names "
                "in the order of the sorted class folders"
            )
        return names
    names = {}
    for number, line in enumerate(read_text(path, "class_names").split("\n"), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}, line {number}: expected '<class_dir> <class name>', got {line!r}")
        names[parts[0]] = parts[1]
    return names


def read_imagenet(layout) -> TaskData:
    train_dir = need_path(layout["train_dir"], "train_dir", folder=True)
    test_dir = need_path(layout["test_dir"], "test_dir", folder=True)
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    names = read_class_names(layout["class_names"], classes)
    unnamed = [c for c in classes if c not in names]
    if unnamed:
        raise ValueError(f"{layout['class_names']}: no name for class folders {unnamed[:5]} ({len(unnamed)} in all)")
    index = {name: i for i, name in enumerate(classes)}

    def split(root: Path) -> list[Example]:
        examples = []
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            if class_dir.name not in index:
                raise ValueError(f"{class_dir}: class folder not among the {len(classes)} classes of {train_dir}")
            for image in sorted(class_dir.rglob("*")):
                if image.suffix.lower() in IMAGE_EXTENSIONS and image.is_file():
                    examples.append(Example(id=image.relative_to(root).as_posix(), image=image, label=index[class_dir.name]))
        return examples

    return TaskData(
        task="imagenet", support=split(train_dir), query=split(test_dir), class_names=[names[c] for c in classes]
    )


def _custom_split(path: Path, key: str, example: Callable[[dict, Path, int, str], Example]) -> list[Example]:
    """One custom jsonl file, each line made into an Example by ``example(record, image, index, where)``; images are
    relative to the file."""
    examples = []
    for index, (number, record) in enumerate(read_jsonl_lines(path, key)):
        where = f"{path}, line {number}"
        image = path.parent / field_of(record, "image", where, str)
        examples.append(example(record, image, index, where))
    return examples


def _optional_id(record: dict, key: str, index: int, where: str) -> int | str:
    """The record's own id (``key``: an int or a string), else its index among the file's records."""
    return field_of(record, key, where, ID_TYPES) if key in record else index


def _read_custom(layout, example: Callable[[dict, Path, int, str], Example]) -> TaskData:
    """Both jsonl splits (``train_jsonl`` support, ``test_jsonl`` query)."""
    return TaskData(
        task="custom",
        support=_custom_split(layout["train_jsonl"], "train_jsonl", example),
        query=_custom_split(layout["test_jsonl"], "test_jsonl", example),
    )


def _caption_example(record: dict, image: Path, index: int, where: str) -> Example:
    if "captions" in record:
        captions = tuple(field_of(record, "captions", where, list))
    else:
        captions = (field_of(record, "caption", where, str),)
    if not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: 'captions' should be a non-empty list of strings")
    return Example(id=_optional_id(record, "id", index, where), image=image, answers=captions, where=where)


def _vqa_example(record: dict, image: Path, index: int, where: str) -> Example:
    if "answers" in record:
        raw = field_of(record, "answers", where, list)
        # Numbers are answers too ("2"); an empty list, or a list, object or boolean among them, is a broken record.
        if not raw or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in raw):
            raise ValueError(f"{where}: 'answers' should be a non-empty list of strings")
        answers = tuple(str(a) for a in raw)
    else:
        answers = (field_of(record, "answer", where, str),)
    return Example(
        id=_optional_id(record, "question_id", index, where),
        image=image,
        question=field_of(record, "question", where, str),
        answers=answers,
        where=where,
    )


def read_custom_captions(layout) -> TaskData:
    """custom, custom_kind="caption": lines ``{"id"?, "image", "caption" | "captions": [...]}``."""
    return _read_custom(layout, _caption_example)


def read_custom_vqa(layout) -> TaskData:
    """custom, custom_kind="vqa": lines ``{"question_id"?, "image", "question", "answers": [...] | "answer"}``."""
    return _read_custom(layout, _vqa_example)


def read_custom_caption_references(path: Path) -> list[Example]:
    """One custom caption file (a ``test.jsonl``) as ``score_files`` reads it: the same records, ids and captions
    that ``read_custom_captions`` gives the runner."""
    return _custom_split(Path(path), "annotations", _caption_example)


def read_custom_vqa_references(path: Path) -> list[Example]:
    """One custom VQA file (a ``test.jsonl``) as ``score_files`` reads it: the same records, ids and answers that
    ``read_custom_vqa`` gives the runner."""
    return _custom_split(Path(path), "annotations", _vqa_example)
