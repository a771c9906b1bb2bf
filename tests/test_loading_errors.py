"""Broken files on disk fail with a ValueError that names the file and says what to do, never with a traceback from
deep inside json, safetensors, huggingface_hub or torch.load. Each test damages one file of a tiny saved model and
loads it through the public entry points."""

import json
import pickle
import re
import shutil

import pytest
import torch

import flamingo
from models import build_tiny_model


@pytest.fixture(scope="module")
def saved(tiny_vision, tiny_llama_dir, tmp_path_factory):
    """A tiny model and processor saved by reference (config.json, model.safetensors, tokenizer, preprocessor)."""
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    directory = tmp_path_factory.mktemp("saved")
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture
def copy_of_saved(saved, tmp_path):
    """A private copy of ``saved`` that a test may damage."""
    return shutil.copytree(saved, tmp_path / "model")


def _edit_config(directory, **fields):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


# ------------------------------------------------------------------------------------------------ config.json


@pytest.mark.parametrize(
    "field, value, where, expected, got",
    [
        ("cross_attn_every_n_layers", "2", "cross_attn_every_n_layers", "int", "'2' (str)"),
        ("cross_attn_every_n_layers", True, "cross_attn_every_n_layers", "int", "True (bool)"),
        ("trust_remote_code", "false", "trust_remote_code", "bool", "'false' (str)"),
        ("added_token_ids", [1, "2"], "added_token_ids[1]", "int", "'2' (str)"),
        ("added_token_ids", 5, "added_token_ids", "list[int]", "5 (int)"),
        ("lang_model", 3, "lang_model", "str or None", "3 (int)"),
    ],
)
def test_a_config_field_of_the_wrong_type_names_the_file_the_field_and_both_types(
    field, value, where, expected, got, copy_of_saved
):
    _edit_config(copy_of_saved, **{field: value})
    message = f"{copy_of_saved / 'config.json'}: {where}: expected {expected}, got {got}"
    with pytest.raises(ValueError, match=re.escape(message)):
        flamingo.Flamingo.from_pretrained(copy_of_saved)


def test_a_nested_config_field_of_the_wrong_type_is_named_with_its_section(copy_of_saved):
    config = json.loads((copy_of_saved / "config.json").read_text())
    config["perceiver"]["depth"] = 2.0
    (copy_of_saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape("config.json: perceiver.depth: expected int, got 2.0 (float)")):
        flamingo.Flamingo.from_pretrained(copy_of_saved)


def test_a_misspelt_config_field_names_the_file_and_the_field_it_resembles(copy_of_saved):
    config = json.loads((copy_of_saved / "config.json").read_text())
    config["perceiver"]["num_latnets"] = config["perceiver"].pop("num_latents")
    (copy_of_saved / "config.json").write_text(json.dumps(config))
    message = f"{copy_of_saved / 'config.json'}: perceiver.num_latnets: unknown field; did you mean num_latents?"
    with pytest.raises(ValueError, match=re.escape(message) + " Known fields: depth, "):
        flamingo.Flamingo.from_pretrained(copy_of_saved)


def test_a_config_section_that_is_not_an_object_names_the_file(copy_of_saved):
    _edit_config(copy_of_saved, perceiver=[2, 4])
    with pytest.raises(ValueError, match=re.escape(str(copy_of_saved / "config.json"))):
        flamingo.Flamingo.from_pretrained(copy_of_saved)


# ------------------------------------------------------------------------------------------------ weights


def test_a_truncated_weights_file_is_named_and_called_corrupt(copy_of_saved):
    weights = copy_of_saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(str(weights)) + ".*truncated or corrupt.*save"):
        flamingo.Flamingo.from_pretrained(copy_of_saved)


def test_a_weights_file_cut_inside_its_header_is_named_and_called_corrupt(copy_of_saved):
    weights = copy_of_saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(ValueError, match=re.escape(str(weights)) + ".*truncated or corrupt"):
        flamingo.Flamingo.from_pretrained(copy_of_saved)


# ------------------------------------------------------------------------------------------------ backbones


def test_a_language_model_folder_that_has_moved_is_named_with_the_field_and_the_fix(
    tiny_vision, tiny_llama_dir, tmp_path
):
    lm_dir = shutil.copytree(tiny_llama_dir, tmp_path / "lm")
    model, _ = build_tiny_model(tiny_vision, lm_dir)
    model.save_pretrained(tmp_path / "model")
    lm_dir.rename(tmp_path / "lm-moved")
    with pytest.raises(ValueError, match=r"lang_model.*" + re.escape(str(lm_dir.resolve())) + r".*does not exist.*move"):
        flamingo.Flamingo.from_pretrained(tmp_path / "model")


def test_a_vision_weights_file_that_has_moved_is_named_with_the_field(tiny_vision, tiny_llama_dir, tmp_path):
    weights = shutil.copy(tiny_vision["weights"], tmp_path / "tower.pt")
    model, _ = build_tiny_model({**tiny_vision, "weights": str(weights)}, tiny_llama_dir)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "tower.pt").unlink()
    with pytest.raises(ValueError, match=r"vision_pretrained.*" + re.escape(str(weights)) + r".*does not exist"):
        flamingo.Flamingo.from_pretrained(tmp_path / "model")


def test_a_self_contained_save_missing_its_language_model_folder_says_so(tiny_vision, tiny_llama_dir, tmp_path):
    model, _ = build_tiny_model(tiny_vision, tiny_llama_dir)
    model.save_pretrained(tmp_path, save_backbones=True)
    shutil.rmtree(tmp_path / "language_model")
    with pytest.raises(ValueError, match=r"lang_model.*" + re.escape(str(tmp_path / "language_model"))):
        flamingo.Flamingo.from_pretrained(tmp_path)


