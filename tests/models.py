"""Tiny Flamingo models and inputs for tests, built from the tiny backbones in ``flamingo.testing``."""

import torch

import flamingo

TINY_PERCEIVER = flamingo.PerceiverConfig(depth=2, num_latents=4, heads=2, dim_head=16, max_frames=4)
TINY_CROSS_ATTENTION = flamingo.CrossAttentionConfig(heads=2, dim_head=16)
# No latents: the tower's 16 patch tokens per image go to the cross-attention as they are.
NO_RESAMPLING = flamingo.PerceiverConfig(max_frames=4, resample=False)


def build_tiny_model(
    vision, lm_dir, *, every=2, immediate=True, open_gates=True, seed=0, perceiver=TINY_PERCEIVER, **kwargs
):
    """A tiny Flamingo model; ``open_gates`` sets the tanh gates non-zero so the images change the logits."""
    torch.manual_seed(seed)
    cross_attention = flamingo.CrossAttentionConfig(heads=2, dim_head=16, only_attend_immediate_media=immediate)
    model, processor = flamingo.create_model_and_processor(
        vision_model=vision["name"],
        vision_pretrained=vision["weights"],
        lang_model=str(lm_dir),
        cross_attn_every_n_layers=every,
        perceiver=perceiver,
        cross_attention=cross_attention,
        **kwargs,
    )
    if open_gates:
        with torch.no_grad():
            for block in model.cross_attn_blocks.values():
                block.attn_gate.fill_(1.0)
                block.ff_gate.fill_(0.5)
    return model.eval(), processor
