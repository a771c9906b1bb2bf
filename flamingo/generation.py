"""What ``Flamingo.generate`` needs to know about a Hugging Face ``generate`` call before it starts.

The media must follow the batch that ``generate`` builds (beam search and ``num_return_sequences`` repeat each
sample), the whole generation must fit the LM's context, and ``<image>`` must never be generated. A benchmark's
decoding must be exactly its protocol's, whatever the LM's own ``generation_config.json`` says
(:func:`exact_generation_config`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
import transformers
from transformers.generation.logits_process import LogitsProcessor

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel


class BanTokens(LogitsProcessor):
    """Sets the scores of ``token_ids`` to -inf at every step (what ``suppress_tokens`` does, without the per-step
    ``isin`` over the whole vocabulary: one ``index_fill`` of a few columns)."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if self.token_ids.device != scores.device:
            self.token_ids = self.token_ids.to(scores.device)
        return scores.index_fill(1, self.token_ids, float("-inf"))


def copies_per_sample(lang_model: PreTrainedModel, generation_kwargs: dict) -> int:
    """How many rows ``generate`` runs for each input sample: ``max(num_beams, num_return_sequences)``.

    transformers repeats every sample that many times in a row (``repeat_interleave``) before the first forward;
    the media must follow. The settings are merged as ``generate`` merges them: the given ``generation_config`` (or
    the LM's own), updated by the keyword arguments. The first LM forward checks the result against the prompt.
    """
    config = _generation_config(lang_model, generation_kwargs)
    return max(int(config.num_beams or 1), int(config.num_return_sequences or 1))


def _generation_config(lang_model: PreTrainedModel, generation_kwargs: dict):
    config = copy.deepcopy(generation_kwargs.get("generation_config") or lang_model.generation_config)
    config.update(**{k: v for k, v in generation_kwargs.items() if k != "generation_config"})
    return config


def generated_length(lang_model: PreTrainedModel, generation_kwargs: dict, prompt_length: int) -> int:
    """The longest sequence ``generate`` may reach: prompt + ``max_new_tokens``, or ``max_length`` when given here.

    A ``max_length`` that only the LM's own generation config sets is not counted: some ship one longer than their
    context, and generation usually stops at an end token long before.
    """
    config = _generation_config(lang_model, generation_kwargs)
    if config.max_new_tokens is not None:
        return prompt_length + int(config.max_new_tokens)
    if generation_kwargs.get("max_length") is not None:
        return max(prompt_length, int(generation_kwargs["max_length"]))
    return prompt_length


# Settings whose "off" value is not None and that transformers' own defaults do not cover.
_OFF = {"min_new_tokens": 0, "suppress_tokens": [], "begin_suppress_tokens": [], "sequence_bias": {}}
# Kept from the LM's config: they say which tokens are which, not how to decode (Flamingo.generate sets eos and pad).
_TOKEN_IDS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version"}


def exact_generation_config(lang_model: PreTrainedModel, **settings) -> GenerationConfig:
    """A generation config for one ``generate`` call that decodes with exactly ``settings``.

    transformers fills every setting a given config leaves unset from the model's own ``generation_config`` (instruct
    LMs ship repetition penalties, n-gram bans, minimum lengths, sampling), so each decoding setting the LM's config
    makes and ``settings`` does not is given here its off value: transformers' global default (e.g.
    ``repetition_penalty=1.0``) or ``_OFF``'s. The model is not touched, so concurrent calls cannot race. A setting
    with no off value (``bad_words_ids``, ``forced_bos_token_id``...) raises a ValueError naming it.
    """
    from transformers import GenerationConfig

    try:
        defaults = GenerationConfig._get_default_generation_params()
    except AttributeError:  # a private transformers helper (5.0 to 5.24 at least): fail loudly if it goes
        raise ValueError(
            f"transformers {transformers.__version__} has no GenerationConfig._get_default_generation_params, which "
            "Flamingo reads to decode by a benchmark's protocol; please report it with your transformers version."
        ) from None
    off = {**defaults, **_OFF}
    config = GenerationConfig(**settings)
    for name, value in lang_model.generation_config.to_diff_dict().items():
        if name in settings or name in _TOKEN_IDS or name.startswith("_") or value == off.get(name):
            continue
        if off.get(name) is None:
            if not value:  # False, 0, empty: already off (output_attentions=False, say)
                continue
            raise ValueError(
                f"The language model's generation_config sets {name}={value!r}, which has no neutral value to decode "
                "with the protocol's settings only; remove it from the LM's generation_config.json."
            )
        setattr(config, name, off[name])
    return config
