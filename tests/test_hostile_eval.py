"""Hostile and careless evaluation inputs (issue 25): image paths that leave their data folder, ids repeated in
official files, booleans where numbers belong, files that are not UTF-8, outputs that cannot be written, and two runs
on one output. Each is refused with one line naming the file and the record (``flamingo-eval`` exits 2), before any
work where that is possible."""

from __future__ import annotations

import codecs
import dataclasses
import fcntl
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flamingo_eval.cli import main
from flamingo_eval.data import load_task_data
from flamingo_eval.score import prediction_record, score_files, write_predictions
from flamingo_eval.testing import write_fixture_data

TASKS = ("coco", "flickr30k", "vqav2", "textvqa", "vizwiz", "hateful_memes", "imagenet", "custom")


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    return write_fixture_data(tmp_path_factory.mktemp("hostile"), tasks=TASKS, num_support=4, num_query=3)


@pytest.fixture
def root(fixture_root, tmp_path):
    """A copy of the fixture data that a test may damage."""
    return Path(shutil.copytree(fixture_root, tmp_path / "data"))


def _load(task, root, **kwargs):
    return load_task_data(task, data_dir=root, custom_kind="caption" if task == "custom" else None, **kwargs)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=1))


def _edit_jsonl(path: Path, edit) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    edit(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _outside_image(root: Path) -> Path:
    """A real image file outside the data folder (the thing a hostile path would read)."""
    image = root.parent / "private" / "photo.jpg"
    image.parent.mkdir()
    shutil.copy(next((root / "coco" / "val2014").iterdir()), image)
    return image


def _run_cli(capsys, argv) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.splitlines()


def _score(capsys, task: str, predictions: Path, annotations: Path, *more) -> tuple[int, list[str]]:
    """``flamingo-eval score``: its exit code and stderr lines."""
    argv = ["score", "--task", task, "--predictions", predictions, "--annotations", annotations, *more]
    return _run_cli(capsys, list(map(str, argv)))


def _refuses(code: int, err: list[str], *pieces: str) -> None:
    """Exit 2 with one line, ``flamingo-eval: error: ...``, that holds every piece."""
    assert code == 2 and len(err) == 1 and err[0].startswith("flamingo-eval: error: "), (code, err)
    for piece in pieces:
        assert piece in err[0], (piece, err[0])


# ------------------------------------------------------------------------------------------------ image paths
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_custom_image_path_out_of_its_folder_is_refused_naming_the_file_line_and_path(root, how):
    outside = _outside_image(root)
    folder = root / "custom"
    if how == "symlink":
        (folder / "images" / "link.jpg").symlink_to(outside)
    value = {"dotdot": "../../private/photo.jpg", "absolute": str(outside), "symlink": "images/link.jpg"}[how]
    _edit_jsonl(folder / "test.jsonl", lambda records: records[1].update(image=value))
    with pytest.raises(ValueError) as error:
        _load("custom", root)
    message = str(error.value)
    assert message.startswith(f"{folder / 'test.jsonl'}, line 2: image ")
    assert value.split("/")[-1] in message and f"leads outside the data folder {folder}" in message
    assert "--allow-outside-paths" in message and ("through a symlink" in message) == (how == "symlink")


def test_allow_outside_paths_reads_such_images_as_written(root):
    outside = _outside_image(root)
    _edit_jsonl(root / "custom" / "test.jsonl", lambda records: records[1].update(image=str(outside)))
    assert _load("custom", root, allow_outside_paths=True).query[1].image == outside


# Each reader builds its image paths from a string in a data file: task, file, how it is damaged (a path that leaves
# the --data-dir folder for the private image beside it), the record named.
DAMAGES = {
    "coco": ("dataset_coco.json", lambda d: d["images"][1].update(filepath="../../private"), r"images\[1\]"),
    "flickr30k": ("dataset_flickr30k.json", lambda d: d["images"][1].update(filename="../../../private/photo.jpg"),
                  r"images\[1\]"),
    "vqav2": ("v2_OpenEnded_mscoco_train2014_questions.json", lambda d: d.update(data_subtype="../../../../../private"),
              r"questions\[0\]"),
    "textvqa": ("TextVQA_0.5.1_train.json", lambda d: d["data"][1].update(image_id="../../../private/photo"),
                r"data\[1\]"),
    "vizwiz": ("train.json", lambda d: d[1].update(image="../../../private/photo.jpg"), r"\[1\]"),
}


@pytest.mark.parametrize("task", sorted(DAMAGES))
def test_benchmark_readers_keep_images_and_demo_images_inside_the_image_folders(root, task):
    _outside_image(root)
    name, damage, record = DAMAGES[task]
    _edit_json(root / task / name, damage)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}, {record}: image .* leads outside the data folder"):
        _load(task, root)
    if task != "vqav2":  # its escaped path runs through a folder "COCO_.." that does not exist: nothing to read
        _load(task, root, allow_outside_paths=True)  # the flag reads them as written


