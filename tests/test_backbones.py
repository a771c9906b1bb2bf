"""The tiny test backbones load back through the real loading code and are what they claim to be."""

import json
import os

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from flamingo.testing import FAMILIES, FAMILY_SPECS, register_tiny_vision_config, save_tiny_lm


def test_vision_config_registration_is_idempotent():
    assert register_tiny_vision_config() == register_tiny_vision_config() == "flamingo-tiny-vit"
    assert open_clip.get_model_config("flamingo-tiny-vit")["vision_cfg"]["width"] == 64


def test_vision_weights_round_trip(tiny_vision):
    saved = torch.load(tiny_vision["weights"], weights_only=True)
    model = open_clip.create_model(tiny_vision["name"], pretrained=tiny_vision["weights"])
    loaded = model.state_dict()
    assert saved.keys() == loaded.keys()
    for key, value in saved.items():
        assert torch.equal(value, loaded[key]), key

    model.visual.output_tokens = True
    pooled, tokens = model.visual(torch.randn(2, 3, 32, 32))
    assert pooled.shape == (2, 32)
    assert tokens.shape == (2, 16, 64)


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_round_trip(tiny_lm_dir, family):
    out_dir = tiny_lm_dir(family)
    spec = FAMILY_SPECS[family]
    model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)

    # Loading gives exactly the weights of a model built from the same config and seed without the disk round
    # trip (nothing missing or re-initialised), hence the same logits. Compare state dicts rather than the
    # safetensors keys: transformers 5 renames some keys on load (GPT-NeoX saves `embed_out`, loads `lm_head`).
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(model.config).eval()
    fresh_state = fresh.state_dict()
    assert model.state_dict().keys() == fresh_state.keys()
    for key, value in model.state_dict().items():
        assert torch.equal(value, fresh_state[key]), key
    assert len(load_file(os.path.join(out_dir, "model.safetensors"))) > 0
    ids = tokenizer("An image of two cats", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, fresh(**ids).logits, rtol=0, atol=0)

    # Tokenizer and config agree and look like the real family.
    assert len(tokenizer) == model.config.vocab_size
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert (tokenizer.pad_token is not None) == spec["pad"]
    assert (ids["input_ids"][0, 0].item() == tokenizer.bos_token_id) == (spec["bos_eos_style"] == "llama")
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == spec["tie"]

    generated = model.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape[0] == 1 and ids["input_ids"].shape[1] < generated.shape[1] <= ids["input_ids"].shape[1] + 3


def test_tiny_lm_dirs_and_llama(tiny_lm_dirs, tiny_llama_dir):
    assert set(tiny_lm_dirs) == set(FAMILIES)
    assert tiny_lm_dirs["llama"] == tiny_llama_dir
    with open(os.path.join(tiny_llama_dir, "config.json")) as f:
        assert json.load(f)["model_type"] == "llama"


def test_larger_vocab_leaves_spare_rows(tmp_path):
    out_dir = save_tiny_lm(tmp_path, "gpt2", vocab_size=512)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.config.vocab_size == 512
    assert len(AutoTokenizer.from_pretrained(out_dir)) < 512
