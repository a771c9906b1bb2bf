"""The frozen open_clip vision tower: images -> patch features.

Accepts an open_clip model name (built-in, registered with ``open_clip.add_model_config``, ``hf-hub:`` or
``local-dir:``) plus ``pretrained`` (a tag or a local weights file), or a ready open_clip model object.
Following OpenFlamingo, the features are the tower's output tokens (after ``ln_post``, before the projection): the
patch tokens of a ViT, or the attentional pooler's query tokens of a CoCa tower (at the pooler's width, ``embed_dim``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, merge_preprocess_dict
from torch import nn


class VisionEncoder(nn.Module):
    """Wraps ``open_clip`` ``model.visual``. forward: (N, C, H, W) images -> (N, v, d_visual) patch tokens."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        if not hasattr(visual, "output_tokens"):
            raise ValueError(
                f"{type(visual).__name__} cannot return patch tokens; use an open_clip VisionTransformer tower."
            )
        visual.output_tokens = True
        self.visual = visual

    @property
    def width(self) -> int:
        pooler = getattr(self.visual, "attn_pool", None)
        if pooler is not None:  # CoCa-style towers return the attentional pooler's queries, of its width
            return pooler.query.shape[-1]
        transformer = getattr(self.visual, "transformer", None)
        if transformer is not None and hasattr(transformer, "width"):
            return transformer.width
        return self.visual.ln_post.normalized_shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.visual.image_size
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    def train(self, mode: bool = True) -> VisionEncoder:
        # The tower is frozen: keep it in eval mode (no patch dropout) even while the rest of the model trains.
        super().train(mode)
        self.visual.eval()
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.visual.parameters()).dtype
        _, tokens = self.visual(images.to(dtype))
        return tokens


def _visual_of(model: nn.Module) -> nn.Module:
    return model.visual if hasattr(model, "visual") else model


def preprocess_cfg_of(visual: nn.Module) -> dict[str, Any]:
    """The tower's inference preprocessing config (size, mean, std, interpolation, resize mode)."""
    base = dataclasses.asdict(PreprocessCfg())
    base["size"] = visual.image_size
    return merge_preprocess_dict(base, getattr(visual, "preprocess_cfg", None) or {})


def load_vision_encoder(
    vision_model: str | nn.Module, pretrained: str | None = None, *, weights_follow: bool = False
) -> tuple[VisionEncoder, dict[str, Any], dict[str, Any] | None]:
    """Build the tower. Returns ``(encoder, preprocess_cfg, model_cfg)``; model_cfg is None for a model object.

    ``weights_follow``: the caller loads the weights itself next, so open_clip's "initialized randomly" warning
    would be wrong and is not shown.
    """
    if isinstance(vision_model, nn.Module):
        visual = _visual_of(vision_model)
        return VisionEncoder(visual), preprocess_cfg_of(visual), None
    model_cfg = None
    if not vision_model.startswith(("hf-hub:", "local-dir:")):
        model_cfg = open_clip.get_model_config(vision_model)
        if model_cfg is None:
            raise ValueError(
                f"Unknown open_clip model {vision_model!r}. Use a name from open_clip.list_models(), register a config "
                "with open_clip.add_model_config, or pass an open_clip model object."
            )
    quiet = _DropRandomInitWarning() if weights_follow else None
    if quiet:
        logging.getLogger().addFilter(quiet)  # open_clip warns through the root logger
    try:
        model = open_clip.create_model(vision_model, pretrained=pretrained)
    finally:
        if quiet:
            logging.getLogger().removeFilter(quiet)
    visual = model.visual
    return VisionEncoder(visual), preprocess_cfg_of(visual), model_cfg


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def register_model_config(name: str, model_cfg: dict[str, Any]) -> None:
    """Make a saved open_clip architecture known under ``name`` (for configs registered in another process)."""
    if open_clip.get_model_config(name) is not None:
        return
    path = Path(tempfile.mkdtemp(prefix="flamingo-open-clip-")) / f"{name}.json"
    path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(path)
