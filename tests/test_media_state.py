"""MediaState: a hand-written decoding loop that carries the encoded images and their cross-attention keys/values
across calls computes what the plain computation does, and projects the images once."""

import copy
import inspect

import pytest
import torch

import flamingo
from flamingo.cross_attention import MaskedCrossAttention
from flamingo.testing import FAMILIES, random_images
from models import build_tiny_model
from test_generation import _batch, _greedy_without_cache, family_model, greedy_step  # noqa: F401  (a fixture)


class ProjectionCount:
    """Counts the media key/value projections (MaskedCrossAttention.keys_values calls)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = MaskedCrossAttention.keys_values

        def counted(attn, media):
            self.calls += 1
            return original(attn, media)

        monkeypatch.setattr(MaskedCrossAttention, "keys_values", counted)


def _greedy_with_media_state(model, batch, steps):
    """Greedy decoding written by hand: one call per token, continuing the cache with the previous media_state."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    takes_positions = "position_ids" in inspect.signature(model.lang_model.forward).parameters
    extra = {"position_ids": positions} if takes_positions else {}
    out = model(ids, pixel_values=batch["pixel_values"], attention_mask=mask, use_cache=True, **extra)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(steps):
        ids, mask, token, finished = greedy_step(model, out.logits[:, -1], ids, mask, finished)
        if finished.all():
            break
        if takes_positions:
            extra = {"position_ids": positions[:, -1:] + 1}
            positions = torch.cat([positions, extra["position_ids"]], dim=1)
        out = model(token[:, None], attention_mask=mask, cache=out.cache, media_state=out.media_state, use_cache=True,
                    **extra)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_manual_decoding_loop_with_media_state_equals_recomputation_and_projects_the_images_once(
    family, family_model, monkeypatch
):
    model, processor = family_model(family)
    batch = _batch(processor)  # left-padded, 2 and 1 images, text before the first image
    with torch.no_grad():
        plain = _greedy_without_cache(model, batch, steps=8)
        count = ProjectionCount(monkeypatch)
        looped = _greedy_with_media_state(model, batch, steps=8)
    assert looped.shape[1] > batch["input_ids"].shape[1] + 2
    assert torch.equal(looped, plain[:, : looped.shape[1]])
    assert count.calls == len(model.cross_attn_blocks)  # once per block in the whole loop, not once per step


def test_continuing_with_media_state_equals_one_full_forward(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    batch = processor(text="<image>A cat.<|endofchunk|><image>A dog and a", images=random_images(2))
    ids = batch["input_ids"]
    with torch.no_grad():
        full = model(**batch).logits
        first = model(input_ids=ids[:, :5], pixel_values=batch["pixel_values"], use_cache=True)
        second = model(input_ids=ids[:, 5:], cache=first.cache, media_state=first.media_state, use_cache=True)
    assert isinstance(first.media_state, flamingo.MediaState)
    assert first.media_state.images_seen.tolist() == [1] and second.media_state.images_seen.tolist() == [2]
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), full, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert model(**batch, use_cache=False).media_state is None


