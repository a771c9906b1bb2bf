"""Few-shot demo folders (flamingo.demos) and micro's sample files (flamingo.micro.samples)."""

import json

import pytest
from PIL import Image

from flamingo.demos import DEMOS_FILE, interleave, read_demos, write_demos
from flamingo.micro.samples import DEMO_SETS, write_samples
from flamingo.micro.world import COUNT_WORDS, make_scene, rng_for


def test_written_demos_read_back_in_order(tmp_path):
    pairs = [(Image.new("RGB", (8, 8), c), f"Output:{c}") for c in ("red", "blue")]
    folder = write_demos(tmp_path / "set", pairs)
    demos = read_demos(folder)
    assert [d.text for d in demos] == ["Output:red", "Output:blue"]
    assert [Image.open(d.image).getpixel((0, 0)) for d in demos] == [(255, 0, 0), (0, 0, 255)]
    assert interleave(demos) == [demos[0].image, "Output:red", demos[1].image, "Output:blue"]


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 1: not JSON"),
    ('["a.png", "x"]', r"line 1: a demo is a JSON object"),
    ('{"image": "a.png"}', r"line 1: field 'text' must be a non-empty string"),
    ('{"image": "", "text": "x"}', r"line 1: field 'image' must be a non-empty string"),
    ('{"image": "missing.png", "text": "x"}', r"line 1, field 'image': .*missing.png does not exist"),
    ('{"image": "../outside.png", "text": "x"}', r"outside"),
])
def test_a_bad_demo_line_names_the_file_line_and_field(tmp_path, line, message):
    folder = tmp_path / "set"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (folder / DEMOS_FILE).write_text(line + "\n")
    with pytest.raises(ValueError, match=message):
        read_demos(folder)


def test_a_folder_without_demos_says_so(tmp_path):
    with pytest.raises(ValueError, match=f"no {DEMOS_FILE} in it"):
        read_demos(tmp_path)
    (tmp_path / DEMOS_FILE).write_text("\n")
    with pytest.raises(ValueError, match="holds no demos"):
        read_demos(tmp_path)


def test_micro_samples_describe_their_scenes_and_hold_both_demo_sets(tmp_path):
    out = write_samples(tmp_path, scenes=3, shots=2)
    scenes = json.loads((out / "scenes.json").read_text())
    assert sorted(scenes) == ["scene-0.png", "scene-1.png", "scene-2.png"]
    for index, name in enumerate(sorted(scenes)):
        scene = make_scene(rng_for("test", "samples", index))
        assert Image.open(out / name).size == (64, 64)
        assert len(scenes[name]["captions"]) >= 1 and scenes[name]["question"].endswith("?")
        if scenes[name]["question"] == "how many shapes are there?":
            assert scenes[name]["answer"] == COUNT_WORDS[len(scene.shapes)]
    for kind in DEMO_SETS:
        demos = read_demos(out / "demos" / kind)
        assert len(demos) == 2
        assert all(d.text.startswith("Output:" if kind == "caption" else "Question:") for d in demos)
