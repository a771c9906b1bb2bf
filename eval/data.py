"""Loading a task's data from the benchmarks' official files: the demo pool (support) and the evaluated split (query).

``load_task_data(task, data_dir=...)`` finds the files by the task's layout (``Task.layout`` in
``flamingo_eval.tasks``, documented below) and calls the task's reader (``flamingo_eval.readers``,
``flamingo_eval.binding``); ``paths={key: file}`` overrides any one of them (the keys are the names in the layout).
``data_dir`` may be the task's own folder or a root folder that holds a sub-folder named after the task
(``<root>/coco``, ``<root>/vqav2``, ...); so one ``--data-dir`` can serve every task.
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
                   custom_kind="binding": one episode per line (``flamingo_eval.binding``):
                       {"id"?, "demos": [{"image", "word"}, ...], "image", "answer", "choices"?: [...]}
                       demos come from the episode itself; train.jsonl is optional (read and checked if present).
                       In a root folder its sub-folder is <root>/binding (caption and vqa use <root>/custom).
                   id defaults to the line's index in its file.

Image files are opened later, by ``flamingo.processing.load_image``; here only the image folders and each split's
first image are checked, so that a wrong layout fails at once without opening every one of 100k images.
The evaluated split's ids must be unique: scores and prediction files are keyed by them.

Images stay in the task's data folders: ``data_dir`` (``--data-dir``), the folders its layout names (``image_dir``,
``train_image_dir``, ...), or, for a layout of files only (custom, binding), the folders of those files. A path in a data file that leads elsewhere
(``../``, an absolute path, a symlink out) is refused, naming the file, the record and the path, unless
``allow_outside_paths`` (``--allow-outside-paths``): a downloaded dataset must not read any image on the machine into
a prompt or a predictions file. Symlinks are followed, so an image folder that is itself a link (``val2014 ->
/mnt/coco/val2014``) lies outside ``<dir>`` when the layout names ``<dir>``: name the real folder in the layout
(``--coco-image-dir``) or allow outside paths.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from flamingo.file_access import OutsideDataRoot, confined_path

from .files import (  # noqa: F401  (re-exported: the public names readers and callers use)
    IMAGE_EXTENSIONS,
    Example,
    TaskData,
    answers_of,
    describe,
    field_of,
    list_field,
    read_json,
    read_jsonl,
)
from .readers import read_class_names  # noqa: F401
from .tasks import Task, custom_kinds, get_task


def task_dir(task: str | Task, data_dir: Path, *, custom_kind: str | None = None) -> Path:
    """``data_dir/<task folder>`` when that folder exists (a root holding every task), else ``data_dir`` itself."""
    folder = get_task(task, custom_kind=custom_kind).data_folder
    data_dir = Path(data_dir)
    return data_dir / folder if (data_dir / folder).is_dir() else data_dir


def default_layout(task: str | Task, data_dir: Path, *, custom_kind: str | None = None) -> dict[str, Path]:
    """The documented file and folder paths of ``task`` under ``data_dir`` (see the module docstring)."""
    task = _resolve(task, custom_kind)
    base = task_dir(task, data_dir)
    layout = {key: (base / name if name != "." else base) for key, name in task.layout.items()}
    # Where releases differ in naming, take the first alternative that exists (else the documented name).
    for key, alternative in task.alternatives.items():
        if not layout[key].exists() and (base / alternative).exists():
            layout[key] = base / alternative
    return layout


def _resolve(task: str | Task, custom_kind: str | None) -> Task:
    # custom's layout keys are the same for every kind: the layout alone may be asked without naming one.
    if isinstance(task, str) and custom_kind is None and custom_kinds(task):
        custom_kind = custom_kinds(task)[0]
    return get_task(task, custom_kind=custom_kind)


def load_task_data(
    task: str | Task,
    *,
    data_dir: Path | None = None,
    paths: dict[str, str] | None = None,
    custom_kind: str | None = None,
    allow_outside_paths: bool = False,
) -> TaskData:
    """Read ``task``'s support (train) and query (evaluated) splits from the official files.

    ``task``: a registered name (``custom`` with ``custom_kind``) or a :class:`flamingo_eval.tasks.Task`.
    ``paths`` overrides entries of ``default_layout`` (its keys); with no ``data_dir`` every entry must be given.
    ``allow_outside_paths``: read images that lie outside the task's data folders (see the module docstring).
    Raises ValueError naming the missing file, the bad field and the record (``OutsideDataRoot`` for an image path
    that leads out of the data folders).
    """
    task = get_task(task, custom_kind=custom_kind)
    paths = dict(paths or {})
    unknown = sorted(set(paths) - set(task.layout))
    if unknown:
        raise ValueError(f"Unknown path keys {unknown} for task {task.name!r}; expected some of {sorted(task.layout)}")
    if data_dir is None:
        missing = sorted(set(task.layout) - set(paths))
        if missing:
            raise ValueError(f"Task {task.name!r}: give data_dir or paths for all of {missing}")
        layout: dict[str, Path | None] = {}
    else:
        layout = dict(default_layout(task, Path(data_dir)))
    for key, value in paths.items():
        layout[key] = Path(value) if value not in ("", None) else None
    for key, path in layout.items():
        if path is None and key not in task.optional_paths:
            raise ValueError(f"Task {task.name!r}: path {key!r} must not be empty")
    data = task.read(layout)
    data.files = {key: path for key, path in layout.items() if path is not None}
    if not allow_outside_paths:
        roots = image_roots(data.files) + ([Path(data_dir)] if data_dir is not None else [])
        confine_images(data, task.label, roots)
    splits = (("query", data.query),) if task.kind.episodic else (("support", data.support), ("query", data.query))
    for split, examples in splits:  # an episodic task's demos come with its queries: its support may be empty
        if not examples:
            raise ValueError(f"Task {task.name!r}: the {split} split is empty (files: {describe(layout)})")
        if not examples[0].image.is_file():
            raise ValueError(f"Task {task.name!r}: image {examples[0].image} of {split} example {examples[0].id!r} not found")
    # Scores and predictions are keyed by id: a repeated query id would silently drop queries from the metric.
    counts = Counter(str(e.id) for e in data.query)
    repeated = [e.id for e in data.query if counts[str(e.id)] > 1]
    if repeated:
        raise ValueError(
            f"Task {task.name!r}: the query split repeats ids {repeated[:5]} ({len(repeated)} examples; files: "
            f"{describe(layout)}); every evaluated example needs its own id."
        )
    return data


# ---------------------------------------------------------------------------------------------------- confinement
def image_roots(layout: dict[str, Path]) -> list[Path]:
    """The folders a task's images must lie in: the folders its layout names, else (a layout of files only, as
    custom's) the folders of its files."""
    folders = [path for path in layout.values() if path.is_dir()]
    return list(dict.fromkeys(folders or [path.parent for path in layout.values()]))


