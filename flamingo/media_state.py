"""The encoded images of a Flamingo call, carried to the next call that continues its KV cache.

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

Axes: b batch, t media, n latents, h heads, e head width, d width.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .cross_attention import image_slabs, select_image

KeysValues = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class MediaState:
    """media: (b, t, n, d_visual) perceiver latents. media_ok: (b, t) bool, False for an image masked out (None:
    all usable). images_seen: (b,) ``<image>`` tokens in the text so far. keys_values: per cross-attention block
    index, the media's keys and values, each (b, h, t * n, e). weight_versions: per block, the version counter of
    the key/value projection the keys/values were computed with; after the weights change (an optimiser step), the
    block recomputes them from ``media`` instead of using stale ones.
    """

    media: torch.Tensor
    images_seen: torch.Tensor
    media_ok: torch.Tensor | None = None
    keys_values: dict[int, KeysValues] = field(default_factory=dict)
    weight_versions: dict[int, int] = field(default_factory=dict)

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
