"""Saving and loading: Flamingo.save_pretrained / from_pretrained (by reference and self-contained), the trainable
parameter set, the language model's own state dict and save_pretrained, pickling and deepcopy."""

import copy
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GPT2LMHeadModel, LlamaForCausalLM

import flamingo
from flamingo.testing import TINY_VISION_CONFIG, save_tiny_lm, save_tiny_vision_weights
from models import NO_RESAMPLING, build_tiny_model
from flamingo.testing import random_images

TRAINABLE_PREFIXES = ("perceiver.", "cross_attn_blocks.", "added_tokens.")


def _perturb_trainable(model, seed=0):
    """Move every trainable weight away from its initial value, so a round trip cannot pass by re-initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def _batch(processor, seed=0):
    """Two samples with 2 and 1 images: contains <image>, <|endofchunk|> and padding."""
    images = random_images(3, seed=seed)
    return processor([[images[0], "An image of two cats.", images[1], "An image of"], [images[2], "A dog"]])


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# ------------------------------------------------------------------------------------------------ by reference


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_and_reload_gives_bit_identical_logits(family, tmp_path, tiny_vision, tiny_lm_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_lm_dir(family))
    fresh = _logits(model, _batch(processor))
    _perturb_trainable(model)
    batch = _batch(processor)
    expected = _logits(model, batch)
    assert not torch.allclose(expected, fresh, atol=1e-3)  # the perturbation matters

    model.save_pretrained(tmp_path)
    loaded = flamingo.Flamingo.from_pretrained(tmp_path).eval()
    assert torch.equal(_logits(loaded, batch), expected)
    for name, value in loaded.trainable_state_dict().items():
        assert torch.equal(value, model.trainable_state_dict()[name]), name


def test_from_pretrained_takes_the_documented_dtype_and_trust_remote_code(tmp_path, tiny_vision, tiny_llama_dir):
    model, _ = build_tiny_model(tiny_vision, tiny_llama_dir)
    model.save_pretrained(tmp_path)
    loaded = flamingo.Flamingo.from_pretrained(tmp_path, dtype=torch.bfloat16, trust_remote_code=False)
    assert {p.dtype for p in loaded.lang_model.parameters()} == {torch.bfloat16}
    assert loaded.config.requires_remote_code is False
    with pytest.warns(FutureWarning, match="torch_dtype"):
        old_name = flamingo.Flamingo.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in old_name.lang_model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="not both"):
        flamingo.Flamingo.from_pretrained(tmp_path, dtype=torch.float32, torch_dtype=torch.bfloat16)


def test_default_save_holds_only_config_and_trainable_weights_and_refers_to_the_backbones(
    tmp_path, tiny_vision, tiny_lm_dir
):
    model, _ = build_tiny_model(tiny_vision, tiny_lm_dir("llama"))
    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]

    saved = load_file(str(out / "model.safetensors"))
    assert set(saved) == set(model.trainable_state_dict())
    assert all(key.startswith(TRAINABLE_PREFIXES) for key in saved)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(t.numel() for t in saved.values()) == trainable

    config = json.loads((out / "config.json").read_text())
    assert config["lang_model"] == str(Path(tiny_lm_dir("llama")).resolve())
    assert config["vision_model"] == tiny_vision["name"]
    assert config["vision_pretrained"] == str(Path(tiny_vision["weights"]).resolve())
    assert config["vision_model_cfg"]["vision_cfg"]["width"] == 64


def test_saved_files_get_the_permissions_of_any_new_file_not_private_ones(tmp_path, tiny_vision, tiny_lm_dir):
    # Files are written to a private temporary file and renamed; the rename must not keep mkstemp's 0o600, or a
    # model saved for a group (a shared checkpoint folder) cannot be read by it.
    model, processor = build_tiny_model(tiny_vision, tiny_lm_dir("llama"))
    out = tmp_path / "saved"
    model.save_pretrained(out, save_backbones=True)
    processor.save_pretrained(out)
    (tmp_path / "plain").write_text("x")
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    # language_model/ is the LM's own save_pretrained (transformers' file modes, not ours)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.is_file()}
    assert "model.safetensors" in modes and "preprocessor_config.json" in modes
    assert all(mode == expected for mode in modes.values()), {k: oct(m) for k, m in modes.items() if m != expected}


def test_saved_weights_are_much_smaller_than_the_language_model(tmp_path, tiny_vision):
    """An LM with a realistic (padded) vocabulary: its embeddings dominate, and none of them is saved."""
    lm_dir = save_tiny_lm(tmp_path / "lm", "llama", vocab_size=8192)
    model, _ = build_tiny_model(tiny_vision, lm_dir)
    assert model.config.vocab_size == 8192  # the added tokens fit in the unused rows: no resize
    model.save_pretrained(tmp_path / "saved")
    saved = (tmp_path / "saved" / "model.safetensors").stat().st_size
    lm_weights = (Path(lm_dir) / "model.safetensors").stat().st_size
    assert saved * 4 < lm_weights


# ------------------------------------------------------------------------------------------------ self-contained


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_backbones_reloads_after_the_original_backbones_are_deleted(family, tmp_path, tiny_vision, tiny_lm_dir):
    lm_copy = tmp_path / "lm"
    shutil.copytree(tiny_lm_dir(family), lm_copy)
    vision_copy = tmp_path / "vision.pt"
    shutil.copy(tiny_vision["weights"], vision_copy)
    model, processor = build_tiny_model({"name": tiny_vision["name"], "weights": str(vision_copy)}, lm_copy)
    _perturb_trainable(model, seed=1)
    batch = _batch(processor)
    expected = _logits(model, batch)

    model.save_pretrained(tmp_path / "saved", save_backbones=True)
    shutil.rmtree(lm_copy)
    vision_copy.unlink()
    moved = tmp_path / "elsewhere" / "saved"
    shutil.move(tmp_path / "saved", moved)  # references inside the directory are relative

    assert {"config.json", "model.safetensors", "language_model", "vision_model.safetensors"} <= {
        p.name for p in moved.iterdir()
    }
    loaded = flamingo.Flamingo.from_pretrained(moved).eval()
    assert torch.equal(_logits(loaded, batch), expected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_language_model_loads_on_its_own_with_original_keys_and_trained_token_rows(
    family, tmp_path, tiny_vision, tiny_lm_dir
):
    model, _ = build_tiny_model(tiny_vision, tiny_lm_dir(family))
    _perturb_trainable(model, seed=2)
    model.save_pretrained(tmp_path, save_backbones=True)

    lm, info = AutoModelForCausalLM.from_pretrained(tmp_path / "language_model", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original = AutoModelForCausalLM.from_pretrained(tiny_lm_dir(family))
    keys = set(lm.state_dict())
    assert keys == set(original.state_dict())
    assert not any("decoder_layer." in key for key in keys)
    # The added-token rows in the saved LM are the trained ones, the other rows the original ones.
    added = model.added_tokens
    embedding = lm.get_input_embeddings().weight
    assert embedding.shape[0] == model.config.vocab_size
    assert torch.equal(embedding[added.token_ids], added.input.detach())
    old = original.get_input_embeddings().weight
    assert torch.equal(embedding[: old.shape[0]], old)
    if added.output is not None:
        assert torch.equal(lm.get_output_embeddings().weight[added.token_ids], added.output.detach())
    # The saved vision tower is the original one.
    tower = load_file(str(tmp_path / "vision_model.safetensors"))
    for key, value in model.vision_encoder.visual.state_dict().items():
        assert torch.equal(tower[key], value), key


_LOAD_IN_FRESH_PROCESS = """
import sys, open_clip, torch, flamingo
directory, name, batch_path, out_path = sys.argv[1:]
assert open_clip.get_model_config(name) is None, "the tiny config must be unknown here"
model = flamingo.Flamingo.from_pretrained(directory).eval()
with torch.no_grad():
    torch.save(model(**torch.load(batch_path)).logits, out_path)
