"""The shipped micro model: the name "micro" loads it with no network (a reserved name: a local folder of that name
loads only as ./micro), a missing file is named, and every file of it is package data (so a non-editable install has
it)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import flamingo
import flamingo.micro.shipped as shipped
from flamingo.micro import resolve_model_path
from flamingo.micro.world import captions, make_scene, render, rng_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def micro():
    return flamingo.Flamingo.from_pretrained("micro").eval(), flamingo.FlamingoProcessor.from_pretrained("micro")


@torch.no_grad()
def test_micro_loads_the_shipped_model_which_generates_for_a_few_shot_prompt(micro):
    model, processor = micro
    assert model.config.vision_model_cfg is not None  # self-contained: the tower's config travels with it
    scenes = [make_scene(rng_for("test", "test-micro", i)) for i in range(2)]
    batch = processor([render(scenes[0]), f"Output:{captions(scenes[0])[0]}", render(scenes[1]), "Output:"])
    assert batch["pixel_values"].shape[:2] == (1, 2)
    ids = model.generate(**batch, max_new_tokens=8, num_beams=1)
    new = ids[0, batch["input_ids"].shape[1] :]
    assert len(new) >= 1
    assert processor.decode(new, skip_special_tokens=True).strip()  # some words, whichever the weights choose


@pytest.mark.parametrize("save_backbones", [False, True], ids=["referring", "self-contained"])
def test_micro_saved_elsewhere_reloads_with_the_same_outputs(micro, tmp_path, save_backbones):
    """The save-and-reload of the README's Quick start on the shipped model (tests/test_docs.py runs the block as
    written): by default the saved folder refers to micro's backbones where they are (flamingo.backbones' rule), with
    save_backbones=True it holds copies; both reload."""
    model, processor = micro
    model.save_pretrained(tmp_path / "mine", save_backbones=save_backbones)
    processor.save_pretrained(tmp_path / "mine")
    saved = json.loads((tmp_path / "mine" / "config.json").read_text())
    if save_backbones:
        assert (saved["lang_model"], saved["vision_pretrained"]) == ("language_model", "vision_model.safetensors")
    else:
        assert saved["lang_model"] == str(shipped.MICRO_MODEL_DIR / "language_model")
        assert not (tmp_path / "mine" / "language_model").exists()
    reloaded = flamingo.Flamingo.from_pretrained(tmp_path / "mine").eval()
    batch = flamingo.FlamingoProcessor.from_pretrained(tmp_path / "mine")(
        [render(make_scene(rng_for("test", "save-micro", 0))), "Output:"]
    )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_micro_is_a_reserved_name_a_local_folder_of_that_name_loads_only_as_a_path(tmp_path, monkeypatch):
    mine = shutil.copytree(shipped.MICRO_MODEL_DIR, tmp_path / "micro")
    config = json.loads((mine / "config.json").read_text())
    config["nonfinite_media"] = "mask"  # tells the two apart (the shipped one says "raise")
    (mine / "config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"means the shipped micro model.*'\./micro'"):
        assert resolve_model_path("micro") == shipped.MICRO_MODEL_DIR
    with pytest.warns(UserWarning, match="shipped micro model"):
        shipped_model = flamingo.Flamingo.from_pretrained("micro")
    local = flamingo.Flamingo.from_pretrained("./micro")
    assert (shipped_model.config.nonfinite_media, local.config.nonfinite_media) == ("raise", "mask")
    assert flamingo.FlamingoProcessor.from_pretrained("./micro").tokenizer is not None


@pytest.mark.parametrize("load", [flamingo.Flamingo.from_pretrained, flamingo.FlamingoProcessor.from_pretrained])
def test_missing_shipped_files_raise_an_error_naming_them_and_how_to_rebuild(tmp_path, monkeypatch, load):
    partial = tmp_path / "model"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    monkeypatch.setattr(shipped, "MICRO_MODEL_DIR", partial)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="micro model is incomplete") as error:
        load("micro")
    message = str(error.value)
    missing = message.split(" lacks ", 1)[1].split(". ", 1)[0].split(", ")
    assert "model.safetensors" in missing and "language_model/model.safetensors" in missing
    assert "config.json" not in missing  # it is there
    assert "python -m flamingo_train.recipes.micro --output DIR" in message and "flamingo/final" in message


def test_other_names_are_paths_left_to_the_loaders(tmp_path):
    assert resolve_model_path(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    assert resolve_model_path("micro-2") == Path("micro-2")
    with pytest.raises(ValueError, match="holds no config.json"):
        flamingo.Flamingo.from_pretrained(tmp_path)


def test_every_file_of_the_shipped_model_is_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    files = [p for p in shipped.MICRO_MODEL_DIR.rglob("*") if p.is_file()]
    assert set(shipped.MICRO_MODEL_FILES) <= {p.relative_to(shipped.MICRO_MODEL_DIR).as_posix() for p in files}
    for path in files:
        package = ".".join(path.parent.relative_to(ROOT).parts)
        assert package in setuptools["packages"], f"{path.parent} is not listed in [tool.setuptools] packages"
        assert "*" in setuptools["package-data"].get(package, []), f"{path} is not package data"


def test_the_size_the_readme_quotes_for_micro_is_its_own(micro):
    """Every figure the README and docs/ give for micro's size (docs/micro.md has them all; the README's opening
    repeats the parameter count) is the shipped model's own."""
    model, _ = micro
    text = "\n".join(page.read_text() for page in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))))
    whole = re.search(r"A whole Flamingo of ([\d.]+) M parameters ships inside the package \(`flamingo/micro/model/`, "
                      r"([\d.]+) MiB\)", text)
    trained = re.findall(r"([\d.]+) M trained parameters", text)
    counts = re.findall(r"([\d.]+) M[ -]parameters?\b", text)
    assert whole and trained and len(counts) >= 2, "the micro-model figures moved; update this test with them"
    assert {float(c) for c in counts} == {round(model.num_parameters() / 1e6, 1)}
    assert {float(t) for t in trained} == {round(model.num_parameters(trainable_only=True) / 1e6, 2)}
    size = sum(f.stat().st_size for f in shipped.MICRO_MODEL_DIR.rglob("*") if f.is_file())
    assert float(whole[2]) == round(size / 2**20, 1)
