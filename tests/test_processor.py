"""FlamingoProcessor: interleaved and marked-text input, batching and padding, image sources, the image transform
(taken from the vision tower), the special tokens it adds, and its save/load round trip."""

import io
import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

import flamingo
from flamingo.testing import FAMILIES, FAMILY_SPECS, TINY_VISION_CONFIG
from models import build_tiny_model
from flamingo.testing import random_images

EOC, IMAGE, PAD = "<|endofchunk|>", "<image>", "<PAD>"


@pytest.fixture(scope="module")
def llama(tiny_vision, tiny_llama_dir):
    """(model, processor) for the tiny Llama (its tokenizer prepends <s> and has no pad token of its own)."""
    return build_tiny_model(tiny_vision, tiny_llama_dir)


@pytest.fixture(scope="module")
def processor(llama):
    return llama[1]


def _assert_same_batch(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------------ input styles


def test_interleaved_input_equals_marked_text(processor):
    images = random_images(2)
    interleaved = processor([images[0], "An image of two cats.", images[1], "An image of"])
    marked = processor(text=f"{IMAGE}An image of two cats.{EOC}{IMAGE}An image of", images=images)
    _assert_same_batch(interleaved, marked)
    ids = marked["input_ids"][0]
    tok = processor.tokenizer
    assert (ids == processor.media_token_id).sum() == 2
    assert (ids == processor.end_of_chunk_token_id).sum() == 1
    # <|endofchunk|> sits right before the second <image>.
    second = (ids == processor.media_token_id).nonzero().flatten()[1]
    assert ids[second - 1] == tok.convert_tokens_to_ids(EOC)
    assert marked["pixel_values"].shape == (1, 2, 1, 3, 32, 32)


def test_interleaved_text_already_ending_with_end_of_chunk_is_not_closed_twice(processor):
    images = random_images(2)
    plain = processor([images[0], "An image of two cats.", images[1], "An image of"])
    closed = processor([images[0], f"An image of two cats.{EOC}", images[1], "An image of"])
    _assert_same_batch(plain, closed)
    assert (closed["input_ids"] == processor.end_of_chunk_token_id).sum() == 1


def test_interleaved_final_text_is_not_closed_with_end_of_chunk(processor):
    batch = processor([random_images(1)[0], "An image of"])
    assert (batch["input_ids"] == processor.end_of_chunk_token_id).sum() == 0


# ------------------------------------------------------------------------------------------------ batching


def _two_and_one_images(processor, **kwargs):
    images = random_images(3, seed=7)
    samples = [[images[0], "An image of two cats.", images[1], "An image of"], [images[2], "A dog"]]
    return images, samples, processor(samples, **kwargs)


def test_batch_with_different_image_counts_zero_pads_the_missing_image_slot(processor):
    images, _, batch = _two_and_one_images(processor)
    pixels = batch["pixel_values"]
    assert pixels.shape == (2, 2, 1, 3, 32, 32)
    assert torch.equal(pixels[1, 1], torch.zeros_like(pixels[1, 1]))
    for b, t, image in [(0, 0, images[0]), (0, 1, images[1]), (1, 0, images[2])]:
        expected = processor.image_transform(image)
        assert expected.abs().sum() > 0
        assert torch.equal(pixels[b, t, 0], expected)


def test_batch_pads_on_the_left_by_default_with_the_tokenizer_pad_token(processor):
    _, samples, batch = _two_and_one_images(processor)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    short = processor(samples[1])["input_ids"][0]
    pad = processor.tokenizer.pad_token_id
    n_pad = ids.shape[1] - short.shape[0]
    assert n_pad > 0 and pad is not None
    assert torch.equal(mask[1], torch.cat([torch.zeros(n_pad), torch.ones(short.shape[0])]).long())
    assert (ids[1, :n_pad] == pad).all()
    assert torch.equal(ids[1, n_pad:], short)
    assert mask[0].all()
    assert torch.equal(ids[0], processor(samples[0])["input_ids"][0])


def test_padding_side_right_pads_on_the_right(processor):
    _, samples, batch = _two_and_one_images(processor, padding_side="right")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    short = processor(samples[1])["input_ids"][0]
    length = short.shape[0]
    assert ids.shape[1] > length
    assert mask[1, :length].all() and not mask[1, length:].any()
    assert (ids[1, length:] == processor.tokenizer.pad_token_id).all()
    assert torch.equal(ids[1, :length], short)
    assert mask[0].all()


def test_marked_text_batch_takes_one_image_list_per_text(processor):
    images = random_images(3, seed=7)
    marked = processor(
        text=[f"{IMAGE}An image of two cats.{EOC}{IMAGE}An image of", f"{IMAGE}A dog"],
        images=[images[:2], images[2:]],
    )
    interleaved = processor([[images[0], "An image of two cats.", images[1], "An image of"], [images[2], "A dog"]])
    _assert_same_batch(marked, interleaved)


# ------------------------------------------------------------------------------------------------ image sources


def _encoded(image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_pil_images_file_paths_and_bytes_give_identical_pixel_values(processor, tmp_path, fmt):
    image = random_images(1, seed=11)[0]
    data = _encoded(image, fmt)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)
    decoded = Image.open(io.BytesIO(data))  # what the file holds (JPEG is lossy, so not `image` itself)
    text = f"{IMAGE}An image of"
    reference = processor(text=text, images=[decoded])["pixel_values"]
    for source in (str(path), path, data):
        assert torch.equal(processor(text=text, images=[source])["pixel_values"], reference), type(source)
    # Interleaved style: a Path and bytes are images (a str is text).
    for source in (path, data):
        assert torch.equal(processor([source, "An image of"])["pixel_values"], reference), type(source)
    if fmt == "PNG":  # lossless: the file gives exactly the original image
        assert torch.equal(processor(text=text, images=[image])["pixel_values"], reference)


def test_non_rgb_images_are_converted_to_rgb(processor):
    gray = random_images(1, seed=12)[0].convert("L")
    pixels = processor(text=f"{IMAGE}x", images=[gray])["pixel_values"]
    assert torch.equal(pixels[0, 0, 0], processor.image_transform(gray.convert("RGB")))


# ------------------------------------------------------------------------------------------------ image transform


def test_pixel_values_equal_the_open_clip_validation_transform(processor, tiny_vision):
    val_transform = open_clip.create_model_and_transforms(tiny_vision["name"], pretrained=tiny_vision["weights"])[2]
    images = random_images(2, seed=13, size=50)
    pixels = processor(text=f"{IMAGE}a{EOC}{IMAGE}b", images=images)["pixel_values"]
    for t, image in enumerate(images):
        assert torch.equal(pixels[0, t, 0], val_transform(image))


def test_image_transform_follows_the_vision_towers_own_preprocess_config(tmp_path, tiny_vision, tiny_llama_dir):
    """A tower whose open_clip config sets non-default mean/std/resize: the processor uses them, not the defaults."""
    tower_dir = tmp_path / "tower"
    tower_dir.mkdir()
    preprocess = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear", "resize_mode": "squash"}
    (tower_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_VISION_CONFIG, "preprocess_cfg": preprocess})
    )
    clip = open_clip.create_model(tiny_vision["name"], pretrained=tiny_vision["weights"])
    torch.save(clip.state_dict(), tower_dir / "open_clip_pytorch_model.bin")
    name = f"local-dir:{tower_dir}"

    _, processor = flamingo.create_model_and_processor(
        vision_model=name,
        lang_model=tiny_llama_dir,
        cross_attn_every_n_layers=4,
        perceiver=flamingo.PerceiverConfig(depth=1, num_latents=2, heads=1, dim_head=8),
        cross_attention=flamingo.CrossAttentionConfig(heads=1, dim_head=8),
    )
    val_transform = open_clip.create_model_and_transforms(name)[2]
    default_transform = open_clip.create_model_and_transforms(tiny_vision["name"], pretrained=tiny_vision["weights"])[2]
    image = random_images(1, seed=14, size=50)[0]
    pixels = processor(text=f"{IMAGE}a", images=[image])["pixel_values"][0, 0, 0]
    assert torch.equal(pixels, val_transform(image))
    assert not torch.allclose(pixels, default_transform(image), atol=1e-3)


