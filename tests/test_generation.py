"""Generation: every decoding mode with the KV cache equals recomputation without it, in every LM family; the media
follow generate()'s batch expansion; concurrent calls on one model do not see each other's images."""

import inspect
import threading

import pytest
import torch

import flamingo.modeling
from flamingo.lm_calls import LMCall
from flamingo.media_state import MediaContext
from flamingo.modeling import copies_per_sample
from flamingo.testing import FAMILIES, random_images
from models import build_tiny_model


def _batch(processor):
    """Two samples, left-padded, with 2 and 1 images; sample 0 has text before its first image."""
    images = random_images(3, seed=3)
    return processor(
        [
            ["A few words first.", images[0], "An image of two cats.", images[1], "An image of"],
            [images[2], "A photo of a"],
        ]
    )


def greedy_step(model, logits, ids, mask, finished):
    """The greedy next token from (b, vocab) logits, never <image>, pad for finished rows; returns the grown ids and
    mask, the token (b,) and the updated finished flags (a row finishes at <|endofchunk|>)."""
    logits[:, model.config.media_token_id] = -float("inf")
    token = torch.where(finished, model.config.pad_token_id, logits.argmax(dim=-1))
    ids = torch.cat([ids, token[:, None]], dim=1)
    mask = torch.cat([mask, (~finished).long()[:, None]], dim=1)
    return ids, mask, token, finished | (token == model.config.end_of_chunk_token_id)


