"""Configuration objects: every hyperparameter of a Flamingo model, saved as ``config.json`` next to its weights.

Defaults follow the Flamingo paper and OpenFlamingo: 64 latents, a depth-6 perceiver, 8 heads of width 64,
feed-forward multiplier 4, tanh gates initialised at 0, and a text token that sees only the image right before it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import atomic_write_text
from .typed_config import build

CONFIG_NAME = "config.json"
# dtype names accepted by config files and command lines (training's lang_model_dtype, flamingo-eval --dtype).
# Names only, so that configs and CLIs check them without importing torch; torch_dtype() gives the dtype.
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str):
    """The torch dtype of one of ``DTYPE_NAMES``."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {list(DTYPE_NAMES)}; got {name!r}.")
    import torch

    return getattr(torch, name)


@dataclass
class PerceiverConfig:
    """The Perceiver Resampler: learned latents that compress each image (or video) to ``num_latents`` tokens."""

    depth: int = 6
    num_latents: int = 64
    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    # Learned frame (time) embeddings for video input, one per frame index. None disables video input.
    max_frames: int | None = 8
    # False: no latents; each media's patch tokens (all frames) go to the cross-attention as they are, after the frame
    # embeddings and the final LayerNorm (``depth``, ``num_latents``, ``heads``, ``dim_head`` are then unused). For
    # towers with few tokens, such as the micro model's 16: static latents must first learn to tell objects apart.
    resample: bool = True


@dataclass
class CrossAttentionConfig:
    """The tanh-gated cross-attention + feed-forward blocks inserted into the language model."""

    heads: int = 8
    dim_head: int = 64
    ff_mult: int = 4
    # True: a text token sees only the latest image at or before it (the paper's default).
    # False: it sees every image at or before it.
    only_attend_immediate_media: bool = True


# Fields that early configs stored although the tokens are fixed (flamingo.tokens.MEDIA_TOKEN, ...).
_LEGACY_TOKEN_FIELDS = {"media_token": "<image>", "end_of_chunk_token": "<|endofchunk|>"}


@dataclass
class FlamingoConfig:
    """Everything needed to rebuild a Flamingo model: backbone references, architecture, and special tokens.

    Backbones are stored by reference (``vision_model`` + ``vision_pretrained``, ``lang_model``), so a saved model
    holds only the weights we train. ``vision_model_cfg`` keeps the open_clip architecture itself, so a custom config
    registered with ``open_clip.add_model_config`` reloads in a fresh process.
    """

    vision_model: str | None = None
    lang_model: str | None = None
    vision_pretrained: str | None = None
    vision_model_cfg: dict | None = None
    vision_preprocess_cfg: dict | None = None
    # ResNet vision towers only: the residual stage (1-4) whose feature map gives the visual tokens; None: the last.
    vision_feature_stage: int | None = None
    cross_attn_every_n_layers: int = 1
    decoder_layers_attr: str | None = None
    perceiver: PerceiverConfig = field(default_factory=PerceiverConfig)
    cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    # Filled in when the tokenizer is attached (see ``flamingo.factory``).
    media_token_id: int | None = None
    end_of_chunk_token_id: int | None = None
    pad_token_id: int | None = None
    added_token_ids: list[int] = field(default_factory=list)
    vocab_size: int | None = None
    # Frozen language-model parameters whose values differ from the referenced backbone (for example the embedding
    # table that OpenFlamingo trained in full). They are saved alongside the trainable weights.
    saved_lang_params: list[str] = field(default_factory=list)
    # The language model runs its own Python code (it was built with trust_remote_code=True and its config names
    # code through "auto_map"). A record only: loading such a model still needs the user's own
    # trust_remote_code=True at the call, and fails with a message saying so without it (flamingo.pretrained).
    requires_remote_code: bool = False
    # An image (pixel_values or media) holding NaN or inf: "raise" a ValueError naming it, or "mask" it out, so it is
    # attended by no token and the rest of the batch is computed exactly as if that image were any finite one.
    # Read at every call, so ``model.config.nonfinite_media = "mask"`` on a built model works.
    nonfinite_media: str = "raise"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "FlamingoConfig") -> FlamingoConfig:
        """Build from a JSON mapping, every field's type checked (``flamingo.typed_config``); ``where`` names the
        source in errors: ``config.json: perceiver.depth: expected int, got 2.0 (float)``."""
        if isinstance(data, Mapping):
            data = dict(data)
            for legacy, value in _LEGACY_TOKEN_FIELDS.items():  # written by flamingo 0.1, never read
                if data.get(legacy, value) != value:
                    raise ValueError(f"{where}: {legacy}: {data[legacy]!r} is not supported; the token is {value!r}.")
                data.pop(legacy, None)
            # Earlier versions wrote a setting that loading obeyed, so a file could switch remote code on. Now it is
            # read only as what it recorded, that the LM needs its code; running it takes the user's own argument.
            if "trust_remote_code" in data:
                legacy = data.pop("trust_remote_code")
                if not isinstance(legacy, bool):
                    raise ValueError(f"{where}: trust_remote_code: expected bool, got {legacy!r} ({type(legacy).__name__}).")
                if legacy:
                    data["requires_remote_code"] = True
        return build(cls, data, where=where)

    def save(self, directory: str | Path) -> None:
        atomic_write_text(Path(directory) / CONFIG_NAME, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> FlamingoConfig:
        """``directory/config.json``; a missing or damaged file, or a field of the wrong type, is a ValueError naming
        the file (and the field)."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"{directory} holds no {CONFIG_NAME}; is it a directory written by save_pretrained?")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from error
        return cls.from_dict(data, where=str(path))
