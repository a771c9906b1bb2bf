"""The official-format readers read what the datasets ship, and fail with errors that name the file and field."""

import json
import shutil

import pytest

from flamingo_eval.data import default_layout, load_task_data
from flamingo_eval.tasks import task_names
from flamingo_eval.testing import write_fixture_data


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_fixture_data(tmp_path_factory.mktemp("eval-data"), num_support=8, num_query=6)


def _load(task, root, **kwargs):
    return load_task_data(task, data_dir=root, custom_kind="caption" if task == "custom" else None, **kwargs)


@pytest.mark.parametrize("task", task_names())
def test_every_task_loads_its_fixture_with_the_requested_split_sizes_and_existing_images(task, root):
    data = _load(task, root)
    assert data.task == task
    assert (len(data.support), len(data.query)) == (8, 6)
    assert all(e.image.is_file() for e in data.support + data.query)
    assert len({e.id for e in data.query}) == len(data.query)


def test_data_dir_may_be_the_root_or_the_task_folder(root):
    assert _load("vizwiz", root).query == _load("vizwiz", root / "vizwiz").query


def test_coco_reads_train_and_restval_as_support_test_as_query_and_skips_val(root):
    karpathy = json.loads((root / "coco" / "dataset_coco.json").read_text())["images"]
    data = _load("coco", root)
    by_split = {}
    for image in karpathy:
        by_split.setdefault(image["split"], []).append(image["cocoid"])
    assert [e.id for e in data.support] == by_split["train"] + by_split["restval"]
    assert [e.id for e in data.query] == by_split["test"]
    first = next(i for i in karpathy if i["split"] == "test")
    assert data.query[0].answers == tuple(s["raw"] for s in first["sentences"])
    assert data.query[0].image == root / "coco" / first["filepath"] / first["filename"]


def test_flickr_id_is_the_file_name_stem_as_an_int(root):
    data = _load("flickr30k", root)
    assert all(e.id == int(e.image.stem) for e in data.query)


