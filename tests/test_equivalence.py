"""Equivalence tests: the clever paths (masking, caching, padding, batching) agree with the plain computation."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from flamingo.testing import FAMILIES
from flamingo.cross_attention import media_mask
from models import NO_RESAMPLING, TINY_PERCEIVER, build_tiny_model
from flamingo.testing import random_images


def _bare_lm_like(model, lm_dir):
    """The original LM, resized like ours, with the added-token rows copied in: what zero gates must reproduce."""
    bare = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    bare.resize_token_embeddings(model.config.vocab_size, mean_resizing=False)
    added = model.added_tokens
    with torch.no_grad():
        bare.get_input_embeddings().weight[added.token_ids] = added.input
        if added.output is not None:
            bare.get_output_embeddings().weight[added.token_ids] = added.output
    return bare


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_gates_give_the_bare_language_model_logits(family, tiny_vision, tiny_lm_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_lm_dir(family), every=1, open_gates=False)
    images = random_images(2)
    batch = processor([[images[0], "An image of two cats.", images[1], "An image of"], ["a dog"]])
    bare = _bare_lm_like(model, tiny_lm_dir(family))
    with torch.no_grad():
        ours = model(**batch).logits
        reference = bare(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert model.config.cross_attn_every_n_layers == 1 and len(model.cross_attn_blocks) == 4
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_open_gates_make_the_images_matter(family, tiny_vision, tiny_lm_dir):
    """The other half of the previous test: with gates open, every family really conditions on the images."""
    model, processor = build_tiny_model(tiny_vision, tiny_lm_dir(family))
    text = "<image>An image of two cats."
    with torch.no_grad():
        a = model(**processor(text=text, images=random_images(1, seed=1))).logits
        b = model(**processor(text=text, images=random_images(1, seed=2))).logits
    assert not torch.allclose(a, b, atol=1e-4)


RESAMPLERS = pytest.mark.parametrize("perceiver", [TINY_PERCEIVER, NO_RESAMPLING], ids=["perceiver", "no-resampling"])


@RESAMPLERS
@pytest.mark.parametrize("immediate", [True, False])
def test_changing_image_k_leaves_logits_before_its_token_unchanged(immediate, perceiver, tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir, immediate=immediate, perceiver=perceiver)
    text = "Before any image. <image>A cat.<|endofchunk|> In between <image>A dog.<|endofchunk|><image>A bird"
    images = random_images(3, seed=0)
    batch = processor(text=text, images=images)
    positions = (batch["input_ids"][0] == model.config.media_token_id).nonzero().flatten().tolist()
    with torch.no_grad():
        base = model(**batch).logits[0]
        for k, position in enumerate(positions):
            changed = list(images)
            changed[k] = random_images(1, seed=100 + k)[0]
            logits = model(**processor(text=text, images=changed)).logits[0]
            torch.testing.assert_close(logits[:position], base[:position], rtol=0, atol=1e-6)
            # ... and the image does reach the tokens from its <image> on (the test is not vacuous).
            assert not torch.allclose(logits[position:], base[position:], atol=1e-4)


def test_immediate_mode_sees_only_the_latest_image(tiny_vision, tiny_llama_dir):
    """With only_attend_immediate_media, tokens after image 2 do not change when image 1 changes, except through
    the language model's own self-attention; so compare the first cross-attention block's output directly."""
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir, immediate=True)
    text = "<image>A cat.<|endofchunk|><image>A dog"
    images = random_images(2)
    batch = processor(text=text, images=images)
    second = int((batch["input_ids"][0] == model.config.media_token_id).nonzero()[1])
    block = model.cross_attn_blocks[min(model.cross_attn_blocks, key=int)]
    hidden = torch.randn(1, batch["input_ids"].shape[1], block.attn.norm.normalized_shape[0])
    seen = (batch["input_ids"] == model.config.media_token_id).cumsum(dim=1)

    def cross_attention_output(pixel_values):
        media = model.encode_media(pixel_values)
        mask = media_mask(seen, media.shape[1], media.shape[2], immediate=True)
        return block.attn(hidden, block.attn.keys_values(media), mask)

    with torch.no_grad():
        base = cross_attention_output(batch["pixel_values"])
        other = batch["pixel_values"].clone()
        other[0, 0] = processor(text="<image>", images=random_images(1, seed=9))["pixel_values"][0, 0]
        changed = cross_attention_output(other)
    torch.testing.assert_close(changed[:, second:], base[:, second:], rtol=0, atol=1e-6)
    assert not torch.allclose(changed[:, :second], base[:, :second], atol=1e-4)


def test_text_before_the_first_image_gets_no_cross_attention_output(tiny_vision, tiny_llama_dir):
    model, _ = build_tiny_model(tiny_vision, tiny_llama_dir)
    block = next(iter(model.cross_attn_blocks.values()))
    media = torch.randn(2, 3, 4, model.vision_encoder.width)
    hidden = torch.randn(2, 5, block.attn.norm.normalized_shape[0])
    seen = torch.tensor([[0, 0, 1, 1, 2], [0, 0, 0, 0, 0]])
    out = block.attn(hidden, block.attn.keys_values(media), media_mask(seen, 3, 4, immediate=True))
    assert torch.equal(out[seen == 0], torch.zeros_like(out[seen == 0]))
    assert out[seen > 0].abs().sum() > 0


@RESAMPLERS
def test_left_padded_batch_with_different_image_counts_equals_each_sample_alone(perceiver, tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir, perceiver=perceiver)
    images = random_images(3, seed=4)
    samples = [[images[0], "An image of two cats.", images[1], "An image of"], [images[2], "A photo of a"]]
    batch = processor(samples)
    assert batch["pixel_values"].shape[1] == 2 and batch["attention_mask"][1, 0] == 0
    with torch.no_grad():
        batched = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=6)
        for index, sample in enumerate(samples):
            alone = processor(sample)
            length = alone["input_ids"].shape[1]
            logits = model(**alone).logits[0]
            torch.testing.assert_close(batched[index, -length:], logits, rtol=1e-4, atol=1e-4)
            alone_generated = model.generate(**alone, max_new_tokens=6)[0]
            row = generated[index]
            row = row[row != model.config.pad_token_id] if index == 1 else row
            assert torch.equal(row[: alone_generated.shape[0]], alone_generated)


@RESAMPLERS
def test_continuing_from_the_kv_cache_equals_one_full_forward(perceiver, tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir, perceiver=perceiver)
    batch = processor(text="<image>A cat.<|endofchunk|><image>A dog and a", images=random_images(2))
    ids, split = batch["input_ids"], 5
    with torch.no_grad():
        full = model(**batch).logits
        media = model.encode_media(batch["pixel_values"])
        first = model(input_ids=ids[:, :split], media=media, use_cache=True)
        second = model(
            input_ids=ids[:, split:], media=media, cache=first.cache, images_before=first.images_seen
        )
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="images_before"):
        model(input_ids=ids[:, split:], media=media, cache=first.cache)


def test_beam_search_expands_the_media_with_each_sample(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    images = random_images(3, seed=5)
    samples = [[images[0], "An image of two cats.", images[1], "An image of"], [images[2], "A photo of a"]]
    batch = processor(samples)
    kwargs = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        beams = model.generate(**batch, **kwargs)
        assert beams.shape[0] == 4
        for index, sample in enumerate(samples):
            alone = model.generate(**processor(sample), **kwargs)
            for r in range(2):
                row = beams[2 * index + r]
                row = row[row != model.config.pad_token_id]
                expected = alone[r][alone[r] != model.config.pad_token_id]
                assert torch.equal(row, expected)


def test_generation_stops_at_end_of_chunk_and_never_emits_image_tokens(tiny_vision, tiny_llama_dir):
    """Near-uniform sampling over many copies: rows that produce <|endofchunk|> end there, none produces <image>."""
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    batch = processor(text="<image>An image of", images=random_images(1))
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=30, do_sample=True, temperature=100.0, top_k=0, num_return_sequences=64)
    new = out[:, batch["input_ids"].shape[1] :]
    eoc, pad = model.config.end_of_chunk_token_id, model.config.pad_token_id
    stopped = 0
    for row in new:
        hits = (row == eoc).nonzero().flatten()
        if len(hits):
            stopped += 1
            assert (row[hits[0] + 1 :] == pad).all()
    assert stopped > 0
    assert (new != model.config.media_token_id).all()


def test_text_without_image_tokens_gives_the_same_logits_with_or_without_pixel_values(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    text_only = processor(text="A sentence with no image at all.")
    with torch.no_grad():
        alone = model(input_ids=text_only["input_ids"], attention_mask=text_only["attention_mask"]).logits
        unused_images = processor(text="<image>", images=random_images(1))["pixel_values"]
        with_unused_images = model(**{**text_only, "pixel_values": unused_images}).logits
        generated = model.generate(input_ids=text_only["input_ids"], attention_mask=text_only["attention_mask"], max_new_tokens=4)
    torch.testing.assert_close(alone, with_unused_images, rtol=0, atol=1e-6)
    assert generated.shape[1] > text_only["input_ids"].shape[1]
