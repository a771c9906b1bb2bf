"""The binding kind (``--tasks custom --custom-kind binding``): its episode reader, prompts, ranking and runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from eval_helpers import read_predictions, save_tiny_eval_model, trial_values
from models import build_tiny_model

from flamingo.testing import random_images
from flamingo_eval.binding import Binding, EpisodeDemos, rank_choices
from flamingo_eval.cli import main
from flamingo_eval.data import load_task_data
from flamingo_eval.files import Example
from flamingo_eval.runner import EvalConfig, Evaluator, MediaCache
from flamingo_eval.tasks import get_task, get_task_spec
from flamingo_eval.testing import write_fixture_data

_SPEC = get_task_spec("custom", custom_kind="binding")


def _episode(index: int, **overrides) -> dict:
    demos = [{"image": f"img/d{index}-{j}.png", "word": w} for j, w in enumerate(["dax", "blicket", "dax", "blicket"])]
    return {"id": f"ep{index}", "demos": demos, "image": f"img/q{index}.png", "answer": "blicket", **overrides}


def _write(folder: Path, records: list[dict], name: str = "test.jsonl") -> Path:
    """A binding folder: ``records`` as ``name``, and every image they name as a small PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    paths = {r.get("image") for r in records} | {d.get("image") for r in records for d in r.get("demos", [])}
    images = random_images(len(paths), seed=1)
    for path, image in zip(sorted(p for p in paths if isinstance(p, str)), images):
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / path)
    return folder


def _load(folder: Path):
    return load_task_data("custom", data_dir=folder, custom_kind="binding")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_fixture_data(tmp_path_factory.mktemp("binding"), tasks=("custom",), num_support=3, num_query=5)


# ------------------------------------------------------------------------------------------------ reading
def test_episodes_load_with_their_own_demos_in_file_order_and_default_choices(tmp_path):
    folder = _write(tmp_path / "b", [_episode(0), _episode(1, choices=["wug", "blicket", "dax"])])
    data = _load(folder)  # no train.jsonl: binding needs none
    first, second = data.query
    assert (first.id, first.answers, first.image) == ("ep0", ("blicket",), folder / "img/q0.png")
    assert first.choices == ("dax", "blicket")  # the distinct demo words, in order of first appearance
    assert second.choices == ("wug", "blicket", "dax")
    assert [(d.image, d.answers) for d in first.demos] == [
        (folder / f"img/d0-{j}.png", (w,)) for j, w in enumerate(["dax", "blicket", "dax", "blicket"])
    ]
    assert data.support == []


def test_a_train_file_is_read_and_checked_but_never_a_demo_pool(tmp_path):
    folder = _write(tmp_path / "b", [_episode(0)])
    _write(folder, [_episode(5)], name="train.jsonl")
    data = _load(folder)
    assert [e.id for e in data.support] == ["ep5"] and data.query[0].demos[0].image == folder / "img/d0-0.png"
    _write(folder, [{**_episode(5), "answer": "toma"}], name="train.jsonl")
    with pytest.raises(ValueError, match="train.jsonl, line 1 .*'answer' 'toma' is not among the choices"):
        _load(folder)


