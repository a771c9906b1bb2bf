"""Readers for the benchmarks' official file formats: each returns the demo pool (support) and the evaluated split (query).

``load_task_data(task, data_dir=...)`` finds the files by the layout below; ``paths={key: file}`` overrides any one of
them (the keys are the names in the layout). ``data_dir`` may be the task's own folder or a root folder that holds a
sub-folder named after the task (``<root>/coco``, ``<root>/vqav2``, ...); so one ``--data-dir`` can serve every task.
Every file named below is read as released by the dataset's authors; nothing needs converting.

Expected layout per task (``<dir>`` is the task folder)::

    coco           <dir>/dataset_coco.json               karpathy_json  Karpathy split (images[].filepath, filename,
                   <dir>/train2014/, <dir>/val2014/      image_dir=<dir> cocoid, split, sentences[].raw); image file =
                                                                        image_dir/filepath/filename.
                   support = split "train" + "restval", query = split "test"; id = cocoid; answers = the raw captions.
    flickr30k      <dir>/dataset_flickr30k.json          karpathy_json  Karpathy split (images[].filename, split,
                   <dir>/flickr30k_images/ (or           image_dir      sentences[].raw).
                   flickr30k-images/)
                   support = "train", query = "test"; id = the file name's stem as OpenFlamingo uses it ("1000092795"),
                   as an int when it is all digits, so it matches the COCO-format Flickr30K reference files.
    vqav2          <dir>/v2_OpenEnded_mscoco_train2014_questions.json    train_questions
                   <dir>/v2_mscoco_train2014_annotations.json            train_annotations
                   <dir>/v2_OpenEnded_mscoco_val2014_questions.json      test_questions
                   <dir>/v2_mscoco_val2014_annotations.json              test_annotations  ("" in paths: no answers,
                   <dir>/train2014/, <dir>/val2014/      train_image_dir, test_image_dir           e.g. test-dev)
                   image file = COCO_<data_subtype>_<image_id:012d>.jpg (data_subtype from the questions file, else
                   the image folder's name; test-dev2015 reads test2015 files); id = question_id; answers = the 10
                   human answers.
    okvqa          <dir>/OpenEnded_mscoco_train2014_questions.json, <dir>/mscoco_train2014_annotations.json,
                   <dir>/OpenEnded_mscoco_val2014_questions.json, <dir>/mscoco_val2014_annotations.json,
                   <dir>/train2014/, <dir>/val2014/      same keys and rules as vqav2.
    textvqa        <dir>/TextVQA_0.5.1_train.json        train_json     native format {"data": [{question_id,
                   <dir>/TextVQA_0.5.1_val.json          test_json      question, image_id, answers}]}
                   <dir>/train_images/                   image_dir      image file = image_dir/<image_id>.jpg (the
                                                                        val images ship in train_images/ too).
    vizwiz         <dir>/train.json, <dir>/val.json      train_json, test_json   native list [{image, question,
                   (or <dir>/Annotations/*.json)
                   <dir>/train/, <dir>/val/              train_image_dir, test_image_dir   answers: [{answer}]}];
                   id = the image file name (VizWiz has one question per image).
    hateful_memes  <dir>/train.jsonl                     train_jsonl    lines {id, img, label, text}; img is relative
                   <dir>/test_seen.jsonl (else           test_jsonl     to image_dir (default <dir>, so
                   <dir>/dev_seen.jsonl)                                "img/01235.png" works as released).
                   <dir>/img/                            image_dir      class_names = ["no", "yes"]. (An
                                                                        image_dir pointing at img/ works too.)
    imagenet       <dir>/train/<class_dir>/*.JPEG        train_dir      ImageFolder layout; label = index of
                   <dir>/val/<class_dir>/*.JPEG          test_dir       class_dir in the sorted train class dirs;
                   <dir>/class_names.json                class_names    {"n01440764": "tench", ...}, a list of
                                                                        names in sorted class_dir order, or a
                                                                        text file of "<class_dir> <name>" lines;
                   id = the image path relative to train_dir / test_dir ("n01440764/x.JPEG").
    custom         <dir>/train.jsonl, <dir>/test.jsonl   train_jsonl, test_jsonl; images relative to the file.
                   custom_kind="caption": {"id"?, "image", "caption" | "captions": [...]}
                   custom_kind="vqa":     {"question_id"?, "image", "question", "answers": [...] | "answer"}
                   id defaults to the line's index in its file.

Image files are opened later, by ``flamingo.processing.load_image``; here only the image folders and each split's
first image are checked, so that a wrong layout fails at once without a stat call for every one of 100k images.
The evaluated split's ids must be unique: scores and prediction files are keyed by them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

TASKS = ("coco", "flickr30k", "vqav2", "okvqa", "textvqa", "vizwiz", "hateful_memes", "imagenet", "custom")
CAPTION_TASKS = ("coco", "flickr30k")
VQA_TASKS = ("vqav2", "okvqa", "textvqa", "vizwiz")
CUSTOM_KINDS = ("caption", "vqa")
# torchvision's ImageFolder extensions; compared case-insensitively (ImageNet's files end in .JPEG).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Example:
    """One image with its text. ``answers`` holds the reference captions (captioning) or the human answers (VQA)."""

    id: int | str  # COCO/Flickr: image id; VQA: question_id; HatefulMemes: id; classification: relative image path
    image: Path
    question: str | None = None
    answers: tuple[str, ...] = ()
    text: str | None = None  # HatefulMemes OCR text
    label: int | None = None  # HatefulMemes 0/1; classification: class index


@dataclass
class TaskData:
    """A benchmark's demo pool (``support``, from the train split) and evaluated split (``query``)."""

    task: str
    support: list[Example]
    query: list[Example]
    class_names: list[str] | None = None
    files: dict[str, Path] = field(default_factory=dict)  # the resolved layout (what was read)


