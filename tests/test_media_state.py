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
        with pytest.raises(ValueError, match="do not also pass pixel_values"):
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
