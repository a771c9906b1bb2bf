"""Score mode reads the official results and annotation formats and gives the papers' metrics."""

import json
import random

import pytest
from ea_helpers import pairwise_auc, reference_cider

from flamingo_eval.data import load_task_data
from flamingo_eval.metrics.vqa import question_accuracy
from flamingo_eval.score import prediction_record, score_files, score_records, write_predictions
from flamingo_eval.testing import write_fixture_data


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_fixture_data(tmp_path_factory.mktemp("eval-score"), num_support=4, num_query=12, seed=1)


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


def _guess(example, rng):
    """A prediction that is sometimes right, sometimes a near miss, sometimes wrong."""
    answers = list(example.answers)
    return rng.choice([answers[0], answers[-1].upper() + ".", "something else"])


@pytest.mark.parametrize("task,annotation", [("coco", "coco/dataset_coco.json"), ("flickr30k", "flickr30k/dataset_flickr30k.json")])
def test_caption_score_equals_pycocoevalcap_on_the_karpathy_test_split(task, annotation, root, tmp_path):
    data = load_task_data(task, data_dir=root)
    rng = random.Random(0)
    records = [prediction_record(task, e, _guess(e, rng)) for e in data.query]
    path = write_predictions(task, records, tmp_path / "results.json")
    expected = reference_cider({r["image_id"]: r["caption"] for r in records}, {e.id: list(e.answers) for e in data.query})
    assert score_files(task, path, root / annotation, None) == {"cider": pytest.approx(expected, rel=1e-12)}
    assert score_records(task, records, data.query) == score_files(task, path, root / annotation, None)


def test_caption_score_reads_a_coco_format_annotation_file_too(root, tmp_path):
    data = load_task_data("coco", data_dir=root)
    captions = [(e.id, c) for e in data.query for c in e.answers]
    coco_format = {"annotations": [{"image_id": i, "caption": c, "id": k} for k, (i, c) in enumerate(captions)]}
    annotations = _write(tmp_path / "captions_test.json", coco_format)
    records = [prediction_record("coco", e, e.answers[1]) for e in data.query]
    path = write_predictions("coco", records, tmp_path / "results.json")
    assert score_files("coco", path, annotations, None) == score_files("coco", path, root / "coco/dataset_coco.json", None)


@pytest.mark.parametrize(
    "task,annotation,questions",
    [
        ("vqav2", "vqav2/v2_mscoco_val2014_annotations.json", "vqav2/v2_OpenEnded_mscoco_val2014_questions.json"),
        ("vqav2", "vqav2/v2_mscoco_val2014_annotations.json", None),
        ("textvqa", "textvqa/TextVQA_0.5.1_val.json", None),
        ("vizwiz", "vizwiz/val.json", None),
    ],
)
def test_vqa_score_is_the_mean_official_question_accuracy(task, annotation, questions, root, tmp_path):
    data = load_task_data(task, data_dir=root)
    rng = random.Random(2)
    records = [prediction_record(task, e, _guess(e, rng)) for e in data.query]
    path = write_predictions(task, records, tmp_path / "results.json")
    expected = 100 * sum(question_accuracy(r["answer"], e.answers) for r, e in zip(records, data.query)) / len(records)
    result = score_files(task, path, root / annotation, root / questions if questions else None)
    assert result == {
        "accuracy": pytest.approx(expected, rel=1e-12),
        "vqa_rule": "official-10",  # ten human answers per question, as released
        "vqa_rule_counts": {"official-10": len(records)},
    }
    assert 0 < result["accuracy"] < 100  # the guesses mix hits and misses, so the check is not vacuous


def test_okvqa_score_stems_predictions_and_vqav2_does_not(tmp_path):
    # OK-VQA's annotation answers are stemmed ("dog", "ski"); predictions are stemmed to match.
    answers = {1: ["dog"] * 10, 2: ["ski"] * 7 + ["snow"] * 3}
    annotations = _write(tmp_path / "annotations.json", {"annotations": [
        {"question_id": q, "answers": [{"answer": a} for a in human]} for q, human in answers.items()]})
    results = _write(tmp_path / "results.json", [{"question_id": 1, "answer": "dogs"}, {"question_id": 2, "answer": "skiing"}])
    assert score_files("okvqa", results, annotations, None)["accuracy"] == 100.0
    assert score_files("vqav2", results, annotations, None)["accuracy"] == 0.0


