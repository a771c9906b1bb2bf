"""Code from a model folder runs only when the user asks, at the call: never because a file says so.

Each test plants a language model whose folder ships Python code (``auto_map`` in its config.json, as a hub repo
with custom code has) that leaves a marker file when it runs, then loads the model through a public entry point:
``Flamingo.from_pretrained``, ``flamingo-eval run``, ``flamingo-train``, and the name ``micro`` while a planted folder
of that name sits in the working directory. The marker tells whether the code ran.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from train_loop_helpers import one_thread_and_fresh_accelerate_state  # noqa: F401  (autouse)

import flamingo
import flamingo.micro.shipped as shipped
from flamingo_eval.cli import main as eval_main
from flamingo_train.cli import main as train_main
from flamingo_train.example import write_example

PLANTED_CODE = '''\
from pathlib import Path

import transformers

Path({marker!r}).write_text("the model folder's code ran")


class PlantedLM(getattr(transformers, {architecture!r})):
    pass
'''


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """flamingo_train.example's files: a self-contained tiny model (model/), data and a training config."""
    out = tmp_path_factory.mktemp("example")
    write_example(out, max_steps=1, save_every=1, num_records=8)
    return out


def plant_code(model_dir: Path, marker: Path, **config_fields) -> Path:
    """Give ``model_dir``'s language model code of its own that writes ``marker`` when it runs, and set
    ``config_fields`` in the model's config.json."""
    lm_dir = model_dir / "language_model"
    lm_config = json.loads((lm_dir / "config.json").read_text())
    (lm_dir / "planted.py").write_text(PLANTED_CODE.format(marker=str(marker), architecture=lm_config["architectures"][0]))
    lm_config["auto_map"] = {"AutoModelForCausalLM": "planted.PlantedLM"}
    (lm_dir / "config.json").write_text(json.dumps(lm_config))
    config = json.loads((model_dir / "config.json").read_text())
    config.update(config_fields)
    (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


@pytest.fixture
def planted(example, tmp_path):
    """A copy of the example model whose config.json says, as earlier versions wrote, ``trust_remote_code: true``."""
    marker = tmp_path / "code-ran"
    model_dir = plant_code(shutil.copytree(example / "model", tmp_path / "model"), marker, trust_remote_code=True)
    return model_dir, marker


def test_a_config_that_says_trust_remote_code_does_not_run_code_it_says_how_to_allow_it(planted):
    model_dir, marker = planted
    with pytest.raises(ValueError, match="runs its own Python code") as error:
        flamingo.Flamingo.from_pretrained(model_dir)
    assert str(model_dir / "config.json") in str(error.value)
    assert "trust_remote_code=True" in str(error.value) and "--trust-remote-code" in str(error.value)
    assert not marker.exists()
    with pytest.raises(ValueError, match="runs its own Python code"):
        flamingo.Flamingo.from_pretrained(model_dir, trust_remote_code=False)
    assert not marker.exists()


def test_the_users_argument_runs_the_code_and_the_saved_model_asks_again(planted, tmp_path):
    model_dir, marker = planted
    model = flamingo.Flamingo.from_pretrained(model_dir, trust_remote_code=True)
    assert marker.exists() and type(model.lang_model).__name__ == "PlantedLM"
    assert model.config.requires_remote_code
    model.save_pretrained(tmp_path / "again")  # by reference: the LM is still the planted folder
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["requires_remote_code"] is True and "trust_remote_code" not in saved
    marker.unlink()
    with pytest.raises(ValueError, match="runs its own Python code"):
        flamingo.Flamingo.from_pretrained(tmp_path / "again")
    assert not marker.exists()


def test_a_model_built_with_remote_code_records_that_it_needs_it(example, tiny_vision, tmp_path):
    marker = tmp_path / "code-ran"
    model_dir = plant_code(shutil.copytree(example / "model", tmp_path / "model"), marker)
    model, _ = flamingo.create_model_and_processor(
        vision_model=tiny_vision["name"],
        vision_pretrained=tiny_vision["weights"],
        lang_model=str(model_dir / "language_model"),
        tokenizer=str(model_dir),
        trust_remote_code=True,
    )
    assert marker.exists() and model.config.requires_remote_code
    model.save_pretrained(tmp_path / "built")
    marker.unlink()
    with pytest.raises(ValueError, match="requires_remote_code"):
        flamingo.Flamingo.from_pretrained(tmp_path / "built")
    assert not marker.exists()


def test_flamingo_eval_runs_no_model_code_without_its_flag(planted, tmp_path, capsys):
    model_dir, marker = planted
    argv = ["run", "--model", str(model_dir), "--tasks", "custom", "--custom-kind", "caption", "--shots", "0",
            "--output", str(tmp_path / "results.json")]
    assert eval_main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("flamingo-eval: error: ") and "--trust-remote-code" in error
    assert not marker.exists()


def test_flamingo_train_respects_its_configs_trust_remote_code_false(planted, example, tmp_path, capsys):
    model_dir, marker = planted
    overrides = [f"model.pretrained={model_dir}", f"run.output_dir={tmp_path / 'run'}"]
    for setting in ([], ["model.trust_remote_code=false"]):
        with pytest.raises(SystemExit) as exit:
            train_main(["--config", str(example / "config.yaml"), *overrides, *setting])
        assert exit.value.code == 2
        assert "model.trust_remote_code: true" in capsys.readouterr().err
        assert not marker.exists()


def test_a_planted_micro_folder_neither_replaces_the_shipped_model_nor_runs_code(example, tmp_path, monkeypatch):
    marker = tmp_path / "code-ran"
    plant_code(shutil.copytree(example / "model", tmp_path / "micro"), marker, trust_remote_code=True)
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="means the shipped micro model"):
        model = flamingo.Flamingo.from_pretrained("micro", trust_remote_code=True)
    with pytest.warns(UserWarning, match="means the shipped micro model"):
        flamingo.FlamingoProcessor.from_pretrained("micro", trust_remote_code=True)
    assert not marker.exists()
    assert model.config.lang_model == str(shipped.MICRO_MODEL_DIR / "language_model")
