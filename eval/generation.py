"""Open-ended answers (captioning, VQA): batched beam search over left-padded prompts with pre-encoded images.

Example::

    media = media_cache.media([[demo.image, query.image], ...])            # (B, T_img, n, d)
    answers = generate_answers(model, processor.tokenizer, prompts=[...], media=media, spec=get_task_spec("vqav2"))

Truncation: a generation that used all ``max_new_tokens`` without reaching a stop -- ``<|endofchunk|>``, the
tokenizer's eos, or a stop word / ", " that ``TaskSpec.postprocess`` cuts at -- may have lost the end of its answer.
Each answer records it (``"truncated"``), the runner reports the count per trial (``count_truncated``), and the
first truncated batch of a process warns once.
"""

from __future__ import annotations

import warnings

import torch

from flamingo.generation import exact_generation_config

from .prompts import TaskSpec

TRUNCATION_WARNING = (
    "some generations used all max_new_tokens without reaching <|endofchunk|>, an eos or a stop word, so their "
    "answers may be cut short; each trial's results count them ('truncated'). Raise --max-new-tokens if they matter."
)


@torch.no_grad()
def generate_answers(model, tokenizer, *, prompts: list[str], media: torch.Tensor, spec: TaskSpec) -> list[dict]:
    """Generate for each prompt; returns ``[{"raw": continuation, "prediction": post-processed answer,
    "truncated": bool}]``.

    prompts: B strings with ``<image>`` markers; media: (B, T_img, n, d) from ``Flamingo.encode_media`` (slots past
    a prompt's own image count are padding and never attended). Decoding follows ``spec`` (3 beams, no length
    penalty, task-specific ``max_new_tokens``) and stops at ``<|endofchunk|>``.
    """
    encoded = tokenizer(prompts, padding="longest", padding_side="left", return_tensors="pt")
    input_ids = encoded["input_ids"].to(model.device)
    # length_penalty only means something to beam search; HF warns about it under greedy decoding (num_beams=1).
    beams = {"num_beams": spec.num_beams, "length_penalty": spec.length_penalty} if spec.num_beams > 1 else {}
    # The protocol's decoding is these settings only, not the LM's generation_config.json on top (per call: the
    # model's own config is never swapped, so threads sharing the model cannot race).
    settings = exact_generation_config(model.lang_model, max_new_tokens=spec.max_new_tokens, do_sample=False, **beams)
    output = model.generate(
        input_ids, attention_mask=encoded["attention_mask"].to(model.device), media=media, generation_config=settings
    )
    new_tokens = output[:, input_ids.shape[1] :]  # (B, n_new); finished rows are padded after their stop token
    continuations = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    stopped = _stopped(new_tokens, stop_ids=(model.config.end_of_chunk_token_id, tokenizer.eos_token_id))
    out_of_tokens = new_tokens.shape[1] >= spec.max_new_tokens
    answers = [
        {
            "raw": text,
            "prediction": spec.postprocess(text),
            "truncated": out_of_tokens and not ended and not spec.stops_in(text),
        }
        for text, ended in zip(continuations, stopped)
    ]
    if any(a["truncated"] for a in answers):
        # One fixed message at one place: Python shows it once per process. (Nothing else on the warn line: Python
        # prints that line under the message.)
        warnings.warn(TRUNCATION_WARNING)
    return answers


def _stopped(new_tokens: torch.Tensor, *, stop_ids) -> list[bool]:
    """Per row of ``new_tokens`` (B, n_new): whether it holds a stop token."""
    ids = torch.tensor([i for i in stop_ids if i is not None], device=new_tokens.device, dtype=new_tokens.dtype)
    return torch.isin(new_tokens, ids).any(dim=1).tolist()


def count_truncated(records: list[dict]) -> int | None:
    """How many of a trial's per-query records were truncated; None when none says (a kind that ranks, not
    generates, or records logged before truncation was recorded)."""
    flags = [r["truncated"] for r in records if "truncated" in r]
    return sum(map(bool, flags)) if flags else None
