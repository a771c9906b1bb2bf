"""One template, two uses: task records for training are the evaluation's prompts, token for token, plus the answer."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from flamingo_eval.data import load_task_data
from flamingo_eval.tasks import get_task_spec
from flamingo_eval.testing import write_fixture_data
from flamingo_train.data import DataConfig
from flamingo_train.data.formats import parse_record
from flamingo_train.data.samples import IGNORE_INDEX, SampleBuilder
from flamingo_train.task_data import DemoPool, answer_marker, main, query_answer, task_records
from train_data_helpers import loader, rows, take, tiny_processor


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("task_data")
    return write_fixture_data(root, tasks=("custom", "hateful_memes"), num_support=8, num_query=2)


def custom(fixture_root, kind):
    return load_task_data("custom", data_dir=fixture_root, custom_kind=kind), get_task_spec("custom", custom_kind=kind)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # with and without a bos token
@pytest.mark.parametrize("shots", [0, 2])
@pytest.mark.parametrize("kind", ["vqa", "caption"])
def test_a_training_sample_tokenizes_as_the_eval_prompt_up_to_the_query_answer(
        fixture_root, tiny_vision, tiny_lm_dir, kind, shots, family):
    processor = tiny_processor(tiny_vision, tiny_lm_dir(family))
    data, spec = custom(fixture_root, kind)
    builder = SampleBuilder(processor, max_tokens=10_000, max_images=100, labels="last_answer",
                            answer_markers=(answer_marker(spec),))
    pool = DemoPool(data.support)
    records = list(task_records(spec, data.support, shots=[shots], seed=3))
    assert len(records) == len(data.support)
    for index, (query, record) in enumerate(zip(data.support, records)):
        demos = pool.draw(index, shots or spec.zero_shot_text_demos, seed=3, shots=shots)
        prompt = spec.prompt(demos, query, zero_shot=shots == 0)  # what the evaluation runner builds
        prompt_ids = processor.tokenizer(prompt)["input_ids"]  # as generate_answers tokenizes it (bos included)
        sample = builder.build(parse_record(json.dumps(record), "simple", fixture_root))
        assert sample.input_ids[: len(prompt_ids)] == prompt_ids
        answer = processor.tokenizer(query_answer(spec, query) + END_OF_CHUNK_TOKEN, add_special_tokens=False)
        assert sample.input_ids[len(prompt_ids):] == answer["input_ids"] + [processor.tokenizer.eos_token_id]
        # Answer-only labels: exactly the query's answer and its <|endofchunk|>; demos, separators and eos are context.
        trained = [i for i, label in enumerate(sample.labels) if label != IGNORE_INDEX]
        assert trained == list(range(len(prompt_ids), len(sample.input_ids) - 1))
        assert [sample.input_ids[i] for i in trained] == [sample.labels[i] for i in trained]
        assert sample.images == [str(d.image) for d in demos if shots] + [str(query.image)]


def test_records_follow_the_eval_layout_and_never_show_the_query_as_a_demo(fixture_root):
    data, spec = custom(fixture_root, "caption")
    records = list(task_records(spec, data.support, shots=[0, 4], seed=0))
    assert [(r["id"], r["shots"]) for r in records] == [(str(e.id), k) for e in data.support for k in (0, 4)]
    for record, (query, shots) in zip(records, [(e, k) for e in data.support for k in (0, 4)]):
        text = record["text"]
        query_chunk = f"{MEDIA_TOKEN}Output:{query_answer(spec, query)}{END_OF_CHUNK_TOKEN}"
        assert text.endswith(f"{END_OF_CHUNK_TOKEN}\n{query_chunk}")
        assert text.count(f"{END_OF_CHUNK_TOKEN}\n") == (shots or spec.zero_shot_text_demos)  # text-only at 0 shots
        assert text.count(MEDIA_TOKEN) == len(record["images"]) == shots + 1
        assert record["images"][-1] == str(query.image) and str(query.image) not in record["images"][:-1]
        assert len(set(record["images"])) == len(record["images"])  # drawn without replacement


def test_zero_text_demos_make_a_0_shot_record_the_query_alone(fixture_root):
    data, spec = custom(fixture_root, "vqa")
    record = next(task_records(replace(spec, zero_shot_text_demos=0), data.support, shots=[0], seed=0))
    query = data.support[0]
    assert record["text"] == spec.query_text(query) + query_answer(spec, query) + END_OF_CHUNK_TOKEN
    assert record["images"] == [str(query.image)]


def test_records_are_fixed_by_the_seed_and_each_shot_count_draws_its_own(fixture_root):
    data, spec = custom(fixture_root, "vqa")
    first = list(task_records(spec, data.support, shots=[2, 4], seed=0))
    assert first == list(task_records(spec, data.support, shots=[2, 4], seed=0))
    assert [r for r in first if r["shots"] == 4] == list(task_records(spec, data.support, shots=[4], seed=0))
    assert first != list(task_records(spec, data.support, shots=[2, 4], seed=1))


def test_the_command_writes_records_and_a_data_entry_that_train_through_the_real_loader(
        fixture_root, tiny_vision, tiny_llama_dir, tmp_path, capsys):
    processor = tiny_processor(tiny_vision, tiny_llama_dir)
    output, snippet = tmp_path / "out" / "train.jsonl", tmp_path / "out" / "train.data.yaml"
    assert main(["--task", "custom", "--custom-kind", "vqa", "--data-dir", str(fixture_root), "--split", "train",
                 "--shots", "0,2", "--output", str(output)]) == 0
    assert "labels: last_answer" in capsys.readouterr().out
    records = [json.loads(line) for line in output.read_text().splitlines()]
    images = [image for record in records for image in record["images"]]
    (entry,) = yaml.safe_load(snippet.read_text())
    root = Path(entry.get("image_root", output.parent))  # the task's folder: the images are not under out/
    assert all(not image.startswith(("/", "..")) and (root / image).is_file() for image in images)
    config = DataConfig.from_dict(entry)
    assert (config.format, config.labels, config.answer_markers, config.max_images) == (
        "simple", "last_answer", ["Short answer:"], 3)
    fields = {k: v for k, v in entry.items() if k not in ("name", "path", "format")}
    batch = take(loader(processor, output, batch_size=len(records), shuffle=False, **fields), 1)[0]
    tokenizer = processor.tokenizer
    assert rows(batch) == [tuple(tokenizer(r["text"])["input_ids"] + [tokenizer.eos_token_id]) for r in records]
    assert batch["skipped"] == {}


def test_hateful_memes_records_end_with_the_class_name(fixture_root):
    data = load_task_data("hateful_memes", data_dir=fixture_root)
    spec = get_task_spec("hateful_memes", class_names=data.class_names)
    record = next(task_records(spec, data.support, shots=[2], seed=0))
    assert record["text"].endswith(f"Answer:{data.class_names[data.support[0].label]}{END_OF_CHUNK_TOKEN}")
    assert answer_marker(spec).endswith("Is it hateful? Answer:")


def test_bad_requests_end_with_one_line_naming_the_problem(fixture_root, tmp_path, capsys):
    data, spec = custom(fixture_root, "vqa")
    with pytest.raises(ValueError, match=r"needs 8 demos but only 7"):
        next(task_records(spec, data.support, shots=[8], seed=0))
    argv = ["--task", "custom", "--custom-kind", "vqa", "--data-dir", str(tmp_path / "missing"), "--shots", "0",
            "--output", str(tmp_path / "x.jsonl")]
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err
    argv = ["--task", "custom", "--custom-kind", "vqa", "--data-dir", str(fixture_root), "--shots", "2,8",
            "--output", str(tmp_path / "x.jsonl")]
    assert main(argv) == 2
    assert "needs 8 demos" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no file, and no half-written one
