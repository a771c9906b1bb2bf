"""Building Flamingo models: from backbones (:func:`create_model_and_processor`) and from saved directories.

Backbones go through their libraries' own loaders (``open_clip.create_model``, ``AutoModelForCausalLM`` and
``AutoTokenizer``), exactly as a hub download would.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .configuration import CONFIG_NAME, CrossAttentionConfig, FlamingoConfig, PerceiverConfig
from .io import load_safetensors
from .modeling import Flamingo
from .processing import FlamingoProcessor
from .tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN, add_flamingo_tokens
from .vision import load_vision_encoder, register_model_config

logger = logging.getLogger(__name__)

# Inside a directory written with save_pretrained(..., save_backbones=True).
VISION_WEIGHTS_NAME = "vision_model.safetensors"
LANG_MODEL_DIR = "language_model"


def _reference(name_or_path: str | None) -> str | None:
    """Local paths are stored absolute so a saved model finds its backbone from any working directory."""
    if name_or_path is not None and Path(name_or_path).exists():
        return str(Path(name_or_path).resolve())
    return name_or_path


def load_lang_model(
    lang_model: str | PreTrainedModel, *, trust_remote_code: bool = False, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    if isinstance(lang_model, nn.Module):
        return lang_model
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(lang_model, trust_remote_code=trust_remote_code, **kwargs)


def create_model_and_processor(
    *,
    vision_model: str | nn.Module,
    lang_model: str | PreTrainedModel,
    vision_pretrained: str | None = None,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    vision_feature_stage: int | None = None,
    cross_attn_every_n_layers: int = 1,
    decoder_layers_attr: str | None = None,
    perceiver: PerceiverConfig | None = None,
    cross_attention: CrossAttentionConfig | None = None,
    resize_to_tokenizer: bool = False,
    trust_remote_code: bool = False,
    dtype: torch.dtype | None = None,
) -> tuple[Flamingo, FlamingoProcessor]:
    """A new Flamingo model (fresh perceiver and cross-attention, gates at 0) and its processor.

    vision_model: open_clip model name (with ``vision_pretrained`` tag or weights file) or an open_clip model.
    vision_feature_stage: for a ResNet tower, the stage (1-4) whose feature map gives the visual tokens (None: the
    last); see :class:`flamingo.vision.VisionEncoder`.
    lang_model: HF hub id, local path, or a loaded causal LM. tokenizer: defaults to the LM's.
    resize_to_tokenizer: resize the LM vocabulary to exactly ``len(tokenizer)`` (OpenFlamingo's choice); by default
    the embeddings only grow when the added tokens need rows.
    """
    config = FlamingoConfig(
        vision_model=vision_model if isinstance(vision_model, str) else None,
        vision_pretrained=_reference(vision_pretrained),
        lang_model=_reference(lang_model) if isinstance(lang_model, str) else None,
        vision_feature_stage=vision_feature_stage,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        decoder_layers_attr=decoder_layers_attr,
        perceiver=perceiver or PerceiverConfig(),
        cross_attention=cross_attention or CrossAttentionConfig(),
        trust_remote_code=trust_remote_code,
    )
    vision_encoder, preprocess_cfg, model_cfg = load_vision_encoder(
        vision_model, vision_pretrained, feature_stage=vision_feature_stage
    )
    config.vision_model_cfg, config.vision_preprocess_cfg = model_cfg, preprocess_cfg
    lm = load_lang_model(lang_model, trust_remote_code=trust_remote_code, dtype=dtype)

    if tokenizer is None:
        tokenizer = lang_model if isinstance(lang_model, str) else lm.name_or_path
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
    config.added_token_ids = add_flamingo_tokens(tokenizer)
    config.media_token_id = tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
    config.end_of_chunk_token_id = tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN)
    config.pad_token_id = tokenizer.pad_token_id

    current = lm.get_input_embeddings().weight.shape[0]
    config.vocab_size = len(tokenizer) if resize_to_tokenizer else max(current, len(tokenizer))
    if config.vocab_size != current:
        lm.resize_token_embeddings(config.vocab_size)
    model = Flamingo(config, vision_encoder, lm)
    logger.info("Flamingo model with %d trainable parameters", model.num_parameters(trainable_only=True))
    return model, FlamingoProcessor(tokenizer, preprocess_cfg)


def build_from_config(config: FlamingoConfig, directory: Path, *, dtype: torch.dtype | None = None) -> Flamingo:
    """The model described by a saved config, with backbones loaded and the Flamingo modules freshly initialised."""

    def local(path: str | None) -> str | None:
        return str(directory / path) if path is not None and (directory / path).exists() else path

    if config.vision_model is None or config.lang_model is None:
        raise ValueError(f"{directory}/config.json does not say which backbones to load (vision_model, lang_model).")
    _check_local_backbone("lang_model", config.lang_model, directory, saved_name=LANG_MODEL_DIR)
    _check_local_backbone("vision_pretrained", config.vision_pretrained, directory, saved_name=VISION_WEIGHTS_NAME)
    if config.vision_model_cfg is not None:
        register_model_config(config.vision_model, config.vision_model_cfg)
    vision_weights = local(config.vision_pretrained)
    saved_tower = vision_weights is not None and vision_weights.endswith(VISION_WEIGHTS_NAME)
    vision_encoder, _, _ = load_vision_encoder(
        config.vision_model,
        None if saved_tower else vision_weights,
        feature_stage=config.vision_feature_stage,
        weights_follow=saved_tower,
    )
    if saved_tower:
        vision_encoder.visual.load_state_dict(load_safetensors(vision_weights))
    lm = load_lang_model(local(config.lang_model), trust_remote_code=config.trust_remote_code, dtype=dtype)
    if lm.get_input_embeddings().weight.shape[0] != config.vocab_size:
        lm.resize_token_embeddings(config.vocab_size, mean_resizing=False)
    return Flamingo(config, vision_encoder, lm)



# Weights-file endings that mark a vision_pretrained value as a path (otherwise it is an open_clip tag like "openai").
_WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


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