def test_okvqa_score_without_the_stemming_packages_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import flamingo_eval.metrics.okvqa_stem as okvqa_stem
    from flamingo_eval.cli import main

    def missing():
        raise ImportError("OK-VQA stemming needs nltk and inflection")

    monkeypatch.setattr(okvqa_stem, "_backend", missing)
    annotation = {"question_id": 1, "answers": [{"answer": "dog"}]}
    annotations = _write(tmp_path / "annotations.json", {"annotations": [annotation]})
    results = _write(tmp_path / "results.json", [{"question_id": 1, "answer": "dogs"}])
    args = ["score", "--task", "okvqa", "--predictions", str(results), "--annotations", str(annotations)]
    assert main(args) == 2
    assert "needs nltk and inflection" in capsys.readouterr().err


def test_hateful_memes_score_is_roc_auc_of_the_yes_probability(root, tmp_path):
    data = load_task_data("hateful_memes", data_dir=root)
    rng = random.Random(3)
    records = [prediction_record("hateful_memes", e, round(rng.random(), 1)) for e in data.query]
    path = write_predictions("hateful_memes", records, tmp_path / "results.json")
    expected = pairwise_auc([e.label for e in data.query], [r["score"] for r in records])
    assert score_files("hateful_memes", path, root / "hateful_memes/test_seen.jsonl", None) == {"roc_auc": pytest.approx(expected)}


def test_ids_match_by_value_whatever_their_json_type(root, tmp_path):
    data = load_task_data("vqav2", data_dir=root)
    records = [{"question_id": str(e.id), "answer": e.answers[0]} for e in data.query]
    ints = [{"question_id": e.id, "answer": e.answers[0]} for e in data.query]
    annotations = root / "vqav2/v2_mscoco_val2014_annotations.json"
    assert score_files("vqav2", _write(tmp_path / "s.json", records), annotations, None) == score_files(
        "vqav2", _write(tmp_path / "i.json", ints), annotations, None
    )


# ----------------------------------------------------------------------------------------------- errors
@pytest.fixture
def coco(root):
    return load_task_data("coco", data_dir=root), root / "coco/dataset_coco.json"


def test_missing_predictions_file_is_named(coco, tmp_path):
    _, annotations = coco
    with pytest.raises(ValueError, match="predictions: file .*missing.json not found"):
        score_files("coco", tmp_path / "missing.json", annotations, None)


def test_predictions_that_are_not_a_list_are_rejected(coco, tmp_path):
    _, annotations = coco
    with pytest.raises(ValueError, match="results.json: expected a JSON list of records, got dict"):
        score_files("coco", _write(tmp_path / "results.json", {"image_id": 1}), annotations, None)


def test_a_record_without_caption_names_the_record_and_the_field(coco, tmp_path):
    data, annotations = coco
    records = [{"image_id": e.id, "caption": "a dog"} for e in data.query]
    records[3] = {"image_id": data.query[3].id, "text": "a dog"}
    with pytest.raises(ValueError, match="results.json, record 3: missing field 'caption'"):
        score_files("coco", _write(tmp_path / "results.json", records), annotations, None)


def test_predictions_missing_annotated_ids_name_some_of_them(coco, tmp_path):
    data, annotations = coco
    records = [{"image_id": e.id, "caption": "a dog"} for e in data.query[2:]]
    with pytest.raises(ValueError, match=rf"no prediction for 2 of the 12 items .* e.g. ids \['{data.query[0].id}', '{data.query[1].id}'\]"):
        score_files("coco", _write(tmp_path / "results.json", records), annotations, None)