# ------------------------------------------------------------------------------------------------ special tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_get_consecutive_ids_after_the_original_vocabulary(family, tiny_lm_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir(family))
    n, original_pad = len(tokenizer), tokenizer.pad_token_id
    has_pad = FAMILY_SPECS[family]["pad"]
    assert (original_pad is not None) == has_pad

    added = flamingo.add_flamingo_tokens(tokenizer)
    if has_pad:
        assert added == [n, n + 1]
        assert tokenizer.pad_token_id == original_pad and tokenizer.pad_token != PAD
        assert PAD not in tokenizer.get_vocab()
        assert len(tokenizer) == n + 2
    else:
        assert added == [n, n + 1, n + 2]
        assert tokenizer.convert_tokens_to_ids(PAD) == n + 2
        assert tokenizer.pad_token == PAD and tokenizer.pad_token_id == n + 2
        assert len(tokenizer) == n + 3
    assert tokenizer.convert_tokens_to_ids(EOC) == n
    assert tokenizer.convert_tokens_to_ids(IMAGE) == n + 1
    # They are single tokens in running text, not split into pieces.
    ids = tokenizer(f"a cat{IMAGE}a dog{EOC}", add_special_tokens=False)["input_ids"]
    assert ids.count(n + 1) == 1 and ids.count(n) == 1
    assert n + 1 not in tokenizer("<imag e>", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_model_config_records_the_processor_token_ids(family, tiny_vision, tiny_lm_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_lm_dir(family))
    tokenizer = processor.tokenizer
    n = len(AutoTokenizer.from_pretrained(tiny_lm_dir(family)))
    assert model.config.end_of_chunk_token_id == processor.end_of_chunk_token_id == n
    assert model.config.media_token_id == processor.media_token_id == n + 1
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.added_token_ids == list(range(n, len(tokenizer)))
    assert model.lang_model.get_input_embeddings().weight.shape[0] == len(tokenizer)


# ------------------------------------------------------------------------------------------------ save / load


def test_processor_save_load_round_trip_gives_identical_outputs(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = flamingo.FlamingoProcessor.from_pretrained(tmp_path)
    images = random_images(3, seed=15)
    samples = [[images[0], "An image of two cats.", images[1], "An image of"], [images[2], "A dog"]]
    for kwargs in ({}, {"padding_side": "right"}):
        _assert_same_batch(processor(samples, **kwargs), loaded(samples, **kwargs))
    text = f"{IMAGE}a{EOC}{IMAGE} <PAD> b"
    _assert_same_batch(processor(text=text, images=images[:2]), loaded(text=text, images=images[:2]))
    assert len(loaded.tokenizer) == len(processor.tokenizer)
    assert loaded.tokenizer.pad_token_id == processor.tokenizer.pad_token_id
    assert (loaded.media_token_id, loaded.end_of_chunk_token_id) == (processor.media_token_id, processor.end_of_chunk_token_id)
    assert loaded.batch_decode(processor(samples)["input_ids"]) == processor.batch_decode(processor(samples)["input_ids"])



# ------------------------------------------------------------------------------------------------ bad input
# Each case either converts the documented way (flamingo.images) or raises a ValueError that names the problem and
# the sample/image; never a silent wrong result, never a traceback from inside PIL or the tokenizer.


def _pixels(processor, image):
    return processor(text=f"{IMAGE}x", images=[image])["pixel_values"][0, 0, 0]


def _grey(value, size=(8, 8)):
    return Image.new("RGB", size, (value, value, value))


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_images_are_scaled_to_8_bit_not_saturated(processor, tmp_path, mode):
    image = Image.new(mode, (8, 8), 30000)  # 30000 / 65535 * 255 = 116.7
    assert (np.asarray(flamingo.processing.load_image(image)) == 117).all()
    assert torch.equal(_pixels(processor, image), processor.image_transform(_grey(117)))
    path = tmp_path / "deep.png"
    Image.new("I;16", (8, 8), 30000).save(path)  # a 16-bit PNG file, the case users hit
    assert torch.equal(_pixels(processor, path), processor.image_transform(_grey(117)))


def test_float_pil_images_are_read_as_zero_to_one_and_out_of_range_is_rejected(processor):
    assert torch.equal(_pixels(processor, Image.new("F", (8, 8), 0.5)), processor.image_transform(_grey(128)))
    with pytest.raises(ValueError, match=r"Sample 0, image 0: Float image values must lie in \[0, 1\]"):
        _pixels(processor, Image.new("F", (8, 8), 200.0))


def test_jpeg_exif_orientation_is_applied_on_load(processor, tmp_path):
    # Stored 64 wide and 32 high with orientation 6 ("rotate 90 degrees clockwise to view"): a viewer shows 32x64.
    stored = Image.new("RGB", (64, 32), (255, 255, 255))
    stored.paste((0, 0, 0), (0, 0, 32, 32))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    upright = stored.transpose(Image.Transpose.ROTATE_270)  # left half -> top half
    assert upright.size == (32, 64)
    expected = processor.image_transform(upright)
    for source in (path, path.read_bytes(), Image.open(path)):
        assert torch.allclose(_pixels(processor, source), expected, atol=0.1), type(source)
    assert flamingo.processing.load_image(path).size == (32, 64)


def test_numpy_arrays_and_torch_tensors_are_images(processor):
    rgb = random_images(1, seed=16)[0]
    array = np.array(rgb)  # (H, W, 3) uint8
    expected = processor.image_transform(rgb)
    as_float = array.astype(np.float32) / 255
    for image in (
        array,
        as_float,
        as_float.astype(np.float64),
        torch.from_numpy(array),  # HWC
        torch.from_numpy(array).permute(2, 0, 1),  # CHW, torchvision's layout
        torch.from_numpy(as_float).permute(2, 0, 1),
    ):
        assert torch.allclose(_pixels(processor, image), expected, atol=1e-5), (type(image), image.dtype)
    grey = array[:, :, 0]
    assert torch.equal(_pixels(processor, grey), processor.image_transform(Image.fromarray(grey).convert("RGB")))
    # Interleaved style takes them too.
    assert torch.equal(processor([array, "x"])["pixel_values"][0, 0, 0], expected)


@pytest.mark.parametrize(
    "image, message",
    [
        (None, "got NoneType"),
        (np.zeros((3, 8, 9), np.uint8), "looks channels-first"),
        (np.zeros((8, 8, 2), np.uint8), "expected \\(H, W\\)"),
        (np.zeros((0, 8, 3), np.uint8), "at least 1x1"),
        (np.full((8, 8, 3), 2.0, np.float32), "must lie in \\[0, 1\\]"),
        (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
        (np.full((8, 8, 3), 300, np.int64), "must lie in \\[0, 255\\]"),
        (torch.zeros(2, 3, 8, 8), "expected \\(H, W\\)"),
    ],
)
def test_unusable_images_raise_a_value_error_naming_sample_and_image(processor, image, message):
    good = random_images(1)[0]
    with pytest.raises(ValueError, match=rf"Sample 1, image 1: .*{message}"):
        processor(text=[f"{IMAGE}a", f"{IMAGE}b{IMAGE}c"], images=[[good], [good, image]])


def test_none_in_interleaved_input_is_a_value_error_naming_sample_and_item(processor):
    with pytest.raises(ValueError, match="Sample 0, item 1: .*got NoneType"):
        processor(["a", None])


def test_empty_text_list_is_a_value_error(processor):
    with pytest.raises(ValueError, match="text= is an empty list"):
        processor(text=[])
    with pytest.raises(ValueError, match="interleaved input is an empty list"):
        processor([])


def test_text_that_encodes_to_no_tokens_is_a_value_error(tiny_vision, tiny_lm_dir):
    _, gpt2 = build_tiny_model(tiny_vision, tiny_lm_dir("gpt2"))  # adds no BOS, so "" is zero tokens
    with pytest.raises(ValueError, match="Sample 1 is empty"):
        gpt2(text=["a", ""])


def test_lone_surrogate_in_text_is_a_value_error_naming_the_sample(processor):
    with pytest.raises(ValueError, match="Sample 1: text is not valid Unicode .*lone surrogate"):
        processor(text=["fine", "half an emoji \ud83d"])
    with pytest.raises(ValueError, match="Sample 0: text is not valid Unicode"):
        processor([random_images(1)[0], "\ud83d"])


def test_non_string_text_is_a_value_error(processor):
    with pytest.raises(ValueError, match="Sample 1: text must be a str; got int"):
        processor(text=["a", 3])


def test_texts_with_a_flat_image_list_explain_the_nesting(processor):
    images = random_images(2)
    with pytest.raises(ValueError, match=r"one list of images per text .*got a flat list of images"):
        processor(text=[f"{IMAGE}a", f"{IMAGE}b"], images=images)


def test_one_text_takes_a_single_image_without_a_list(processor):
    image = random_images(1)[0]
    _assert_same_batch(processor(text=f"{IMAGE}a", images=image), processor(text=f"{IMAGE}a", images=[image]))


@pytest.mark.parametrize("name", ["cat.png", " photos/Cat.JPEG\n", "C:/images/a.webp"])
def test_a_lone_image_file_name_in_an_interleaved_list_is_an_error_not_text(processor, name):
    with pytest.raises(ValueError, match=r"Sample 0, item 1 is the text .* reads as an image file name.*pathlib\.Path"):
        processor([Image.new("RGB", (8, 8)), name, "Output:"])


def test_text_that_mentions_an_image_file_stays_text(processor):
    batch = processor([Image.new("RGB", (8, 8)), "Output: see cat.png"])
    assert batch["pixel_values"].shape[1] == 1
