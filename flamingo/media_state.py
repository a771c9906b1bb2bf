"""Per-call visual state, in one place: the call in progress (:class:`MediaContext`), what it hands to the next call
that continues its KV cache (:class:`MediaState`), and where the fused decoder layers find the call (:class:`MediaSlot`).

A decoding loop written by hand (custom sampling, a chat front-end) calls the model once per token. Given only the
pixels or the perceiver latents, every call would project the media into each cross-attention block's keys and
values again: for one new token that costs more than the token itself. :class:`MediaState` holds what the next call
needs (the latents, the per-block keys/values and how many ``<image>`` tokens the cache has seen), so a step costs
the language model plus the blocks' work on the new tokens only::

    out = model(input_ids, pixel_values=pixels, attention_mask=mask, use_cache=True)
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(token, attention_mask=mask, cache=out.cache, media_state=out.media_state, use_cache=True)

A continuing call may bring new images with new ``<image>`` tokens (a chat turn that adds a picture): pass their
``pixel_values`` (or ``media``) with the state. Only the new images are encoded and projected
(:meth:`MediaState.with_new_images`); each sample's new images follow the images its text has seen so far::

    turn = processor([new_image, "Question: what colour is it? Short answer:"])
    out = model(turn["input_ids"], pixel_values=turn["pixel_values"], cache=out.cache, media_state=out.media_state,
                attention_mask=torch.cat([mask, turn["attention_mask"]], dim=1), use_cache=True)

A call may also carry per-token attributes (``token_attributes``: a task id, a modality, input or target...), which
every cross-attention block receives for the tokens it processes; routers of mixture-of-experts blocks read them.

Axes: b batch, s tokens of the whole call, l tokens of one LM forward, t media, n latents, h heads, e head width,
d width, a attributes per token.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping

import torch

from .auxiliary import AuxiliaryReport
from .cross_attention import GatedCrossAttentionBlock, MediaMask, image_slabs, media_mask, select_image
from .lm_calls import LMCall

KeysValues = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class MediaState:
    """What a call continuing another's KV cache needs of it.

    media: (b, t, n, d_visual) perceiver latents. images_seen: (b,) ``<image>`` tokens in the text so far.
    media_ok: (b, t) bool, False for an image masked out (None: all usable). keys_values: per cross-attention block
    index, the media's keys and values, each (b, h, t * n, e). weight_versions: per block, the version counter of
    the key/value projection the keys/values were computed with; after the weights change (an optimiser step), the
    block recomputes them from ``media`` instead of using stale ones. token_attributes: (b, ...) the attributes of
    each sample's last token (None: the call had none); a continuing call given no attributes repeats them.
    """

    media: torch.Tensor
    images_seen: torch.Tensor
    media_ok: torch.Tensor | None = None
    keys_values: dict[int, KeysValues] = field(default_factory=dict)
    weight_versions: dict[int, int] = field(default_factory=dict)
    token_attributes: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.media.shape[0]

    def _map_rows(self, fn) -> MediaState:
        return MediaState(
            media=fn(self.media),
            images_seen=fn(self.images_seen),
            media_ok=None if self.media_ok is None else fn(self.media_ok),
            keys_values={i: (fn(k), fn(v)) for i, (k, v) in self.keys_values.items()},
            weight_versions=dict(self.weight_versions),
            token_attributes=None if self.token_attributes is None else fn(self.token_attributes),
        )

    def repeat_interleave(self, copies: int) -> MediaState:
        """Each sample repeated ``copies`` times in a row, as ``Cache.batch_repeat_interleave`` does to the KV cache."""
        if copies == 1:
            return self
        return self._map_rows(lambda x: x.repeat_interleave(copies, dim=0))

    def select(self, index: torch.Tensor) -> MediaState:
        """The samples at ``index`` (1-D), in that order: follows a KV cache reordered for beam search."""
        return self._map_rows(lambda x: x.index_select(0, index.to(x.device)))

    def last_image_only(self) -> MediaState:
        """Only each sample's most recent image, for continuations that attend to it alone.

        Valid under ``only_attend_immediate_media`` when every sample has seen an image: new tokens then attend to
        image ``images_seen`` only, so the state keeps that one image (its latents and its slice of every block's
        keys/values) and counts it as image 1. Used where many copies of a state are made (rank classification).
        """
        if not bool((self.images_seen > 0).all()):
            raise ValueError("last_image_only needs every sample to have seen an image.")
        rows = torch.arange(self.batch_size, device=self.media.device)
        last = self.images_seen.to(self.media.device) - 1  # (b,)
        t, n = self.media.shape[1:3]
        return replace(
            self,
            media=self.media[rows, last][:, None],
            images_seen=torch.ones_like(self.images_seen),
            media_ok=None if self.media_ok is None else self.media_ok[rows.to(self.media_ok.device), last][:, None],
            keys_values={i: select_image(kv, image_slabs(last, kv[0].shape[1], t), n)
                         for i, kv in self.keys_values.items()},
        )

    def with_new_images(
        self, media: torch.Tensor, media_ok: torch.Tensor | None, keys_values: Mapping[int, KeysValues]
    ) -> MediaState:
        """This state with new images added: ``media`` (b, t_new, n, d), sample b's new image j becoming its image
        ``images_seen[b] + 1 + j`` (the next ``<image>`` tokens of its text), as the processor numbers a turn's images.

        keys_values: the new images' keys/values (each (b, h, t_new * n, e)) for the blocks whose carried keys/values
        are still current; the others are dropped and recomputed from the merged media when next needed. Slots a
        sample's text has not reached yet (the zero padding of a batch whose samples had different image counts) are
        replaced, so the state stays aligned with each sample's ``<image>`` tokens.
        """
        b, t_new, n = media.shape[:3]
        if b != self.batch_size or n != self.media.shape[2]:
            raise ValueError(
                f"New media of shape {tuple(media.shape)} do not match the state's media {tuple(self.media.shape)}: "
                "expected the same batch size and tokens per image."
            )
        device = self.media.device
        slots = self.images_seen.to(device)[:, None] + torch.arange(t_new, device=device)  # (b, t_new), 0-based
        t = max(self.media.shape[1], int(slots.max()) + 1) if t_new else self.media.shape[1]
        merged_ok = None
        if media_ok is not None or self.media_ok is not None:
            old_ok = self.media_ok if self.media_ok is not None else self.media.new_ones(self.media.shape[:2], dtype=torch.bool)
            new_ok = media_ok if media_ok is not None else media.new_ones(media.shape[:2], dtype=torch.bool)
            merged_ok = _place(old_ok.to(device), new_ok.to(device), slots, t, dim=1, fill=True)
        merged_kv = {}
        for index, new in keys_values.items():
            if index not in self.keys_values:
                continue
            merged_kv[index] = tuple(
                _place(old.unflatten(2, (-1, n)), x.unflatten(2, (-1, n)), slots.to(x.device), t, dim=2).flatten(2, 3)
                for old, x in zip(self.keys_values[index], new)
            )  # (b, h, t, n, e) -> (b, h, t * n, e), contiguous as MaskedCrossAttention.keys_values makes them
        return replace(
            self,
            media=_place(self.media, media.to(device, self.media.dtype), slots, t, dim=1),
            media_ok=merged_ok,
            keys_values=merged_kv,
            weight_versions={i: v for i, v in self.weight_versions.items() if i in merged_kv},
        )


def _place(old: torch.Tensor, new: torch.Tensor, slots: torch.Tensor, t: int, *, dim: int, fill=0) -> torch.Tensor:
    """``old`` (b, ..., t_old, ...) grown to ``t`` image slots along ``dim`` (new slots: ``fill``), with ``new``
    (b, ..., t_new, ...) written at each row's ``slots`` (b, t_new)."""
    shape = list(old.shape)
    shape[dim] = t
    out = old.new_full(shape, fill)
    out.narrow(dim, 0, old.shape[dim]).copy_(old)
    index = slots.view(slots.shape[0], *([1] * (dim - 1)), slots.shape[1], *([1] * (old.ndim - dim - 1)))
    return out.scatter(dim, index.expand_as(new), new.to(out.dtype))