def test_predictions_for_unknown_ids_are_rejected(coco, tmp_path):
    data, annotations = coco
    records = [{"image_id": e.id, "caption": "a dog"} for e in data.query] + [{"image_id": 999999, "caption": "x"}]
    with pytest.raises(ValueError, match=r"1 prediction\(s\) for ids that .* does not have, e.g. \['999999'\]"):
        score_files("coco", _write(tmp_path / "results.json", records), annotations, None)


def test_duplicate_predictions_are_rejected(coco, tmp_path):
    data, annotations = coco
    records = [{"image_id": e.id, "caption": "a dog"} for e in data.query] + [{"image_id": data.query[0].id, "caption": "x"}]
    with pytest.raises(ValueError, match="appears more than once"):
        score_files("coco", _write(tmp_path / "results.json", records), annotations, None)


def test_annotations_in_an_unknown_format_are_named(coco, tmp_path):
    data, _ = coco
    records = [{"image_id": e.id, "caption": "a dog"} for e in data.query]
    with pytest.raises(ValueError, match="bad.json: expected a COCO-format captions file"):
        score_files("coco", _write(tmp_path / "results.json", records), _write(tmp_path / "bad.json", {"foo": []}), None)


def test_unscorable_task_is_named(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        score_files("imagenet", tmp_path / "a.json", tmp_path / "b.json", None)
    refused = r"task must be one of .*custom \(custom_kind caption \| vqa\), got 'custom \(binding\)'"
    with pytest.raises(ValueError, match=refused):
        score_files("custom", tmp_path / "a.json", tmp_path / "b.json", custom_kind="binding")


def test_predictions_with_non_ascii_text_are_written_under_a_c_locale(root, tmp_path):
    # A batch job without LANG writes files as ASCII: a caption with "é" once crashed the end of a finished trial.
    import subprocess
    import sys

    script = (
        "from flamingo_eval.score import write_predictions; "
        f"write_predictions('coco', [{{'image_id': 1, 'caption': 'un caf\\u00e9'}}], {str(tmp_path / 'p.json')!r})"
    )
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    assert json.loads((tmp_path / "p.json").read_text(encoding="utf-8")) == [{"image_id": 1, "caption": "un caf\u00e9"}]


@pytest.mark.parametrize("task,annotation", [("coco", "coco/dataset_coco.json"), ("vqav2", "vqav2/v2_mscoco_val2014_annotations.json")])
def test_subset_scores_only_the_predicted_items_as_if_the_annotations_held_only_those(task, annotation, root, tmp_path):
    # A --num-samples run predicts a subset; COCOEvalCap likewise scores only the images in the results file.
    data = load_task_data(task, data_dir=root)
    rng = random.Random(3)
    records = [prediction_record(task, e, _guess(e, rng)) for e in data.query[::2]]
    path = write_predictions(task, records, tmp_path / "results.json")
    kept = data.query[::2]
    if task == "coco":
        refs = {e.id: list(e.answers) for e in kept}
        expected = {"cider": pytest.approx(reference_cider({r["image_id"]: r["caption"] for r in records}, refs), rel=1e-12)}
    else:
        accuracy = 100 * sum(question_accuracy(r["answer"], e.answers) for r, e in zip(records, kept)) / len(kept)
        expected = {"accuracy": pytest.approx(accuracy, rel=1e-12), "vqa_rule": "official-10",
                    "vqa_rule_counts": {"official-10": len(kept)}}
    assert score_files(task, path, root / annotation, None, subset=True) == expected
    with pytest.raises(ValueError, match="no prediction for"):
        score_files(task, path, root / annotation, None)



# ----------------------------------------------------------------------------------------------- custom files
def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _score_cli(capsys, *args):
    from flamingo_eval.cli import main

    code = main(["score", *map(str, args)])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else captured.err)


