"""Bad input fails early with a ValueError that names the problem."""

import re

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import flamingo
from models import TINY_CROSS_ATTENTION, TINY_PERCEIVER, build_tiny_model
from flamingo.testing import random_images


@pytest.fixture(scope="module")
def llama(tiny_vision, tiny_llama_dir):
    return build_tiny_model(tiny_vision, tiny_llama_dir)


@pytest.fixture(scope="module")
def batch(llama):
    """One sample with one image: input_ids (1, L), pixel_values (1, 1, 1, 3, 32, 32)."""
    return llama[1](text="<image>An image of", images=random_images(1))


# ------------------------------------------------------------------------------------------------ image count


def test_processor_rejects_more_image_markers_than_images(llama):
    processor = llama[1]
    with pytest.raises(ValueError, match=r"Sample 0 has 2 <image> token\(s\) but 1 image\(s\)"):
        processor(text="<image>A cat.<|endofchunk|><image>A dog", images=random_images(1))


def test_processor_rejects_more_images_than_image_markers(llama):
    processor = llama[1]
    with pytest.raises(ValueError, match=r"Sample 1 has 1 <image> token\(s\) but 2 image\(s\)"):
        processor(text=["<image>a", "<image>b"], images=[random_images(1), random_images(2)])


def test_processor_rejects_one_image_list_per_text_mismatch(llama):
    with pytest.raises(ValueError, match="2 texts but 1 image lists"):
        llama[1](text=["<image>a", "<image>b"], images=[random_images(1)])


def test_model_rejects_more_image_tokens_than_pixel_value_slots(llama, batch):
    model = llama[0]
    ids = torch.cat([batch["input_ids"], torch.tensor([[model.config.media_token_id]])], dim=1)
    with pytest.raises(ValueError, match=r"2 <image> token\(s\) in a sample but only 1 image\(s\)"):
        model(input_ids=ids, pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match=r"1 <image> token\(s\) in a sample but only 0 image\(s\)"):
        model(input_ids=batch["input_ids"])  # <image> in the text but no pixel_values at all


# ------------------------------------------------------------------------------------------------ tensor ranks


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (1, 1, 1, 1, 3, 32, 32)], ids=["4d", "7d"])
def test_model_rejects_pixel_values_of_the_wrong_rank(shape, llama, batch):
    with pytest.raises(ValueError, match=re.escape("pixel_values must be (B, T_img, F, C, H, W)") + ".*" + re.escape(str(shape))):
        llama[0](input_ids=batch["input_ids"], pixel_values=torch.zeros(shape))


def test_model_rejects_one_dimensional_input_ids(llama, batch):
    with pytest.raises(ValueError, match=re.escape("input_ids must be a (B, L) tensor") + r".*\(\d+,\)"):
        llama[0](input_ids=batch["input_ids"][0], pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match=re.escape("input_ids must be a (B, L) tensor")):
        llama[0].generate(input_ids=batch["input_ids"][0], pixel_values=batch["pixel_values"])


def test_model_rejects_media_of_the_wrong_rank(llama, batch):
    with pytest.raises(ValueError, match="media must be"):
        llama[0](input_ids=batch["input_ids"], media=torch.zeros(1, 4, 64))


def test_model_rejects_pixel_values_and_media_together(llama, batch):
    model = llama[0]
    media = model.encode_media(batch["pixel_values"])
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], media=media)


# ------------------------------------------------------------------------------------------------ image files


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "Path"])
def test_unreadable_image_file_is_named_in_the_error(as_path, llama, tmp_path):
    fake = tmp_path / "x.jpg"
    fake.write_text("this is not a JPEG")
    source = fake if as_path else str(fake)
    with pytest.raises(ValueError, match="Cannot read image " + re.escape(str(fake))):
        llama[1](text="<image>a", images=[source])


@pytest.mark.parametrize("as_path", [False, True], ids=["str", "Path"])
def test_missing_image_file_is_named_in_the_error(as_path, llama, tmp_path):
    missing = tmp_path / "missing" / "nowhere.png"
    source = missing if as_path else str(missing)
    with pytest.raises(ValueError, match="Cannot read image " + re.escape(str(missing))):
        llama[1](text="<image>a", images=[source])


def test_undecodable_image_bytes_raise_value_error(llama):
    with pytest.raises(ValueError, match="Cannot read image 9 bytes"):
        llama[1](text="<image>a", images=[b"not a png"])