def _drop(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


@pytest.mark.parametrize(
    "bad, message",
    [
        (_drop(_episode(1), "image"), r"missing field 'image'"),
        (_drop(_episode(1), "answer"), r"missing field 'answer'"),
        (_drop(_episode(1), "demos"), r"missing field 'demos'"),
        ({**_episode(1), "demos": [{"image": "img/d1-0.png"}]}, r", demos\[0\]: missing field 'word'"),
        ({**_episode(1), "demos": [{"image": "img/d1-0.png", "word": " "}]}, r", demos\[0\]: field 'word' is empty"),
        ({**_episode(1), "answer": "wug"}, r"field 'answer' 'wug' is not among the choices \['dax', 'blicket'\]"),
        ({**_episode(1), "choices": "dax"}, r"field 'choices' should be a non-empty list"),
        ({**_episode(1), "demos": []}, r"no 'choices' and no demos"),
        ({**_episode(1), "image": "img/nope.png"}, r"image .*nope.png \(field 'image'\) not found"),
    ],
    ids=["no-image", "no-answer", "no-demos", "demo-without-word", "empty-word", "answer-not-a-choice",
         "choices-not-a-list", "nothing-to-choose", "missing-image-file"],
)
def test_bad_episodes_are_errors_naming_the_file_line_episode_and_field(tmp_path, bad, message):
    folder = _write(tmp_path / "b", [_episode(0), bad])
    if "nope.png" in json.dumps(bad):
        (folder / "img/nope.png").unlink()
    with pytest.raises(ValueError, match=rf"test.jsonl, line 2 \(episode 'ep1'\).*{message}"):
        _load(folder)


def test_the_fixture_writes_episodes_that_load_with_every_shot_count_up_to_four(data_dir):
    data = _load(data_dir)
    assert data_dir / "binding" / "test.jsonl" == data.files["test_jsonl"]
    assert len(data.query) == 5 and len(data.support) == 3
    assert all(len(e.demos) == 4 and e.answers[0] in e.choices for e in data.query)
    assert any(len(e.choices) == 3 for e in data.query) and any(len(e.choices) == 2 for e in data.query)


# ------------------------------------------------------------------------------------------------ prompts
def _demos(query, k):
    return EpisodeDemos("test.jsonl").select(query_index=0, query=query, k=k)


def test_prompts_at_0_2_and_4_shots_are_the_episodes_words_in_order(tmp_path):
    (query,) = _load(_write(tmp_path / "b", [_episode(0)])).query
    chunk = "<image>This is a {}.<|endofchunk|>\n"
    assert _SPEC.prompt(_demos(query, 0), query, zero_shot=True) == "<image>This is a"
    assert _SPEC.prompt(_demos(query, 2), query, zero_shot=False) == (
        chunk.format("dax") + chunk.format("blicket") + "<image>This is a"
    )
    assert _SPEC.prompt(_demos(query, 4), query, zero_shot=False) == (
        chunk.format("dax") + chunk.format("blicket") + chunk.format("dax") + chunk.format("blicket") + "<image>This is a"
    )
    assert [d.image.name for d in _demos(query, 4)] == [f"d0-{j}.png" for j in range(4)]
    assert _SPEC.zero_shot_text_demos == 0


def test_an_episode_with_fewer_demos_than_shots_is_an_error_naming_it_and_its_file(tmp_path):
    (query,) = _load(_write(tmp_path / "b", [_episode(3)])).query
    with pytest.raises(ValueError, match=r"test.jsonl: episode 'ep3' has 4 demos; 6 shots need at least 6"):
        _demos(query, 6)


# ------------------------------------------------------------------------------------------------ ranking
def _direct_mean_log_prob(model, processor, prompt: str, images, continuation: str) -> float:
    """Mean log-probability of the tokens ``continuation`` adds to ``prompt``, from one full forward."""
    whole = processor(text=prompt + continuation, images=images)
    prompt_length = processor(text=prompt, images=images)["input_ids"].shape[1]
    ids = whole["input_ids"]
    logits = model(ids, pixel_values=whole["pixel_values"]).logits[0].float()
    log_probs = logits[prompt_length - 1 : -1].log_softmax(-1)  # position t predicts token t + 1
    return float(log_probs.gather(1, ids[0, prompt_length:, None]).mean())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ranking_scores_each_querys_own_choices_as_a_full_forward_does_and_picks_the_best(
    tiny_vision, tiny_lm_dir, family
):
    model, processor = build_tiny_model(tiny_vision, tiny_lm_dir(family))
    a, b, c = random_images(3, seed=5)
    queries = [
        Example(id="x", image=Path("q1"), answers=("dax",), choices=("dax", "blicket")),
        Example(id="y", image=Path("q2"), answers=("wug",), choices=("wug", "toma", "dax")),  # another count
    ]
    prompts = ["<image>This is a dax.<|endofchunk|>\n<image>This is a", "<image>This is a"]
    images = [[a, b], [c]]
    media = model.encode_media(processor.preprocess_images(images))
    with torch.no_grad():
        ranked = rank_choices(model, processor.tokenizer, prompts=prompts, media=media, queries=queries, class_batch_size=2)
        direct = [
            torch.tensor([_direct_mean_log_prob(model, processor, p, imgs, f" {w}.") for w in q.choices])
            for p, imgs, q in zip(prompts, images, queries)
        ]
    for got, expected in zip(ranked, direct):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    out = Binding().predict(
        model, processor.tokenizer, prompts=prompts, media=media, spec=_SPEC, queries=queries, class_batch_size=8
    )
    assert [o["prediction"] for o in out] == [q.choices[int(d.argmax())] for q, d in zip(queries, direct)]


# ------------------------------------------------------------------------------------------------ runner
def test_runner_evaluates_binding_at_0_and_2_shots_and_writes_accuracy(tiny_vision, tiny_llama_dir, data_dir, tmp_path):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    config = EvalConfig(
        model=None, tasks=["custom"], custom_kind="binding", shots=[0, 2], data_dir=data_dir, batch_size=2,
        rices=True,  # ignored: an episode's demos are its own
        output=tmp_path / "results.json", predictions_dir=tmp_path / "preds",
    )
    results = Evaluator(config, model=model, processor=processor).run()
    query = _load(data_dir).query
    assert {(t["shots"], t["metric"]) for t in results["trials"]} == {(0, "accuracy"), (2, "accuracy")}
    for trial in results["trials"]:
        records = json.loads(Path(trial["predictions"]).read_text())
        assert [set(r) for r in records] == [{"id", "prediction", "answer"}] * len(query)
        assert [(r["id"], r["answer"]) for r in records] == [(e.id, e.answers[0]) for e in query]
        assert all(r["prediction"] in e.choices for r, e in zip(records, query))
        correct = sum(r["prediction"] == r["answer"] for r in records)
        assert trial["value"] == pytest.approx(100.0 * correct / len(query))


def test_cli_runs_binding_with_the_demo_separator_it_is_given(tiny_vision, tiny_llama_dir, data_dir, tmp_path, monkeypatch):
    model_dir = save_tiny_eval_model(tiny_vision, tiny_llama_dir, tmp_path / "model")
    prompts = []
    predict = Binding.predict
    monkeypatch.setattr(Binding, "predict", lambda self, *a, **kw: prompts.extend(kw["prompts"]) or predict(self, *a, **kw))
    out = tmp_path / "r.json"
    argv = ["run", "--model", str(model_dir), "--tasks", "custom", "--custom-kind", "binding", "--shots", "2",
            "--data-dir", str(data_dir), "--batch-size", "5", "--output", str(out), "--predictions-dir", str(tmp_path / "p")]
    assert main([*argv, "--demo-separator", ""]) == 0
    assert len(prompts) == 5 and all(p.count("<|endofchunk|><image>") == 2 and "\n" not in p for p in prompts)
    assert set(trial_values(out)) == {("custom", 2, 42, False)}
    assert set(read_predictions(tmp_path / "p")) == {"custom-2shot-seed42.json"}
    prompts.clear()
    assert main([*argv, "--demo-separator", "\\n--\\n", "--output", str(tmp_path / "r2.json")]) == 0
    assert all(p.count("<|endofchunk|>\n--\n<image>") == 2 for p in prompts)


def test_binding_media_holds_the_episodes_demo_images_then_the_query(
    tiny_vision, tiny_llama_dir, data_dir, tmp_path, monkeypatch
):
    # The k demo images go in episode order before the query image, as the prompt's <image> markers do.
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    seen = []
    media = MediaCache.media
    monkeypatch.setattr(MediaCache, "media", lambda self, lists: seen.extend(lists) or media(self, lists))
    config = EvalConfig(model=None, tasks=["custom"], custom_kind="binding", shots=[2], data_dir=data_dir,
                        batch_size=5, output=tmp_path / "r.json")
    Evaluator(config, model=model, processor=processor).run()
    query = _load(data_dir).query
    assert seen == [[e.demos[0].image, e.demos[1].image, e.image] for e in query]
    assert get_task("custom", custom_kind="binding").kind.episodic