# ------------------------------------------------------------------------------------------------------ layout
_LAYOUTS: dict[str, dict[str, str]] = {
    "coco": {"karpathy_json": "dataset_coco.json", "image_dir": "."},
    "flickr30k": {"karpathy_json": "dataset_flickr30k.json", "image_dir": "flickr30k_images"},
    "vqav2": {
        "train_questions": "v2_OpenEnded_mscoco_train2014_questions.json",
        "train_annotations": "v2_mscoco_train2014_annotations.json",
        "train_image_dir": "train2014",
        "test_questions": "v2_OpenEnded_mscoco_val2014_questions.json",
        "test_annotations": "v2_mscoco_val2014_annotations.json",
        "test_image_dir": "val2014",
    },
    "okvqa": {
        "train_questions": "OpenEnded_mscoco_train2014_questions.json",
        "train_annotations": "mscoco_train2014_annotations.json",
        "train_image_dir": "train2014",
        "test_questions": "OpenEnded_mscoco_val2014_questions.json",
        "test_annotations": "mscoco_val2014_annotations.json",
        "test_image_dir": "val2014",
    },
    "textvqa": {"train_json": "TextVQA_0.5.1_train.json", "test_json": "TextVQA_0.5.1_val.json", "image_dir": "train_images"},
    "vizwiz": {"train_json": "train.json", "test_json": "val.json", "train_image_dir": "train", "test_image_dir": "val"},
    "hateful_memes": {"train_jsonl": "train.jsonl", "test_jsonl": "test_seen.jsonl", "image_dir": "."},
    "imagenet": {"train_dir": "train", "test_dir": "val", "class_names": "class_names.json"},
    "custom": {"train_jsonl": "train.jsonl", "test_jsonl": "test.jsonl"},
}


_ALTERNATIVES = {
    "flickr30k": {"image_dir": "flickr30k-images"},  # the official archive's folder name
    "vizwiz": {"train_json": "Annotations/train.json", "test_json": "Annotations/val.json"},  # Annotations.zip
    "hateful_memes": {"test_jsonl": "dev_seen.jsonl"},
}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; expected one of {', '.join(TASKS)}")


def task_dir(task: str, data_dir: Path) -> Path:
    """``data_dir/<task>`` when that folder exists (a root holding every task), else ``data_dir`` itself."""
    data_dir = Path(data_dir)
    return data_dir / task if (data_dir / task).is_dir() else data_dir


def default_layout(task: str, data_dir: Path) -> dict[str, Path]:
    """The documented file and folder paths of ``task`` under ``data_dir`` (see the module docstring)."""
    _check_task(task)
    base = task_dir(task, data_dir)
    layout = {key: (base / name if name != "." else base) for key, name in _LAYOUTS[task].items()}
    # Where releases differ in naming, take the first alternative that exists (else the documented name).
    for key, alternative in _ALTERNATIVES.get(task, {}).items():
        if not layout[key].exists() and (base / alternative).exists():
            layout[key] = base / alternative
    return layout


