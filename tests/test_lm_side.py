"""The language-model side after training: the LM saves as a plain LM holding the trained rows of the added tokens,
and ``unfuse`` gives back the original LM bit for bit."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import flamingo
from flamingo.lm_fusion import FusedDecoderLayer
from flamingo.testing import FAMILIES, random_images
from models import TINY_CROSS_ATTENTION, TINY_PERCEIVER

TEXT = "<image>An image of two cats.<|endofchunk|><image>A dog.<|endofchunk|>"


def _train(model, processor, steps=3):
    """A few AdamW steps with a large learning rate, so every trainable tensor moves."""
    texts, images = [TEXT, "Some words first. " + TEXT], [random_images(2, seed=1), random_images(2, seed=2)]
    batch = processor(text=texts, images=images)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def _build(tiny_vision, lm):
    torch.manual_seed(0)
    return flamingo.create_model_and_processor(
        vision_model=tiny_vision["name"],
        vision_pretrained=tiny_vision["weights"],
        lang_model=lm,
        tokenizer=lm.name_or_path,
        cross_attn_every_n_layers=2,
        perceiver=TINY_PERCEIVER,
        cross_attention=TINY_CROSS_ATTENTION,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_lang_model_save_pretrained_after_training_holds_the_trained_rows(family, tiny_vision, tiny_lm_dir, tmp_path):
    lm_dir = tiny_lm_dir(family)
    model, processor = _build(tiny_vision, AutoModelForCausalLM.from_pretrained(lm_dir))
    added = model.added_tokens
    initial = {name: p.detach().clone() for name, p in added.named_parameters()}
    frozen_input = model.lang_model.get_input_embeddings().weight.detach().clone()
    frozen_output = model.lang_model.get_output_embeddings().weight.detach().clone()
    _train(model, processor)
    assert all(not torch.equal(p, initial[name]) for name, p in added.named_parameters())

    model.lang_model.save_pretrained(tmp_path / "lm")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert type(plain).__name__ == type(model.lang_model).__name__
    ids = added.token_ids
    ordinary = torch.ones(frozen_input.shape[0], dtype=torch.bool)
    ordinary[ids] = False
    saved_input, saved_output = plain.get_input_embeddings().weight, plain.get_output_embeddings().weight
    # Every row: the LM's own rows as they were, the added ones as trained.
    assert torch.equal(saved_input[ordinary], frozen_input[ordinary])
    assert torch.equal(saved_input[ids], added.input.detach())
    assert torch.equal(saved_output[ordinary], frozen_output[ordinary])
    assert torch.equal(saved_output[ids], added.output_rows().detach())
    assert (saved_output is saved_input) == added.tied

    batch = processor(text="A cat.<|endofchunk|> And<image> a dog<|endofchunk|>", images=random_images(1))
    with torch.no_grad():
        fused = model.lang_model(input_ids=batch["input_ids"]).logits  # the LM alone: no images, trained rows
        reloaded = plain(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(reloaded, fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_unfuse_gives_back_the_original_language_model_bit_for_bit(family, tiny_vision, tiny_lm_dir):
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm_dir(family)).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir(family))
    flamingo.add_flamingo_tokens(tokenizer)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # so that Flamingo takes the LM as it is
    original = copy.deepcopy(lm)
    original_state = copy.deepcopy(original.state_dict())
    model, processor = _build(tiny_vision, lm)
    _train(model, processor)

    unfused = model.unfuse()
    assert unfused is lm
    assert not any(isinstance(m, FusedDecoderLayer) for m in unfused.modules())
    assert type(unfused.get_input_embeddings()) is type(original.get_input_embeddings())
    assert type(unfused.get_output_embeddings()) is type(original.get_output_embeddings())
    assert not unfused._forward_pre_hooks
    state = unfused.state_dict()
    assert state.keys() == original_state.keys()
    assert all(torch.equal(state[k], original_state[k]) for k in state)
    ids = processor(text="A cat.<|endofchunk|><image> a dog", images=random_images(1))["input_ids"]
    with torch.no_grad():
        assert torch.equal(unfused(input_ids=ids).logits, original(input_ids=ids).logits)
    with pytest.raises(ValueError, match="unfused"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match="already been unfused"):
        model.unfuse()


def test_loading_a_plain_table_into_the_fused_lm_sets_the_added_rows(tiny_vision, tiny_llama_dir):
    model, _ = _build(tiny_vision, AutoModelForCausalLM.from_pretrained(tiny_llama_dir))
    key = "model.embed_tokens.weight"
    table = model.lang_model.state_dict()[key].clone()
    table[model.added_tokens.token_ids] = 7.0
    model.lang_model.load_state_dict({key: table}, strict=False)
    assert torch.equal(model.added_tokens.input.detach(), torch.full_like(model.added_tokens.input, 7.0))
    assert torch.equal(model.lang_model.state_dict()[key], table)
