"""The Flamingo model: pixels -> patch features -> perceiver latents -> gated cross-attention inside the LM -> logits.

Axes: b batch, t media per sample, f frames per media, c/h/w image, v patches, n latents, l text tokens, d width.

Example::

    model, processor = flamingo.create_model_and_processor(
        vision_model="ViT-L-14", vision_pretrained="openai", lang_model="meta-llama/Llama-3.2-1B",
        cross_attn_every_n_layers=4)
    batch = processor([cat_image, "An image of two cats.", dog_image, "An image of"])
    out = model(**batch)                                   # out.logits: (b, l, vocab)
    ids = model.generate(**batch, max_new_tokens=20)       # prompt + new tokens
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .added_tokens import AddedTokenEmbeddings
from .configuration import FlamingoConfig
from .cross_attention import GatedCrossAttentionBlock
from .lm_fusion import MediaContext, MediaSlot, find_decoder_layers, fuse_cross_attention
from .perceiver import PerceiverResampler
from .vision import VisionEncoder

WEIGHTS_NAME = "model.safetensors"


@dataclass
class FlamingoOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``images_seen`` (b,): the ``<image>`` tokens seen up to the end of the input.

    Pass it back as ``images_before`` when continuing from ``past_key_values``.
    """

    images_seen: torch.LongTensor | None = None


