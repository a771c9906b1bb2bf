"""``save_pretrained`` / ``from_pretrained`` for Flamingo models.

A saved directory holds ``config.json`` and ``model.safetensors`` with the trainable weights (perceiver,
cross-attention blocks, added-token embeddings, and any frozen LM parameters listed in
``config.saved_lang_params``). Backbones are referenced, or saved too with ``save_backbones=True``:
``language_model/`` (the LM's own ``save_pretrained``) and ``vision_model.safetensors`` (the open_clip tower).
Every file is written atomically.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import torch

from .configuration import CONFIG_NAME, FlamingoConfig
from .factory import LANG_MODEL_DIR, VISION_WEIGHTS_NAME, build_from_config
from .io import atomic_save_safetensors, load_safetensors
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
    config_path = directory / CONFIG_NAME
    try:
        config = FlamingoConfig.load(directory)
    except TypeError as error:  # a section that is not an object, or an unknown field inside one
        raise ValueError(f"{config_path}: {error}") from error
    check_field_types(config, config_path)
    if trust_remote_code is not None:
        config.trust_remote_code = trust_remote_code
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{directory} holds no {WEIGHTS_NAME}.")
    state = load_safetensors(weights)  # before the backbones load, so a damaged file fails at once
    model = build_from_config(config, directory, dtype=dtype)
    model.load_trainable_state_dict(state)
    return model


def check_field_types(config: Any, source: Path, prefix: str = "") -> None:
    """Every field of a config dataclass (and of its nested sections) has its annotated type.

    JSON edited by hand gives ``"2"`` for ``2`` or ``"false"`` for ``false``; checked here, before anything is built,
    so the error names the field rather than a comparison deep inside the model.
    """
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, hint, name = getattr(config, field.name), hints[field.name], prefix + field.name
        if dataclasses.is_dataclass(hint):
            check_field_types(value, source, prefix=name + ".")
        elif not _has_type(value, hint):
            raise ValueError(
                f"{source}: field {name} must be {_type_name(hint)}, got {type(value).__name__} {value!r}."
            )


def _has_type(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(_has_type(item, args[0]) for item in value)
    if origin is not None:
        return isinstance(value, origin)
    if hint is type(None):
        return value is None
    if hint in (int, float):  # JSON true/false are bools, which Python also counts as ints
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return hint.__name__ if isinstance(hint, type) else str(hint)