def load_task_data(
    task: str,
    *,
    data_dir: Path | None = None,
    paths: dict[str, str] | None = None,
    custom_kind: str | None = None,
) -> TaskData:
    """Read ``task``'s support (train) and query (evaluated) splits from the official files.

    ``paths`` overrides entries of ``default_layout`` (its keys); with no ``data_dir`` every entry must be given.
    Raises ValueError naming the missing file, the bad field and the record.
    """
    _check_task(task)
    paths = dict(paths or {})
    unknown = sorted(set(paths) - set(_LAYOUTS[task]))
    if unknown:
        raise ValueError(f"Unknown path keys {unknown} for task {task!r}; expected some of {sorted(_LAYOUTS[task])}")
    if data_dir is None:
        missing = sorted(set(_LAYOUTS[task]) - set(paths))
        # Only vqa test_annotations may be absent, and only when given as "" explicitly.
        if missing:
            raise ValueError(f"Task {task!r}: give data_dir or paths for all of {missing}")
        layout: dict[str, Path | None] = {}
    else:
        layout = dict(default_layout(task, Path(data_dir)))
    for key, value in paths.items():
        layout[key] = Path(value) if value not in ("", None) else None
    if task == "custom" and custom_kind not in CUSTOM_KINDS:
        raise ValueError(f"Task 'custom' needs custom_kind in {CUSTOM_KINDS}, got {custom_kind!r}")
    for key, path in layout.items():
        if path is None and not (task in ("vqav2", "okvqa") and key == "test_annotations"):
            raise ValueError(f"Task {task!r}: path {key!r} must not be empty")
    data = _READERS[task](layout, custom_kind)
    data.files = {key: path for key, path in layout.items() if path is not None}
    for split, examples in (("support", data.support), ("query", data.query)):
        if not examples:
            raise ValueError(f"Task {task!r}: the {split} split is empty (files: {_describe(layout)})")
        if not examples[0].image.is_file():
            raise ValueError(f"Task {task!r}: image {examples[0].image} of {split} example {examples[0].id!r} not found")
    # Scores and predictions are keyed by id: a repeated query id would silently drop queries from the metric.
    counts = Counter(str(e.id) for e in data.query)
    repeated = [e.id for e in data.query if counts[str(e.id)] > 1]
    if repeated:
        raise ValueError(
            f"Task {task!r}: the query split repeats ids {repeated[:5]} ({len(repeated)} examples; files: "
            f"{_describe(layout)}); every evaluated example needs its own id."
        )
    return data


# ------------------------------------------------------------------------------------------------------ helpers
def _describe(layout: dict[str, Path | None]) -> str:
    return ", ".join(f"{key}={path}" for key, path in layout.items())


def _need(path: Path, what: str, *, folder: bool = False) -> Path:
    if folder and not path.is_dir():
        raise ValueError(f"{what}: folder {path} not found")
    if not folder and not path.is_file():
        raise ValueError(f"{what}: file {path} not found")
    return path


def read_json(path: Path, what: str = "file") -> Any:
    """Parse a JSON file; ValueError naming the file if it is missing or malformed."""
    path = _need(Path(path), what)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what}: {path} is not valid JSON: {error}") from error


