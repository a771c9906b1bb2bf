"""`flamingo-demo` (``flamingo_train.demo``) on the shipped micro model: its sections, the images it names, and scores that
come from the evaluation code (checked for form, not for how good the model is)."""

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import flamingo
from flamingo.micro.world import COLOURS, SHAPES, make_scene, render, rng_for
from flamingo_train.demo import (
    OWN_IMAGE_PROMPTS,
    PAD,
    RIGHT,
    SHOTS,
    VIEW_SCALE,
    WRONG,
    DemoConfig,
    as_seen,
    episode_strip,
    parse_config,
    run,
    strip_cell,
)

# The user's images of the run below: a scene of micro's world drawn at 200 px, and a plain 300 x 120 JPEG.
OWN_SCENE = make_scene(rng_for("test", "own-image", 0), num_shapes=1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(out folder, printed text, run's result, the user's images) of one small run, shared by the tests below."""
    out = tmp_path_factory.mktemp("demo")
    mine = tmp_path_factory.mktemp("mine")
    render(OWN_SCENE, size=200).save(mine / "scene.png")
    Image.new("RGB", (300, 120), (90, 140, 200)).save(mine / "wide.jpg")
    images = [mine / "scene.png", mine / "wide.jpg"]
    argv = ["--out", str(out), "--queries", "6", "--support", "8", "--examples", "2"]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        result = run(parse_config(argv + [arg for image in images for arg in ("--image", str(image))]))
    return out, printed.getvalue(), result, images


def test_demo_prints_its_sections_in_order(demo):
    _, text, _, _ = demo
    starts = [text.index(f"\n{n}. ") for n in (1, 2, 3, 4)]
    assert starts == sorted(starts)
    assert re.search(r"^VQA +exact match %( +\d+\.\d){2}$", text, re.M)
    assert re.search(r"^binding +accuracy %( +\d+\.\d){2}$", text, re.M)
    assert re.search(r"^captioning +CIDEr( +\d+\.\d){2}$", text, re.M)


def test_demo_scores_are_the_evaluators_for_every_task_and_shot_count(demo):
    out, _, result, _ = demo
    for kind in ("vqa", "binding", "caption"):
        scores = result["results"][kind]["scores"]
        assert sorted(scores) == list(SHOTS)
        assert (out / "results" / f"{kind}.json").is_file()
        for k in SHOTS:
            assert len(result["results"][kind]["predictions"][k]) == 6
    for k in SHOTS:
        assert 0 <= result["results"]["vqa"]["scores"][k] <= 100 and 0 <= result["results"]["binding"]["scores"][k] <= 100


def test_every_image_the_demo_names_is_a_file_it_wrote(demo):
    out, text, _, images = demo
    named = [p for p in re.findall(r"(\S+\.png)", text) if Path(p).resolve() not in {i.resolve() for i in images}]
    # the prompt's 3 and their viewing copies, per shown episode its demos, query and strip, per own image its view
    assert len(named) >= 2 * 3 + 2 * (max(SHOTS) + 2) + len(images)
    for path in named:
        assert Path(path).is_file(), path
        assert Path(path).resolve().is_relative_to(out.resolve())


def test_the_prompt_images_are_the_models_64_px_input_with_nearest_neighbour_viewing_copies(demo):
    out, _, _, _ = demo
    for name in ("demo1", "demo2", "query"):
        image = Image.open(out / "prompt" / f"{name}.png")
        assert image.size == (64, 64)
        view = Image.open(out / "prompt" / f"{name}_x{VIEW_SCALE}.png")
        assert view.tobytes() == image.resize((64 * VIEW_SCALE,) * 2, Image.Resampling.NEAREST).tobytes()


def test_the_prompt_interleaves_three_images_and_the_model_continues_it(demo):
    _, text, result, _ = demo
    prompt = result["prompt"]
    assert prompt["prompt"].count("<image>") == 3 and prompt["prompt"].count("<|endofchunk|>") == 2
    assert prompt["prompt"].endswith("<image>Output:")
    assert f"prompt:  {prompt['prompt']}" in text and f"model:   {prompt['generated']}" in text


def test_binding_picks_are_one_of_each_episodes_two_words(demo):
    _, text, _, _ = demo
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


def frame_colour(strip: Image.Image, index: int, tile: int) -> tuple:
    """The colour of tile ``index``'s frame line (the pad left of the tile, halfway down)."""
    x, y = strip_cell(index, tile)
    return strip.getpixel((x - PAD + 1, y + tile // 2))


def test_binding_strip_frames_the_answers_demos_green_and_a_wrong_picks_orange(tmp_path):
    colours = {"dax": (200, 0, 0), "wug": (0, 0, 200)}
    for word, colour in colours.items():
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"{word}.png")
    demos = [(tmp_path / f"{word}.png", word) for word in ("dax", "wug", "wug", "dax")]
    tile = 2 * 64
    wrong = Image.open(episode_strip(demos, tmp_path / "wug.png", "wug", {0: "wug", 4: "dax"}, tmp_path / "w.png"))
    assert [frame_colour(wrong, i, tile) for i in range(5)] == [WRONG, RIGHT, RIGHT, WRONG, WRONG]
    right = Image.open(episode_strip(demos, tmp_path / "wug.png", "wug", {0: "dax", 4: "wug"}, tmp_path / "r.png"))
    assert [frame_colour(right, i, tile) for i in range(5)] == [(255, 255, 255), RIGHT, RIGHT, (255, 255, 255), RIGHT]
    for i, (_, word) in enumerate(demos):  # the frames lie around the images, never on them
        x, y = strip_cell(i, tile)
        assert {right.getpixel((x + dx, y + dy)) for dx in (0, tile - 1) for dy in (0, tile - 1)} == {colours[word]}
    assert right.height > tile + 5 * 16  # the rows under the tiles: words, the answer, the picks, the legend


def test_own_images_are_answered_with_each_template_as_the_model_sees_them(demo):
    out, text, result, images = demo
    section = text[text.index("\n4. ") :]
    assert all(colour in section and shape in section for colour in COLOURS for shape in SHAPES)  # what micro knows
    assert [r["image"] for r in result["own_images"]] == images
    for own, size in zip(result["own_images"], ((200, 200), (300, 120))):
        assert f"({size[0]} x {size[1]})" in section
        seen = Image.open(own["seen"])
        assert seen.size == (64 * VIEW_SCALE,) * 2  # the model's 64 x 64 input, whatever the image's size
        blocks = seen.resize((64, 64), Image.Resampling.NEAREST).resize(seen.size, Image.Resampling.NEAREST)
        assert blocks.tobytes() == seen.tobytes()  # a nearest-neighbour viewing copy
        assert list(own["answers"]) == [what for what, _ in OWN_IMAGE_PROMPTS]
        for what, text_after_image in OWN_IMAGE_PROMPTS:
            assert f"<image>{text_after_image}" in section and f"model: {own['answers'][what]}" in section
    (obj,) = OWN_SCENE.shapes  # a scene of its world, at another size, is still read as one
    assert f"{obj.colour} {obj.shape}" in result["own_images"][0]["answers"]["caption"]


def test_the_image_as_seen_is_the_models_input_with_its_normalisation_undone():
    processor = flamingo.FlamingoProcessor.from_pretrained("micro")
    image = render(OWN_SCENE)  # already 64 x 64: the processor's resize and crop leave it as it is
    seen = as_seen(processor, image)
    assert seen.size == image.size
    assert np.abs(np.asarray(seen, dtype=int) - np.asarray(image, dtype=int)).max() <= 1


@pytest.mark.parametrize("make", [lambda d: d / "missing.png", lambda d: d, lambda d: d / "notes.png"],
                         ids=["missing", "a folder", "not an image"])
def test_an_image_path_that_is_not_an_image_is_refused_in_one_line(tmp_path, capsys, make):
    (tmp_path / "notes.png").write_text("not an image")
    path = make(tmp_path)
    with pytest.raises(SystemExit) as refused:
        parse_config(["--image", str(path)])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("flamingo-demo: error: --image:") and str(path) in err
