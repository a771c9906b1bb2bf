"""Perceiver Resampler (Flamingo, Alayrac et al. 2022, section 2.1 and appendix A.1.1).

A fixed set of learned latents cross-attends to the patch features of one image (or all frames of one video)
and returns ``num_latents`` visual tokens, whatever the image resolution or number of frames.

Axes: b batch, t media (images) per sample, f frames per media, v patches per frame, n latents, d width.

Example::

    resampler = PerceiverResampler(dim=1024, config=PerceiverConfig())
    tokens = resampler(patch_features)  # (b, t, f, v, d) -> (b, t, 64, d)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .auxiliary import AuxiliaryReport
from .configuration import PerceiverConfig


class FeedForward(nn.Module):
    """Pre-norm MLP used by the perceiver and the gated cross-attention blocks: (..., d) -> (..., d)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc_in = nn.Linear(dim, dim * mult, bias=False)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(dim * mult, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(self.norm(x))))


class PerceiverAttention(nn.Module):
    """Latents attend to ``[media; latents]``.

    The paper departs from the original Perceiver here: keys and values come from the media features
    concatenated with the latents, so latents can also exchange information with each other.
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media: (b, v, d), latents: (b, n, d) -> (b, n, d). Media and frames are folded into b by the caller."""
        media = self.norm_media(media)
        latents = self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((media, latents), dim=1)).chunk(2, dim=-1)
        q, k, v = (rearrange(x, "b n (h e) -> b h n e", h=self.heads) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n e -> b n (h e)"))


class PerceiverLayer(nn.Module):
    def __init__(self, dim: int, config: PerceiverConfig):
        super().__init__()
        self.attn = PerceiverAttention(dim, heads=config.heads, dim_head=config.dim_head)
        self.ff = FeedForward(dim, config.ff_mult)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        latents = latents + self.attn(media, latents)
        return latents + self.ff(latents)


class PerceiverResampler(nn.Module):
    """Resample patch features to a fixed number of visual tokens per media.

    Input ``(b, t, f, v, d)``: ``t`` media per sample, ``f`` frames each (1 for images), ``v`` patches per frame.
    Output ``(b, t, n, d)`` with ``n = config.num_latents``. Frames of one media are flattened into one key/value
    sequence after adding a learned embedding per frame index (the paper's temporal embeddings).

    With ``config.resample=False`` there are no latents: the output is that sequence itself, layer-normalised,
    ``(b, t, f * v, d)``.
    """

    def __init__(self, dim: int, config: PerceiverConfig | None = None):
        super().__init__()
        config = config or PerceiverConfig()
        self.config = config
        if config.resample:
            self.latents = nn.Parameter(torch.randn(config.num_latents, dim))
        else:
            self.register_parameter("latents", None)
        self.frame_embeddings = (
            nn.Parameter(torch.randn(config.max_frames, dim)) if config.max_frames is not None else None
        )
        depth = config.depth if config.resample else 0
        self.layers = nn.ModuleList(PerceiverLayer(dim, config) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def empty_media(self, batch_size: int) -> torch.Tensor:
        """(batch_size, 0, n, d) zeros: the media of samples without images, on this module's device and dtype."""
        tokens = self.config.num_latents if self.config.resample else 1
        return self.norm.weight.new_zeros(batch_size, 0, tokens, self.norm.normalized_shape[0])

    def forward(self, features: torch.Tensor, *, report: AuxiliaryReport | None = None) -> torch.Tensor:
        """features (b, t, f, v, d) -> (b, t, n, d). ``report``: where a variant with auxiliary losses would report
        them (:mod:`flamingo.auxiliary`); this perceiver has none."""
        b, t, f, v, d = features.shape
        if self.frame_embeddings is not None:
            if f > self.frame_embeddings.shape[0]:
                raise ValueError(
                    f"Media have {f} frames but the perceiver has frame embeddings for at most "
                    f"{self.frame_embeddings.shape[0]} (PerceiverConfig.max_frames)."
                )
            features = features + self.frame_embeddings[:f, None, :].to(features.dtype)
        elif f > 1:
            raise ValueError("This perceiver has no frame embeddings (max_frames=None), so it takes one frame per media.")
        media = rearrange(features, "b t f v d -> (b t) (f v) d")
        if self.latents is None:
            return rearrange(self.norm(media), "(b t) n d -> b t n d", b=b)
        latents = self.latents.to(media.dtype).expand(b * t, -1, -1)
        for layer in self.layers:
            latents = layer(media, latents)
        return rearrange(self.norm(latents), "(b t) n d -> b t n d", b=b)