def test_an_image_over_pils_decompression_bomb_limit_is_named_in_the_error(llama, tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    random_images(1, size=40)[0].save(path)
    monkeypatch.setattr("PIL.Image.MAX_IMAGE_PIXELS", 100)  # 40 x 48 is over twice this: PIL refuses to open it
    with pytest.raises(ValueError, match="Cannot read image " + re.escape(str(path))):
        llama[1](text="<image>a", images=[path])


def test_interleaved_input_rejects_items_that_are_neither_text_nor_image(llama):
    with pytest.raises(ValueError, match="got int"):
        llama[1]([random_images(1)[0], "a", 3])


# ------------------------------------------------------------------------------------------------ decoder layers


def _create(tiny_vision, lm, tokenizer_dir, **kwargs):
    return flamingo.create_model_and_processor(
        vision_model=tiny_vision["name"],
        vision_pretrained=tiny_vision["weights"],
        lang_model=lm,
        tokenizer=str(tokenizer_dir),
        perceiver=TINY_PERCEIVER,
        cross_attention=TINY_CROSS_ATTENTION,
        **kwargs,
    )


def test_language_model_without_a_decoder_layer_list_asks_for_decoder_layers_attr(tiny_vision, tiny_llama_dir):
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    lm.model.layers = nn.Sequential(*lm.model.layers)
    with pytest.raises(ValueError, match=r"No decoder layers found in LlamaForCausalLM.*decoder_layers_attr"):
        _create(tiny_vision, lm, tiny_llama_dir)
    with pytest.raises(ValueError, match=r"decoder_layers_attr='model.layers' is a Sequential, not a non-empty nn.ModuleList"):
        _create(tiny_vision, lm, tiny_llama_dir, decoder_layers_attr="model.layers")


def test_decoder_layers_attr_that_does_not_exist_is_rejected(tiny_vision, tiny_llama_dir):
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(ValueError, match=r"decoder_layers_attr='model.blocks' does not exist in LlamaForCausalLM"):
        _create(tiny_vision, lm, tiny_llama_dir, decoder_layers_attr="model.blocks")


def test_cross_attention_interval_larger_than_the_layer_count_is_rejected(tiny_vision, tiny_llama_dir):
    with pytest.raises(ValueError, match="cross_attn_every_n_layers=5 must be between 1 and the 4 decoder layers"):
        _create(tiny_vision, str(tiny_llama_dir), tiny_llama_dir, cross_attn_every_n_layers=5)


# ------------------------------------------------------------------------------------------------ video, batch


def test_video_with_more_frames_than_max_frames_is_rejected(llama, batch):
    model = llama[0]
    assert model.config.perceiver.max_frames == 4
    frames = batch["pixel_values"].expand(1, 1, 5, 3, 32, 32)
    with pytest.raises(ValueError, match=r"5 frames.*at most 4 \(PerceiverConfig.max_frames\)"):
        model(input_ids=batch["input_ids"], pixel_values=frames)
    model(input_ids=batch["input_ids"], pixel_values=frames[:, :, :4])  # at the limit it works


def test_batch_size_mismatch_between_pixel_values_and_input_ids_is_rejected(llama, batch):
    pixels = batch["pixel_values"].expand(2, -1, -1, -1, -1, -1)
    with pytest.raises(ValueError, match="pixel_values has batch size 2 but input_ids has 1"):
        llama[0](input_ids=batch["input_ids"], pixel_values=pixels)


# ------------------------------------------------------------------------------------------------ loading


def test_from_pretrained_on_a_directory_without_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} holds no config.json")):
        flamingo.Flamingo.from_pretrained(tmp_path)


def test_from_pretrained_on_a_directory_without_weights(llama, tmp_path):
    llama[0].save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="holds no model.safetensors"):
        flamingo.Flamingo.from_pretrained(tmp_path)


def test_from_pretrained_rejects_weights_that_do_not_match_the_config(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    llama[0].save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"Weights do not match this model: missing \[" + re.escape(repr(dropped))):
        flamingo.Flamingo.from_pretrained(tmp_path)


def test_processor_from_pretrained_requires_its_preprocessor_config(llama, tmp_path):
    llama[1].tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no preprocessor_config.json"):
        flamingo.FlamingoProcessor.from_pretrained(tmp_path)
