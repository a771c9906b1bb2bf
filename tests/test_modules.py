"""The fused SDPA paths of the perceiver and masked cross-attention against a plain einsum + softmax reference."""

import pytest
import torch

import flamingo
from flamingo.cross_attention import GatedCrossAttentionBlock, media_mask
from flamingo.perceiver import PerceiverResampler
from models import build_tiny_model
from flamingo.testing import random_images


def _reference_attention(q, k, v, allowed=None):
    """softmax(q k^T / sqrt(e)) v, written out. q: (..., i, e), k/v: (..., j, e), allowed: (..., i, j) bool."""
    scores = torch.einsum("...ie,...je->...ij", q, k) * q.shape[-1] ** -0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("...ij,...je->...ie", scores.softmax(dim=-1), v)


def _split_heads(x, heads):
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def test_perceiver_equals_the_written_out_computation():
    torch.manual_seed(0)
    config = flamingo.PerceiverConfig(depth=2, num_latents=3, heads=2, dim_head=8, max_frames=2)
    resampler = PerceiverResampler(16, config)
    features = torch.randn(2, 3, 2, 5, 16)  # (b, t, f, v, d)

    x = (features + resampler.frame_embeddings[:2, None]).flatten(2, 3).flatten(0, 1)  # (b t, f v, d)
    latents = resampler.latents.expand(6, -1, -1)
    for layer in resampler.layers:
        attn = layer.attn
        media, lat = attn.norm_media(x), attn.norm_latents(latents)
        q = _split_heads(attn.to_q(lat), 2)
        k, v = (_split_heads(t, 2) for t in attn.to_kv(torch.cat([media, lat], dim=1)).chunk(2, dim=-1))
        out = _reference_attention(q, k, v).transpose(1, 2).flatten(2)
        latents = latents + attn.to_out(out)
        latents = latents + layer.ff(latents)
    expected = resampler.norm(latents).unflatten(0, (2, 3))
    torch.testing.assert_close(resampler(features), expected, rtol=1e-5, atol=1e-5)