def confine_images(data: TaskData, label: str, roots: list[Path]) -> None:
    """Refuse (``OutsideDataRoot``) the first image of ``data`` (both splits, and binding's episode demos) whose path,
    symlinks followed, lies outside every folder of ``roots``; the error names its record (``Example.where``)."""
    inside = _Inside(roots)
    for split, examples in (("support", data.support), ("query", data.query)):
        for example, where in _with_demos(examples, label, split):
            if not inside(example.image):
                raise _outside_error(example.image, roots, where)


def _with_demos(examples: list[Example], label: str, split: str) -> Iterator[tuple[Example, str]]:
    for example in examples:
        where = example.where or f"Task {label!r}, {split} example {example.id!r}"
        yield example, where
        for index, demo in enumerate(example.demos):
            yield demo, f"{where}, demos[{index}]"


class _Inside:
    """``inside(path)``: whether ``path`` with its symlinks resolved lies in one of ``roots``.

    ``confined_path`` resolves every path from the root up; for the 443k images of VQAv2's training questions that
    takes seconds per split. Images share a few folders, so each folder is resolved once, and only the file itself
    is looked at (is it a symlink?) per image.
    """

    def __init__(self, roots: list[Path]):
        self.roots = [os.path.join(os.path.realpath(root), "") for root in roots]  # "/data/coco/": a prefix to match
        self._folders: dict[str, bool] = {}  # folder as written -> whether it lies in a root, resolved

    def __call__(self, path: Path) -> bool:
        text = os.fspath(path)
        folder, name = os.path.split(text)
        if name in ("", ".", "..") or os.path.islink(text):
            return self._resolved_inside(os.path.realpath(text))
        # A plain file (not a link) lies where its folder lies.
        if folder not in self._folders:
            self._folders[folder] = self._resolved_inside(os.path.realpath(folder))
        return self._folders[folder]

    def _resolved_inside(self, real: str) -> bool:
        return any(os.path.join(real, "").startswith(root) for root in self.roots)


def _outside_error(image: Path, roots: list[Path], where: str) -> OutsideDataRoot:
    """The shared message of ``flamingo.file_access`` for ``image``, said of the root it lies in by name (if any)."""
    # Absolute, but not normalised: the message shows the "../" that the data file wrote.
    image, roots = Path.cwd() / image, [Path.cwd() / root for root in roots]
    by_name = os.path.normpath(image)
    root = next((r for r in roots if by_name == str(r) or by_name.startswith(os.path.join(r, ""))), roots[0])
    try:
        confined_path(image, root, what=f"{where}: image")
    except OutsideDataRoot as error:
        return error
    # Not reached while _Inside and confined_path agree; if they ever do not, refusing is the safe answer.
    return OutsideDataRoot(f"{where}: image {image} leads outside the data folders {[str(r) for r in roots]}")