class _RunsCode:
    """A pickle payload: unpickling it creates its marker file (a hostile checkpoint would run any code instead)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _write_pickle_payload(path, marker):
    with open(path, "wb") as file:
        pickle.dump({"weights": _RunsCode(marker)}, file, protocol=2)
    return path


def test_a_vision_weights_pickle_that_torch_refuses_names_the_field_and_the_file(copy_of_saved, tmp_path):
    marker = tmp_path / "code-ran"
    payload = _write_pickle_payload(tmp_path / "tower.pt", marker)
    _edit_config(copy_of_saved, vision_pretrained=str(payload))
    with pytest.raises(ValueError, match=r"config\.json: vision_pretrained: " + re.escape(str(payload)) + ".*weights_only"):
        flamingo.Flamingo.from_pretrained(copy_of_saved)
    assert not marker.exists()


def test_a_vision_weights_pickle_given_to_the_factory_names_the_argument(tiny_vision, tiny_llama_dir, tmp_path):
    payload = _write_pickle_payload(tmp_path / "tower.pt", tmp_path / "code-ran")
    with pytest.raises(ValueError, match=r"vision_pretrained: " + re.escape(str(payload)) + ".*safetensors"):
        build_tiny_model({**tiny_vision, "weights": str(payload)}, tiny_llama_dir)
    assert not (tmp_path / "code-ran").exists()


def test_a_language_model_pickle_that_torch_refuses_names_the_field_and_the_file(copy_of_saved, tiny_llama_dir, tmp_path):
    lm_dir = shutil.copytree(tiny_llama_dir, tmp_path / "lm")
    (lm_dir / "model.safetensors").unlink()
    payload = _write_pickle_payload(lm_dir / "pytorch_model.bin", tmp_path / "code-ran")
    _edit_config(copy_of_saved, lang_model=str(lm_dir))
    with pytest.raises(ValueError, match=r"config\.json: lang_model: " + re.escape(str(payload)) + ".*weights_only"):
        flamingo.Flamingo.from_pretrained(copy_of_saved)
    assert not (tmp_path / "code-ran").exists()


def _poison(path, name_part):
    """Set one value of the first tensor whose name contains ``name_part`` in a safetensors file to NaN."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    name = next(n for n in sorted(tensors) if name_part in n and tensors[n].is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    return name


def test_nan_in_the_trained_weights_is_named_with_the_file_and_the_weight(copy_of_saved):
    name = _poison(copy_of_saved / "model.safetensors", "perceiver")
    with pytest.raises(ValueError, match=re.escape(f"{copy_of_saved / 'model.safetensors'}: the weight {name} holds 1 NaN")):
        flamingo.Flamingo.from_pretrained(copy_of_saved)


def test_nan_in_a_saved_backbone_is_named_with_its_file(tiny_vision, tiny_llama_dir, tmp_path):
    model, _ = build_tiny_model(tiny_vision, tiny_llama_dir)
    model.save_pretrained(tmp_path / "model", save_backbones=True)
    vision_file = tmp_path / "model" / "vision_model.safetensors"
    shutil.copy(vision_file, tmp_path / "intact.safetensors")
    name = _poison(vision_file, "")
    with pytest.raises(ValueError, match=re.escape(f"{vision_file}: the weight {name} holds 1 NaN")):
        flamingo.Flamingo.from_pretrained(tmp_path / "model")
    shutil.copy(tmp_path / "intact.safetensors", vision_file)
    name = _poison(tmp_path / "model" / "language_model" / "model.safetensors", "layers.0")
    lm_dir = tmp_path / "model" / "language_model"
    with pytest.raises(ValueError, match=re.escape(f"the language model {lm_dir}: the weight {name} holds 1 NaN")):
        flamingo.Flamingo.from_pretrained(tmp_path / "model")


# ------------------------------------------------------------------------------------------------ processor


def test_a_corrupt_preprocessor_config_names_the_file_line_and_column(copy_of_saved):
    path = copy_of_saved / "preprocessor_config.json"
    path.write_text('{\n  "size": [32, 32],\n  "mean": [0.5,\n')
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*line \d+ column \d+"):
        flamingo.FlamingoProcessor.from_pretrained(copy_of_saved)


# ------------------------------------------------------------------------------------------------ OpenFlamingo


@pytest.mark.parametrize("content", [b"epoch 3, loss 1.25\n", b"", b"PK\x03\x04 not really a zip"])
def test_a_file_that_is_not_a_pytorch_checkpoint_is_named(content, tiny_vision, tiny_llama_dir, tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*not a PyTorch checkpoint"):
        flamingo.load_openflamingo(
            path,
            vision_encoder=tiny_vision["name"],
            vision_pretrained=tiny_vision["weights"],
            lang_model=str(tiny_llama_dir),
            cross_attn_every_n_layers=2,
        )


def test_a_truncated_safetensors_checkpoint_is_named_and_called_corrupt(tmp_path):
    from safetensors.torch import save_file

    from flamingo.openflamingo import _load_checkpoint

    path = tmp_path / "checkpoint.safetensors"
    save_file({"perceiver.latents": torch.zeros(4, 8)}, str(path))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated or corrupt"):
        _load_checkpoint(path)


def test_a_checkpoint_that_holds_no_state_dict_is_named(tmp_path):
    from flamingo.openflamingo import _load_checkpoint

    path = tmp_path / "checkpoint.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*Tensor.*not a state dict"):
        _load_checkpoint(path)
