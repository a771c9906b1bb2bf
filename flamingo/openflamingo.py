"""Import OpenFlamingo checkpoints by key mapping onto our modules.

OpenFlamingo's state dicts come in two layouts, both handled:

* v2 (per layer): ``lang_encoder.<layers>.N.gated_cross_attn_layer.*`` and ``lang_encoder.<layers>.N.decoder_layer.*``;
* v1: ``lang_encoder.gated_cross_attn_layers.N.*`` and ``lang_encoder.old_decoder_blocks.N.*``;

either a full state dict (a full dict holds both, since the same modules are registered twice) or only the
trainable parameters (perceiver, cross-attention, embeddings). Wrapper prefixes from DDP, FSDP or
``torch.compile`` (``module.``, ``_fsdp_wrapped_module.``, ``_orig_mod.``...) are removed first.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .configuration import PerceiverConfig
from .factory import create_model_and_processor
from .io import load_safetensors
from .modeling import Flamingo
from .processing import FlamingoProcessor

_WRAPPER_PREFIXES = re.compile(r"(^|\.)(module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")

# OpenFlamingo's FeedForward is nn.Sequential(LayerNorm, Linear, GELU, Linear).
_FEED_FORWARD = {"0": "norm", "1": "fc_in", "3": "fc_out"}


def _rename_feed_forward(rest: str) -> str:
    match = re.match(r"ff\.(\d)\.(.+)$", rest)
    return f"ff.{_FEED_FORWARD[match.group(1)]}.{match.group(2)}" if match else rest


def _perceiver_key(rest: str) -> str:
    match = re.match(r"layers\.(\d+)\.([01])\.(.+)$", rest)
    if match:
        layer, part, tail = match.groups()
        if part == "0":
            return f"layers.{layer}.attn.{tail}"
        return f"layers.{layer}.{_rename_feed_forward('ff.' + tail)}"
    return {"frame_embs": "frame_embeddings"}.get(rest, rest)


def convert_openflamingo_state_dict(
    state: dict[str, torch.Tensor], decoder_layers_attr: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an OpenFlamingo state dict into (our Flamingo-module keys, language-model keys)."""
    layers = re.escape(decoder_layers_attr)
    v2_xattn = re.compile(rf"^lang_encoder\.{layers}\.(\d+)\.gated_cross_attn_layer\.(.+)$")
    v1_xattn = re.compile(r"^lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)$")
    v2_layer = re.compile(rf"^lang_encoder\.{layers}\.(\d+)\.decoder_layer\.(.+)$")
    v1_layer = re.compile(r"^lang_encoder\.old_decoder_blocks\.(\d+)\.(.+)$")

    ours: dict[str, torch.Tensor] = {}
    lang: dict[str, torch.Tensor] = {}
    for raw_key, value in state.items():
        key = _WRAPPER_PREFIXES.sub(r"\1", raw_key)
        if key.startswith("vision_encoder."):
            ours["vision_encoder.visual." + key[len("vision_encoder.") :]] = value
        elif key.startswith("perceiver."):
            ours["perceiver." + _perceiver_key(key[len("perceiver.") :])] = value
        elif match := v2_xattn.match(key) or v1_xattn.match(key):
            index, rest = match.groups()
            ours[f"cross_attn_blocks.{index}.{_rename_feed_forward(rest)}"] = value
        elif match := v2_layer.match(key) or v1_layer.match(key):
            index, rest = match.groups()
            lang[f"{decoder_layers_attr}.{index}.{rest}"] = value
        elif key.startswith("lang_encoder."):
            lang[key[len("lang_encoder.") :]] = value
        else:
            raise ValueError(f"Unrecognised key {raw_key!r} in the OpenFlamingo checkpoint.")
    return ours, lang


def _checkpoint_key(state: dict, decoder_layers_attr: str, key: str, *, lang: bool) -> str:
    """The checkpoint's own name for a converted key (ours, or the LM's when ``lang``), for error messages."""
    for raw_key in state:
        ours, lang_keys = convert_openflamingo_state_dict({raw_key: None}, decoder_layers_attr)
        if key in (lang_keys if lang else ours):
            return raw_key
    return key


def _torch_load(path: Path) -> object:
    not_a_checkpoint = (
        f"OpenFlamingo checkpoint {path} is not a PyTorch checkpoint (or is truncated); "
        "pass the checkpoint.pt file that torch.save wrote."
    )
    # torch.save writes a zip archive (legacy files: a pickle, first byte 0x80). torch.load reads anything else as a
    # legacy pickle and fails with whatever the first bytes trigger (KeyError: '101' for text), so check first.
    with path.open("rb") as file:
        legacy_pickle = file.read(1) == b"\x80"
    if not (legacy_pickle or zipfile.is_zipfile(path)):
        raise ValueError(not_a_checkpoint)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise ValueError(f"OpenFlamingo checkpoint {path} holds objects that are not weights: {error}") from error
        raise ValueError(f"{not_a_checkpoint} ({error})") from error
    except (EOFError, RuntimeError) as error:  # a truncated zip or pickle
        raise ValueError(f"{not_a_checkpoint} ({type(error).__name__}: {error})") from error


