"""The OpenFlamingo reference implementation (open_flamingo 2.0.1) on the tiny backbones, and its checkpoint layouts.

Used by ``test_openflamingo.py``. The reference needs three small patches to run on transformers 5; they are applied
by a fixture there (see :func:`patched_forwards`), never to the installed package.
"""

import re

import torch

# OpenFlamingo infers the decoder-layer path from the class name and knows llama, opt, gpt_neox and mpt only.
OPENFLAMINGO_LAYERS_ATTR = {
    "gpt2": "transformer.h",
    "phi": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
}
CROSS_ATTN_EVERY = 2
ATTN_GATE, FF_GATE = 0.8, -0.5


def patched_forwards():
    """``{(class, name): replacement}``: the parts of open_flamingo 2.0.1 that break on transformers 5.

    1. ``FlamingoLayer.forward(self, lang_x, attention_mask=None, **kw)`` takes the decoder layer's other arguments
       by keyword only, but GPT-2 calls its blocks with positional ones (``block(hidden, past, mask, ...)``), which
       would land in ``attention_mask``; the replacement passes ``*args`` through unchanged.
    2. ``FlamingoLMMixin.forward(self, input_ids, attention_mask, **kw)`` requires ``attention_mask``, but
       ``generate`` in transformers 5 drops an all-ones mask and passes none; the replacement defaults it to None.
       Its signature also hid ``position_ids``, and transformers 5's generic ``prepare_inputs_for_generation``
       builds padding-aware position ids (from the attention mask) only for a forward that declares them; so it
       declares ``position_ids`` and hands them on to LMs whose own forward takes them. (Under the transformers 4
       of OpenFlamingo's time, GPT-2 built them itself; without this, left-padded GPT-2 generation would shift the
       absolute positions of the padded samples.) It also hands the KV cache on under the name the LM's forward
       declares: OpenFlamingo passes ``past_key_values``, which transformers 5.24 deprecates for ``cache``.

    3. ``FlamingoLayer`` hides the attributes of the decoder layer it wraps; Qwen2 in transformers < 5.24 reads
       ``layer.attention_type`` off its layers. The replacement ``__getattr__`` forwards unknown names to the layer.

    None of this changes what the reference computes in a plain forward.
    """
    import inspect

    import open_flamingo.src.flamingo_lm as ofl

    def layer_forward(self, lang_x, *args, **kwargs):
        if self.gated_cross_attn_layer is not None:
            if self.vis_x is None or self.media_locations is None:
                raise ValueError("FlamingoLayer must be conditioned before forward pass")
            lang_x = self.gated_cross_attn_layer(
                lang_x, self.vis_x, media_locations=self.media_locations, use_cached_media=self.use_cached_media
            )
        return self.decoder_layer(lang_x, *args, **kwargs)

    original_lm_forward = ofl.FlamingoLMMixin.forward

    def lm_forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        lm_forward_params = inspect.signature(super(ofl.FlamingoLMMixin, self).forward).parameters
        if position_ids is not None and "position_ids" in lm_forward_params:
            kwargs["position_ids"] = position_ids
        past = kwargs.pop("past_key_values", None)  # the name transformers >= 5.24 deprecates
        if past is not None:
            kwargs["cache" if "cache" in lm_forward_params else "past_key_values"] = past
        return original_lm_forward(self, input_ids, attention_mask, **kwargs)

    def layer_getattr(self, name):
        try:
            return torch.nn.Module.__getattr__(self, name)
        except AttributeError:
            if name == "decoder_layer":
                raise
            return getattr(self.decoder_layer, name)

    return {
        (ofl.FlamingoLayer, "forward"): layer_forward,
        (ofl.FlamingoLayer, "__getattr__"): layer_getattr,
        (ofl.FlamingoLMMixin, "forward"): lm_forward,
    }


def build_reference(family, vision, lm_dir, seed=0):
    """OpenFlamingo's model and tokenizer on the tiny backbones, with every trainable weight randomised.

    Perceiver and cross-attention weights get noise (LayerNorms included), the gates are opened (0.8 / -0.5, so the
    images change the logits), and the LM input embedding table, which OpenFlamingo trains in full, is perturbed.
    """
    from open_flamingo import create_model_and_transforms

    torch.manual_seed(seed)
    model, _, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path=vision["name"],
        clip_vision_encoder_pretrained=vision["weights"],
        lang_encoder_path=str(lm_dir),
        tokenizer_path=str(lm_dir),
        cross_attn_every_n_layers=CROSS_ATTN_EVERY,
        decoder_layers_attr_name=OPENFLAMINGO_LAYERS_ATTR.get(family),
    )
    embedding = model.lang_encoder.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if param is embedding:
                param.add_(0.02 * noise)
            elif name.endswith("attn_gate"):
                param.fill_(ATTN_GATE)
            elif name.endswith("ff_gate"):
                param.fill_(FF_GATE)
            else:
                param.add_(0.1 * noise)
    return model.eval(), tokenizer


def checkpoint_variants(model):
    """``{variant: state dict}`` in the layouts OpenFlamingo checkpoints come in.

    full: ``state_dict()`` as OpenFlamingo produces it, holding both layouts (the same modules are registered twice);
    full_v2 / full_v1: one layout only; trainable_v2: what OpenFlamingo's training saves
    (``requires_grad`` parameters, per-layer names), with DDP's ``module.`` prefix; trainable_v1: the same with
    ``lang_encoder.gated_cross_attn_layers.N.*`` names.
    """
    layers = re.escape(model.lang_encoder.decoder_layers_attr_name)
    v2_xattn = re.compile(rf"^lang_encoder\.{layers}\.(\d+)\.gated_cross_attn_layer\.(.+)$")
    v2_layer = re.compile(rf"^lang_encoder\.{layers}\.\d+\.decoder_layer\.")
    v1_only = re.compile(r"^lang_encoder\.(gated_cross_attn_layers|old_decoder_blocks)\.")

    full = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    assert any(v2_xattn.match(k) for k in trainable), "named_parameters should list the per-layer (v2) names"
    assert any(v1_only.match(k) for k in full) and any(v2_xattn.match(k) for k in full)

    def to_v1(key):
        return v2_xattn.sub(r"lang_encoder.gated_cross_attn_layers.\1.\2", key)

    return {
        "full": full,
        "full_v2": {k: v for k, v in full.items() if not v1_only.match(k)},
        "full_v1": {k: v for k, v in full.items() if not (v2_xattn.match(k) or v2_layer.match(k))},
        "trainable_v2": {"module." + k: v for k, v in trainable.items()},
        "trainable_v1": {to_v1(k): v for k, v in trainable.items()},
    }
