"""`flamingo-demo` (``flamingo_train.demo``) on the shipped micro model: its three sections, the images it names, and scores that
come from the evaluation code (checked for form, not for how good the model is)."""

import contextlib
import io
import re
from pathlib import Path

import pytest
from PIL import Image

from flamingo_train.demo import SHOTS, DemoConfig, parse_config, run


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(out folder, printed text, run's result) of one small run, shared by the tests below."""
    out = tmp_path_factory.mktemp("demo")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        result = run(parse_config(["--out", str(out), "--queries", "6", "--support", "8", "--examples", "2"]))
    return out, printed.getvalue(), result


def test_demo_prints_the_three_sections_in_order(demo):
    _, text, _ = demo
    starts = [text.index(f"\n{n}. ") for n in (1, 2, 3)]
    assert starts == sorted(starts)
    assert re.search(r"^VQA +exact match %( +\d+\.\d){2}$", text, re.M)
    assert re.search(r"^binding +accuracy %( +\d+\.\d){2}$", text, re.M)
    assert re.search(r"^captioning +CIDEr( +\d+\.\d){2}$", text, re.M)


def test_demo_scores_are_the_evaluators_for_every_task_and_shot_count(demo):
    out, _, result = demo
    for kind in ("vqa", "binding", "caption"):
        scores = result["results"][kind]["scores"]
        assert sorted(scores) == list(SHOTS)
        assert (out / "results" / f"{kind}.json").is_file()
        for k in SHOTS:
            assert len(result["results"][kind]["predictions"][k]) == 6
    for k in SHOTS:
        assert 0 <= result["results"]["vqa"]["scores"][k] <= 100 and 0 <= result["results"]["binding"]["scores"][k] <= 100


def test_every_image_the_demo_names_is_a_file_it_wrote(demo):
    out, text, _ = demo
    named = re.findall(r"(\S+\.png)", text)
    assert len(named) >= 3 + 2 * (max(SHOTS) + 2)  # the prompt's 3, and per shown episode its demos, query and strip
    for path in named:
        assert Path(path).is_file(), path
        assert Path(path).resolve().is_relative_to(out.resolve())
    for name in ("demo1", "demo2", "query"):
        assert Image.open(out / "prompt" / f"{name}.png").size == (64, 64)


def test_the_prompt_interleaves_three_images_and_the_model_continues_it(demo):
    _, text, result = demo
    prompt = result["prompt"]
    assert prompt["prompt"].count("<image>") == 3 and prompt["prompt"].count("<|endofchunk|>") == 2
    assert prompt["prompt"].endswith("<image>Output:")
    assert f"prompt:  {prompt['prompt']}" in text and f"model:   {prompt['generated']}" in text


def test_binding_picks_are_one_of_each_episodes_two_words(demo):
    _, text, _ = demo
    episodes = re.findall(r"^episode \S+: words (\S+) / (\S+)", text, re.M)
    picks = re.findall(r"^  model's pick: +(.*)$", text, re.M)
    assert len(episodes) == len(picks) == 2
    for words, line in zip(episodes, picks):
        chosen = re.findall(r"(\d+)-shot (\S+) \((right|wrong)\)", line)
        assert [int(k) for k, _, _ in chosen] == list(SHOTS)
        assert all(word in words for _, word, _ in chosen)


def test_demo_config_rejects_a_demo_pool_smaller_than_the_shots():
    with pytest.raises(ValueError, match=f"support >= {max(SHOTS)}"):
        DemoConfig(support=1)
