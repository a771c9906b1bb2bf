"""The auxiliary channel and per-token attributes: what a block or the perceiver reports reaches FlamingoOutput, a
dense model reports nothing, and every block reads the attributes of exactly the tokens it processes."""

import pytest
import torch

from flamingo.auxiliary import AuxiliaryReport
from flamingo.cross_attention import GatedCrossAttentionBlock
from flamingo.perceiver import PerceiverResampler
from flamingo.testing import random_images
from models import build_tiny_model


class ReportingBlock(GatedCrossAttentionBlock):
    """A dense block that also reports a known loss (``value``, differentiable through the attention gate), the
    number of tokens it processed, and records the attributes it was given."""

    def __init__(self, model, index: str, value: float):
        block = model.cross_attn_blocks[index]
        super().__init__(block.attn.norm.normalized_shape[0], block.attn.to_kv.in_features, model.config.cross_attention)
        self.load_state_dict(block.state_dict())
        self.value = value
        self.attributes_seen = []

    def forward(self, x, keys_values, mask, *, attributes=None, report=None):
        report.add_loss("known", self.attn_gate.sum() * 0 + self.value)
        report.add_stat("tokens", x.shape[1])
        self.attributes_seen.append(None if attributes is None else attributes.clone())
        return super().forward(x, keys_values, mask, attributes=attributes, report=report)


@pytest.fixture
def model_and_batch(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir, every=1)  # two layers: blocks 0 and 1
    batch = processor(text="<image>A cat.<|endofchunk|><image>A dog", images=random_images(2))
    return model, batch


def test_a_dense_model_reports_nothing(model_and_batch):
    model, batch = model_and_batch
    out = model(**batch)
    assert out.aux_losses == {} and out.stats == {}


def test_losses_and_statistics_the_blocks_report_reach_the_output_and_the_losses_carry_gradients(model_and_batch):
    model, batch = model_and_batch
    with torch.no_grad():
        reference = model(**batch).logits
    model.cross_attn_blocks["0"] = ReportingBlock(model, "0", value=1.0)
    model.cross_attn_blocks["1"] = ReportingBlock(model, "1", value=3.0)
    out = model(**batch)
    length = batch["input_ids"].shape[1]
    assert set(out.aux_losses) == {"known"}
    assert out.aux_losses["known"].item() == pytest.approx(2.0)  # a loss is averaged over the blocks reporting it
    assert {k: v.item() for k, v in out.stats.items()} == {
        "cross_attn_blocks.0/tokens": length, "cross_attn_blocks.1/tokens": length,
    }
    out.aux_losses["known"].backward()
    assert model.cross_attn_blocks["0"].attn_gate.grad is not None
    torch.testing.assert_close(out.logits, reference, rtol=0, atol=0)  # reporting changes nothing computed


def test_the_perceiver_reports_through_its_own_scope(model_and_batch, monkeypatch):
    model, batch = model_and_batch
    original = PerceiverResampler.forward

    def reporting(self, features, *, report=None):
        report.add_stat("images", features.shape[1])
        return original(self, features, report=report)

    monkeypatch.setattr(PerceiverResampler, "forward", reporting)
    assert {k: v.item() for k, v in model(**batch).stats.items()} == {"perceiver/images": 2}


def test_a_report_refuses_a_loss_that_is_not_a_scalar():
    with pytest.raises(ValueError, match="auxiliary loss 'balance' from cross_attn_blocks.3 must be a scalar"):
        AuxiliaryReport().scoped("cross_attn_blocks.3").add_loss("balance", torch.ones(2))


def test_every_block_reads_the_attributes_of_the_tokens_it_processes(model_and_batch):
    model, batch = model_and_batch
    block = model.cross_attn_blocks["1"] = ReportingBlock(model, "1", value=0.0)
    ids = batch["input_ids"]
    attributes = torch.arange(ids.shape[1])[None] * 10  # (1, l): a distinct attribute per token
    with torch.no_grad():
        first = model(ids[:, :5], pixel_values=batch["pixel_values"], token_attributes=attributes[:, :5],
                      use_cache=True)
        model(ids[:, 5:], cache=first.cache, media_state=first.media_state, token_attributes=attributes[:, 5:])
        model(ids[:, 5:7], cache=first.cache, media_state=first.media_state)  # none given: the last one repeats
        model(**batch)  # no attributes at all: blocks get None
    assert [a.tolist() for a in block.attributes_seen[:3]] == [
        attributes[:, :5].tolist(), attributes[:, 5:].tolist(), [[40, 40]],
    ]
    assert block.attributes_seen[3] is None


def test_generated_tokens_repeat_the_last_prompt_tokens_attributes(model_and_batch):
    model, batch = model_and_batch
    block = model.cross_attn_blocks["0"] = ReportingBlock(model, "0", value=0.0)
    ids = batch["input_ids"]
    attributes = torch.stack([torch.arange(ids.shape[1]), torch.ones(ids.shape[1], dtype=torch.long)], dim=-1)[None]
    model.generate(**batch, token_attributes=attributes, max_new_tokens=3, min_new_tokens=3, num_beams=2)
    prompt, *steps = block.attributes_seen
    assert torch.equal(prompt, attributes.repeat_interleave(2, dim=0))  # beams follow the expanded batch
    assert [s.tolist() for s in steps] == [[[attributes[0, -1].tolist()]] * 2] * 2


def test_attributes_of_the_wrong_shape_are_refused(model_and_batch):
    model, batch = model_and_batch
    with pytest.raises(ValueError, match="first two dimensions must be input_ids'"):
        model(**batch, token_attributes=torch.zeros(1, 3))