def _load_checkpoint(checkpoint: str | Path | dict) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict):
        state = checkpoint
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise ValueError(f"OpenFlamingo checkpoint {path} does not exist.")
        if path.suffix == ".safetensors":
            state = load_safetensors(path)
        else:
            state = _torch_load(path)
        if not isinstance(state, dict):
            raise ValueError(f"OpenFlamingo checkpoint {path} holds a {type(state).__name__}, not a state dict.")
    # Training checkpoints wrap the weights: {"model_state_dict": ..., "optimizer_state_dict": ...}.
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    return state


def load_openflamingo(
    checkpoint: str | Path | dict,
    *,
    vision_encoder: str | nn.Module,
    vision_pretrained: str | None,
    lang_model: str | PreTrainedModel,
    cross_attn_every_n_layers: int,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    decoder_layers_attr: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[Flamingo, FlamingoProcessor]:
    """Load an OpenFlamingo ``checkpoint.pt`` (loaded with ``weights_only=True``) into a Flamingo model.

    The backbones are given as for OpenFlamingo's ``create_model_and_transforms`` (e.g. ``"ViT-L-14"``,
    ``"openai"``, ``"anas-awadalla/mpt-1b-redpajama-200b"``). As in OpenFlamingo, the LM vocabulary is resized to the
    tokenizer's length. OpenFlamingo has no frame embeddings; ours are set to zero, which changes nothing for images.
    """
    state = _load_checkpoint(checkpoint)  # first: a wrong file fails before the backbones load
    model, processor = create_model_and_processor(
        vision_model=vision_encoder,
        vision_pretrained=vision_pretrained,
        lang_model=lang_model,
        tokenizer=tokenizer,
        cross_attn_every_n_layers=cross_attn_every_n_layers,
        decoder_layers_attr=decoder_layers_attr,
        perceiver=PerceiverConfig(),
        trust_remote_code=trust_remote_code,
        resize_to_tokenizer=True,
    )
    ours, lang = convert_openflamingo_state_dict(state, model.config.decoder_layers_attr)

    def named(key: str, lang: bool = False) -> str:
        return repr(_checkpoint_key(state, model.config.decoder_layers_attr, key, lang=lang))

    with torch.no_grad():
        if model.perceiver.frame_embeddings is not None and "perceiver.frame_embeddings" not in ours:
            model.perceiver.frame_embeddings.zero_()
        own = model.state_dict()
        for key, value in ours.items():
            if key not in own:
                raise ValueError(
                    f"OpenFlamingo weight {named(key)} (ours {key!r}) has no counterpart in this model; "
                    "check the backbones."
                )
            if own[key].shape != value.shape:
                raise ValueError(
                    f"OpenFlamingo weight {named(key)} has shape {tuple(value.shape)}, ours ({key!r}) "
                    f"{tuple(own[key].shape)}."
                )
            own[key].copy_(value)
        missing = [k for k in model.trainable_state_dict() if k.startswith(("perceiver.", "cross_attn_blocks.")) and k not in ours]
        missing = [k for k in missing if k != "perceiver.frame_embeddings"]
        if missing:
            raise ValueError(f"The OpenFlamingo checkpoint lacks {len(missing)} Flamingo weights, e.g. {missing[:5]}.")

        lang_own = model.lang_model.state_dict()
        changed = {}
        for key, value in lang.items():
            if key not in lang_own:
                raise ValueError(
                    f"OpenFlamingo weight {named(key, lang=True)} has no counterpart in the language model."
                )
            if lang_own[key].shape != value.shape:
                raise ValueError(
                    f"OpenFlamingo weight {named(key, lang=True)} has shape {tuple(value.shape)}, the language model "
                    f"{tuple(lang_own[key].shape)}; check lang_model and tokenizer."
                )
            if not torch.equal(lang_own[key], value.to(lang_own[key].dtype)):
                changed[key] = value
    # Through load_state_dict, so that a trained embedding table also sets the rows of the added tokens.
    model.lang_model.load_state_dict(changed, strict=False)
    # Frozen LM weights that OpenFlamingo trained (its full embedding table) travel with our saved weights.
    model.config.saved_lang_params = sorted(changed)
    return model, processor
