"""Tanh-gated masked cross-attention (Flamingo, section 2.2 and figure 4).

Each block lets the language model's hidden states attend to the perceiver's visual tokens, then applies a
feed-forward layer; both residual branches are scaled by ``tanh(gate)`` with the gates initialised to 0, so a fresh
model computes exactly what the frozen language model computes.

Image-causal masking: ``images_seen[b, i]`` counts the ``<image>`` tokens at or before text position ``i``.
A token with ``images_seen == k > 0`` attends to the latents of image ``k`` only (or to images ``1..k`` when
``only_attend_immediate_media`` is False); a token with ``images_seen == 0`` gets no cross-attention output.
Padded media slots (index > the sample's number of ``<image>`` tokens) are therefore never attended.

Axes: b batch, l text tokens, t media, n latents per media, h heads, e head width, d width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .auxiliary import AuxiliaryReport
from .configuration import CrossAttentionConfig
from .perceiver import FeedForward


@dataclass
class MediaMask:
    """allowed: (b, 1, l, t * n) bool, True where a text token may attend to a visual token; None when ``image``
    is set. has_media: (b, l) bool, False for tokens before the sample's first image (their output is zeroed).
    image: (b,) the 0-based index of the one image that every token of a row attends to (immediate mode, one token a
    row: a decoding step), so attention reads that image's ``num_latents`` keys instead of all ``t * n`` under a mask.

    One mask serves every block of a forward; what the blocks derive from it (the slab index of ``image``, the
    zeroing weights) is computed by the first and kept in ``derived``.
    """

    allowed: torch.Tensor | None
    has_media: torch.Tensor
    image: torch.Tensor | None = None
    num_latents: int = 0
    derived: dict = field(default_factory=dict)

    def media_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(b, l, 1): 1 for tokens with an image to attend to, 0 for the others, in ``dtype``."""
        key = ("weight", dtype)
        if key not in self.derived:
            self.derived[key] = self.has_media[..., None].to(dtype)
        return self.derived[key]

    def image_slabs(self, heads: int, num_media: int) -> torch.Tensor:
        """:func:`image_slabs` of ``image``, computed once for all the blocks."""
        key = ("slabs", heads, num_media)
        if key not in self.derived:
            self.derived[key] = image_slabs(self.image, heads, num_media)
        return self.derived[key]


def image_slabs(image: torch.Tensor, heads: int, num_media: int) -> torch.Tensor:
    """image (b,) 0-based -> (b h,): where each (row, head)'s image sits among the (b h t) slabs of (n, e) keys."""
    rows = torch.arange(image.shape[0], device=image.device)[:, None]
    head = torch.arange(heads, device=image.device)
    return ((rows * heads + head) * num_media + image[:, None]).flatten()


