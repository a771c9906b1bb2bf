"""Fuzzing the readers of training records and evaluation files: bad input is a counted, skipped BadRecord (training)
or one clear ValueError / exit code 2 (evaluation), never another exception from deep inside a library.

``FLAMINGO_FUZZ_EXAMPLES`` sets the examples per property (default 25, about 30 s in all); raise it for a longer hunt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from flamingo_eval.cli import main as eval_main
from flamingo_eval.readers import read_custom_caption_references, read_custom_vqa_references
from flamingo_eval.testing import write_fixture_data
from flamingo_train.data.config import DataConfig
from flamingo_train.data.formats import BadRecord, Document, parse_record
from flamingo_train.data.loader import build_dataloader
from flamingo_train.data.synthetic import write_synthetic_dataset

FUZZ = settings(
    max_examples=int(os.environ.get("FLAMINGO_FUZZ_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

FIELDS = ("text", "texts", "images", "image", "caption", "captions", "id", "question_id", "question", "answer",
          "answers")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner,
                                                                max_size=4),
    max_leaves=12,
)
records = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
lines = records.map(json.dumps) | json_values.map(json.dumps) | st.text(max_size=60)


@st.composite
def mutated(draw, record: dict) -> str:
    """One JSON line made from a valid ``record``: a field dropped or retyped, the line cut short, or kept as is."""
    how = draw(st.sampled_from(["keep", "drop", "retype", "truncate", "replace"]))
    record = dict(record)
    if how == "drop" and record:
        record.pop(draw(st.sampled_from(sorted(record))))
    elif how == "retype" and record:
        record[draw(st.sampled_from(sorted(record)))] = draw(json_values)
    elif how == "replace":
        return draw(lines)
    line = json.dumps(record)
    if how == "truncate":
        line = line[: draw(st.integers(1, max(1, len(line) - 1)))]
    return line


# ------------------------------------------------------------------------------------------------- training records
@FUZZ
@given(record=records | lines | json_values, format=st.sampled_from(["simple", "obelics", "pairs"]))
def test_parse_record_gives_a_document_or_a_bad_record_for_any_input(record, format):
    try:
        document = parse_record(record, format, Path("root"))
    except BadRecord as bad:
        assert bad.reason in ("malformed_json", "malformed_record", "image_count_mismatch", "outside_data_root")
        return
    assert isinstance(document, Document) and isinstance(document.prefix, str)
    assert all(isinstance(text, str) for _, text in document.chunks)


@pytest.mark.parametrize("line", ["9" * 5000, "[" * 100_000], ids=["huge_int", "deep_nesting"])
def test_parse_record_reports_json_that_json_cannot_decode_as_a_bad_record(line):
    with pytest.raises(BadRecord):
        parse_record(line, "simple", None)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from flamingo import FlamingoProcessor
    from flamingo_train.example import write_example

    out = tmp_path_factory.mktemp("fuzz-example")
    write_example(out, max_steps=1, save_every=0)
    return FlamingoProcessor.from_pretrained(out / "model")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    path = write_synthetic_dataset(tmp_path_factory.mktemp("fuzz-data"), format="simple", num_records=8, seed=0)
    return path, [json.loads(line) for line in path.read_text().splitlines()]


@FUZZ
@given(data=st.data())
def test_the_loader_counts_every_corrupted_line_of_a_jsonl_file_as_skipped(processor, synthetic, tmp_path_factory,
                                                                          data):
    path, originals = synthetic
    text_lines = [data.draw(mutated(record)) for record in originals]
    text_lines += data.draw(st.lists(lines | st.just("9" * 5000) | st.just("[" * 5000), max_size=3))
    corrupt = path.parent / f"corrupt-{data.draw(st.integers(0, 10**9))}.jsonl"
    corrupt.write_text("\n".join(text_lines) + "\n")
    # One block holds the whole file (no shuffle), so one batch accounts for every record.
    config = DataConfig(name="fuzz", path=str(corrupt), batch_size=len(text_lines), shuffle=False, num_workers=0,
                        max_tokens=64, max_images=3)
    records = sum(1 for line in text_lines if line.strip() and "\n" not in line and "\r" not in line)
    try:
        batch = next(iter(build_dataloader(config, processor, rank=0, world_size=1, seed=0)))
    except ValueError as error:  # nothing usable at all: one message naming the dataset, never a library's error
        assert "'fuzz'" in str(error)
        event("no usable record")
        return
    finally:
        corrupt.unlink()
    skipped = sum(batch["skipped"].values())
    event(f"a batch, {'some' if skipped else 'no'} records skipped")
    if records == sum(1 for line in text_lines if line.strip()):  # no line break inside a line (text() can make one)
        assert batch["input_ids"].shape[0] + skipped == records, batch["skipped"]


# ------------------------------------------------------------------------------------------------- eval files
@pytest.fixture(scope="module")
def custom_dir(tmp_path_factory):
    root = write_fixture_data(tmp_path_factory.mktemp("fuzz-eval"), tasks=["custom"], num_support=2, num_query=4)
    test = root / "custom" / "test.jsonl"
    return test, [json.loads(line) for line in test.read_text().splitlines()]


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["caption", "vqa"]))
def test_custom_readers_give_examples_or_a_value_error_naming_the_file(custom_dir, data, kind):
    test, originals = custom_dir
    path = test.parent / f"fuzz-{data.draw(st.integers(0, 10**9))}.jsonl"
    path.write_text("\n".join(data.draw(mutated(r)) for r in originals) + "\n")
    reader = read_custom_caption_references if kind == "caption" else read_custom_vqa_references
    try:
        examples = reader(path)
    except ValueError as error:
        assert path.name in str(error)
        return
    finally:
        path.unlink()
    assert all(e.answers and all(isinstance(a, str) for a in e.answers) for e in examples)


@FUZZ
@given(data=st.data(), kind=st.sampled_from(["caption", "vqa"]))
def test_flamingo_eval_score_on_mutated_files_scores_or_exits_2_with_one_line(custom_dir, tmp_path_factory, capsys,
                                                                             data, kind):
    test, originals = custom_dir
    folder = tmp_path_factory.mktemp("score")
    annotations = folder / "test.jsonl"
    annotations.write_text("\n".join(data.draw(mutated(r)) for r in originals) + "\n")
    if kind == "caption":
        predictions = [{"image_id": r["id"], "caption": r["captions"][0]} for r in originals]
    else:
        predictions = [{"question_id": r["question_id"], "answer": r["answers"][0]} for r in originals]
    mutation = data.draw(st.sampled_from(["keep", "record", "truncate", "not_a_list"]))
    text = json.dumps(predictions)
    if mutation == "record" and predictions:
        i = data.draw(st.integers(0, len(predictions) - 1))
        field = data.draw(st.sampled_from(sorted(predictions[i])))
        predictions[i] = {**predictions[i], field: data.draw(json_values)}
        text = json.dumps(predictions)
    elif mutation == "truncate":
        text = text[: data.draw(st.integers(0, len(text) - 1))]
    elif mutation == "not_a_list":
        text = json.dumps(data.draw(json_values))
    (folder / "preds.json").write_text(text)
    capsys.readouterr()
    code = eval_main(["score", "--task", "custom", "--custom-kind", kind, "--predictions", str(folder / "preds.json"),
                      "--annotations", str(annotations)])
    out, err = capsys.readouterr()
    if code == 0:
        assert json.loads(out)
    else:
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("flamingo-eval: error: "), err
