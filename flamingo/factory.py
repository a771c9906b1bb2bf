"""Building a new Flamingo model from backbones: :func:`create_model_and_processor`, the one entry point.

Backbones go through their libraries' own loaders (:mod:`flamingo.backbones`), exactly as a hub download would. A
saved model is loaded with ``Flamingo.from_pretrained`` instead (:mod:`flamingo.pretrained`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .backbones import load_lang_model, reference, runs_own_code, transformers_warnings_hidden
from .configuration import CrossAttentionConfig, FlamingoConfig, PerceiverConfig
from .modeling import Flamingo
from .processing import FlamingoProcessor
from .tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN, add_flamingo_tokens
from .vision import load_vision_encoder

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


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
    trust_remote_code: run the LM's (and tokenizer's) own Python code from its repo or folder; the saved config then
    records ``requires_remote_code``, and loading it needs the same permission again.
    """
    config = FlamingoConfig(
        vision_model=vision_model if isinstance(vision_model, str) else None,
        vision_pretrained=reference(vision_pretrained),
        lang_model=reference(lang_model) if isinstance(lang_model, str) else None,
        vision_feature_stage=vision_feature_stage,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        decoder_layers_attr=decoder_layers_attr,
        perceiver=perceiver or PerceiverConfig(),
        cross_attention=cross_attention or CrossAttentionConfig(),
    )
    vision_encoder, preprocess_cfg, model_cfg = load_vision_encoder(
        vision_model, vision_pretrained, feature_stage=vision_feature_stage
    )
    config.vision_model_cfg, config.vision_preprocess_cfg = model_cfg, preprocess_cfg
    lm = load_lang_model(lang_model, trust_remote_code=trust_remote_code, dtype=dtype)
    # Recorded so that loading the saved model asks for the user's permission again (flamingo.pretrained).
    config.requires_remote_code = trust_remote_code and runs_own_code(lm)

    if tokenizer is None:
        tokenizer = lang_model if isinstance(lang_model, str) else lm.name_or_path
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
    config.added_token_ids = add_flamingo_tokens(tokenizer)
    config.media_token_id = tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
    config.end_of_chunk_token_id = tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN)
    config.pad_token_id = tokenizer.pad_token_id

    current = lm.get_input_embeddings().weight.shape[0]
    config.vocab_size = len(tokenizer) if resize_to_tokenizer else max(current, len(tokenizer))
    if config.vocab_size != current:
        # Mean resizing (transformers' default) starts the new rows at the old rows' mean and covariance, which suits
        # a trained LM; transformers announces that default with a warning every time, which is dropped here.
        with transformers_warnings_hidden("transformers.modeling_utils"):
            lm.resize_token_embeddings(config.vocab_size, mean_resizing=True)
    model = Flamingo(config, vision_encoder, lm)
    logger.info("Flamingo model with %d trainable parameters", model.num_parameters(trainable_only=True))
    return model, FlamingoProcessor(tokenizer, preprocess_cfg)
