"""The frozen open_clip vision tower: images -> patch features.

Accepts an open_clip model name (built-in, registered with ``open_clip.add_model_config``, ``hf-hub:`` or
``local-dir:``) plus ``pretrained`` (a tag or a local weights file), or a ready open_clip model object.
Following OpenFlamingo, the features of a ViT tower are its output tokens (after ``ln_post``, before the projection):
the patch tokens, or the attentional pooler's query tokens of a CoCa tower (at the pooler's width, ``embed_dim``).
A ResNet tower (open_clip's ``ModifiedResNet``, CLIP's RN50 family) gives the feature map of one residual stage, one
token per position, as Flamingo reads its NFNet's feature map.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .io import RefusedPickle, refused_pickle

# open_clip is imported inside the functions that build or describe towers: importing it costs seconds (it pulls in
# much of transformers), and a VisionEncoder wrapping a tower already built needs none of it.


RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def is_resnet_tower(visual: nn.Module) -> bool:
    """open_clip's ModifiedResNet: a stem, four residual stages and an attention pool."""
    return all(hasattr(visual, name) for name in ("stem", *RESNET_STAGES, "attnpool"))


class VisionEncoder(nn.Module):
    """Wraps ``open_clip`` ``model.visual``. forward: (N, C, H, W) images -> (N, v, d_visual) visual tokens.

    * ViT towers: the output tokens (``v`` patches, or a CoCa pooler's queries).
    * ResNet towers: the feature map (N, d_visual, h, w) of residual stage ``feature_stage`` (1-4; None: the last),
      flattened to ``v = h * w`` tokens and layer-normalised over channels (parameter-free, as a ViT's ``ln_post``
      normalises its tokens). An earlier stage keeps a finer grid: a 64-px image has 2 x 2 positions after stage 4
      and 4 x 4 after stage 3.
    """

    def __init__(self, visual: nn.Module, feature_stage: int | None = None):
        super().__init__()
        self.resnet_stage: int | None = None
        if is_resnet_tower(visual):
            stage = len(RESNET_STAGES) if feature_stage is None else feature_stage
            if stage not in range(1, len(RESNET_STAGES) + 1):
                raise ValueError(
                    f"vision_feature_stage must be one of 1-4 (a ResNet stage) or None; got {feature_stage!r}."
                )
            self.resnet_stage = stage
        elif not hasattr(visual, "output_tokens"):
            raise ValueError(
                f"{type(visual).__name__} cannot return patch tokens; use an open_clip VisionTransformer or "
                "ModifiedResNet tower."
            )
        elif feature_stage is not None:
            raise ValueError(
                f"vision_feature_stage={feature_stage} applies to ResNet towers only; a {type(visual).__name__} "
                "gives its output tokens. Leave it None."
            )
        else:
            visual.output_tokens = True
        self.visual = visual

    @property
    def width(self) -> int:
        if self.resnet_stage is not None:
            return getattr(self.visual, RESNET_STAGES[self.resnet_stage - 1])[-1].conv3.out_channels
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

    @property
    def dtype(self) -> torch.dtype:
        """The tower's dtype; images are cast to it."""
        return next(self.visual.parameters()).dtype

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.dtype)
        if self.resnet_stage is None:
            _, tokens = self.visual(images)
            return tokens
        features = self.visual.stem(images)
        for name in RESNET_STAGES[: self.resnet_stage]:
            features = getattr(self.visual, name)(features)
        tokens = features.flatten(2).transpose(1, 2)  # (N, d, h, w) -> (N, h * w, d)
        return F.layer_norm(tokens, tokens.shape[-1:])

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, embed_dim) the tower's own pooled CLIP embedding (not normalised)."""
        out = self.visual(images.to(self.dtype))
        return out if self.resnet_stage is not None else out[0]


def _visual_of(model: nn.Module) -> nn.Module:
    return model.visual if hasattr(model, "visual") else model


def preprocess_cfg_of(visual: nn.Module) -> dict[str, Any]:
    """The tower's inference preprocessing config (size, mean, std, interpolation, resize mode)."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    base = dataclasses.asdict(PreprocessCfg())
    base["size"] = visual.image_size
    return merge_preprocess_dict(base, getattr(visual, "preprocess_cfg", None) or {})


def load_vision_encoder(
    vision_model: str | nn.Module,
    pretrained: str | None = None,
    *,
    feature_stage: int | None = None,
    weights_follow: bool = False,
) -> tuple[VisionEncoder, dict[str, Any], dict[str, Any] | None]:
    """Build the tower. Returns ``(encoder, preprocess_cfg, model_cfg)``; model_cfg is None for a model object.

    ``feature_stage``: for a ResNet tower, the stage whose feature map gives the tokens (see :class:`VisionEncoder`).

    ``weights_follow``: the caller loads the weights itself next, so open_clip's "initialized randomly" warning
    would be wrong and is not shown.
    """
    import open_clip

    if isinstance(vision_model, nn.Module):
        visual = _visual_of(vision_model)
        return VisionEncoder(visual, feature_stage), preprocess_cfg_of(visual), None
    model_cfg = None
    if not vision_model.startswith(("hf-hub:", "local-dir:")):
        model_cfg = open_clip.get_model_config(vision_model)
        if model_cfg is None:
            raise ValueError(
                f"Unknown open_clip model {vision_model!r}. Use a name from open_clip.list_models(), register a config "
                "with open_clip.add_model_config, or pass an open_clip model object."
            )
    try:
        with no_random_init_warning() if weights_follow else nullcontext():
            model = open_clip.create_model(vision_model, pretrained=pretrained)
    except pickle.UnpicklingError as error:
        raise RefusedPickle(refused_pickle("vision_pretrained", pretrained, error)) from error
    visual = model.visual
    return VisionEncoder(visual, feature_stage), preprocess_cfg_of(visual), model_cfg


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def no_random_init_warning():
    """Within: open_clip's "No pretrained weights loaded ... initialized randomly" (a root-logger warning) is not
    shown, for callers that load the weights next or want a random tower."""
    quiet = _DropRandomInitWarning()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def register_model_config(name: str, model_cfg: dict[str, Any]) -> None:
    """Make a saved open_clip architecture known under ``name`` (for configs registered in another process)."""
    import open_clip

    if open_clip.get_model_config(name) is not None:
        return
    path = Path(tempfile.mkdtemp(prefix="flamingo-open-clip-")) / f"{name}.json"
    path.write_text(json.dumps(model_cfg))
    open_clip.add_model_config(path)