class Flamingo(nn.Module):
    """A frozen open_clip vision tower and a frozen HF causal LM, joined by a trainable perceiver and gated
    cross-attention blocks fused before every ``cross_attn_every_n_layers``-th decoder layer.

    Build one with :func:`flamingo.create_model_and_processor`, :meth:`from_pretrained` or
    :func:`flamingo.load_openflamingo`. Trainable: ``perceiver``, ``cross_attn_blocks`` and ``added_tokens``.
    """

    def __init__(self, config: FlamingoConfig, vision_encoder: VisionEncoder, lang_model: PreTrainedModel):
        super().__init__()
        if config.media_token_id is None:
            raise ValueError("config.media_token_id is unset; build the model with create_model_and_processor.")
        self.config = config
        self.vision_encoder = vision_encoder
        self.lang_model = lang_model
        vision_width = vision_encoder.width
        self.perceiver = PerceiverResampler(vision_width, config.perceiver)

        layers_attr, layers = find_decoder_layers(lang_model, config.decoder_layers_attr)
        config.decoder_layers_attr = layers_attr
        text_width = lang_model.get_input_embeddings().embedding_dim
        every = config.cross_attn_every_n_layers
        if every < 1 or every > len(layers):
            raise ValueError(f"cross_attn_every_n_layers={every} must be between 1 and the {len(layers)} decoder layers.")
        # OpenFlamingo's placement: before layers n-1, 2n-1, ... (0-based), i.e. before every n-th layer.
        self.cross_attn_blocks = nn.ModuleDict(
            {
                str(i): GatedCrossAttentionBlock(text_width, vision_width, config.cross_attention)
                for i in range(len(layers))
                if (i + 1) % every == 0
            }
        )
        self._media_slot = MediaSlot()
        fuse_cross_attention(layers, {int(i): b for i, b in self.cross_attn_blocks.items()}, self._media_slot)
        lang_model.register_forward_pre_hook(self._observe_lm_forward, with_kwargs=True)
        lang_model.get_input_embeddings().register_forward_pre_hook(self._observe_input_ids)
        self.added_tokens = AddedTokenEmbeddings(lang_model, config.added_token_ids)
        self.freeze_backbones()

    # ------------------------------------------------------------------------------------------ parameters
    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"perceiver": self.perceiver, "cross_attn_blocks": self.cross_attn_blocks, "added_tokens": self.added_tokens}

    def freeze_backbones(self) -> None:
        """Freeze everything, check that nothing trains, then unfreeze the Flamingo-specific modules."""
        self.requires_grad_(False)
        assert not any(p.requires_grad for p in self.parameters())
        for module in self.trainable_modules().values():
            module.requires_grad_(True)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @property
    def device(self) -> torch.device:
        return self.perceiver.latents.device

    @property
    def dtype(self) -> torch.dtype:
        return self.perceiver.latents.dtype

    # ------------------------------------------------------------------------------------------ forward
    def encode_media(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(b, t, f, c, h, w) or (b, t, c, h, w) pixels -> (b, t, n, d_visual) perceiver latents."""
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.unsqueeze(2)
        if pixel_values.ndim != 6:
            raise ValueError(
                f"pixel_values must be (B, T_img, F, C, H, W) or (B, T_img, C, H, W); got shape {tuple(pixel_values.shape)}."
            )
        b, t, f = pixel_values.shape[:3]
        features = self.vision_encoder(pixel_values.flatten(0, 2))  # (b t f, v, d)
        features = features.unflatten(0, (b, t, f)).to(self.perceiver.latents.dtype)
        return self.perceiver(features)

    def _media_context(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        media: torch.Tensor | None,
        images_before: torch.Tensor | None,
    ) -> MediaContext:
        if input_ids is None or input_ids.ndim != 2:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ValueError(f"input_ids must be a (B, L) tensor of token ids; got {shape}.")
        if pixel_values is not None and media is not None:
            raise ValueError("Give pixel_values or precomputed media, not both.")
        if media is None and pixel_values is not None:
            media = self.encode_media(pixel_values)
        if media is not None and media.ndim != 4:
            raise ValueError(f"media must be (B, T_img, n_latents, D) perceiver output; got {tuple(media.shape)}.")
        if images_before is None:
            images_before = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        mentioned = images_before + (input_ids == self.config.media_token_id).sum(dim=1)
        available = 0 if media is None else media.shape[1]
        if media is not None and media.shape[0] != input_ids.shape[0]:
            raise ValueError(f"pixel_values has batch size {media.shape[0]} but input_ids has {input_ids.shape[0]}.")
        if int(mentioned.max()) > available:
            raise ValueError(
                f"The text has {int(mentioned.max())} {self.config.media_token} token(s) in a sample but only "
                f"{available} image(s) per sample were given."
            )
        if media is None:
            # Text only: the blocks still run (their feed-forward branch applies to every token, as in the paper),
            # so a text's logits do not depend on whether unrelated images were passed along.
            media = self.perceiver.latents.new_zeros(input_ids.shape[0], 0, *self.perceiver.latents.shape)
        return MediaContext(media, images_before, self.config.media_token_id)

    def _observe_lm_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = self._media_slot.context
        if context is not None:
            past = kwargs.get("past_key_values")
            context.start_lm_forward(past is not None and _cache_length(past) > 0)

    def _observe_input_ids(self, module: nn.Module, args: tuple) -> None:
        context = self._media_slot.context
        if context is not None:
            context.observe_input_ids(args[0])

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        media: torch.Tensor | None = None,
        images_before: torch.LongTensor | None = None,
        **lang_model_kwargs,
    ) -> FlamingoOutput:
        """Logits (and loss, if ``labels``; -100 is ignored) for interleaved text and images.

        input_ids, attention_mask, labels: (b, l). pixel_values: (b, t, f, c, h, w) or (b, t, c, h, w), or give
        ``media`` (b, t, n, d) from :meth:`encode_media` to reuse encoded images. When continuing from
        ``past_key_values``, give ``images_before`` (b,): the ``images_seen`` of the previous output.
        """
        if past_key_values is not None and images_before is None and _cache_length(past_key_values) > 0:
            raise ValueError("Continuing from past_key_values needs images_before (the previous output's images_seen).")
        context = self._media_context(input_ids, pixel_values, media, images_before)
        with self._media_slot.bind(context):
            out = self.lang_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                past_key_values=past_key_values,
                use_cache=use_cache,
                return_dict=True,
                **lang_model_kwargs,
            )
        before = images_before if images_before is not None else 0
        images_seen = before + (input_ids == self.config.media_token_id).sum(dim=1)
        return FlamingoOutput(
            loss=out.loss,
            logits=out.logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            images_seen=images_seen,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        media: torch.Tensor | None = None,
        **generation_kwargs,
    ) -> torch.LongTensor:
        """HF ``generate`` on the language model, conditioned on the images; returns prompt + new tokens (b', l').

        Images are encoded once, and each cross-attention block computes its media keys/values once per call.
        Stops at ``<|endofchunk|>`` unless ``eos_token_id`` is given. Beam search, sampling and
        ``num_return_sequences`` work as in HF; the media follow the expanded batch. ``<image>`` is never generated,
        since a generated image token would have no image.
        """
        context = self._media_context(input_ids, pixel_values, media, None)
        generation_kwargs.setdefault("eos_token_id", self.config.end_of_chunk_token_id)
        generation_kwargs.setdefault("pad_token_id", self.config.pad_token_id)
        suppress = set(generation_kwargs.pop("suppress_tokens", None) or []) | {self.config.media_token_id}
        with self._media_slot.bind(context):
            return self.lang_model.generate(
                input_ids=input_ids, attention_mask=attention_mask, suppress_tokens=sorted(suppress), **generation_kwargs
            )

    # ------------------------------------------------------------------------------------------ saving
    def trainable_state_dict(self, full_state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The weights a saved model stores: the Flamingo modules plus ``config.saved_lang_params``.

        ``full_state_dict``: take the values from this whole-model state dict (e.g. ``accelerator.get_state_dict``
        gathered from FSDP shards) instead of from the modules, whose parameters may be shards.
        """
        state = {
            f"{prefix}.{key}": value
            for prefix, module in self.trainable_modules().items()
            for key, value in module.state_dict().items()
        }
        if self.config.saved_lang_params:
            lang_state = self.lang_model.state_dict()
            for name in self.config.saved_lang_params:
                state[f"lang_model.{name}"] = lang_state[name]
        if full_state_dict is None:
            return state
        missing = sorted(set(state) - set(full_state_dict))
        if missing:
            raise ValueError(f"The given state dict lacks trainable weights: {missing[:10]}.")
        return {key: full_state_dict[key] for key in state}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`trainable_state_dict` produced; every expected key must be present."""
        expected = set(self.trainable_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"Weights do not match this model: missing {missing[:10]}, unexpected {unexpected[:10]}.")
        for prefix, module in self.trainable_modules().items():
            part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            module.load_state_dict(part, strict=True)
        lang_part = {k[len("lang_model.") :]: v for k, v in state.items() if k.startswith("lang_model.")}
        if lang_part:
            self.lang_model.load_state_dict(lang_part, strict=False)

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
        from .pretrained import save_model

        if state_dict is not None and save_backbones:
            raise ValueError("save_backbones=True saves this module's own backbones; it cannot take a state_dict.")
        save_model(self, Path(directory), save_backbones=save_backbones, state_dict=state_dict)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> Flamingo:
        """Rebuild a model written by :meth:`save_pretrained`. kwargs: ``torch_dtype``, ``trust_remote_code``."""
        from .pretrained import load_model

        return load_model(Path(directory), **kwargs)


def _cache_length(past_key_values) -> int:
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    return int(past_key_values[0][0].shape[-2]) if len(past_key_values) else 0