def select_image(keys_values: tuple[torch.Tensor, torch.Tensor], slabs: torch.Tensor, num_latents: int):
    """Contiguous keys and values (b, h, t * n, e) -> each (b, h, n, e): the image that ``slabs`` (from
    :func:`image_slabs`) picks for each row. One ``index_select`` of (n, e) slabs: much cheaper than advanced
    indexing or ``gather`` here."""
    k, _ = keys_values
    b, h, s, e = k.shape
    slabs = slabs.to(k.device)
    return tuple(x.view(b * h * (s // num_latents), num_latents, e).index_select(0, slabs).view(b, h, num_latents, e)
                 for x in keys_values)


def media_mask(
    images_seen: torch.Tensor, num_media: int, num_latents: int, immediate: bool, media_ok: torch.Tensor | None = None
) -> MediaMask:
    """The image-causal mask for text tokens with ``images_seen`` (b, l) images at or before them.

    media_ok: (b, t) bool, False for an image masked out (``FlamingoConfig.nonfinite_media="mask"``): no token
    attends to it, and a token left with no image to attend to is treated like a token before the first image.
    """
    if immediate and images_seen.shape[1] == 1 and num_media > 0:
        # One token a row, attending to image images_seen (1-based) alone: select it instead of masking the rest.
        image = (images_seen[:, 0] - 1).clamp(min=0)
        has_media = images_seen > 0
        if media_ok is not None:
            rows = torch.arange(images_seen.shape[0], device=images_seen.device)
            has_media = has_media & media_ok.to(images_seen.device)[rows, image][:, None]
        return MediaMask(None, has_media, image, num_latents)
    media_index = torch.arange(1, num_media + 1, device=images_seen.device).repeat_interleave(num_latents)
    seen = images_seen[:, None, :, None]
    allowed = seen == media_index if immediate else seen >= media_index
    if media_ok is None:
        has_media = images_seen > 0
    else:
        allowed = allowed & media_ok.to(allowed.device).repeat_interleave(num_latents, dim=1)[:, None, None, :]
        has_media = allowed.any(dim=-1)[:, 0]
    # A row with nothing to attend to would make softmax produce NaN; let it attend anywhere, its output is zeroed.
    return MediaMask(allowed | ~has_media[:, None, :, None], has_media)


class MaskedCrossAttention(nn.Module):
    """Text queries attend to visual keys/values under the image-causal mask.

    A masked-out key still enters the weighted sum with weight 0, and 0 * NaN is NaN: a non-finite image would reach
    every token of its sample, including those before it. The model therefore never passes non-finite media here
    (it raises, or replaces them with zeros and masks them out: ``FlamingoConfig.nonfinite_media``).
    """

    def __init__(self, dim: int, dim_visual: int, config: CrossAttentionConfig):
        super().__init__()
        self.heads = config.heads
        self.immediate = config.only_attend_immediate_media
        inner = config.heads * config.dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def keys_values(self, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """media: (b, t, n, d_visual) -> keys, values: each (b, h, t * n, e), contiguous. Computed once per call
        and reused (or carried to the next call in a :class:`~flamingo.media_state.MediaState`)."""
        kv = self.to_kv(rearrange(media, "b t n d -> b (t n) d").to(self.to_kv.weight.dtype))
        k, v = kv.chunk(2, dim=-1)
        # Contiguous once here, so that every decoding step can select one image's slabs without a copy of all.
        return tuple(rearrange(x, "b s (h e) -> b h s e", h=self.heads).contiguous() for x in (k, v))

    def forward(self, x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor], mask: MediaMask) -> torch.Tensor:
        """x: (b, l, d); keys_values from :meth:`keys_values`; mask from :func:`media_mask` -> (b, l, d)."""
        k, v = keys_values
        if k.shape[2] == 0:  # no media at all: nothing to attend to, and SDPA over zero keys is NaN
            return torch.zeros_like(x)
        b, l, _ = x.shape
        q = self.to_q(self.norm(x)).view(b, l, self.heads, -1).transpose(1, 2)  # (b, h, l, e)
        if mask.image is not None:
            k, v = select_image((k, v), mask.image_slabs(self.heads, k.shape[2] // mask.num_latents), mask.num_latents)
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.allowed)
        out = out.transpose(1, 2).reshape(b, l, -1) * mask.media_weight(out.dtype)
        return self.to_out(out)


class GatedCrossAttentionBlock(nn.Module):
    """``x + tanh(a) * xattn(x)`` then ``x + tanh(f) * ffw(x)``, with gates a, f starting at 0.

    Shapes: x (b, l, d_text), media latents (b, t, n, d_visual) -> (b, l, d_text).

    Every block receives, besides the hidden states, the call's per-token ``attributes`` ((b, l, ...) or None) and
    a ``report`` (:class:`~flamingo.auxiliary.AuxiliaryReport`) for auxiliary losses and statistics. This dense block
    uses neither; a block that routes tokens (mixture of experts) reads the first and reports through the second.
    """

    def __init__(self, dim: int, dim_visual: int, config: CrossAttentionConfig | None = None):
        super().__init__()
        config = config or CrossAttentionConfig()
        self.attn = MaskedCrossAttention(dim, dim_visual, config)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff = FeedForward(dim, config.ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(
        self,
        x: torch.Tensor,
        keys_values: tuple[torch.Tensor, torch.Tensor],
        mask: MediaMask,
        *,
        attributes: torch.Tensor | None = None,
        report: AuxiliaryReport | None = None,
    ) -> torch.Tensor:
        x = x + self.attn_gate.tanh() * self.attn(x, keys_values, mask)
        return x + self.ff_gate.tanh() * self.ff(x)