def test_without_resampling_the_tokens_are_the_frames_patches_in_order_layer_normalised():
    torch.manual_seed(0)
    resampler = PerceiverResampler(16, flamingo.PerceiverConfig(max_frames=2, resample=False))
    assert resampler.latents is None and len(resampler.layers) == 0
    with torch.no_grad():
        resampler.norm.weight.normal_()
        resampler.norm.bias.normal_()
    features = torch.randn(2, 3, 2, 5, 16)  # (b, t, f, v, d)
    expected = resampler.norm((features + resampler.frame_embeddings[:2, None]).flatten(2, 3))
    out = resampler(features)
    assert out.shape == (2, 3, 10, 16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert resampler.empty_media(2).shape == (2, 0, 1, 16)

# Images at or before each token: a prompt (l = 7), and decoding steps (l = 1, which selects each row's one image).
SEEN = [[[0, 1, 1, 2, 2, 3, 3], [0, 0, 1, 1, 1, 1, 1]], [[2], [0]], [[3], [1]], [[1], [2]]]


@pytest.mark.parametrize("seen", SEEN, ids=["prompt", "step-2-0", "step-3-1", "step-1-2"])
@pytest.mark.parametrize("immediate", [True, False])
def test_masked_cross_attention_equals_the_written_out_computation(immediate, seen):
    torch.manual_seed(0)
    config = flamingo.CrossAttentionConfig(heads=2, dim_head=8, only_attend_immediate_media=immediate)
    block = GatedCrossAttentionBlock(12, 16, config)
    with torch.no_grad():
        block.attn_gate.fill_(0.7)
        block.ff_gate.fill_(-0.3)
    seen = torch.tensor(seen)
    b, l, t, n = *seen.shape, 3, 4
    x, media = torch.randn(b, l, 12), torch.randn(b, t, n, 16)

    attn = block.attn
    q = _split_heads(attn.to_q(attn.norm(x)), 2)
    k, v = (_split_heads(z, 2) for z in attn.to_kv(media.flatten(1, 2)).chunk(2, dim=-1))
    image_of_key = torch.arange(1, t + 1).repeat_interleave(n)  # 1-based image index of each visual token
    rule = (seen[:, :, None] == image_of_key) if immediate else (seen[:, :, None] >= image_of_key)
    outputs = []
    for row in range(b):  # one sample at a time, tokens without an image get exactly zero
        per_token = []
        for i in range(l):
            if seen[row, i] == 0:
                per_token.append(torch.zeros(2, 8))
            else:
                per_token.append(_reference_attention(q[row, :, i : i + 1], k[row], v[row], rule[row, i][None, None])[:, 0])
        outputs.append(torch.stack(per_token, dim=1))
    attended = attn.to_out(torch.stack(outputs).transpose(1, 2).flatten(2))
    hidden = x + torch.tanh(torch.tensor(0.7)) * attended
    expected = hidden + torch.tanh(torch.tensor(-0.3)) * block.ff(hidden)

    torch.testing.assert_close(block(x, attn.keys_values(media), media_mask(seen, t, n, immediate)), expected, rtol=1e-5, atol=1e-5)


def test_a_decoding_step_that_selects_its_image_equals_the_masked_path_with_masked_out_images():
    torch.manual_seed(0)
    attn = GatedCrossAttentionBlock(12, 16, flamingo.CrossAttentionConfig(heads=2, dim_head=8)).attn
    t, n = 3, 4
    seen = torch.tensor([[2, 2], [1, 1], [0, 0], [3, 3]])  # two tokens a row, each row on one image
    media_ok = torch.tensor([[True, True, True], [False, True, True], [True, True, True], [True, True, False]])
    x, media = torch.randn(4, 2, 12), torch.randn(4, t, n, 16)
    kv = attn.keys_values(media)
    prompt_mask, step_mask = media_mask(seen, t, n, True, media_ok), media_mask(seen[:, 1:], t, n, True, media_ok)
    assert prompt_mask.image is None and step_mask.image is not None  # the two paths really differ
    both, step = attn(x, kv, prompt_mask), attn(x[:, 1:], kv, step_mask)
    torch.testing.assert_close(step, both[:, 1:], rtol=1e-6, atol=1e-6)
    assert step[[0]].abs().sum() > 0 and torch.equal(step[1:], torch.zeros_like(step[1:]))  # masked-out or none


def test_single_images_may_be_given_without_a_frame_axis(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    batch = processor(text="<image>A cat", images=random_images(1))
    with torch.no_grad():
        six_d = model(**batch).logits
        batch["pixel_values"] = batch["pixel_values"][:, :, 0]
        five_d = model(**batch).logits
    assert torch.equal(six_d, five_d)


def test_video_frames_get_distinct_frame_embeddings(tiny_vision, tiny_llama_dir):
    """The same two frames in the other order give other latents and other logits: frame order reaches the text.
    A one-frame video is exactly an image."""
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    frames = processor(text="<image><image>", images=random_images(2))["pixel_values"][:, :, 0]  # (1, 2, c, h, w)
    video = frames[:, None]  # (b=1, t=1, f=2, c, h, w)
    ids = processor(text="Before. <image>A video of", images=random_images(1))["input_ids"]
    first_image = int((ids[0] == model.config.media_token_id).nonzero()[0])
    with torch.no_grad():
        forward_order = model.encode_media(video)
        reverse_order = model.encode_media(video.flip(2))
        logits = model(input_ids=ids, pixel_values=video).logits
        reversed_logits = model(input_ids=ids, pixel_values=video.flip(2)).logits
        one_frame = model(input_ids=ids, pixel_values=frames[:, :1, None]).logits  # (1, 1, f=1, c, h, w)
        image = model(input_ids=ids, pixel_values=frames[:, :1]).logits  # (1, 1, c, h, w)
    assert forward_order.shape == (1, 1, 4, model.vision_encoder.width)
    assert not torch.allclose(forward_order, reverse_order, atol=1e-4)
    torch.testing.assert_close(logits[:, :first_image], reversed_logits[:, :first_image], rtol=0, atol=0)
    assert not torch.allclose(logits[:, first_image:], reversed_logits[:, first_image:], atol=1e-4)
    assert torch.equal(one_frame, image)


def test_bf16_forward_on_cpu_matches_fp32(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    batch = processor([random_images(1)[0], "An image of two cats."])
    with torch.no_grad():
        fp32 = model(**batch).logits
        model.to(torch.bfloat16)
        bf16 = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=3)
    assert bf16.dtype == torch.bfloat16
    assert model.cross_attn_blocks["1"].attn.to_q.weight.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), fp32, rtol=0.05, atol=0.05)
    assert generated.shape[1] > batch["input_ids"].shape[1]


def test_bf16_language_model_with_fp32_flamingo_modules(tiny_vision, tiny_llama_dir):
    """Mixed setup common in training: frozen LM in bf16, trainable modules in fp32."""
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    batch = processor([random_images(1)[0], "An image of two cats."])
    with torch.no_grad():
        fp32 = model(**batch).logits
        model.lang_model.to(torch.bfloat16)
        mixed = model(**batch).logits
    torch.testing.assert_close(mixed.float(), fp32, rtol=0.05, atol=0.05)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    batch = processor([random_images(1)[0], "An image of two cats.", random_images(1, seed=1)[0], "A dog."])
    batch["labels"] = batch["input_ids"]
    model.train()

    def gradients():
        model.zero_grad()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = gradients()
    model.lang_model.activation_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.lang_model.modules())
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
