"""``save_pretrained`` / ``from_pretrained`` for Flamingo models.

A saved directory holds ``config.json`` and ``model.safetensors`` with the trainable weights (perceiver,
cross-attention blocks, added-token embeddings, and any frozen LM parameters listed in
``config.saved_lang_params``). Backbones are referenced, or saved too with ``save_backbones=True``:
``language_model/`` (the LM's own ``save_pretrained``) and ``vision_model.safetensors`` (the open_clip tower).
Every file is written atomically.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file

from .configuration import FlamingoConfig
from .factory import LANG_MODEL_DIR, VISION_WEIGHTS_NAME, build_from_config
from .io import atomic_save_safetensors
from .modeling import WEIGHTS_NAME, Flamingo


def save_model(model: Flamingo, directory: Path, *, save_backbones: bool, state_dict: dict | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if save_backbones:
        # The LM's state dict holds the trained rows of the added tokens (flamingo.added_tokens), so it saves whole.
        model.lang_model.save_pretrained(directory / LANG_MODEL_DIR)
        atomic_save_safetensors(directory / VISION_WEIGHTS_NAME, model.vision_encoder.visual.state_dict())
        config.lang_model, config.vision_pretrained = LANG_MODEL_DIR, VISION_WEIGHTS_NAME
        if config.vision_model is None:
            raise ValueError("The vision tower was given as an object; its open_clip name is needed to save it.")
    elif config.vision_model is None or config.lang_model is None:
        raise ValueError(
            "This model was built from backbone objects, so config.json cannot refer to them by name; "
            "use save_pretrained(directory, save_backbones=True)."
        )
    weights = model.trainable_state_dict(state_dict)
    atomic_save_safetensors(directory / WEIGHTS_NAME, weights, metadata={"format": "pt"})
    config.save(directory)  # last: a directory with a config is complete


def load_model(
    directory: Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool | None = None
) -> Flamingo:
    config = FlamingoConfig.load(directory)
    if trust_remote_code is not None:
        config.trust_remote_code = trust_remote_code
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{directory} holds no {WEIGHTS_NAME}.")
    model = build_from_config(config, directory, dtype=dtype)
    model.load_trainable_state_dict(load_file(str(weights)))
    return model