def test_custom_vqa_test_jsonl_scores_through_the_cli_with_exact_match_below_ten_answers(tmp_path, capsys):
    # The file `run --tasks custom --custom-kind vqa` reads: "answer" or "answers", ids default to the line index.
    annotations = _jsonl(tmp_path / "test.jsonl", [
        {"question_id": "q1", "image": "a.jpg", "question": "What colour?", "answer": "red"},
        {"question_id": "q2", "image": "b.jpg", "question": "How many?", "answers": ["2", "3"]},
        {"question_id": "q3", "image": "c.jpg", "question": "What animal?", "answer": "cat"},
        {"question_id": "q4", "image": "d.jpg", "question": "Is it day?", "answers": ["yes"] * 10},
    ])
    predictions = _write(tmp_path / "custom-0shot-seed42.json", [
        {"question_id": "q1", "answer": "Red"},  # right, after the official normalisation
        {"question_id": "q2", "answer": "three"},  # matches the second answer
        {"question_id": "q3", "answer": "dog"},  # wrong
        {"question_id": "q4", "answer": "yes"},
    ])
    code, result = _score_cli(capsys, "--task", "custom", "--custom-kind", "vqa", "--predictions", predictions,
                              "--annotations", annotations)
    assert code == 0
    counts = {"exact-match-any": 3, "official-10": 1}
    assert result == {"accuracy": 75.0, "vqa_rule": "mixed", "vqa_rule_counts": counts}


def test_custom_single_answer_file_scores_100_when_right_and_0_when_wrong(tmp_path, capsys):
    annotations = _jsonl(tmp_path / "test.jsonl", [{"image": "a.jpg", "question": "What?", "answer": "a red ball"}])
    for answer, expected in (("red ball", 100.0), ("blue ball", 0.0)):
        predictions = _write(tmp_path / "p.json", [{"question_id": 0, "answer": answer}])  # id = the line index
        code, result = _score_cli(capsys, "--task", "custom", "--custom-kind", "vqa", "--predictions", predictions,
                                  "--annotations", annotations)
        assert code == 0 and result["accuracy"] == expected and result["vqa_rule"] == "exact-match-any"


@pytest.mark.parametrize("kind", ["caption", "vqa"])
def test_custom_predictions_of_a_run_score_against_its_test_jsonl_as_in_the_runner(kind, root, tmp_path, capsys):
    data = load_task_data("custom", data_dir=root, custom_kind=kind)
    rng = random.Random(4)
    records = [prediction_record("custom", e, _guess(e, rng), custom_kind=kind) for e in data.query]
    path = write_predictions("custom", records, tmp_path / "custom-2shot-seed42.json")
    code, result = _score_cli(capsys, "--task", "custom", "--custom-kind", kind, "--predictions", path,
                              "--annotations", data.files["test_jsonl"])
    assert code == 0
    expected = score_records("custom", records, data.query, custom_kind=kind)  # what the runner reports
    metric = "cider" if kind == "caption" else "accuracy"
    assert result == {**expected, metric: pytest.approx(expected[metric], rel=1e-12)}
    assert 0 < result[metric]  # the guesses hit some references, so the check is not vacuous
    assert result == score_files("custom", path, data.files["test_jsonl"], custom_kind=kind)


def test_custom_score_without_a_kind_or_with_a_questions_file_is_a_one_line_error(tmp_path, capsys):
    annotations = _jsonl(tmp_path / "test.jsonl", [{"image": "a.jpg", "question": "What?", "answer": "red"}])
    predictions = _write(tmp_path / "p.json", [{"question_id": 0, "answer": "red"}])
    code, error = _score_cli(capsys, "--task", "custom", "--predictions", predictions, "--annotations", annotations)
    assert code == 2 and "--custom-kind" in error
    code, error = _score_cli(capsys, "--task", "custom", "--custom-kind", "vqa", "--predictions", predictions,
                             "--annotations", annotations, "--questions", annotations)
    assert code == 2 and "carry their questions" in error


def test_custom_annotations_with_a_repeated_id_are_refused(tmp_path):
    record = {"question_id": "q", "image": "a.jpg", "question": "What?", "answer": "red"}
    annotations = _jsonl(tmp_path / "test.jsonl", [record, record])
    predictions = _write(tmp_path / "p.json", [{"question_id": "q", "answer": "red"}])
    with pytest.raises(ValueError, match="test.jsonl: id 'q' appears more than once"):
        score_files("custom", predictions, annotations, custom_kind="vqa")
