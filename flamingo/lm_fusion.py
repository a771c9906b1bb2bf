"""Fusing gated cross-attention into a Hugging Face causal LM without changing its class.

The language model keeps its own class, forward, cache and ``generate``. We only replace entries of its decoder
layer list with :class:`FusedDecoderLayer`, which runs a gated cross-attention block on the hidden states and then
the original layer. State-dict hooks keep the LM's parameter names unchanged, so ``lang_model.save_pretrained`` and
checkpoint loading see the original layout (the approach of torchtune's ``FusionLayer``).

Per-call visual state lives in one explicit :class:`MediaContext`, bound to a shared :class:`MediaSlot` for the
duration of a Flamingo call. Outside such a call the slot is empty and the LM computes exactly what it did before.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .cross_attention import GatedCrossAttentionBlock, MediaMask, media_mask


class MediaContext:
    """Visual state for one Flamingo call: media latents, per-token image counts, and cached keys/values.

    media: (b, t, n, d_visual) perceiver output. images_before: (b,) number of ``<image>`` tokens that precede the
    tokens of the next language-model forward (non-zero when continuing from a KV cache).
    """

    def __init__(self, media: torch.Tensor, images_before: torch.Tensor, media_token_id: int):
        self.media = media
        self.images_before = images_before
        self._images_at_start = images_before  # before the call's first LM forward
        self.media_token_id = media_token_id
        self.images_seen: torch.Tensor | None = None  # (b, l), for the tokens of the forward in progress
        self._keys_values: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self._masks: dict[tuple[bool, torch.device], MediaMask] = {}  # per forward, shared by all blocks

    @property
    def num_latents(self) -> int:
        return self.media.shape[2]

    def start_lm_forward(self, continues_cache: bool) -> None:
        """Called as each LM forward begins. One that continues no KV cache (``generate`` with ``use_cache=False``,
        or for an LM whose config turns the cache off, as MPT's does) reads the whole sequence again, so its images
        are counted from the start of the call, not from the end of the previous forward."""
        if not continues_cache:
            self.images_before = self._images_at_start

    def observe_input_ids(self, input_ids: torch.Tensor) -> None:
        """Called at the start of every LM forward with its input ids (b', l): counts images per position."""
        batch, media_batch = input_ids.shape[0], self.media.shape[0]
        if batch != media_batch:
            # generate() repeats each sample for beams / num_return_sequences with repeat_interleave; follow it.
            if batch % media_batch:
                raise ValueError(f"input_ids batch {batch} is not a multiple of the media batch {media_batch}.")
            repeats = batch // media_batch
            self.media = self.media.repeat_interleave(repeats, dim=0)
            self.images_before = self.images_before.repeat_interleave(repeats, dim=0)
            self._images_at_start = self._images_at_start.repeat_interleave(repeats, dim=0)
            self._keys_values.clear()
        is_media = (input_ids == self.media_token_id).long()
        self.images_seen = self.images_before[:, None] + is_media.cumsum(dim=1)
        self.images_before = self.images_seen[:, -1]
        self._masks.clear()

    def apply(self, block: GatedCrossAttentionBlock, hidden_states: torch.Tensor) -> torch.Tensor:
        """Run one gated block on (b, l, d) hidden states; keys/values of the media are computed once per call."""
        if self.images_seen is None:
            raise ValueError("Flamingo needs input_ids (not inputs_embeds) to locate the <image> tokens.")
        kv = self._keys_values.get(block)
        if kv is None:
            kv = block.attn.keys_values(self.media.to(hidden_states.device))
            self._keys_values[block] = kv
        key = (block.attn.immediate, hidden_states.device)
        mask = self._masks.get(key)
        if mask is None:
            seen = self.images_seen.to(hidden_states.device)
            mask = media_mask(seen, self.media.shape[1], self.num_latents, immediate=block.attn.immediate)
            self._masks[key] = mask
        out = block(hidden_states.to(block.attn_gate.dtype), kv, mask)
        return out.to(hidden_states.dtype)


class MediaSlot:
    """Holds the :class:`MediaContext` of the Flamingo call in progress, if any; the fused layers read it."""

    def __init__(self):
        self.context: MediaContext | None = None

    @contextmanager
    def bind(self, context: MediaContext | None) -> Iterator[None]:
        previous, self.context = self.context, context
        try:
            yield
        finally:
            self.context = previous


class FusedDecoderLayer(nn.Module):
    """A decoder layer preceded by a gated cross-attention block: ``layer(xattn(hidden_states), ...)``.

    The block is owned by the Flamingo model (``Flamingo.cross_attn_blocks``) and only referenced here, so the
    language model's parameters and state dict stay exactly its own.
    """

    def __init__(self, decoder_layer: nn.Module, cross_attn: GatedCrossAttentionBlock, slot: MediaSlot):
        super().__init__()
        self.decoder_layer = decoder_layer
        object.__setattr__(self, "cross_attn", cross_attn)
        object.__setattr__(self, "slot", slot)
        self.register_state_dict_post_hook(_drop_wrapper_prefix)
        self.register_load_state_dict_pre_hook(_add_wrapper_prefix)

    def forward(self, *args, **kwargs):
        context = self.slot.context
        if context is not None:
            if args:
                args = (context.apply(self.cross_attn, args[0]), *args[1:])
            else:
                kwargs["hidden_states"] = context.apply(self.cross_attn, kwargs["hidden_states"])
        return self.decoder_layer(*args, **kwargs)

    def __getattr__(self, name: str):
        # Some LMs read attributes off their layers (e.g. ``layer.attention_type``); forward them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "decoder_layer":
                raise
            return getattr(self.decoder_layer, name)


_WRAPPED = "decoder_layer."


def _drop_wrapper_prefix(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _WRAPPED)]:
        state_dict[prefix + key[len(prefix + _WRAPPED) :]] = state_dict.pop(key)


def _add_wrapper_prefix(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _WRAPPED)]:
        state_dict[prefix + _WRAPPED + key[len(prefix) :]] = state_dict.pop(key)


