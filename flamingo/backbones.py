"""The frozen backbones of a Flamingo model: finding, loading and saving the vision tower and the language model.

Backbones load through their libraries' own loaders (``open_clip.create_model``, ``AutoModelForCausalLM``), exactly
as a hub download would. A saved model refers to them by name (an open_clip model name and pretrained tag or file,
a hub id or a path), or holds them itself (``save_pretrained(dir, save_backbones=True)``): ``language_model/`` (the
LM's own ``save_pretrained``) and ``vision_model.safetensors`` (the open_clip tower's state dict), which its
``config.json`` names by those relative names.

The rule for paths: in memory, a model's config names local backbones by absolute path, so that whatever directory
it is later saved to, the saved config finds them. A model loaded from a self-contained directory (the shipped
``micro`` one, for example) therefore refers to that directory's backbones; ``save_pretrained(dir)`` writes those
references (a small folder that needs the original to stay where it is), ``save_backbones=True`` writes copies.
"""

from __future__ import annotations

import logging
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .configuration import CONFIG_NAME, FlamingoConfig
from .io import RefusedPickle, atomic_save_safetensors, check_finite, load_safetensors, refused_pickle
from .vision import VisionEncoder, load_vision_encoder, register_model_config

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

VISION_WEIGHTS_NAME = "vision_model.safetensors"
LANG_MODEL_DIR = "language_model"
# Weights-file endings that mark a vision_pretrained value as a path (otherwise it is an open_clip tag like "openai").
_WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def reference(name_or_path: str | None) -> str | None:
    """How a config names a backbone: an existing local path becomes absolute, anything else (a hub id, an open_clip
    tag) stays as it is."""
    if name_or_path is not None and Path(name_or_path).exists():
        return str(Path(name_or_path).resolve())
    return name_or_path


def load_lang_model(
    lang_model: str | PreTrainedModel,
    *,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
    field: str = "lang_model",
) -> PreTrainedModel:
    """A causal LM from a hub id or path (``AutoModelForCausalLM``); a model object is returned as it is.

    A weights file that is a pickle torch refuses to load (``weights_only``: it would run code) is a ValueError
    naming ``field`` (how the config calls this LM) and the model, not torch's UnpicklingError.
    """
    from torch import nn
    from transformers import AutoModelForCausalLM

    if isinstance(lang_model, nn.Module):
        return lang_model
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        with no_transformers_bars():
            return AutoModelForCausalLM.from_pretrained(lang_model, trust_remote_code=trust_remote_code, **kwargs)
    except pickle.UnpicklingError as error:
        pickles = sorted(Path(lang_model).glob("*.bin")) if Path(lang_model).is_dir() else []
        named = ", ".join(str(path) for path in pickles) or lang_model
        raise ValueError(refused_pickle(field, named, error)) from error


@contextmanager
def no_transformers_bars():
    """Within: transformers' own progress bars are hidden ("Loading weights" and "Writing model shards", drawn by every
    ``from_pretrained`` and ``save_pretrained`` in transformers 5, even of a tiny model on disk). Download bars are
    huggingface_hub's own and stay.

    ``set_tqdm_hook`` (what transformers' own server wraps its loads in) returns the hook it replaces, which is put
    back after. Older transformers (5.0) has only the global switch, which hides the download bars too; it is turned
    off for this load only.
    """
    from transformers.utils import logging as hf_logging

    set_hook = getattr(hf_logging, "set_tqdm_hook", None)
    if set_hook is None:
        was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if was_enabled:
                hf_logging.enable_progress_bar()
        return

    def hidden(factory, args, kwargs):
        kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous is not None else factory(*args, **kwargs)

    previous = set_hook(hidden)
    try:
        yield
    finally:
        set_hook(previous)


@contextmanager
def transformers_warnings_hidden(logger_name: str):
    """Within: the transformers logger ``logger_name`` shows errors only (for a warning that announces a choice we made
    on purpose). Its level is put back after."""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def runs_own_code(lang_model: PreTrainedModel) -> bool:
    """Whether a loaded LM came from its repo's own code: its config maps AutoModelForCausalLM to a class there
    (``auto_map``, the key transformers itself reads to find remote code)."""
    auto_map = getattr(lang_model.config, "auto_map", None) or {}
    return "AutoModelForCausalLM" in auto_map