def _greedy_without_cache(model, batch, steps):
    """Plain greedy decoding: one full forward over the whole sequence per step, no KV cache, no generate()."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    takes_positions = "position_ids" in inspect.signature(model.lang_model.forward).parameters
    for _ in range(steps):
        # Left padding must not shift the positions of real tokens (GPT-2's are absolute), as in generate().
        positions = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)} if takes_positions else {}
        out = model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"], **positions)
        ids, mask, _, finished = greedy_step(model, out.logits[:, -1], ids, mask, finished)
        if finished.all():
            break
    return ids


class ForwardLengths:
    """Records the input length of every LM forward, to show which runs really used the cache."""

    def __init__(self, lang_model):
        self.lengths = []
        self._handle = lang_model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.lengths.append(kwargs["input_ids"].shape[1])

    def take(self):
        lengths, self.lengths = self.lengths, []
        return lengths


@pytest.fixture(scope="module")
def family_model(tiny_vision, tiny_lm_dir):
    models = {}

    def get(family):
        if family not in models:
            models[family] = build_tiny_model(tiny_vision, tiny_lm_dir(family))
        return models[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_generation_equals_full_recomputation(family, family_model):
    model, processor = family_model(family)
    batch = _batch(processor)
    lengths = ForwardLengths(model.lang_model)
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=True)
        decode_steps = lengths.take()[1:]
        plain = _greedy_without_cache(model, batch, steps=8)
    assert decode_steps and set(decode_steps) == {1}  # the cache was used
    assert cached.shape[1] > batch["input_ids"].shape[1] + 1
    assert torch.equal(cached, plain[:, : cached.shape[1]])


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_beam_search_equals_beam_search_without_cache(family, family_model):
    model, processor = family_model(family)
    batch = _batch(processor)
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2)
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    lengths = ForwardLengths(model.lang_model)
    with torch.no_grad():
        cached = model.generate(**batch, use_cache=True, **kwargs)
        assert set(lengths.take()[1:]) == {1}
        plain = model.generate(**batch, use_cache=False, **kwargs)
        assert len(set(lengths.take())) > 1  # recomputed: the whole, growing sequence each step
    assert cached.sequences.shape[0] == 4
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(cached.sequences_scores, plain.sequences_scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_sampling_with_several_return_sequences_equals_sampling_without_cache(family, family_model):
    model, processor = family_model(family)
    batch = _batch(processor)
    kwargs = dict(max_new_tokens=6, do_sample=True, top_k=0, num_return_sequences=3)
    with torch.no_grad():
        torch.manual_seed(1234)
        cached = model.generate(**batch, use_cache=True, **kwargs)
        torch.manual_seed(1234)
        plain = model.generate(**batch, use_cache=False, **kwargs)
        torch.manual_seed(4321)
        other_seed = model.generate(**batch, use_cache=True, **kwargs)
    assert cached.shape[0] == 6
    assert torch.equal(cached, plain)
    assert not torch.equal(cached, other_seed)  # the samples really are random draws


def test_each_returned_copy_is_conditioned_on_its_own_samples_images(family_model):
    """Sampling with top_k=1 is greedy, so every copy must equal its own sample's greedy output."""
    model, processor = family_model("llama")
    batch = _batch(processor)
    with torch.no_grad():
        greedy = model.generate(**batch, max_new_tokens=6)
        sampled = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=1, num_return_sequences=3)
    for row in range(6):
        assert torch.equal(sampled[row], greedy[row // 3])


def test_generate_continues_a_cache_given_with_the_whole_sequence(family_model):
    """HF convention: input_ids hold the cached tokens too; the images among them are counted from the ids."""
    model, processor = family_model("llama")
    batch = _batch(processor)
    split = batch["input_ids"].shape[1] - 3
    with torch.no_grad():
        whole = model.generate(**batch, max_new_tokens=6)
        prefix = model(
            input_ids=batch["input_ids"][:, :split],
            attention_mask=batch["attention_mask"][:, :split],
            pixel_values=batch["pixel_values"],
            use_cache=True,
        )
        continued = model.generate(**batch, cache=prefix.cache, max_new_tokens=6)
    assert torch.equal(continued, whole)


def test_copies_per_sample_follows_the_merged_generation_settings(family_model):
    model, _ = family_model("llama")
    lm = model.lang_model
    assert copies_per_sample(lm, {}) == 1
    assert copies_per_sample(lm, {"num_beams": 3}) == 3
    assert copies_per_sample(lm, {"num_beams": 3, "num_return_sequences": 2}) == 3
    assert copies_per_sample(lm, {"do_sample": True, "num_return_sequences": 4}) == 4
    from transformers import GenerationConfig

    assert copies_per_sample(lm, {"generation_config": GenerationConfig(num_beams=5), "num_return_sequences": 2}) == 5
    assert copies_per_sample(lm, {"generation_config": GenerationConfig(num_beams=5), "num_beams": 2}) == 2


def test_expanded_context_repeats_each_sample_in_a_row():
    media = torch.arange(2.0)[:, None, None, None].expand(2, 1, 1, 3)
    prompt = torch.tensor([[1, 9, 2], [9, 3, 4]])
    context = MediaContext(media=media, blocks={}, media_token_id=9, prompt_ids=prompt,
                           images_before=torch.zeros(2, dtype=torch.long), prompt_offset=0).expanded(3)
    assert context.media[:, 0, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(context.prompt_ids, prompt.repeat_interleave(3, dim=0))
    context.start_lm_forward(LMCall(prompt.repeat_interleave(3, dim=0), 0))
    assert context.images_seen.tolist() == [[0, 1, 1]] * 3 + [[1, 1, 1]] * 3


def test_a_batch_the_media_cannot_follow_raises():
    prompt = torch.tensor([[1, 9, 2], [9, 3, 4]])
    context = MediaContext(media=torch.zeros(2, 1, 1, 3), blocks={}, media_token_id=9, prompt_ids=prompt,
                           images_before=torch.zeros(2, dtype=torch.long), prompt_offset=0).expanded(2)
    with pytest.raises(ValueError, match="batch of 6 sequences, but the images are for 4"):
        context.start_lm_forward(LMCall(prompt.repeat_interleave(3, dim=0), 0))
    with pytest.raises(ValueError, match="differ from the prompt"):
        context.start_lm_forward(LMCall(prompt.repeat(2, 1), 0))  # tiled, not interleaved: samples mixed up


def test_generate_mode_that_changes_the_batch_unexpectedly_raises_a_clear_error(family_model, monkeypatch):
    model, processor = family_model("llama")
    monkeypatch.setattr(flamingo.modeling, "copies_per_sample", lambda lang_model, kwargs: 1)
    with pytest.raises(ValueError, match="batch of 6 sequences, but the images are for 2"):
        model.generate(**_batch(processor), max_new_tokens=2, num_beams=3)


def test_two_threads_generating_on_one_model_each_get_their_own_answer(family_model):
    model, processor = family_model("llama")
    prompts = [
        processor([random_images(1, seed=10)[0], "An image of"]),
        processor([random_images(1, seed=11)[0], "A photo of a", random_images(1, seed=12)[0], "And"]),
    ]
    with torch.no_grad():
        alone = [model.generate(**p, max_new_tokens=10) for p in prompts]
    start = threading.Barrier(2)
    results, errors = {0: [], 1: []}, []

    def serve(index):
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(6):
                    results[index].append(model.generate(**prompts[index], max_new_tokens=10))
        except Exception as error:  # reported below; an exception in a thread would otherwise be lost
            errors.append(error)

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for index in range(2):
        assert all(torch.equal(out, alone[index]) for out in results[index])


def test_the_old_cache_name_still_works_with_a_future_warning(family_model):
    model, processor = family_model("llama")
    batch = processor(text="<image>A cat.<|endofchunk|><image>A dog and a", images=random_images(2))
    ids, split = batch["input_ids"], 5
    with torch.no_grad():
        media = model.encode_media(batch["pixel_values"])
        first = model(input_ids=ids[:, :split], media=media, use_cache=True)
        new = model(input_ids=ids[:, split:], media=media, cache=first.cache, images_before=first.images_seen)
        first = model(input_ids=ids[:, :split], media=media, use_cache=True)
        with pytest.warns(FutureWarning, match="past_key_values"):
            old_cache = first.past_key_values
        with pytest.warns(FutureWarning, match="pass cache="):
            old = model(
                input_ids=ids[:, split:], media=media, past_key_values=old_cache, images_before=first.images_seen
            )
    assert old_cache is first.cache
    torch.testing.assert_close(old.logits, new.logits, rtol=0, atol=0)