def read_jsonl(path: Path, what: str = "file") -> list[dict]:
    """Parse a JSON-lines file (blank lines skipped); ValueError naming the file and line."""
    path = _need(Path(path), what)
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not valid JSON: {error}") from error
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def field_of(record: Any, key: str, where: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """``record[key]``, or a ValueError that names the file/record (``where``) and the missing or mistyped field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{where}: missing field {key!r} (has {sorted(record)[:8]})")
    value = record[key]
    if kind is not None and not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field {key!r} should be {names}, got {type(value).__name__}")
    return value


def list_field(data: Any, key: str | None, path: Path) -> list:
    """The top-level list of a file (``data`` itself, or ``data[key]``), with an error naming the file if it is not."""
    if key is not None:
        data = field_of(data, key, str(path), list)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def answers_of(record: dict, where: str) -> tuple[str, ...]:
    """The human answers of a VQA record: ``answers`` as [{"answer": ...}] (VQA v2, VizWiz) or [str] (TextVQA)."""
    raw = field_of(record, "answers", where, list)
    return tuple(field_of(a, "answer", f"{where}, answer {i}", str) if isinstance(a, dict) else str(a) for i, a in enumerate(raw))


# ------------------------------------------------------------------------------------------------------ readers
def _karpathy(layout, splits: dict[str, tuple[str, ...]], task: str) -> TaskData:
    path = layout["karpathy_json"]
    images = list_field(read_json(path, "karpathy_json"), "images", path)
    image_dir = _need(layout["image_dir"], "image_dir", folder=True)
    found: dict[str, list[Example]] = {name: [] for name in splits}
    for index, record in enumerate(images):
        where = f"{path}, images[{index}]"
        split = field_of(record, "split", where, str)
        target = next((name for name, accepted in splits.items() if split in accepted), None)
        if target is None:
            continue
        filename = field_of(record, "filename", where, str)
        captions = tuple(field_of(s, "raw", f"{where}, sentences[{j}]", str) for j, s in enumerate(field_of(record, "sentences", where, list)))
        if task == "coco":
            image = image_dir / field_of(record, "filepath", where, str) / filename
            image_id: int | str = field_of(record, "cocoid", where, int)
        else:
            image = image_dir / filename
            stem = Path(filename).stem
            image_id = int(stem) if stem.isdigit() else stem
        found[target].append(Example(id=image_id, image=image, answers=captions))
    return TaskData(task=task, support=found["support"], query=found["query"])


def _read_coco(layout, _kind) -> TaskData:
    # Karpathy's "restval" images are val2014 images outside his val/test splits; they are training data.
    return _karpathy(layout, {"support": ("train", "restval"), "query": ("test",)}, "coco")


def _read_flickr30k(layout, _kind) -> TaskData:
    return _karpathy(layout, {"support": ("train",), "query": ("test",)}, "flickr30k")


def _vqa_split(questions_path: Path, annotations_path: Path | None, image_dir: Path, what: str) -> list[Example]:
    questions_data = read_json(questions_path, f"{what}_questions")
    questions = list_field(questions_data, "questions", questions_path)
    image_dir = _need(image_dir, f"{what}_image_dir", folder=True)
    # The questions file names its COCO subset ("train2014"); OpenFlamingo reads it off the folder name instead.
    subtype = questions_data.get("data_subtype") or image_dir.name
    if subtype.startswith("test-dev"):  # test-dev2015 is a subset of test2015, whose files are COCO_test2015_*.jpg
        subtype = "test" + subtype[len("test-dev") :]
    answers: dict[Any, tuple[str, ...]] = {}
    if annotations_path is not None:
        annotations = list_field(read_json(annotations_path, f"{what}_annotations"), "annotations", annotations_path)
        for index, record in enumerate(annotations):
            where = f"{annotations_path}, annotations[{index}]"
            answers[field_of(record, "question_id", where)] = answers_of(record, where)
    examples = []
    for index, record in enumerate(questions):
        where = f"{questions_path}, questions[{index}]"
        question_id = field_of(record, "question_id", where)
        image_id = field_of(record, "image_id", where, int)
        if annotations_path is not None and question_id not in answers:
            raise ValueError(f"{annotations_path}: no annotation for question_id {question_id} ({where})")
        examples.append(
            Example(
                id=question_id,
                image=image_dir / f"COCO_{subtype}_{image_id:012d}.jpg",
                question=field_of(record, "question", where, str),
                answers=answers.get(question_id, ()),
            )
        )
    return examples


def _read_coco_vqa(task: str) -> Callable:
    def read(layout, _kind) -> TaskData:
        support = _vqa_split(layout["train_questions"], layout["train_annotations"], layout["train_image_dir"], "train")
        query = _vqa_split(layout["test_questions"], layout["test_annotations"], layout["test_image_dir"], "test")
        return TaskData(task=task, support=support, query=query)

    return read


def _read_textvqa(layout, _kind) -> TaskData:
    image_dir = _need(layout["image_dir"], "image_dir", folder=True)

    def split(key: str) -> list[Example]:
        path = layout[key]
        records = list_field(read_json(path, key), "data", path)
        examples = []
        for index, record in enumerate(records):
            where = f"{path}, data[{index}]"
            examples.append(
                Example(
                    id=field_of(record, "question_id", where),
                    image=image_dir / f"{field_of(record, 'image_id', where, str)}.jpg",
                    question=field_of(record, "question", where, str),
                    answers=answers_of(record, where) if "answers" in record else (),  # the test split has none
                )
            )
        return examples

    return TaskData(task="textvqa", support=split("train_json"), query=split("test_json"))


def _read_vizwiz(layout, _kind) -> TaskData:
    def split(key: str, image_key: str) -> list[Example]:
        path = layout[key]
        records = list_field(read_json(path, key), None, path)
        image_dir = _need(layout[image_key], image_key, folder=True)
        examples = []
        for index, record in enumerate(records):
            where = f"{path}, [{index}]"
            image = field_of(record, "image", where, str)
            examples.append(
                Example(
                    id=image,
                    image=image_dir / image,
                    question=field_of(record, "question", where, str),
                    answers=answers_of(record, where) if "answers" in record else (),  # the test split has none
                )
            )
        return examples

    return TaskData(
        task="vizwiz", support=split("train_json", "train_image_dir"), query=split("test_json", "test_image_dir")
    )


def _read_hateful_memes(layout, _kind) -> TaskData:
    image_dir = _need(layout["image_dir"], "image_dir", folder=True)

    def split(key: str) -> list[Example]:
        path = layout[key]
        examples = []
        records = read_jsonl(path, key)
        # "img" is relative to the dataset folder ("img/01235.png"); OpenFlamingo instead points image_dir at the
        # img/ folder itself and keeps only the file name. Accept both, decided once per file.
        by_name = bool(records) and not (image_dir / str(records[0].get("img", ""))).is_file() and (
            image_dir / Path(str(records[0].get("img", ""))).name
        ).is_file()
        for index, record in enumerate(records):
            where = f"{path}, record {index}"
            label = field_of(record, "label", where, int)
            if label not in (0, 1):
                raise ValueError(f"{where}: field 'label' should be 0 or 1, got {label!r}")
            img = field_of(record, "img", where, str)
            examples.append(
                Example(
                    id=field_of(record, "id", where, (int, str)),
                    image=image_dir / (Path(img).name if by_name else img),
                    text=field_of(record, "text", where, str),
                    label=label,
                )
            )
        return examples

    return TaskData(
        task="hateful_memes", support=split("train_jsonl"), query=split("test_jsonl"), class_names=["no", "yes"]
    )


def read_class_names(path: Path, class_dirs: list[str]) -> dict[str, str]:
    """class_dir -> readable name, from a JSON object, from "<class_dir> <name>" lines (LOC_synset_mapping.txt), or
    from a JSON list of names in the order of the sorted ``class_dirs`` (OpenFlamingo's / CLIP's ImageNet list)."""
    path = _need(Path(path), "class_names")
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
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}, line {number}: expected '<class_dir> <class name>', got {line!r}")
        names[parts[0]] = parts[1]
    return names


def _read_imagenet(layout, _kind) -> TaskData:
    train_dir = _need(layout["train_dir"], "train_dir", folder=True)
    test_dir = _need(layout["test_dir"], "test_dir", folder=True)
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


def _read_custom(layout, kind: str) -> TaskData:
    def split(key: str) -> list[Example]:
        path = layout[key]
        examples = []
        for index, record in enumerate(read_jsonl(path, key)):
            where = f"{path}, record {index}"
            image = path.parent / field_of(record, "image", where, str)
            if kind == "caption":
                if "captions" in record:
                    captions = tuple(field_of(record, "captions", where, list))
                else:
                    captions = (field_of(record, "caption", where, str),)
                if not captions or not all(isinstance(c, str) for c in captions):
                    raise ValueError(f"{where}: 'captions' should be a non-empty list of strings")
                examples.append(Example(id=record.get("id", index), image=image, answers=captions))
            else:
                if "answers" in record:
                    answers = tuple(str(a) for a in field_of(record, "answers", where, list))
                else:
                    answers = (field_of(record, "answer", where, str),)
                examples.append(
                    Example(
                        id=record.get("question_id", index),
                        image=image,
                        question=field_of(record, "question", where, str),
                        answers=answers,
                    )
                )
        return examples

    return TaskData(task="custom", support=split("train_jsonl"), query=split("test_jsonl"))


_READERS: dict[str, Callable[[dict, str | None], TaskData]] = {
    "coco": _read_coco,
    "flickr30k": _read_flickr30k,
    "vqav2": _read_coco_vqa("vqav2"),
    "okvqa": _read_coco_vqa("okvqa"),
    "textvqa": _read_textvqa,
    "vizwiz": _read_vizwiz,
    "hateful_memes": _read_hateful_memes,
    "imagenet": _read_imagenet,
    "custom": _read_custom,
}