class MediaContext:
    """Visual state for one Flamingo call: media latents, per-token image counts, cached keys/values, token
    attributes, and the report that collects the blocks' auxiliary losses.

    media: (b, t, n, d_visual) perceiver output. blocks: the cross-attention block of each fused layer index.
    prompt_ids: (b, s0) the call's input ids. images_before: (b,) ``<image>`` tokens before ``prompt_ids[:, 0]``.
    prompt_offset: the cache position of ``prompt_ids[:, 0]``: 0 for ``generate`` (its input ids hold the whole
    sequence, cached part included); None for a forward call, whose ids continue whatever its cache holds.
    media_ok: (b, t) bool, False for an image that no token may attend to (non-finite, masked out); None: all may.
    keys_values, weight_versions: the blocks' media keys/values carried over from an earlier call (a
    :class:`MediaState`), used while the block's weights are unchanged. token_attributes: (b, s0, ...) per prompt
    token (None: none); tokens past the prompt (generated ones) repeat the last token's. report: where the blocks
    report auxiliary losses and statistics.
    """

    def __init__(
        self,
        *,
        media: torch.Tensor,
        blocks: Mapping[int, GatedCrossAttentionBlock],
        media_token_id: int,
        prompt_ids: torch.Tensor,
        images_before: torch.Tensor,
        prompt_offset: int | None,
        media_ok: torch.Tensor | None = None,
        keys_values: Mapping[int, KeysValues] | None = None,
        weight_versions: Mapping[int, int] | None = None,
        token_attributes: torch.Tensor | None = None,
        report: AuxiliaryReport | None = None,
    ):
        self.media = media
        self.media_ok = media_ok
        self.blocks = blocks
        self.media_token_id = media_token_id
        self.prompt_ids = prompt_ids
        self.images_before = images_before
        self.offset = prompt_offset
        self.token_attributes = token_attributes
        self.report = report if report is not None else AuxiliaryReport()
        # (b, s): the <image> tokens at or before every token of the call so far (the prompt, then what the LM read).
        self.seen = images_before[:, None] + (prompt_ids == media_token_id).cumsum(dim=1)
        self.images_seen: torch.Tensor | None = None  # (b, l) for the LM forward in progress
        self.attributes: torch.Tensor | None = None  # (b, l, ...) for the LM forward in progress
        self._keys_values: dict[int, KeysValues] = dict(keys_values or {})
        self._weight_versions: dict[int, int] = dict(weight_versions or {})
        self._masks: dict[tuple[bool, torch.device], MediaMask] = {}  # per forward, shared by all blocks
        self._block_reports: dict[int, AuxiliaryReport] = {}

    @property
    def batch_size(self) -> int:
        return self.prompt_ids.shape[0]

    @classmethod
    def continuing(
        cls,
        state: MediaState,
        *,
        blocks: Mapping[int, GatedCrossAttentionBlock],
        media_token_id: int,
        prompt_ids: torch.Tensor,
        token_attributes: torch.Tensor | None = None,
        report: AuxiliaryReport | None = None,
    ) -> MediaContext:
        """A forward call that continues the call ``state`` came from (its KV cache): same media, same keys/values;
        without ``token_attributes`` its tokens repeat the attributes of the state's last token."""
        if token_attributes is None and state.token_attributes is not None:
            carried = state.token_attributes.to(prompt_ids.device)[:, None]
            token_attributes = carried.expand(-1, prompt_ids.shape[1], *carried.shape[2:])
        return cls(
            media=state.media,
            blocks=blocks,
            media_token_id=media_token_id,
            prompt_ids=prompt_ids,
            images_before=state.images_seen.to(prompt_ids.device),
            prompt_offset=None,
            media_ok=state.media_ok,
            keys_values=state.keys_values,
            weight_versions=state.weight_versions,
            token_attributes=token_attributes,
            report=report,
        )

    def state(self) -> MediaState:
        """What a later call continuing this one's KV cache needs: the media, their keys/values and the image count."""
        return MediaState(
            media=self.media,
            images_seen=self.seen[:, -1],
            media_ok=self.media_ok,
            keys_values=dict(self._keys_values),
            weight_versions=dict(self._weight_versions),
            token_attributes=None if self.token_attributes is None else self.token_attributes[:, -1],
        )

    def expanded(self, copies: int) -> MediaContext:
        """This context for a batch where each sample is repeated ``copies`` times in a row (``repeat_interleave``),
        as ``generate`` does for beam search and ``num_return_sequences``."""
        if copies == 1:
            return self

        def repeat(x):
            return None if x is None else x.repeat_interleave(copies, dim=0)

        return MediaContext(
            media=repeat(self.media),
            blocks=self.blocks,
            media_token_id=self.media_token_id,
            prompt_ids=repeat(self.prompt_ids),
            images_before=repeat(self.images_before),
            prompt_offset=self.offset,
            media_ok=repeat(self.media_ok),
            token_attributes=repeat(self.token_attributes),
            report=self.report,
        )

    def start_lm_forward(self, call: LMCall) -> None:
        """Count the images before each token of a starting LM forward, from the cache length it continues, and
        take the attributes of its tokens."""
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
        self.attributes = self._attributes_of(start, ids.shape[1])
        self._masks.clear()

    def _attributes_of(self, start: int, length: int) -> torch.Tensor | None:
        """(b, length, ...) the attributes of the call's tokens ``start`` to ``start + length``; past the prompt
        (generated tokens), the prompt's last token's."""
        if self.token_attributes is None:
            return None
        given = self.token_attributes[:, start : start + length]
        missing = length - given.shape[1]
        if missing:
            last = self.token_attributes[:, -1:]
            given = torch.cat([given, last.expand(-1, missing, *last.shape[2:])], dim=1)
        return given

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
        report = self._block_reports.get(index)
        if report is None:
            report = self._block_reports[index] = self.report.scoped(f"cross_attn_blocks.{index}")
        attributes = None if self.attributes is None else self.attributes.to(hidden_states.device)
        out = block(hidden_states.to(block.attn_gate.dtype), kv, mask, attributes=attributes, report=report)
        return out.to(hidden_states.dtype)


class MediaSlot:
    """The :class:`MediaContext` of the Flamingo call in progress in this thread (or task), if any.

    A context variable, so threads serving one model concurrently each see their own call.
    """

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