"""


def test_model_with_a_registered_open_clip_config_reloads_in_a_process_that_never_registered_it(
    tmp_path, tiny_vision, tiny_llama_dir
):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    _perturb_trainable(model, seed=3)
    batch = dict(_batch(processor))
    model.save_pretrained(tmp_path / "saved")
    torch.save(batch, tmp_path / "batch.pt")

    root = str(Path(flamingo.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = [str(tmp_path / "saved"), tiny_vision["name"], str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt")]
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_IN_FRESH_PROCESS, *args], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), _logits(model, batch))


# ------------------------------------------------------------------------------------------------ what trains


def test_only_perceiver_cross_attention_and_added_tokens_are_trainable(tiny_vision, tiny_llama_dir):
    model, _ = build_tiny_model(tiny_vision, tiny_llama_dir)
    names = dict(model.named_parameters())
    trainable = {name for name, p in names.items() if p.requires_grad}
    assert trainable == {name for name in names if name.startswith(TRAINABLE_PREFIXES)}
    assert {name.split(".")[0] for name in trainable} == {"perceiver", "cross_attn_blocks", "added_tokens"}
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    assert not any(p.requires_grad for p in model.lang_model.parameters())
    # The cross-attention blocks are not parameters of the LM (they are referenced by its fused layers only).
    assert not any("cross_attn" in name for name, _ in model.lang_model.named_parameters())


def test_adamw_with_weight_decay_leaves_frozen_weights_and_ordinary_token_embeddings_unchanged(
    tiny_vision, tiny_llama_dir
):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    model.train()
    batch = _batch(processor)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    trainable = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    embed = model.lang_model.get_input_embeddings()
    added_ids = model.added_tokens.token_ids
    ordinary_ids = torch.arange(embed.weight.shape[0])[model.added_tokens.slot_of_token < 0]
    with torch.no_grad():
        ordinary_before = embed(ordinary_ids[None])
        added_before = embed(added_ids[None])

    # All parameters go to the optimizer: weight decay must still not touch the frozen ones.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[name], before) for name, before in trainable.items())
    with torch.no_grad():
        assert torch.equal(embed(ordinary_ids[None]), ordinary_before)
        added_after = embed(added_ids[None])
    used = [i for i, token in enumerate(added_ids.tolist()) if (batch["input_ids"] == token).any()]
    assert len(used) == 3  # <|endofchunk|>, <image> and <PAD> all occur in the batch
    for i in used:
        assert not torch.equal(added_after[0, i], added_before[0, i])


# ------------------------------------------------------------------------------------------------ LM state dict


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_language_model_keeps_its_original_state_dict_and_save_pretrained(family, tmp_path, tiny_vision, tiny_lm_dir):
    model, _ = build_tiny_model(tiny_vision, tiny_lm_dir(family))
    original = AutoModelForCausalLM.from_pretrained(tiny_lm_dir(family))
    state = model.lang_model.state_dict()
    assert list(state) == list(original.state_dict())
    vocab = original.get_input_embeddings().weight.shape[0]
    for key, value in original.state_dict().items():
        same_rows = state[key][:vocab] if state[key].shape != value.shape else state[key]
        assert torch.equal(same_rows, value), key

    model.lang_model.save_pretrained(tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, state[key]), key

    # And the fused LM loads a plain state dict back (keys without the wrapper prefix), strictly.
    changed = {key: value + 1 if value.is_floating_point() else value for key, value in reloaded.state_dict().items()}
    model.lang_model.load_state_dict(changed, strict=True)
    for key, value in model.lang_model.state_dict().items():
        assert torch.equal(value, changed[key]), key


# ------------------------------------------------------------------------------------------------ copies


@pytest.mark.parametrize("make_copy", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_copied_model_gives_identical_logits_and_is_independent(make_copy, tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    _perturb_trainable(model, seed=4)
    batch = _batch(processor)
    expected = _logits(model, batch)

    twin = make_copy(model)
    assert type(twin.lang_model) is LlamaForCausalLM
    assert torch.equal(_logits(twin, batch), expected)
    with torch.no_grad():
        ids = twin.generate(**batch, max_new_tokens=4)
    assert torch.equal(ids, model.generate(**batch, max_new_tokens=4))

    # The copy's fused layers use the copy's blocks and tokens: closing its gates changes the copy only.
    with torch.no_grad():
        for block in twin.cross_attn_blocks.values():
            block.attn_gate.zero_()
            block.ff_gate.zero_()
        twin.added_tokens.input.add_(1.0)
    assert not torch.allclose(_logits(twin, batch), expected, atol=1e-3)
    assert torch.equal(_logits(model, batch), expected)


def test_gpt2_copy_keeps_its_class_and_tied_embeddings(tiny_vision, tiny_lm_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_lm_dir("gpt2"))
    twin = copy.deepcopy(model)
    assert type(twin.lang_model) is GPT2LMHeadModel
    assert twin.lang_model.lm_head.weight is twin.lang_model.get_input_embeddings().weight
    batch = _batch(processor)
    assert torch.equal(_logits(twin, batch), _logits(model, batch))


def test_save_pretrained_takes_the_trainable_weights_from_a_gathered_state_dict(tmp_path, tiny_vision, tiny_llama_dir):
    # Under FSDP the module's own parameters are shards; the trainer passes accelerator.get_state_dict(model).
    model, _ = build_tiny_model(tiny_vision, tiny_llama_dir)
    gathered = {key: value.clone() for key, value in model.state_dict().items()}
    gathered["perceiver.latents"] += 1.0
    model.save_pretrained(tmp_path / "saved", state_dict=gathered)
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert set(saved) == set(model.trainable_state_dict())
    assert torch.equal(saved["perceiver.latents"], gathered["perceiver.latents"])
    assert not torch.equal(saved["perceiver.latents"], model.perceiver.latents)


def test_save_pretrained_with_a_state_dict_missing_trainable_weights_names_them(tmp_path, tiny_vision, tiny_llama_dir):
    model, _ = build_tiny_model(tiny_vision, tiny_llama_dir)
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("perceiver.")}
    with pytest.raises(ValueError, match=r"lacks trainable weights: \['perceiver\."):
        model.save_pretrained(tmp_path / "saved", state_dict=partial)
    with pytest.raises(ValueError, match="cannot take a state_dict"):
        model.save_pretrained(tmp_path / "saved", state_dict=model.state_dict(), save_backbones=True)


# ------------------------------------------------------------------------------------------------ other towers


def test_coca_tower_gives_its_attentional_pooler_tokens_and_reloads(tmp_path, tiny_llama_dir):
    """A CoCa tower's tokens are its attentional pooler's queries, at the pooler's width (embed_dim), not the ViT's:
    the perceiver must be built for that width, and the saved model must rebuild the same tower."""
    config = {**TINY_VISION_CONFIG, "vision_cfg": {**TINY_VISION_CONFIG["vision_cfg"], "attentional_pool": True,
                                                    "attn_pooler_queries": 5, "attn_pooler_heads": 2}}
    config["multimodal_cfg"] = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}
    config["text_cfg"] = {**config["text_cfg"], "embed_cls": True}
    config["custom_text"] = True  # with multimodal_cfg: open_clip builds a CoCa
    (tmp_path / "flamingo-tiny-coca.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "flamingo-tiny-coca.json")
    weights = save_tiny_vision_weights("flamingo-tiny-coca", tmp_path / "coca.pt")
    model, processor = build_tiny_model({"name": "flamingo-tiny-coca", "weights": weights}, tiny_llama_dir)

    assert model.vision_encoder.width == config["embed_dim"] != config["vision_cfg"]["width"]
    tokens = model.vision_encoder(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 4, config["embed_dim"])  # 5 queries: the first is the pooled embedding
    _perturb_trainable(model, seed=3)
    batch = _batch(processor)
    expected = _logits(model, batch)
    other_images = {**batch, "pixel_values": torch.randn_like(batch["pixel_values"])}
    assert not torch.allclose(expected, _logits(model, other_images))  # the pooler's tokens reach the text

    model.save_pretrained(tmp_path / "saved", save_backbones=True)
    processor.save_pretrained(tmp_path / "saved")
    loaded = flamingo.Flamingo.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(_logits(loaded, batch), expected)


def _register_tiny_resnet(tmp_path) -> dict:
    config = {**TINY_VISION_CONFIG, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}}
    (tmp_path / "flamingo-tiny-rn.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "flamingo-tiny-rn.json")
    return {"name": "flamingo-tiny-rn", "weights": save_tiny_vision_weights("flamingo-tiny-rn", tmp_path / "rn.pt")}


def test_resnet_tower_gives_one_token_per_position_of_its_feature_stage_and_reloads(tmp_path, tiny_llama_dir):
    """A ResNet tower (open_clip ModifiedResNet) gives the feature map of the configured stage, one layer-normalised
    token per position; the stage is part of the config, so the saved model rebuilds the same tokens."""
    vision = _register_tiny_resnet(tmp_path)
    model, processor = build_tiny_model(vision, tiny_llama_dir, vision_feature_stage=2)
    assert model.config.vision_feature_stage == 2
    images = torch.randn(2, 3, 32, 32)
    tokens = model.vision_encoder(images)
    # stage 2 of a width-8 ResNet: stride 8 (a 4 x 4 grid at 32 px), 8 * 2 planes * 4 (bottleneck expansion) channels
    assert model.vision_encoder.width == 64
    assert tokens.shape == (2, 16, 64)
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 16), atol=1e-5, rtol=0)  # layer-normalised
    last = build_tiny_model(vision, tiny_llama_dir)[0].vision_encoder  # None: the last stage, 1 x 1 at 32 px
    assert last(images).shape == (2, 1, last.width) and last.width == 256
    # The pooled embedding (RICES) is the tower's own CLIP image embedding.
    reference = open_clip.create_model(vision["name"], pretrained=vision["weights"]).eval()
    torch.testing.assert_close(model.vision_encoder.embed(images), reference.encode_image(images))

    _perturb_trainable(model, seed=4)
    batch = _batch(processor)
    expected = _logits(model, batch)
    other_images = {**batch, "pixel_values": torch.randn_like(batch["pixel_values"])}
    assert not torch.allclose(expected, _logits(model, other_images))  # the feature map reaches the text
    model.save_pretrained(tmp_path / "saved", save_backbones=True)
    processor.save_pretrained(tmp_path / "saved")
    loaded = flamingo.Flamingo.from_pretrained(tmp_path / "saved").eval()
    assert loaded.vision_encoder.resnet_stage == 2
    assert torch.equal(_logits(loaded, batch), expected)


def test_feature_stage_is_refused_where_it_has_no_meaning(tmp_path, tiny_vision, tiny_llama_dir):
    with pytest.raises(ValueError, match="ResNet towers only"):
        build_tiny_model(tiny_vision, tiny_llama_dir, vision_feature_stage=2)
    with pytest.raises(ValueError, match="must be one of 1-4"):
        build_tiny_model(_register_tiny_resnet(tmp_path), tiny_llama_dir, vision_feature_stage=5)



def test_a_model_without_resampling_saves_no_latents_and_reloads(tmp_path, tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir, perceiver=NO_RESAMPLING)
    _perturb_trainable(model, seed=5)
    batch = _batch(processor)
    expected = _logits(model, batch)
    assert model.encode_media(batch["pixel_values"]).shape[2] == 16  # the tower's 16 patch tokens
    model.save_pretrained(tmp_path / "saved")
    assert not any("latents" in key for key in load_file(tmp_path / "saved" / "model.safetensors"))
    loaded = flamingo.Flamingo.from_pretrained(tmp_path / "saved").eval()
    assert loaded.config.perceiver.resample is False
    assert torch.equal(_logits(loaded, batch), expected)
