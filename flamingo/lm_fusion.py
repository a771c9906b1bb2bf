"""Fusing gated cross-attention into a Hugging Face causal LM without changing its class, and undoing it.

The language model keeps its own class, forward, cache and ``generate``. :class:`LanguageModelFusion` makes every
change to it, keeps what it replaced, and :meth:`~LanguageModelFusion.unfuse` puts it back:

* decoder layer ``i`` becomes :class:`FusedDecoderLayer`, which runs gated cross-attention block ``i`` on the hidden
  states and then the original layer (the approach of torchtune's ``FusionLayer``; state-dict hooks keep the LM's
  parameter names);
* the input embedding and output layer become the modules of :mod:`flamingo.added_tokens`;
* one forward pre-hook on the LM observes each of its forwards (its input ids and the length of the KV cache it
  continues, read by :func:`flamingo.lm_calls.read_lm_call`) and tells the call's :class:`MediaContext`.

Per-call visual state lives in one explicit :class:`MediaContext`, bound to the model's :class:`MediaSlot` for the
duration of a Flamingo call. The slot is a context variable, so threads serving one model concurrently each see
their own call. Outside a Flamingo call the slot is empty and the LM computes exactly what it did before (plus the
trained rows of the added tokens).

Axes: b batch, l tokens of one LM forward, s tokens of the whole call, t media, n latents, d width.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import nn

from .added_tokens import AddedTokenEmbeddings, AddedTokenInputEmbedding, AddedTokenOutputLayer
from .cross_attention import GatedCrossAttentionBlock, MediaMask, media_mask
from .lm_calls import LMCall, read_lm_call
from .media_state import KeysValues, MediaState


class MediaContext:
    """Visual state for one Flamingo call: media latents, per-token image counts, and cached keys/values.

    media: (b, t, n, d_visual) perceiver output. blocks: the cross-attention block of each fused layer index.
    prompt_ids: (b, s0) the call's input ids. images_before: (b,) ``<image>`` tokens before ``prompt_ids[:, 0]``.
    prompt_offset: the cache position of ``prompt_ids[:, 0]``: 0 for ``generate`` (its input ids hold the whole
    sequence, cached part included); None for a forward call, whose ids continue whatever its cache holds.
    media_ok: (b, t) bool, False for an image that no token may attend to (non-finite, masked out); None: all may.
    keys_values, weight_versions: the blocks' media keys/values carried over from an earlier call (a
    :class:`~flamingo.media_state.MediaState`), used while the block's weights are unchanged.
    """

    def __init__(
        self,
        media: torch.Tensor,
        blocks: Mapping[int, GatedCrossAttentionBlock],
        media_token_id: int,
        prompt_ids: torch.Tensor,
        images_before: torch.Tensor,
        prompt_offset: int | None,
        media_ok: torch.Tensor | None = None,
        keys_values: dict[int, KeysValues] | None = None,
        weight_versions: dict[int, int] | None = None,
    ):
        self.media = media
        self.media_ok = media_ok
        self.blocks = blocks
        self.media_token_id = media_token_id
        self.prompt_ids = prompt_ids
        self.images_before = images_before
        self.offset = prompt_offset
        # (b, s): the <image> tokens at or before every token of the call so far (the prompt, then what the LM read).
        self.seen = images_before[:, None] + (prompt_ids == media_token_id).cumsum(dim=1)
        self.images_seen: torch.Tensor | None = None  # (b, l) for the LM forward in progress
        self._keys_values: dict[int, KeysValues] = dict(keys_values or {})
        self._weight_versions: dict[int, int] = dict(weight_versions or {})
        self._masks: dict[tuple[bool, torch.device], MediaMask] = {}  # per forward, shared by all blocks

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @classmethod
    def continuing(
        cls, state: MediaState, blocks: Mapping[int, GatedCrossAttentionBlock], media_token_id: int, prompt_ids: torch.Tensor
    ) -> MediaContext:
        """A forward call that continues the call ``state`` came from (its KV cache): same media, same keys/values."""
        return cls(
            state.media, blocks, media_token_id, prompt_ids, state.images_seen.to(prompt_ids.device), None,
            state.media_ok, state.keys_values, state.weight_versions,
        )

    def state(self) -> MediaState:
        """What a later call continuing this one's KV cache needs: the media, their keys/values and the image count."""
        return MediaState(self.media, self.seen[:, -1], self.media_ok, dict(self._keys_values), dict(self._weight_versions))

    def expanded(self, copies: int) -> MediaContext:
        """This context for a batch where each sample is repeated ``copies`` times in a row (``repeat_interleave``),
        as ``generate`` does for beam search and ``num_return_sequences``."""
        if copies == 1:
            return self
        return MediaContext(
            self.media.repeat_interleave(copies, dim=0),
            self.blocks,
            self.media_token_id,
            self.prompt_ids.repeat_interleave(copies, dim=0),
            self.images_before.repeat_interleave(copies, dim=0),
            self.offset,
            None if self.media_ok is None else self.media_ok.repeat_interleave(copies, dim=0),
        )

    def start_lm_forward(self, call: LMCall) -> None:
        """Count the images before each token of a starting LM forward, from the cache length it continues."""
        ids, past = call
        if ids.shape[0] != self.batch_size:
            raise ValueError(
                f"The language model was run on a batch of {ids.shape[0]} sequences, but the images are for "
                f"{self.batch_size}. Flamingo follows generate()'s batch expansion for beam search, sampling and "
                "num_return_sequences; this generation mode changes the batch in another way and is not supported."
            )
        if self.offset is None:
            self.offset = past
        start = past - self.offset  # where this forward's tokens begin in the call
        if not 0 <= start <= self.seen.shape[1]:
            raise ValueError(
                f"This language-model forward continues a cache of {past} tokens, but the Flamingo call only knows "
                f"positions {self.offset} to {self.offset + self.seen.shape[1]}. Pass images_before when continuing "
                "from a cache, and give generate() the whole sequence."
            )
        ids = ids.to(self.seen.device)
        known = self.prompt_ids[:, start : start + ids.shape[1]]  # empty once decoding is past the prompt
        if known.shape[1] and not torch.equal(ids[:, : known.shape[1]], known):
            raise ValueError(
                "The language model was run on tokens that differ from the prompt given to Flamingo at the same "
                "positions; this generation mode reorders or rewrites the prompt and is not supported."
            )
        before = self.images_before if start == 0 else self.seen[:, start - 1]
        self.images_seen = before[:, None] + (ids == self.media_token_id).cumsum(dim=1)
        self.seen = torch.cat([self.seen[:, :start], self.images_seen], dim=1)
        self._masks.clear()

    def cross_attend(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Run block ``index`` on (b, l, d) hidden states; its media keys/values are computed once per call (or
        carried in from an earlier call), and again only if the block's key/value weights changed meanwhile."""
        if self.images_seen is None:
            raise RuntimeError("A fused decoder layer ran before the language model's forward began.")
        block = self.blocks[index]
        kv = self._keys_values.get(index)
        version = block.attn.to_kv.weight._version  # bumped by every in-place update, e.g. an optimiser step
        if kv is None or self._weight_versions.get(index) != version:
            kv = block.attn.keys_values(self.media.to(hidden_states.device))
            self._keys_values[index] = kv
            self._weight_versions[index] = version
        key = (block.attn.immediate, hidden_states.device)
        mask = self._masks.get(key)
        if mask is None:
            seen = self.images_seen.to(hidden_states.device)
            mask = media_mask(
                seen, self.media.shape[1], self.media.shape[2], immediate=block.attn.immediate, media_ok=self.media_ok
            )
            self._masks[key] = mask
        out = block(hidden_states.to(block.attn_gate.dtype), kv, mask)
        return out.to(hidden_states.dtype)


class MediaSlot:
    """The :class:`MediaContext` of the Flamingo call in progress in this thread (or task), if any."""

    def __init__(self):
        self._context: contextvars.ContextVar[MediaContext | None] = contextvars.ContextVar("flamingo", default=None)

    # A copied or unpickled model gets a slot of its own (a ContextVar itself can be neither copied nor pickled).
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @property
    def context(self) -> MediaContext | None:
        return self._context.get()

    @contextmanager
    def bind(self, context: MediaContext | None) -> Iterator[None]:
        token = self._context.set(context)
        try:
            yield
        finally:
            self._context.reset(token)


class FusedDecoderLayer(nn.Module):
    """A decoder layer preceded by gated cross-attention: ``layer(xattn_index(hidden_states), ...)``.

    The block itself is owned by the Flamingo model (``Flamingo.cross_attn_blocks``) and reached through the call's
    :class:`MediaContext`, so the language model's parameters and state dict stay exactly its own.
    """

    def __init__(self, decoder_layer: nn.Module, index: int, slot: MediaSlot):
        super().__init__()
        self.decoder_layer = decoder_layer
        self.index = index
        self.slot = slot
        self.register_state_dict_post_hook(_drop_wrapper_prefix)
        self.register_load_state_dict_pre_hook(_add_wrapper_prefix)

    def forward(self, *args, **kwargs):
        context = self.slot.context
        if context is not None:
            if args:
                args = (context.cross_attend(self.index, args[0]), *args[1:])
            else:
                kwargs["hidden_states"] = context.cross_attend(self.index, kwargs["hidden_states"])
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


class LanguageModelFusion:
    """Every change Flamingo makes to a language model, with what it replaced, so that :meth:`unfuse` undoes it.

    layers: the LM's decoder layer list. block_indices: the layers that get cross-attention before them.
    """

    def __init__(
        self,
        lang_model: nn.Module,
        layers: nn.ModuleList,
        block_indices: list[int],
        added_tokens: AddedTokenEmbeddings,
        slot: MediaSlot,
    ):
        self.lang_model = lang_model
        self.slot = slot
        self._layers = layers
        self._replaced_layers = {}
        for index in block_indices:
            if isinstance(layers[index], FusedDecoderLayer):
                raise ValueError(f"Decoder layer {index} already has cross-attention fused into it.")
            self._replaced_layers[index] = layers[index]
            layers[index] = FusedDecoderLayer(layers[index], index, slot)

        self._input_embedding = lang_model.get_input_embeddings()
        self._output_layer = lang_model.get_output_embeddings()
        lang_model.set_input_embeddings(AddedTokenInputEmbedding(self._input_embedding, added_tokens))
        _check_installed(lang_model.get_input_embeddings(), AddedTokenInputEmbedding, lang_model)
        if self._output_layer is not None:
            lang_model.set_output_embeddings(AddedTokenOutputLayer(self._output_layer, added_tokens))
            _check_installed(lang_model.get_output_embeddings(), AddedTokenOutputLayer, lang_model)
        self._hook = lang_model.register_forward_pre_hook(self._observe_forward, with_kwargs=True)

    def _observe_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = self.slot.context
        if context is not None:
            context.start_lm_forward(read_lm_call(args, kwargs))

    def unfuse(self) -> nn.Module:
        """Put back the original layers, embeddings and output layer, remove the hook; return the plain LM."""
        self._hook.remove()
        for index, layer in self._replaced_layers.items():
            self._layers[index] = layer
        self.lang_model.set_input_embeddings(self._input_embedding)
        if self._output_layer is not None:
            self.lang_model.set_output_embeddings(self._output_layer)
        return self.lang_model


def _check_installed(found: nn.Module | None, expected: type, lang_model: nn.Module) -> None:
    if not isinstance(found, expected):
        raise ValueError(
            f"{type(lang_model).__name__} did not take Flamingo's {expected.__name__} through its "
            "set_input_embeddings / set_output_embeddings; this language model is not supported."
        )