def test_hateful_memes_and_imagenet_images_are_confined_too(root):
    outside = _outside_image(root)
    _edit_jsonl(root / "hateful_memes" / "train.jsonl", lambda records: records[2].update(img=str(outside)))
    with pytest.raises(ValueError, match=r"train.jsonl, line 3: image .*photo.jpg' leads outside"):
        _load("hateful_memes", root)
    victim = sorted((root / "imagenet" / "val").rglob("*.JPEG"))[1]
    victim.unlink()
    victim.symlink_to(outside)
    with pytest.raises(ValueError, match=rf"query example '{victim.parent.name}/{victim.name}': image .* leads outside "
                                         rf"the data folder .*val through a symlink"):
        _load("imagenet", root)


def test_binding_episode_demo_images_are_confined_too(root, tmp_path):
    binding = write_fixture_data(tmp_path / "binding", tasks=["custom"], num_support=2, num_query=2) / "binding"
    assert _outside_image(root).parent == binding.parent.parent / "private"  # beside the binding data folder
    _edit_jsonl(binding / "test.jsonl", lambda records: records[1]["demos"][2].update(image="../../private/photo.jpg"))
    with pytest.raises(ValueError, match=r"query example 'test-ep1', demos\[2\]: image .*photo.jpg' leads outside"):
        load_task_data("custom", custom_kind="binding", data_dir=binding.parent)


def test_flamingo_eval_run_exits_2_on_an_outside_image_and_runs_with_allow_outside_paths(root, tmp_path, capsys):
    outside = _outside_image(root)
    _edit_jsonl(root / "custom" / "test.jsonl", lambda records: records[1].update(image=str(outside)))
    argv = ["run", "--model", "micro", "--tasks", "custom", "--custom-kind", "caption", "--shots", "0",
            "--data-dir", str(root), "--batch-size", "3", "--max-new-tokens", "2", "--output", str(tmp_path / "r.json")]
    code, err = _run_cli(capsys, argv)
    _refuses(code, err, f"{root / 'custom' / 'test.jsonl'}, line 2: image", "leads outside the data folder")
    assert main([*argv, "--allow-outside-paths"]) == 0


# ------------------------------------------------------------------------------------------------ repeated ids
def _repeat(records: list, index: int = 1, **changes) -> None:
    """Append a copy of ``records[index]`` (with ``changes``): the same id, told twice."""
    records.append({**records[index], **changes})


# The run's readers: a repeat in the support split (the demo pool) is refused as well as one in the query split.
RUN_REPEATS = {
    "coco": ("dataset_coco.json", lambda d: _repeat(d["images"], sentences=[{"raw": "other"}]), "cocoid 101"),
    "flickr30k": ("dataset_flickr30k.json", lambda d: _repeat(d["images"]), "image id (the file name's stem)"),
    "vqav2-annotations": ("v2_mscoco_val2014_annotations.json",
                          lambda d: _repeat(d["annotations"], answers=[{"answer": "no"}] * 10), "question_id"),
    "vqav2-questions": ("v2_OpenEnded_mscoco_train2014_questions.json", lambda d: _repeat(d["questions"]),
                        "question_id"),
    "textvqa": ("TextVQA_0.5.1_train.json", lambda d: _repeat(d["data"]), "question_id 1"),
    "vizwiz": ("train.json", lambda d: _repeat(d), "image 'VizWiz_train_00000001.jpg'"),
}


@pytest.mark.parametrize("case", sorted(RUN_REPEATS))
def test_an_id_repeated_in_an_official_file_is_refused_by_the_run_naming_the_file_and_id(root, case):
    task = case.split("-")[0]
    name, repeat, named = RUN_REPEATS[case]
    _edit_json(root / task / name, repeat)
    with pytest.raises(ValueError, match=rf"{re.escape(name)}, .*: {re.escape(named)}.* appears more than once"):
        _load(task, root)


def test_a_repeated_hateful_memes_id_is_refused_naming_the_file_and_line(root):
    _edit_jsonl(root / "hateful_memes" / "train.jsonl", lambda records: _repeat(records, label=1 - records[1]["label"]))
    with pytest.raises(ValueError, match=r"train.jsonl, line 5: id 10001 appears more than once \(first at .*line 2\)"):
        _load("hateful_memes", root)


