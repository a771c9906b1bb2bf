"""What ``Flamingo.generate`` needs to know about a Hugging Face ``generate`` call before it starts.

The media must follow the batch that ``generate`` builds (beam search and ``num_return_sequences`` repeat each
sample), the whole generation must fit the LM's context, and ``<image>`` must never be generated.
"""

from __future__ import annotations

import copy

import torch
from transformers import LogitsProcessor, PreTrainedModel


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