def load_backbones(
    config: FlamingoConfig, directory: Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> tuple[VisionEncoder, PreTrainedModel]:
    """The vision tower and the LM a saved ``config`` names (relative names are looked up in ``directory``), the LM
    resized to the saved vocabulary. Afterwards ``config`` names local backbones by absolute path (see above).

    trust_remote_code: the caller's permission for the LM's own code (never read from ``config``). Every weight of
    both backbones is checked to be finite (a ValueError names the file otherwise)."""
    if config.vision_model is None or config.lang_model is None:
        raise ValueError(f"{directory}/{CONFIG_NAME} does not say which backbones to load (vision_model, lang_model).")
    _check_local_backbone("lang_model", config.lang_model, directory, saved_name=LANG_MODEL_DIR)
    _check_local_backbone("vision_pretrained", config.vision_pretrained, directory, saved_name=VISION_WEIGHTS_NAME)
    config.lang_model = _inside(directory, config.lang_model)
    config.vision_pretrained = _inside(directory, config.vision_pretrained)
    if config.vision_model_cfg is not None:
        register_model_config(config.vision_model, config.vision_model_cfg)
    saved_tower = config.vision_pretrained is not None and config.vision_pretrained.endswith(VISION_WEIGHTS_NAME)
    config_path = directory / CONFIG_NAME
    try:
        vision_encoder, _, _ = load_vision_encoder(
            config.vision_model,
            None if saved_tower else config.vision_pretrained,
            feature_stage=config.vision_feature_stage,
            weights_follow=saved_tower,
        )
    except RefusedPickle as error:
        raise ValueError(f"{config_path}: {error}") from error
    if saved_tower:
        vision_encoder.visual.load_state_dict(load_safetensors(config.vision_pretrained))
    vision_source = config.vision_pretrained or f"the open_clip model {config.vision_model}"
    check_finite(vision_encoder.visual.state_dict().items(), source=vision_source)
    lm = load_lang_model(config.lang_model, trust_remote_code=trust_remote_code, dtype=dtype, field=f"{config_path}: lang_model")
    check_finite(lm.state_dict().items(), source=f"the language model {config.lang_model}")
    if lm.get_input_embeddings().weight.shape[0] != config.vocab_size:
        lm.resize_token_embeddings(config.vocab_size, mean_resizing=False)
    return vision_encoder, lm


def write_backbones(vision_encoder: VisionEncoder, lang_model: PreTrainedModel, directory: Path, config: FlamingoConfig):
    """Write both backbones into ``directory`` and point ``config`` (the copy being saved) at them."""
    if config.vision_model is None:
        raise ValueError("The vision tower was given as an object; its open_clip name is needed to save it.")
    # The LM's state dict holds the trained rows of the added tokens (flamingo.added_tokens), so it saves whole.
    with no_transformers_bars():
        lang_model.save_pretrained(directory / LANG_MODEL_DIR)
    atomic_save_safetensors(directory / VISION_WEIGHTS_NAME, vision_encoder.visual.state_dict())
    config.lang_model, config.vision_pretrained = LANG_MODEL_DIR, VISION_WEIGHTS_NAME


def _inside(directory: Path, value: str | None) -> str | None:
    """``value`` as an absolute path when it names something inside ``directory``, else unchanged."""
    if value is not None and not os.path.isabs(value) and (directory / value).exists():
        return str((directory / value).resolve())
    return value


def _check_local_backbone(field: str, value: str | None, directory: Path, *, saved_name: str) -> None:
    """A backbone that config.json names by a local path that is gone: say so here, before huggingface_hub reads the
    path as a malformed repo id (or open_clip as an unknown tag)."""
    if value is None:
        return
    config_path = directory / CONFIG_NAME
    if value == saved_name:
        if not (directory / saved_name).exists():
            raise ValueError(
                f"{config_path}: {field} is the backbone saved with save_backbones=True, but "
                f"{directory / saved_name} does not exist; copy the whole model directory, or save it again."
            )
        return
    looks_local = os.path.isabs(value) or value.startswith((".", "~"))
    if field == "vision_pretrained":  # an open_clip tag never has a path separator or a file ending
        looks_local = looks_local or "/" in value or os.sep in value or value.endswith(_WEIGHTS_SUFFIXES)
    if looks_local and not Path(value).expanduser().exists():
        raise ValueError(
            f"{config_path}: {field} is the local path {value}, which does not exist (moved or deleted?). "
            f"To fix it, move it back there, or set \"{field}\" in {config_path} to its new path (or a hub id)."
        )