@pytest.fixture(scope="module")
def predictions(fixture_root, tmp_path_factory):
    """task -> a predictions file for its query split, as the runner writes it."""
    folder, files = tmp_path_factory.mktemp("predictions"), {}
    for task in ("coco", "vqav2", "textvqa", "vizwiz", "hateful_memes"):
        queries = _load(task, fixture_root).query
        records = [prediction_record(task, e, 0.5 if task == "hateful_memes" else "a dog") for e in queries]
        files[task] = write_predictions(task, records, folder / f"{task}.json")
    return files


def _coco_format(data: dict) -> dict:
    """A COCO-format captions file of the Karpathy test split, one record (with its own id) per caption."""
    test = [image for image in data["images"] if image["split"] == "test"]
    captions = [(image["cocoid"], s["raw"]) for image in test for s in image["sentences"]]
    return {"annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(captions)]}


# The scorer's readers: task, annotation file (in the task folder), how it is repeated, and the id field named.
SCORE_REPEATS = {
    "coco-karpathy": ("coco", "dataset_coco.json", lambda d: _repeat(d["images"], index=-1), "cocoid"),
    "coco-captions": ("coco", "captions.json", lambda d: _repeat(d["annotations"], caption="other"), "id"),
    "vqav2": ("vqav2", "v2_mscoco_val2014_annotations.json",
              lambda d: _repeat(d["annotations"], answers=[{"answer": "no"}] * 10), "question_id"),
    "textvqa": ("textvqa", "TextVQA_0.5.1_val.json", lambda d: _repeat(d["data"]), "question_id"),
    "vizwiz": ("vizwiz", "val.json", lambda d: _repeat(d), "image"),
}


@pytest.mark.parametrize("case", sorted(SCORE_REPEATS))
def test_flamingo_eval_score_refuses_an_id_repeated_in_the_annotations(root, predictions, case, capsys):
    task, name, repeat, field = SCORE_REPEATS[case]
    if name == "captions.json":
        karpathy = json.loads((root / task / "dataset_coco.json").read_text())
        (root / task / name).write_text(json.dumps(_coco_format(karpathy)))
    _edit_json(root / task / name, repeat)
    code, err = _score(capsys, task, predictions[task], root / task / name)
    _refuses(code, err, str(root / task / name), f": {field} ", "appears more than once")


def test_flamingo_eval_score_refuses_repeats_in_a_questions_file_and_a_labels_file(root, predictions, capsys):
    questions = root / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json"
    _edit_json(questions, lambda d: _repeat(d["questions"]))
    annotations = root / "vqav2" / "v2_mscoco_val2014_annotations.json"
    code, err = _score(capsys, "vqav2", predictions["vqav2"], annotations, "--questions", questions)
    _refuses(code, err, f"{questions}, questions[3]: question_id", "appears more than once")
    labels = root / "hateful_memes" / "test_seen.jsonl"
    _edit_jsonl(labels, lambda records: _repeat(records, label=1 - records[1]["label"]))
    code, err = _score(capsys, "hateful_memes", predictions["hateful_memes"], labels)
    _refuses(code, err, f"{labels}, line 4: id 20001 appears more than once")


# ------------------------------------------------------------------------------------------------ booleans
@pytest.mark.parametrize(
    "task,name,damage,message",
    [
        ("hateful_memes", "train.jsonl", lambda r: r[0].update(label=True),
         "train.jsonl, line 1: field 'label' should be int, got bool"),
        ("vqav2", "v2_OpenEnded_mscoco_train2014_questions.json", lambda d: d["questions"][0].update(image_id=True),
         "questions[0]: field 'image_id' should be int, got bool"),
        ("vqav2", "v2_mscoco_val2014_annotations.json", lambda d: d["annotations"][0].update(question_id=True),
         "annotations[0]: field 'question_id' should be int or str, got bool"),
        ("custom", "train.jsonl", lambda r: r[1].update(id=False),
         "train.jsonl, line 2: field 'id' should be int or str, got bool"),
    ],
    ids=["label", "image_id", "question_id", "custom-id"],
)
def test_a_boolean_where_a_number_or_id_belongs_is_refused_by_the_run_naming_file_and_field(root, task, name, damage,
                                                                                             message):
    (_edit_jsonl if name.endswith(".jsonl") else _edit_json)(root / task / name, damage)
    with pytest.raises(ValueError, match=re.escape(message)):
        _load(task, root)


def test_a_custom_vqa_record_with_no_answers_or_a_boolean_answer_is_refused_naming_the_line(root):
    test = root / "custom" / "test.jsonl"
    for answers in ([], ["yes", True]):
        _edit_jsonl(test, lambda records: records[2].update(answers=answers))
        with pytest.raises(ValueError, match=r"test.jsonl, line 3: 'answers' should be a non-empty list of strings"):
            load_task_data("custom", custom_kind="vqa", data_dir=root)


def test_a_boolean_label_score_or_id_is_refused_by_the_scorer(root, predictions, tmp_path, capsys):
    labels = root / "hateful_memes" / "test_seen.jsonl"
    good_labels = labels.read_text()
    _edit_jsonl(labels, lambda records: records[0].update(label=True))
    code, err = _score(capsys, "hateful_memes", predictions["hateful_memes"], labels)
    _refuses(code, err, f"{labels}, line 1: field 'label' should be int, got bool")
    labels.write_text(good_labels)
    for task, field, value, annotations, expected in (
        ("hateful_memes", "score", True, labels, "field 'score' should be int or float, got bool"),
        ("vqav2", "question_id", True, root / "vqav2" / "v2_mscoco_val2014_annotations.json",
         "field 'question_id' should be int or str, got bool"),
    ):
        records = json.loads(predictions[task].read_text())
        records[1][field] = value
        (tmp_path / f"{task}.json").write_text(json.dumps(records))
        code, err = _score(capsys, task, tmp_path / f"{task}.json", annotations)
        _refuses(code, err, f"{tmp_path / f'{task}.json'}, record 1: {expected}")


# ------------------------------------------------------------------------------------------------ encodings
def _insert_byte(path: Path, line: int, byte: bytes = b"\xff") -> None:
    """Put one byte that is not UTF-8 inside the first string of ``line`` (1-based)."""
    lines = path.read_bytes().split(b"\n")
    quote = lines[line - 1].index(b'"') + 1
    lines[line - 1] = lines[line - 1][:quote] + byte + lines[line - 1][quote:]
    path.write_bytes(b"\n".join(lines))


def test_a_byte_that_is_not_utf8_is_refused_naming_the_file_and_line_in_jsonl_and_json(root):
    _insert_byte(root / "custom" / "test.jsonl", 3)
    with pytest.raises(ValueError, match=r"test.jsonl, line 3: not valid UTF-8 \(byte 0xff at byte 3 of the line\)"):
        _load("custom", root)
    annotations = root / "vqav2" / "v2_mscoco_val2014_annotations.json"
    _insert_byte(annotations, 7, b"\xc3(")  # a lead byte without its continuation
    with pytest.raises(ValueError, match=r"v2_mscoco_val2014_annotations.json, line 7: not valid UTF-8 \(byte 0xc3"):
        _load("vqav2", root)


def test_flamingo_eval_score_refuses_a_bad_byte_instead_of_dropping_the_line(root, predictions, capsys):
    labels = root / "hateful_memes" / "test_seen.jsonl"
    _insert_byte(labels, 2)
    code, err = _score(capsys, "hateful_memes", predictions["hateful_memes"], labels)
    _refuses(code, err, f"{labels}, line 2: not valid UTF-8")


@pytest.mark.parametrize("encoding,name", [("utf-16", "UTF-16 (little-endian)"), ("utf-16-be", "UTF-16 (big-endian)"),
                                           ("utf-32", "UTF-32 (little-endian)")])
def test_a_utf16_or_utf32_file_is_refused_naming_its_encoding(root, encoding, name):
    for path in (root / "custom" / "test.jsonl", root / "coco" / "dataset_coco.json"):
        path.write_text(path.read_text(), encoding=encoding)  # "utf-16": with a BOM; "utf-16-be": without
        task = path.parent.name
        expected = f"{path}: the file is encoded in {name}, not UTF-8; convert it to UTF-8"
        with pytest.raises(ValueError, match=re.escape(expected)):
            _load(task, root)


def _add_bom(path: Path) -> None:
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes())


