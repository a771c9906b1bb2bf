"""``save_pretrained`` / ``from_pretrained`` for Flamingo models, as a mixin in the manner of Hugging Face's
``PreTrainedModel``: it never imports the model class it serves.

A saved directory holds ``config.json`` and ``model.safetensors`` with the trainable weights (perceiver,
cross-attention blocks, added-token embeddings, and any frozen LM parameters listed in
``config.saved_lang_params``). Backbones are referenced, or saved too with ``save_backbones=True``
(:mod:`flamingo.backbones`, which also states the rule for local paths). Every file is written atomically, the
config last, so a directory with a config is complete.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

from .backbones import load_backbones, write_backbones
from .configuration import CONFIG_NAME, FlamingoConfig
from .deprecation import renamed_argument
from .io import atomic_save_safetensors, check_finite, load_safetensors
from .micro.shipped import is_shipped_model, resolve_model_path

if TYPE_CHECKING:
    import torch

WEIGHTS_NAME = "model.safetensors"


class PretrainedMixin:
    """Saving and loading for a model class that is built as ``cls(config, vision_encoder, lang_model)`` and has
    ``config`` (a :class:`~flamingo.configuration.FlamingoConfig`), ``vision_encoder``, ``lang_model``,
    ``trainable_state_dict()`` and ``load_trainable_state_dict(state)``."""

    def save_pretrained(
        self, directory: str | Path, *, save_backbones: bool = False, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Write ``config.json`` and ``model.safetensors`` (trainable weights) to ``directory``.

        By default the backbones are stored by reference (open_clip name + pretrained tag or file, LM hub id or
        path). ``save_backbones=True`` also writes the LM (``language_model/``) and the vision tower
        (``vision_model.safetensors``), so the directory is self-contained. ``state_dict``: the whole model's
        weights gathered from a sharded wrapper (``accelerator.get_state_dict(model)`` under FSDP), saved instead
        of this module's own parameters.
        """
        if state_dict is not None and save_backbones:
            raise ValueError("save_backbones=True saves this module's own backbones; it cannot take a state_dict.")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        if save_backbones:
            write_backbones(self.vision_encoder, self.lang_model, directory, config)
        elif config.vision_model is None or config.lang_model is None:
            raise ValueError(
                "This model was built from backbone objects, so config.json cannot refer to them by name; "
                "use save_pretrained(directory, save_backbones=True)."
            )
        atomic_save_safetensors(directory / WEIGHTS_NAME, self.trainable_state_dict(state_dict), metadata={"format": "pt"})
        config.save(directory)  # last: a directory with a config is complete

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        dtype: torch.dtype | None = None,
        trust_remote_code: bool = False,
        torch_dtype: torch.dtype | None = None,
    ):
        """Rebuild a model written by :meth:`save_pretrained`, from its directory; ``"micro"`` is the model shipped
        in the package (a reserved name: :mod:`flamingo.micro.shipped`).

        dtype: the language model's dtype (default: as saved). trust_remote_code: run the LM's own Python code from
        its directory or hub repo. Only this argument allows it, never a file: a config that records
        ``requires_remote_code`` fails to load without it, saying so; the shipped model never runs code.
        torch_dtype: the deprecated name of ``dtype``. A self-contained directory's backbones are afterwards referred
        to by absolute path (:mod:`flamingo.backbones`), so the model saves anywhere.

        Every loaded weight is checked to be finite; a NaN or inf is a ValueError naming the file it came from.
        """
        dtype = renamed_argument(dtype, torch_dtype, new="dtype", old="torch_dtype", where="Flamingo.from_pretrained")
        directory = resolve_model_path(directory)
        if is_shipped_model(directory):
            trust_remote_code = False  # the shipped model has no code of its own, whatever its files say
        config = FlamingoConfig.load(directory)
        if config.requires_remote_code and not trust_remote_code:
            raise ValueError(remote_code_refusal(directory, config))
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise ValueError(f"{directory} holds no {WEIGHTS_NAME}.")
        state = load_safetensors(weights)  # before the backbones load, so a damaged file fails at once
        check_finite(state.items(), source=weights)
        vision_encoder, lang_model = load_backbones(config, directory, dtype=dtype, trust_remote_code=trust_remote_code)
        model = cls(config, vision_encoder, lang_model)
        model.load_trainable_state_dict(state)
        return model


def remote_code_refusal(directory: Path, config: FlamingoConfig) -> str:
    """Why a model whose config records ``requires_remote_code`` does not load, and how to allow it."""
    return (
        f"{directory / CONFIG_NAME} records that its language model ({config.lang_model}) runs its own Python code "
        "(requires_remote_code), and code from a model folder runs only when you ask. If you trust this folder, "
        "pass trust_remote_code=True (Flamingo.from_pretrained), --trust-remote-code (flamingo-eval run), or set "
        "model.trust_remote_code: true (flamingo-train)."
    )
