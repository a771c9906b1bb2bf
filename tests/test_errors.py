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


# ------------------------------------------------------------------------------------------------ non-finite images


def _two_image_batch(processor, images):
    """Two samples; sample 1 is '<image>A cat.<|endofchunk|><image>A dog' with images (1, 2, 1, 3, 32, 32)."""
    text = ["<image>A bird.<|endofchunk|><image>A fish", "<image>A cat.<|endofchunk|><image>A dog"]
    return processor(text=text, images=[images[:2], images[2:]])


def test_nan_in_one_image_raises_naming_the_sample_and_image(llama):
    model, processor = llama
    batch = _two_image_batch(processor, random_images(4))
    batch["pixel_values"][1, 1, 0, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"pixel_values of sample 1, image 1 holds NaN or inf.*nonfinite_media='mask'"):
        model(**batch)
    batch["pixel_values"][1, 1, 0, 0, 5, 5] = float("inf")
    with pytest.raises(ValueError, match=r"pixel_values of sample 1, image 1 holds NaN or inf"):
        model.generate(**batch, max_new_tokens=2)


def test_nonfinite_media_given_directly_raises(llama, batch):
    model = llama[0]
    media = model.encode_media(batch["pixel_values"])
    media[0, 0, 1, 2] = float("-inf")
    with pytest.raises(ValueError, match=r"media of sample 0, image 0 holds NaN or inf"):
        model(input_ids=batch["input_ids"], media=media)


def test_unknown_nonfinite_media_setting_is_rejected(llama, batch, monkeypatch):
    monkeypatch.setattr(llama[0].config, "nonfinite_media", "ignore")
    with pytest.raises(ValueError, match=r"nonfinite_media='ignore' must be one of \('raise', 'mask'\)"):
        llama[0](**batch)


@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all-previous"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_masked_nonfinite_image_affects_no_token_before_it_and_gives_no_nan(
    immediate, value, tiny_vision, tiny_llama_dir
):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir, immediate=immediate)
    model.config.nonfinite_media = "mask"
    batch = _two_image_batch(processor, random_images(4))
    clean = model(**batch).logits
    bad = batch["pixel_values"].clone()
    bad[1, 1, 0, :, 3:9, 3:9] = value
    out = model(**{**batch, "pixel_values": bad}).logits
    assert out.isfinite().all()
    # Tokens of sample 1 up to (not including) its second <image> are bit-identical; sample 0 is untouched.
    second_image = int((batch["input_ids"][1] == model.config.media_token_id).nonzero()[1])
    assert torch.equal(out[1, :second_image], clean[1, :second_image])
    assert torch.equal(out[0], clean[0])
    # The masked image reaches no token: the tokens after it are those of the same image slot with any finite image.
    other = batch["pixel_values"].clone()
    other[1, 1] = torch.randn_like(other[1, 1])
    media = model.encode_media(other)
    media[1, 1] = float("nan")
    same_slot = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], media=media).logits
    assert torch.equal(same_slot, out)
    generated = model.generate(**{**batch, "pixel_values": bad}, max_new_tokens=3)
    assert generated.shape[0] == 2


# ------------------------------------------------------------------------------------------------ context length


def test_text_longer_than_the_llama_context_is_rejected(llama, batch):
    model = llama[0]
    ids = batch["input_ids"].repeat(1, 300 // batch["input_ids"].shape[1] + 1)[:, :300]
    message = r"\(0 cached \+ 300 new tokens\) is 300 tokens.*at most 256 positions.*max_position_embeddings"
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, pixel_values=batch["pixel_values"].expand(1, 300, 1, 3, 32, 32))


def test_text_longer_than_the_gpt2_context_is_rejected_not_an_index_error(tiny_vision, tiny_lm_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_lm_dir("gpt2"))
    ids = processor(text="a b c " * 200)["input_ids"]
    assert ids.shape[1] > 256
    with pytest.raises(ValueError, match=r"at most 256 positions \(its config's (n_positions|max_position_embeddings)"):
        model(input_ids=ids)


def test_cached_plus_new_tokens_past_the_context_are_rejected(llama):
    model, processor = llama
    ids = processor(text="a b c " * 200)["input_ids"][:, :200]
    out = model(input_ids=ids, use_cache=True)
    with pytest.raises(ValueError, match=r"\(200 cached \+ 60 new tokens\) is 260 tokens"):
        model(input_ids=ids[:, :60], cache=out.cache, images_before=out.images_seen)