def num_decoder_layers(lang_model: nn.Module) -> int | None:
    config = lang_model.config.get_text_config() if hasattr(lang_model, "config") else None
    for name in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_layers(lang_model: nn.Module, attr: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted_path, layers)`` for the LM's list of decoder layers.

    Found from the model's structure: the ``nn.ModuleList`` of identical blocks whose length is the configured
    number of layers (the one with most parameters if several qualify). ``attr`` overrides the search.
    """
    if attr is not None:
        try:
            layers = lang_model.get_submodule(attr)
        except AttributeError as error:
            raise ValueError(f"decoder_layers_attr={attr!r} does not exist in {type(lang_model).__name__}.") from error
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise ValueError(f"decoder_layers_attr={attr!r} is a {type(layers).__name__}, not a non-empty nn.ModuleList.")
        return attr, layers

    expected = num_decoder_layers(lang_model)
    candidates = []
    for name, module in lang_model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(layer) for layer in module}) != 1 or isinstance(module[0], FusedDecoderLayer):
            continue
        if expected is not None and len(module) != expected:
            continue
        size = sum(p.numel() for p in module.parameters())
        candidates.append((size, name, module))
    if not candidates:
        raise ValueError(
            f"No decoder layers found in {type(lang_model).__name__}: no nn.ModuleList of "
            f"{expected if expected is not None else 'N'} identical blocks. Pass decoder_layers_attr='<path>' "
            "(the dotted path of the layer list, e.g. 'model.layers' or 'transformer.h')."
        )
    _, name, module = max(candidates, key=lambda c: c[0])
    return name, module


def fuse_cross_attention(
    layers: nn.ModuleList, blocks: dict[int, GatedCrossAttentionBlock], slot: MediaSlot
) -> None:
    """Replace ``layers[i]`` by ``FusedDecoderLayer(layers[i], blocks[i])`` for every i in ``blocks``, in place."""
    for index, block in blocks.items():
        layer = layers[index]
        if isinstance(layer, FusedDecoderLayer):
            raise ValueError(f"Decoder layer {index} already has cross-attention fused into it.")
        layers[index] = FusedDecoderLayer(layer, block, slot)