def test_vqa_joins_annotations_to_questions_by_question_id_not_by_position(root):
    # The fixture lists the annotations in reverse order.
    questions = json.loads((root / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    annotations = json.loads((root / "vqav2" / "v2_mscoco_val2014_annotations.json").read_text())["annotations"]
    expected = {a["question_id"]: tuple(x["answer"] for x in a["answers"]) for a in annotations}
    data = _load("vqav2", root)
    assert [e.id for e in data.query] == [q["question_id"] for q in questions]
    assert all(e.answers == expected[e.id] and len(e.answers) == 10 for e in data.query)
    assert data.query[0].image.name == f"COCO_val2014_{questions[0]['image_id']:012d}.jpg"


def test_vqa_test_annotations_can_be_left_out_for_test_dev(root):
    data = _load("vqav2", root, paths={"test_annotations": ""})
    assert all(e.answers == () and e.question for e in data.query)


def test_vqa_test_dev_questions_name_their_images_after_the_test2015_folder(root, tmp_path):
    # v2_OpenEnded_mscoco_test-dev2015_questions.json says data_subtype "test-dev2015", but its images are test2015's.
    questions = json.loads((root / "vqav2" / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    questions["data_subtype"] = "test-dev2015"
    (tmp_path / "test-dev.json").write_text(json.dumps(questions))
    image_dir = tmp_path / "test2015"
    image_dir.mkdir()
    for q in questions["questions"]:
        shutil.copy(next((root / "vqav2" / "val2014").iterdir()), image_dir / f"COCO_test2015_{q['image_id']:012d}.jpg")
    paths = {"test_questions": str(tmp_path / "test-dev.json"), "test_annotations": ""}
    data = _load("vqav2", root, paths={**paths, "test_image_dir": str(image_dir)})
    assert all(e.image.is_file() and e.image.name.startswith("COCO_test2015_") for e in data.query)


def test_textvqa_and_vizwiz_read_their_native_formats(root):
    textvqa = _load("textvqa", root)
    assert all(e.image.parent.name == "train_images" and len(e.answers) == 10 for e in textvqa.query)
    vizwiz = _load("vizwiz", root)
    assert all(e.id == e.image.name and e.image.parent.name == "val" for e in vizwiz.query)


def test_hateful_memes_reads_labels_text_and_class_names_and_falls_back_to_dev_seen(root, tmp_path):
    data = _load("hateful_memes", root)
    assert data.class_names == ["no", "yes"] and {e.label for e in data.query} == {0, 1}
    assert all(e.text for e in data.query)
    shutil.copytree(root / "hateful_memes", tmp_path / "hm")
    (tmp_path / "hm" / "test_seen.jsonl").rename(tmp_path / "hm" / "dev_seen.jsonl")
    assert default_layout("hateful_memes", tmp_path / "hm")["test_jsonl"].name == "dev_seen.jsonl"
    assert [e.id for e in _load("hateful_memes", tmp_path / "hm").query] == [e.id for e in data.query]


def test_imagenet_labels_are_sorted_class_folder_indices_with_readable_names(root):
    data = _load("imagenet", root)
    names = json.loads((root / "imagenet" / "class_names.json").read_text())
    folders = sorted(names)
    assert data.class_names == [names[f] for f in folders]
    assert all(folders[e.label] == e.id.split("/")[0] for e in data.support + data.query)


def test_custom_jsonl_loads_as_captions_or_as_vqa(root):
    captions = load_task_data("custom", data_dir=root, custom_kind="caption")
    vqa = load_task_data("custom", data_dir=root, custom_kind="vqa")
    assert all(len(e.answers) == 2 and e.question is None for e in captions.query)
    assert all(len(e.answers) == 10 and e.question for e in vqa.query)


def test_repeated_query_ids_are_an_error_naming_them(root, tmp_path):
    # Scores are keyed by id: two test lines with one "id" once scored only the last of them, silently.
    shutil.copytree(root / "custom", tmp_path / "custom")
    lines = (tmp_path / "custom" / "test.jsonl").read_text().splitlines()
    lines = [json.dumps({**json.loads(line), "id": "same"}) for line in lines]
    (tmp_path / "custom" / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="repeats ids \\['same'"):
        _load("custom", tmp_path)


def test_custom_needs_a_kind(root):
    with pytest.raises(ValueError, match="custom_kind"):
        load_task_data("custom", data_dir=root)


def test_unknown_task_and_unknown_path_key_are_named():
    with pytest.raises(ValueError, match="Unknown task 'cocoa'"):
        load_task_data("cocoa", data_dir=".")
    with pytest.raises(ValueError, match="Unknown path keys \\['questions'\\]"):
        load_task_data("coco", data_dir=".", paths={"questions": "x"})


def test_missing_file_is_named(root, tmp_path):
    with pytest.raises(ValueError, match="karpathy_json: file .*nope.json not found"):
        load_task_data("coco", data_dir=root, paths={"karpathy_json": str(tmp_path / "nope.json")})


def test_bad_field_names_the_file_the_record_and_the_field(root, tmp_path):
    annotations = json.loads((root / "vqav2" / "v2_mscoco_val2014_annotations.json").read_text())
    del annotations["annotations"][2]["answers"]
    bad = tmp_path / "annotations.json"
    bad.write_text(json.dumps(annotations))
    with pytest.raises(ValueError, match=r"annotations.json, annotations\[2\]: missing field 'answers'"):
        load_task_data("vqav2", data_dir=root, paths={"test_annotations": str(bad)})


def test_malformed_json_and_jsonl_are_named_with_the_line(root, tmp_path):
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_task_data("textvqa", data_dir=root, paths={"test_json": str(tmp_path / "broken.json")})
    (tmp_path / "broken.jsonl").write_text('{"id": 1, "img": "x.png", "label": 0, "text": "t"}\nnot json\n')
    with pytest.raises(ValueError, match="broken.jsonl, line 2: not valid JSON"):
        load_task_data("hateful_memes", data_dir=root, paths={"test_jsonl": str(tmp_path / "broken.jsonl")})


def test_a_wrong_image_folder_fails_at_load_time(root, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="image .* of support example .* not found"):
        load_task_data("flickr30k", data_dir=root, paths={"image_dir": str(tmp_path / "empty")})


def test_fixture_writer_is_deterministic(tmp_path):
    a = write_fixture_data(tmp_path / "a", tasks=("coco", "vqav2"), seed=3)
    b = write_fixture_data(tmp_path / "b", tasks=("coco", "vqav2"), seed=3)
    for name in ("coco/dataset_coco.json", "vqav2/v2_mscoco_val2014_annotations.json"):
        assert (a / name).read_text() == (b / name).read_text()
    image = "vqav2/val2014/COCO_val2014_000000001500.jpg"
    assert (a / image).read_bytes() == (b / image).read_bytes()


def test_release_folder_name_variants_are_found(root, tmp_path):
    shutil.copytree(root / "flickr30k", tmp_path / "f")
    (tmp_path / "f" / "flickr30k_images").rename(tmp_path / "f" / "flickr30k-images")
    assert [e.id for e in _load("flickr30k", tmp_path / "f").query] == [e.id for e in _load("flickr30k", root).query]
    shutil.copytree(root / "vizwiz", tmp_path / "v")
    (tmp_path / "v" / "Annotations").mkdir()
    for name in ("train.json", "val.json"):
        (tmp_path / "v" / name).rename(tmp_path / "v" / "Annotations" / name)
    assert _load("vizwiz", tmp_path / "v").query == [
        e.__class__(**{**e.__dict__, "image": tmp_path / "v" / "val" / e.image.name}) for e in _load("vizwiz", root).query
    ]


def test_hateful_memes_image_dir_may_point_at_the_img_folder_as_in_openflamingo(root):
    data = _load("hateful_memes", root, paths={"image_dir": str(root / "hateful_memes" / "img")})
    assert [e.image for e in data.query] == [e.image for e in _load("hateful_memes", root).query]


def test_imagenet_class_names_may_be_a_list_in_sorted_folder_order(tmp_path):
    root = write_fixture_data(tmp_path / "data", tasks=("imagenet",), num_support=4, num_query=3)
    names_file = root / "imagenet" / "class_names.json"
    mapping = json.loads(names_file.read_text())
    expected = load_task_data("imagenet", data_dir=root).class_names
    names_file.write_text(json.dumps([mapping[folder] for folder in sorted(mapping)]))
    assert load_task_data("imagenet", data_dir=root).class_names == expected
    names_file.write_text(json.dumps(list(mapping.values())[:-1]))
    with pytest.raises(ValueError, match=r"class_names\.json: lists \d+ class names for \d+ class folders"):
        load_task_data("imagenet", data_dir=root)