def test_media_state_after_a_weight_update_uses_the_new_weights_not_stale_keys_values(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    batch = processor(text="<image>A cat.<|endofchunk|><image>A dog and a", images=random_images(2))
    ids = batch["input_ids"]
    with torch.no_grad():
        first = model(input_ids=ids[:, :5], pixel_values=batch["pixel_values"], use_cache=True)
        caches = [copy.deepcopy(first.cache) for _ in range(3)]
        before = model(input_ids=ids[:, 5:], cache=caches[0], media_state=first.media_state).logits
        for block in model.cross_attn_blocks.values():
            block.attn.to_kv.weight.mul_(3.0)  # what an optimiser step does: an in-place update
        carried = model(input_ids=ids[:, 5:], cache=caches[1], media_state=first.media_state).logits
        recomputed = model(input_ids=ids[:, 5:], cache=caches[2], media=first.media_state.media,
                           images_before=first.images_seen).logits
    assert not torch.allclose(carried, before, atol=1e-4)  # the update changes the answer ...
    torch.testing.assert_close(carried, recomputed, rtol=0, atol=0)  # ... and the carried state follows it


def test_repeated_and_selected_media_state_follow_the_repeated_cache(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    batch = processor(
        text=["<image>A cat.<|endofchunk|><image>A dog", "<image>A bird on a"], images=[random_images(2), random_images(1, seed=5)]
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    new = torch.tensor([[7, 8], [9, 10]])
    with torch.no_grad():
        first = model(ids, pixel_values=batch["pixel_values"], attention_mask=mask, use_cache=True)
        once = model(new, attention_mask=torch.cat([mask, torch.ones_like(new)], 1), cache=first.cache,
                     media_state=first.media_state).logits
        first = model(ids, pixel_values=batch["pixel_values"], attention_mask=mask, use_cache=True)
        first.cache.batch_repeat_interleave(3)
        rows = torch.tensor([5, 0])  # copy 2 of sample 1, copy 0 of sample 0
        first.cache.reorder_cache(rows)
        state = first.media_state.repeat_interleave(3).select(rows)
        swapped = model(new.flip(0), attention_mask=torch.cat([mask.flip(0), torch.ones_like(new)], 1),
                        cache=first.cache, media_state=state).logits
    torch.testing.assert_close(swapped, once.flip(0), rtol=1e-5, atol=1e-5)


def test_last_image_only_gives_the_same_continuation_in_immediate_mode(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir, immediate=True)
    batch = processor(
        text=["<image>A cat.<|endofchunk|><image>A dog", "<image>A bird on a"], images=[random_images(2), random_images(1, seed=5)]
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    new = torch.tensor([[7, 8], [9, 10]])
    new_mask = torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        first = model(ids, pixel_values=batch["pixel_values"], attention_mask=mask, use_cache=True)
        whole = model(new, attention_mask=new_mask, cache=first.cache, media_state=first.media_state).logits
        first = model(ids, pixel_values=batch["pixel_values"], attention_mask=mask, use_cache=True)
        last = first.media_state.last_image_only()
        assert last.media.shape[1] == 1 and last.images_seen.tolist() == [1, 1]
        assert all(k.shape[2] == last.media.shape[2] for k, _ in last.keys_values.values())
        sliced = model(new, attention_mask=new_mask, cache=first.cache, media_state=last).logits
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)


def test_media_state_misuse_raises_clear_errors(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    batch = processor(text="<image>A cat.<|endofchunk|>A dog", images=random_images(1))
    ids = batch["input_ids"]
    with torch.no_grad():
        first = model(ids, pixel_values=batch["pixel_values"], use_cache=True)
        state = first.media_state
        with pytest.raises(ValueError, match="holds 1 image.*new text has at most 0 <image> token"):
            model(ids[:, -1:], pixel_values=batch["pixel_values"], cache=first.cache, media_state=state)
        with pytest.raises(ValueError, match="do not also pass images_before"):
            model(ids[:, -1:], images_before=first.images_seen, cache=first.cache, media_state=state)
        with pytest.raises(ValueError, match="media_state is for 1 samples but input_ids has 2"):
            model(ids[:, -1:].repeat(2, 1), cache=first.cache, media_state=state)
        image = torch.tensor([[model.config.media_token_id]])
        with pytest.raises(ValueError, match="holds only 1 image"):
            model(image, cache=first.cache, media_state=state)
        with pytest.raises(ValueError, match="previous output's media_state"):
            model(ids[:, -1:], cache=first.cache, media_state=first.media_state.media)
        with pytest.raises(ValueError, match="media_state"):
            model(ids[:, -1:], media=state.media, cache=first.cache)  # continuing needs the count


class ProjectedImages:
    """Counts the image slots projected to keys/values, per call of MaskedCrossAttention.keys_values."""

    def __init__(self, monkeypatch):
        self.slots = []
        original = MaskedCrossAttention.keys_values

        def counted(attn, media):
            self.slots.append(media.shape[1])
            return original(attn, media)

        monkeypatch.setattr(MaskedCrossAttention, "keys_values", counted)


def _chunk_images(ids, pixel_values, start, end, media_token_id):
    """The pixels of the images whose <image> tokens lie in columns start:end of each row, zero-padded to the most
    any row has there (as the processor pads a turn's images); None when the chunk has no image."""
    rows = []
    for b in range(ids.shape[0]):
        image_positions = (ids[b] == media_token_id).nonzero().flatten().tolist()
        rows.append([k for k, p in enumerate(image_positions) if start <= p < end])
    most = max(len(r) for r in rows)
    if most == 0:
        return None, rows
    chunk = pixel_values.new_zeros(ids.shape[0], most, *pixel_values.shape[2:])
    for b, images in enumerate(rows):
        for j, k in enumerate(images):
            chunk[b, j] = pixel_values[b, k]
    return chunk, rows


@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all-earlier-images"])
@pytest.mark.parametrize("family", FAMILIES)
def test_continuation_calls_that_bring_new_images_equal_one_forward_over_the_whole_sequence(
    family, immediate, tiny_vision, tiny_lm_dir, monkeypatch
):
    """A chat-like run: the sequence arrives in four calls on the KV cache and media_state, some calls bringing the
    images of their own <image> tokens (for one row but not the other, or for neither); the logits equal one plain
    forward over the whole left-padded batch with all its images, and every image is projected once."""
    model, processor = build_tiny_model(tiny_vision, tiny_lm_dir(family), immediate=immediate)
    images = random_images(5, seed=11)
    batch = processor([
        ["A few words first.", images[0], "Two cats.", images[1], "A dog on a mat and", images[2], "a bird"],
        [images[3], "A photo of a dog and some more words.", images[4], "A fish"],
    ])
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    media_token = model.config.media_token_id
    row0 = (ids[0] == media_token).nonzero().flatten().tolist()
    bounds = [0, row0[0] + 2, row0[1] + 1, row0[2], ids.shape[1]]  # the third call brings no image for row 0
    takes_positions = "position_ids" in inspect.signature(model.lang_model.forward).parameters
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = (lambda a, b: {"position_ids": positions[:, a:b]}) if takes_positions else (lambda a, b: {})
    with torch.no_grad():
        full = model(ids, pixel_values=pixels, attention_mask=mask, **extra(0, ids.shape[1])).logits
        projected = ProjectedImages(monkeypatch)
        pieces, out, brought = [], None, []
        for start, end in zip(bounds, bounds[1:]):
            chunk_pixels, rows = _chunk_images(ids, pixels, start, end, media_token)
            brought.append([len(r) for r in rows])
            if out is None:
                out = model(ids[:, :end], pixel_values=chunk_pixels, attention_mask=mask[:, :end], use_cache=True,
                            **extra(0, end))
            else:
                out = model(ids[:, start:end], pixel_values=chunk_pixels, attention_mask=mask[:, :end],
                            cache=out.cache, media_state=out.media_state, use_cache=True, **extra(start, end))
            pieces.append(out.logits)
    # The split exercises what it should: later calls bring images for one row only, for both, and for neither.
    assert brought[0] == [1, 1] and sum(sum(b) for b in brought) == 5
    assert any(0 in b and sum(b) > 0 for b in brought[1:]) and [0, 0] in brought[1:], brought
    real = mask.bool()  # a padding position's logits are whatever the LM makes of a fully masked row
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], full[real], rtol=1e-5, atol=1e-5)
    # Each call projected only its own new images (padded to the most any row brought), once per block.
    per_call = [max(b) for b in brought if max(b)]
    assert projected.slots == [t for t in per_call for _ in model.cross_attn_blocks]
    assert out.media_state.images_seen.tolist() == [3, 2]


def test_the_readmes_decoding_by_hand_example_runs_and_its_new_image_is_seen(tiny_vision, tiny_llama_dir):
    """The "Decoding by hand" block of docs/model.md (the README's test name stays), run as written: the logits
    after the new image equal one plain forward over everything it fed the model, both images included."""
    from test_docs import doc_block

    block = doc_block("decoding-by-hand")
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    images = random_images(2, seed=4)
    batch = processor([images[0], "A cat and a"])
    fed = []
    original_forward = type(model).forward

    def recording(self, input_ids, *args, **kwargs):
        fed.append(input_ids)
        return original_forward(self, input_ids, *args, **kwargs)

    namespace = {"model": model, "processor": processor, "torch": torch, "input_ids": batch["input_ids"],
                 "pixels": batch["pixel_values"], "mask": batch["attention_mask"], "new_image": images[1]}
    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model), "forward", recording)
        exec(block, namespace)
    out = namespace["out"]
    assert out.media_state.images_seen.tolist() == [2] and len(fed) == 22
    ids = torch.cat(fed, dim=1)
    with torch.no_grad():
        full = model(ids, pixel_values=torch.cat([batch["pixel_values"], processor.preprocess_images([[images[1]]])], 1))
    torch.testing.assert_close(out.logits[0, -1], full.logits[0, -1], rtol=1e-5, atol=1e-5)