def _as_read(task: str, root: Path) -> list:
    """Both splits of ``task``, with image paths relative to ``root``: two copies of the data compare equal."""
    data = _load(task, root)
    return [dataclasses.replace(e, image=e.image.relative_to(root)) for e in data.support + data.query]


def test_a_utf8_bom_is_read_in_every_evaluation_file_of_the_run_and_the_scorer(fixture_root, root, predictions,
                                                                                 tmp_path):
    for task in ("coco", "vqav2", "hateful_memes", "custom"):
        for path in sorted((root / task).glob("*.json*")):
            _add_bom(path)
        assert _as_read(task, root) == _as_read(task, fixture_root)
    labels = "hateful_memes/test_seen.jsonl"
    plain = score_files("hateful_memes", predictions["hateful_memes"], fixture_root / labels)
    with_bom = tmp_path / "predictions.json"
    with_bom.write_bytes(codecs.BOM_UTF8 + predictions["hateful_memes"].read_bytes())
    assert score_files("hateful_memes", with_bom, root / labels) == plain


# ------------------------------------------------------------------------------------------------ outputs
@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is loaded: output problems must be found before."""
    import flamingo_eval.runner

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(flamingo_eval.runner, "load_model", load_model)


def _run_argv(fixture_root, *more) -> list[str]:
    argv = ["run", "--model", "micro", "--tasks", "coco", "--shots", "0", "--data-dir", fixture_root, *more]
    return list(map(str, argv))


def test_run_refuses_an_output_that_is_a_folder_before_the_model_loads(fixture_root, tmp_path, no_model, capsys):
    code, err = _run_cli(capsys, _run_argv(fixture_root, "--output", tmp_path))
    _refuses(code, err, f"--output {tmp_path}: is a folder; name the results file")


def test_run_refuses_an_output_or_predictions_dir_below_a_file_before_the_model_loads(fixture_root, tmp_path, no_model,
                                                                                        capsys):
    # Below a regular file nothing can be written, root or not.
    blocker = tmp_path / "somefile"
    blocker.write_text("x")
    code, err = _run_cli(capsys, _run_argv(fixture_root, "--output", blocker / "results.json"))
    _refuses(code, err, f"--output {blocker / 'results.json'}: {blocker} is a file, not a folder")
    argv = _run_argv(fixture_root, "--output", tmp_path / "r.json", "--predictions-dir", blocker / "preds")
    code, err = _run_cli(capsys, argv)
    _refuses(code, err, f"--predictions-dir {blocker / 'preds'}: {blocker} is a file, not a folder")
    assert not (tmp_path / "r.json").exists()


def test_run_refuses_an_output_in_a_folder_nobody_can_write_in(fixture_root, no_model, capsys):
    # /proc takes no new files, whatever the user (root included): writability is tried, not read off the mode bits.
    code, err = _run_cli(capsys, _run_argv(fixture_root, "--output", "/proc/flamingo-results.json"))
    _refuses(code, err, "--output /proc/flamingo-results.json: cannot write in /proc (")


def test_the_evaluator_checks_its_output_before_it_touches_the_model(fixture_root, tmp_path):
    from flamingo_eval.runner import EvalConfig, Evaluator

    (tmp_path / "somefile").write_text("x")
    config = EvalConfig(model=None, tasks=["coco"], data_dir=fixture_root, output=tmp_path / "somefile" / "r.json")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        Evaluator(config, model=object(), processor=None)  # not a model: touching it would fail otherwise


# ------------------------------------------------------------------------------------------------ the output lock
def test_two_holders_of_one_output_lock_conflict_until_the_first_releases(tmp_path):
    from flamingo_eval.results import OutputLock

    output = tmp_path / "results.json"
    first = OutputLock(output).acquire()
    # flock locks belong to an open file, not a process: a second open in this same process is refused like another run.
    with pytest.raises(ValueError, match=re.escape(f"its lock {output}.lock is held (by pid ")):
        OutputLock(output).acquire()
    first.release()
    with OutputLock(output) as second:
        assert second.held
    assert not second.held


def test_a_second_run_on_a_locked_output_exits_2_naming_the_lock_before_the_model_loads(fixture_root, tmp_path,
                                                                                          no_model, capsys):
    output = tmp_path / "results.json"
    with open(f"{output}.lock", "a") as other_run:  # another run's lock, taken as any process would take it
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code, err = _run_cli(capsys, _run_argv(fixture_root, "--output", output))
    _refuses(code, err, f"--output {output}: another run is using it: its lock {output}.lock is held")
    assert not output.exists()


def test_the_output_lock_goes_with_its_holder_when_that_process_is_killed(tmp_path):
    from flamingo_eval.results import OutputLock

    output = tmp_path / "results.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom flamingo_eval.results import OutputLock\n"
         "lock = OutputLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(60)", str(output)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=re.escape(f"is held (by pid {holder.pid} on ")):
            OutputLock(output).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    OutputLock(output).acquire().release()
