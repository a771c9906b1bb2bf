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

import copy
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.utils import ModelOutput

from .added_tokens import AddedTokenEmbeddings
from .auxiliary import AuxiliaryReport
from .configuration import FlamingoConfig
from .cross_attention import GatedCrossAttentionBlock
from .deprecation import renamed_argument
from .generation import BanTokens, copies_per_sample, generated_length
from .lm_calls import cache_keyword, cache_length, output_cache
from .lm_fusion import LanguageModelFusion, find_decoder_layers
from .media_state import MediaContext, MediaSlot, MediaState
from .perceiver import PerceiverResampler
from .pretrained import PretrainedMixin
from .tokens import MEDIA_TOKEN
from .vision import VisionEncoder

if TYPE_CHECKING:
    from transformers import PreTrainedModel

NONFINITE_MEDIA = ("raise", "mask")  # FlamingoConfig.nonfinite_media


@dataclass
class FlamingoOutput(ModelOutput):
    """The output of :meth:`Flamingo.forward`.

    loss: scalar, if labels were given. logits: (b, l, vocab). cache: the LM's KV cache (a ``transformers.Cache``),
    if ``use_cache``. media_state: with a cache, the encoded images and their cross-attention keys/values; pass it
    back with ``cache`` to continue without encoding or projecting the images again. images_seen: (b,) the
    ``<image>`` tokens seen up to the end of the input (also in ``media_state``; pass it back as ``images_before``
    when continuing with ``pixel_values`` or ``media`` instead). hidden_states, attentions: as the LM returns them.
    aux_losses: ``{name: scalar}`` auxiliary losses the modules reported (empty for a dense model; training adds
    each times its ``optim.aux_loss_weights`` entry). stats: ``{"source/name": scalar}`` statistics they reported
    (:mod:`flamingo.auxiliary`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    images_seen: torch.LongTensor | None = None
    media_state: MediaState | None = None
    aux_losses: dict[str, torch.Tensor] | None = None
    stats: dict[str, torch.Tensor] | None = None

    @property
    def past_key_values(self):
        """Deprecated name of :attr:`cache` (transformers renamed it in 5.24)."""
        warnings.warn("FlamingoOutput.past_key_values is deprecated; use .cache.", FutureWarning, stacklevel=2)
        return self.cache


def context_length(lang_model: PreTrainedModel) -> tuple[str, int] | None:
    """``(config field, value)``: the most positions the LM takes, from its config; None if it states no limit.

    Families name it differently (Llama ``max_position_embeddings``, GPT-2 ``n_positions``, MPT ``max_seq_len``).
    Past it, learned position tables fail with an ``IndexError`` deep in torch and rotary ones go on silently on
    positions they were never trained on; either way the logits are not the model's.
    """
    config = getattr(lang_model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def _first_true(mask: torch.Tensor) -> list[int]:
    """The index of the first True entry of a bool tensor known to hold one."""
    return mask.nonzero()[0].tolist()


class Flamingo(PretrainedMixin, nn.Module):
    """A frozen open_clip vision tower and a frozen HF causal LM, joined by a trainable perceiver and gated
    cross-attention blocks fused before every ``cross_attn_every_n_layers``-th decoder layer.

    Build one with :func:`flamingo.create_model_and_processor`, :meth:`from_pretrained` or
    :func:`flamingo.load_openflamingo`. Trainable: ``perceiver``, ``cross_attn_blocks`` and ``added_tokens``.
    ``lang_model`` stays a plain HF model; :meth:`unfuse` gives it back exactly as it was.
    """

    def __init__(self, config: FlamingoConfig, vision_encoder: VisionEncoder, lang_model: PreTrainedModel):
        super().__init__()
        if config.media_token_id is None:
            raise ValueError("config.media_token_id is unset; build the model with create_model_and_processor.")
        if config.nonfinite_media not in NONFINITE_MEDIA:
            raise ValueError(f"nonfinite_media={config.nonfinite_media!r} must be one of {NONFINITE_MEDIA}.")
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
        self.added_tokens = AddedTokenEmbeddings.from_lang_model(lang_model, config.added_token_ids)
        self._cache_keyword = cache_keyword(lang_model)
        self._media_slot = MediaSlot()
        self._fusion: LanguageModelFusion | None = LanguageModelFusion(
            lang_model, layers, [int(i) for i in self.cross_attn_blocks], self.added_tokens, self._media_slot
        )
        self.freeze_backbones()

    def unfuse(self) -> PreTrainedModel:
        """Remove Flamingo from the language model and return it, bit-identical to the LM this model was built on.

        The Flamingo model cannot run afterwards. (To keep the trained rows of the added tokens in a plain LM, save
        ``model.lang_model`` with ``save_pretrained`` before unfusing.)
        """
        if self._fusion is None:
            raise ValueError("This Flamingo model has already been unfused.")
        lang_model, self._fusion = self._fusion.unfuse(), None
        return lang_model

    def _check_fused(self) -> None:
        if self._fusion is None:
            raise ValueError("This Flamingo model was unfused; its language model no longer has cross-attention.")

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
        return self.perceiver.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.perceiver.norm.weight.dtype

    # ------------------------------------------------------------------------------------------ forward
    def _checked_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values as (b, t, f, c, h, w), after checking rank, dtype and image size against the vision tower."""
        if pixel_values.ndim == 5:
            pixel_values = pixel_values.unsqueeze(2)
        if pixel_values.ndim != 6:
            raise ValueError(
                f"pixel_values must be (B, T_img, F, C, H, W) or (B, T_img, C, H, W); got shape {tuple(pixel_values.shape)}."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be normalised floating-point pixels; got dtype {pixel_values.dtype}. "
                "Prepare images with FlamingoProcessor (or the vision tower's own transform)."
            )
        conv = getattr(self.vision_encoder.visual, "conv1", None)
        expected = (getattr(conv, "in_channels", 3), *self.vision_encoder.image_size)
        if tuple(pixel_values.shape[3:]) != expected:
            raise ValueError(
                f"pixel_values images must be (C, H, W) = {expected} for this vision tower; got "
                f"{tuple(pixel_values.shape[3:])} (pixel_values shape {tuple(pixel_values.shape)})."
            )
        if pixel_values.shape[0] == 0 or pixel_values.shape[2] == 0:
            raise ValueError(f"pixel_values is empty: shape {tuple(pixel_values.shape)} has no samples or no frames.")
        return pixel_values

    def encode_media(self, pixel_values: torch.Tensor, *, report: AuxiliaryReport | None = None) -> torch.Tensor:
        """(b, t, f, c, h, w) or (b, t, c, h, w) pixels -> (b, t, n, d_visual) visual tokens: the perceiver latents, or
        with ``PerceiverConfig(resample=False)`` the patch tokens of all frames (n = f * v).

        Pixels must be floats normalised as the processor does, at the tower's image size; any float dtype is
        cast to the tower's own (float64 included), integer pixels (e.g. uint8) are rejected. ``report``: where the
        perceiver reports auxiliary losses (:mod:`flamingo.auxiliary`), if it has any.
        """
        pixel_values = self._checked_pixels(pixel_values)
        b, t, f = pixel_values.shape[:3]
        if t == 0:  # no images in this batch: the tower cannot run on an empty batch
            return self.perceiver.empty_media(b)
        features = self.vision_encoder(pixel_values.flatten(0, 2))  # (b t f, v, d)
        features = features.unflatten(0, (b, t, f)).to(self.dtype)
        return self.perceiver(features, report=None if report is None else report.scoped("perceiver"))

    def _media_context(
        self,
        input_ids: torch.Tensor,
        *,
        pixel_values: torch.Tensor | None,
        media: torch.Tensor | None,
        images_before: torch.Tensor | None,
        prompt_offset: int | None,
        token_attributes: torch.Tensor | None,
        report: AuxiliaryReport,
    ) -> MediaContext:
        """The context of a call that starts afresh (or continues a cache given ``images_before``)."""
        self._check_fused()
        self._check_input_ids(input_ids)
        self._check_token_attributes(token_attributes, input_ids)
        media, media_ok = self._finite_media(pixel_values, media, report)
        if images_before is None:
            images_before = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        images_before = images_before.to(input_ids.device)
        if media is not None and media.shape[0] != input_ids.shape[0]:
            raise ValueError(f"pixel_values has batch size {media.shape[0]} but input_ids has {input_ids.shape[0]}.")
        mentioned, available = self._images_mentioned(input_ids, images_before), 0 if media is None else media.shape[1]
        if mentioned > available:
            raise ValueError(
                f"The text has {mentioned} {MEDIA_TOKEN} token(s) in a sample but only {available} image(s) per sample "
                "were given."
            )
        if media is None:
            # Text only: the blocks still run (their feed-forward branch applies to every token, as in the paper),
            # so a text's logits do not depend on whether unrelated images were passed along.
            media = self.perceiver.empty_media(input_ids.shape[0])
        return MediaContext(
            media=media,
            blocks=self._blocks_by_index(),
            media_token_id=self.config.media_token_id,
            prompt_ids=input_ids,
            images_before=images_before,
            prompt_offset=prompt_offset,
            media_ok=media_ok,
            token_attributes=token_attributes,
            report=report,
        )

    def _blocks_by_index(self) -> dict[int, GatedCrossAttentionBlock]:
        return {int(i): block for i, block in self.cross_attn_blocks.items()}

    def _images_mentioned(self, input_ids: torch.Tensor, images_before: torch.Tensor) -> int:
        """The most ``<image>`` tokens any sample's text has so far: ``images_before`` (b,) plus those in input_ids."""
        return int((images_before.to(input_ids.device) + (input_ids == self.config.media_token_id).sum(dim=1)).max())

    def _check_input_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (B, L) tensor of token ids; got {shape}.")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids; got dtype {input_ids.dtype}.")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); give at least one token a sample.")
        vocab = self.lang_model.get_input_embeddings().weight.shape[0]
        outside = (input_ids < 0) | (input_ids >= vocab)
        if outside.any():
            b, i = _first_true(outside)
            raise ValueError(
                f"input_ids[{b}, {i}] = {int(input_ids[b, i])} is not a token id: the vocabulary has {vocab} ids "
                f"(0 to {vocab - 1}). Pad with the tokenizer's pad id, not a negative one."
            )

    def _check_length(self, length: int, what: str) -> None:
        limit = context_length(self.lang_model)
        if limit is not None and length > limit[1]:
            raise ValueError(
                f"{what} is {length} tokens, but the language model takes at most {limit[1]} positions "
                f"(its config's {limit[0]}). Shorten the text."
            )

    def _finite_media(
        self, pixel_values: torch.Tensor | None, media: torch.Tensor | None, report: AuxiliaryReport | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Encode the pixels if given, and deal with images holding NaN or inf (``config.nonfinite_media``).

        Returns media (b, t, n, d) and media_ok (b, t) bool (None when every image is finite). Checked once per
        call, at the boundary: inside the blocks a non-finite image would reach every token (see cross_attention).
        """
        if pixel_values is not None and media is not None:
            raise ValueError("Give pixel_values or precomputed media, not both.")
        if pixel_values is None and media is None:
            return None, None
        if self.config.nonfinite_media not in NONFINITE_MEDIA:
            raise ValueError(f"nonfinite_media={self.config.nonfinite_media!r} must be one of {NONFINITE_MEDIA}.")
        mask = self.config.nonfinite_media == "mask"
        bad_pixels = None
        if pixel_values is not None:
            pixel_values = self._checked_pixels(pixel_values)
            bad_pixels = ~pixel_values.isfinite().flatten(2).all(dim=2)  # (b, t)
            if mask:  # no sync: zeroed images are masked out below, so their values do not matter
                pixel_values = torch.where(bad_pixels[:, :, None, None, None, None], 0, pixel_values)
            media = self.encode_media(pixel_values, report=report)
        if media.ndim != 4 or not media.is_floating_point():
            raise ValueError(
                f"media must be (B, T_img, n_latents, D) floating-point perceiver output; got shape "
                f"{tuple(media.shape)}, dtype {media.dtype}."
            )
        bad = ~media.isfinite().flatten(2).all(dim=2)  # (b, t); also catches overflow inside the tower or perceiver
        if bad_pixels is not None:
            bad = bad | bad_pixels
        if not bad.any():
            return media, None
        if not mask:
            b, t = _first_true(bad)
            source = "pixel_values" if bad_pixels is not None and bad_pixels[b, t] else "media"
            raise ValueError(
                f"{source} of sample {b}, image {t} holds NaN or inf. Fix the input, or build the model with "
                "nonfinite_media='mask' to leave such images out (no token attends to them)."
            )
        # Replace, don't multiply: NaN * 0 is NaN.
        return torch.where(bad[:, :, None, None], 0, media), ~bad

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        media: torch.Tensor | None = None,
        images_before: torch.LongTensor | None = None,
        media_state: MediaState | None = None,
        token_attributes: torch.Tensor | None = None,
        past_key_values=None,
        **lang_model_kwargs,
    ) -> FlamingoOutput:
        """Logits (and loss, if ``labels``; -100 is ignored) for interleaved text and images.

        input_ids, attention_mask, labels: (b, l). pixel_values: (b, t, f, c, h, w) or (b, t, c, h, w), or give
        ``media`` (b, t, n, d) from :meth:`encode_media` to reuse encoded images. token_attributes: (b, l) or
        (b, l, a), per-token attributes every cross-attention block receives (see :mod:`flamingo.media_state`).

        To continue from a KV cache, give the previous output's ``cache`` and its ``media_state`` (the fast way: the
        images' cross-attention keys/values are reused, see :mod:`flamingo.media_state`), with ``pixel_values`` or
        ``media`` holding only the images of this call's new ``<image>`` tokens, if any; or give its
        ``images_seen`` as ``images_before`` (b,) with all the images again. ``past_key_values`` is the deprecated
        name of ``cache``.

        ``aux_losses`` and ``stats`` of the output hold what the modules reported (:mod:`flamingo.auxiliary`); the
        ``loss`` is the language-modelling loss alone.

        Bad input raises a ValueError: token ids outside the vocabulary, an empty batch, more tokens (cache
        included) than the LM's context, pixels that are not normalised floats at the tower's image size, labels
        with no token to predict, and images holding NaN or inf (unless ``config.nonfinite_media="mask"``).
        """
        cache = renamed_argument(cache, past_key_values, new="cache", old="past_key_values", where="Flamingo.forward")
        past = 0 if cache is None else cache_length(cache)
        report = AuxiliaryReport()
        if media_state is not None:
            context = self._continued_context(
                input_ids, media_state, pixel_values=pixel_values, media=media, images_before=images_before,
                token_attributes=token_attributes, report=report,
            )
        else:
            if cache is not None and images_before is None and past > 0:
                raise ValueError(
                    "Continuing from a cache needs the previous output's media_state (or its images_seen as "
                    "images_before, with the images again)."
                )
            context = self._media_context(
                input_ids, pixel_values=pixel_values, media=media, images_before=images_before, prompt_offset=None,
                token_attributes=token_attributes, report=report,
            )
        self._check_length(past + input_ids.shape[1], f"The input ({past} cached + {input_ids.shape[1]} new tokens)")
        if labels is not None:
            self._check_labels(labels, input_ids)
        if cache is not None:
            lang_model_kwargs[self._cache_keyword] = cache
        with self._media_slot.bind(context):
            out = self.lang_model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                use_cache=use_cache,
                return_dict=True,
                **lang_model_kwargs,
            )
        new_cache = output_cache(out)
        return FlamingoOutput(
            loss=out.loss,
            logits=out.logits,
            cache=new_cache,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            images_seen=context.seen[:, -1],
            media_state=None if new_cache is None else context.state(),
            aux_losses=report.losses(),
            stats=report.stats(),
        )

    def _continued_context(
        self,
        input_ids: torch.Tensor,
        state: MediaState,
        *,
        pixel_values: torch.Tensor | None,
        media: torch.Tensor | None,
        images_before: torch.Tensor | None,
        token_attributes: torch.Tensor | None,
        report: AuxiliaryReport,
    ) -> MediaContext:
        """The context of a call continuing the one ``state`` came from, with the images of its new ``<image>``
        tokens, if given, added to the state (encoded and projected alone)."""
        self._check_fused()
        if not isinstance(state, MediaState):
            raise ValueError(f"media_state must be a previous output's media_state; got {type(state).__name__}.")
        if images_before is not None:
            raise ValueError("media_state already holds the image count; do not also pass images_before.")
        self._check_input_ids(input_ids)
        self._check_token_attributes(token_attributes, input_ids)
        if state.batch_size != input_ids.shape[0]:
            raise ValueError(
                f"media_state is for {state.batch_size} samples but input_ids has {input_ids.shape[0]}; after "
                "reordering or repeating the cache, do the same to the state (MediaState.select / repeat_interleave)."
            )
        new_media, new_ok = self._finite_media(pixel_values, media, report)
        if new_media is not None:
            source = "pixel_values" if pixel_values is not None else "media"
            if new_media.shape[0] != input_ids.shape[0]:
                raise ValueError(f"{source} has batch size {new_media.shape[0]} but input_ids has {input_ids.shape[0]}.")
            new_tokens = int((input_ids == self.config.media_token_id).sum(dim=1).max())
            if new_media.shape[1] != new_tokens:
                # Resending all the images with the state would number the old ones as new: refuse, don't guess.
                raise ValueError(
                    f"{source} holds {new_media.shape[1]} image(s) per sample but the new text has at most "
                    f"{new_tokens} {MEDIA_TOKEN} token(s) in a sample; with media_state, give only the images of this "
                    "call's new <image> tokens (the state holds the earlier ones)."
                )
            state = self._with_new_images(state, new_media, new_ok)
        mentioned = self._images_mentioned(input_ids, state.images_seen)
        if mentioned > state.media.shape[1]:
            raise ValueError(
                f"The text has {mentioned} {MEDIA_TOKEN} token(s) in a sample but media_state holds only "
                f"{state.media.shape[1]} image(s) per sample; give the new images' pixel_values (or media) with "
                "media_state."
            )
        return MediaContext.continuing(
            state, blocks=self._blocks_by_index(), media_token_id=self.config.media_token_id, prompt_ids=input_ids,
            token_attributes=token_attributes, report=report,
        )

    def _with_new_images(self, state: MediaState, media: torch.Tensor, media_ok: torch.Tensor | None) -> MediaState:
        """``state`` with the new images ``media`` (b, t_new, n, d) added; each block whose carried keys/values are
        current projects the new images alone."""
        new_keys_values = {}
        for index, block in self._blocks_by_index().items():
            if index in state.keys_values and state.weight_versions.get(index) == block.attn.to_kv.weight._version:
                new_keys_values[index] = block.attn.keys_values(media.to(state.keys_values[index][0].device))
        return state.with_new_images(media, media_ok, new_keys_values)

    def _check_token_attributes(self, token_attributes: torch.Tensor | None, input_ids: torch.Tensor) -> None:
        if token_attributes is None:
            return
        if not isinstance(token_attributes, torch.Tensor) or token_attributes.ndim not in (2, 3):
            shape = tuple(token_attributes.shape) if isinstance(token_attributes, torch.Tensor) else type(token_attributes).__name__
            raise ValueError(f"token_attributes must be a (B, L) or (B, L, A) tensor; got {shape}.")
        if tuple(token_attributes.shape[:2]) != tuple(input_ids.shape):
            raise ValueError(
                f"token_attributes has shape {tuple(token_attributes.shape)}; its first two dimensions must be "
                f"input_ids' {tuple(input_ids.shape)}."
            )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        media: torch.Tensor | None = None,
        token_attributes: torch.Tensor | None = None,
        **generation_kwargs,
    ) -> torch.LongTensor:
        """HF ``generate`` on the language model, conditioned on the images; returns prompt + new tokens (b', l').

        Images are encoded once, and each cross-attention block computes its media keys/values once per call.
        Stops at ``<|endofchunk|>`` unless ``eos_token_id`` is given. Beam search, sampling and
        ``num_return_sequences`` work as in HF; the media follow the expanded batch (:func:`copies_per_sample`).
        ``<image>`` is never generated, since a generated image token would have no image. To continue a KV
        cache, pass it as ``cache`` with the whole sequence as ``input_ids`` (the transformers convention).
        token_attributes: (b, l) or (b, l, a) for the prompt; generated tokens repeat the last prompt token's.
        Prompt plus ``max_new_tokens`` (or ``max_length``) must fit the LM's context; inputs are checked as in
        :meth:`forward`.
        """
        cache = renamed_argument(
            generation_kwargs.pop("cache", None),
            generation_kwargs.pop("past_key_values", None),
            new="cache",
            old="past_key_values",
            where="Flamingo.generate",
        )
        if cache is not None:
            generation_kwargs[self._cache_keyword] = cache
        self._set_token_defaults(generation_kwargs)
        from transformers import LogitsProcessorList  # here: the generation stack is not needed to build a model

        processors = LogitsProcessorList(generation_kwargs.pop("logits_processor", None) or [])
        processors.append(BanTokens([self.config.media_token_id]))
        generation_kwargs["logits_processor"] = processors
        context = self._media_context(
            input_ids, pixel_values=pixel_values, media=media, images_before=None, prompt_offset=0,
            token_attributes=token_attributes, report=AuxiliaryReport(),
        )
        self._check_length(generated_length(self.lang_model, generation_kwargs, input_ids.shape[1]),
                           f"The prompt ({input_ids.shape[1]} tokens) plus the tokens to generate")
        context = context.expanded(copies_per_sample(self.lang_model, generation_kwargs))
        with self._media_slot.bind(context):
            return self.lang_model.generate(input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs)

    def _set_token_defaults(self, generation_kwargs: dict) -> None:
        """End at ``<|endofchunk|>`` and pad with the model's pad token, unless the call says otherwise: in the given
        ``generation_config`` when there is one (transformers deprecates settings given both ways), else as keywords."""
        defaults = {"eos_token_id": self.config.end_of_chunk_token_id, "pad_token_id": self.config.pad_token_id}
        config = generation_kwargs.get("generation_config")
        if config is None:
            for name, value in defaults.items():
                generation_kwargs.setdefault(name, value)
            return
        config = copy.deepcopy(config)  # the caller's object stays as it was
        for name, value in defaults.items():
            if getattr(config, name, None) is None and name not in generation_kwargs:
                setattr(config, name, value)
        generation_kwargs["generation_config"] = config

    def _check_labels(self, labels: torch.Tensor, input_ids: torch.Tensor) -> None:
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}; got {tuple(labels.shape)}.")
        vocab = self.lang_model.get_input_embeddings().weight.shape[0]
        # The LM shifts: label i+1 is predicted at token i, so labels[:, 0] is never used.
        used = labels[:, 1:]
        counted = used != -100
        outside = counted & ((used < 0) | (used >= vocab))
        state = torch.stack([counted.any(), outside.any()]).tolist()
        if state[1]:
            b, i = _first_true(outside)
            raise ValueError(f"labels[{b}, {i + 1}] = {int(used[b, i])} is neither -100 nor a token id below {vocab}.")
        if not state[0]:
            # The mean over zero tokens is NaN; training (training/train.py) sums token losses itself.
            raise ValueError("labels hold no token to compute a loss on: every label after the first is -100.")

    # ------------------------------------------------------------------------------------------ saving
    # save_pretrained / from_pretrained come from PretrainedMixin (flamingo.pretrained).
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
        # The LM's part first: a saved embedding table also sets the added rows, which the module weights then give.
        lang_part = {k[len("lang_model.") :]: v for k, v in state.items() if k.startswith("lang_model.")}
        if lang_part:
            self.lang_model.load_state_dict(lang_part, strict=False)
        for prefix, module in self.trainable_modules().items():
            part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            module.load_state_dict(part, strict=True)