def test_generation_past_the_context_is_rejected_before_it_starts(llama):
    model, processor = llama
    ids = processor(text="a b c " * 200)["input_ids"][:, :250]
    with pytest.raises(ValueError, match=r"prompt \(250 tokens\) plus the tokens to generate is 260 tokens"):
        model.generate(input_ids=ids, max_new_tokens=10)
    assert model.generate(input_ids=ids, max_new_tokens=6).shape[1] <= 256


# ------------------------------------------------------------------------------------------------ pixel values


@pytest.mark.parametrize(
    "shape, got",
    [((1, 1, 1, 3, 40, 40), "(3, 40, 40)"), ((1, 1, 1, 1, 32, 32), "(1, 32, 32)"), ((1, 1, 4, 32, 32), "(4, 32, 32)")],
    ids=["size", "channels", "channels-5d"],
)
def test_pixel_values_of_the_wrong_image_size_or_channels_are_rejected(shape, got, llama, batch):
    with pytest.raises(ValueError, match=re.escape(f"(C, H, W) = (3, 32, 32) for this vision tower; got {got}")):
        llama[0](input_ids=batch["input_ids"], pixel_values=torch.zeros(shape))


def test_uint8_pixel_values_are_rejected_with_a_pointer_to_the_processor(llama, batch):
    pixels = torch.zeros(batch["pixel_values"].shape, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"normalised floating-point pixels; got dtype torch\.uint8.*FlamingoProcessor"):
        llama[0](input_ids=batch["input_ids"], pixel_values=pixels)


def test_float64_pixel_values_are_cast_to_the_towers_dtype(llama, batch):
    model = llama[0]
    expected = model(**batch).logits
    assert torch.equal(model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"].double()).logits, expected)


# ------------------------------------------------------------------------------------------------ token ids, labels


@pytest.mark.parametrize("bad_id", ["vocab", -1, -100])
def test_token_id_outside_the_vocabulary_is_rejected(bad_id, llama, batch):
    model = llama[0]
    vocab = model.lang_model.get_input_embeddings().weight.shape[0]
    bad_id = vocab if bad_id == "vocab" else bad_id
    ids = batch["input_ids"].clone()
    ids[0, -1] = bad_id
    message = rf"input_ids\[0, {ids.shape[1] - 1}\] = {bad_id} is not a token id: the vocabulary has {vocab} ids"
    with pytest.raises(ValueError, match=message):
        model(input_ids=ids, pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match=rf"= {bad_id} is not a token id"):
        model.generate(input_ids=ids, pixel_values=batch["pixel_values"], max_new_tokens=2)


@pytest.mark.parametrize("shape", [(0, 5), (1, 0), (0, 0)])
def test_empty_batch_is_rejected(shape, llama):
    with pytest.raises(ValueError, match=re.escape(f"input_ids is empty (shape {shape})")):
        llama[0](input_ids=torch.zeros(shape, dtype=torch.long))


def test_float_input_ids_are_rejected(llama, batch):
    with pytest.raises(ValueError, match="input_ids must hold integer token ids; got dtype torch.float32"):
        llama[0](input_ids=batch["input_ids"].float(), pixel_values=batch["pixel_values"])


def test_labels_with_no_token_to_predict_are_rejected_rather_than_giving_nan_loss(llama, batch):
    model = llama[0]
    labels = torch.full_like(batch["input_ids"], -100)
    with pytest.raises(ValueError, match="labels hold no token to compute a loss on"):
        model(**batch, labels=labels)
    labels[0, 0] = batch["input_ids"][0, 0]  # the first label is never predicted (the LM shifts)
    with pytest.raises(ValueError, match="labels hold no token to compute a loss on"):
        model(**batch, labels=labels)
    labels[0, -1] = batch["input_ids"][0, -1]
    assert model(**batch, labels=labels).loss.isfinite()


def test_labels_outside_the_vocabulary_or_of_the_wrong_shape_are_rejected(llama, batch):
    model = llama[0]
    labels = batch["input_ids"].clone()
    labels[0, 2] = 10**6
    with pytest.raises(ValueError, match=r"labels\[0, 2\] = 1000000 is neither -100 nor a token id"):
        model(**batch, labels=labels)
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model(**batch, labels=labels[:, :-1])
