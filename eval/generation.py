"""Open-ended answers (captioning, VQA): batched beam search over left-padded prompts with pre-encoded images.

Example::

    media = media_cache.media([[demo.image, query.image], ...])            # (B, T_img, n, d)
    answers = generate_answers(model, processor.tokenizer, prompts=[...], media=media, spec=get_task_spec("vqav2"))
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from .prompts import TaskSpec


@torch.no_grad()
def generate_answers(model, tokenizer, *, prompts: list[str], media: torch.Tensor, spec: TaskSpec) -> list[dict]:
    """Generate for each prompt; returns ``[{"raw": continuation, "prediction": post-processed answer}]``.

    prompts: B strings with ``<image>`` markers; media: (B, T_img, n, d) from ``Flamingo.encode_media`` (slots past
    a prompt's own image count are padding and never attended). Decoding follows ``spec`` (3 beams, no length
    penalty, task-specific ``max_new_tokens``) and stops at ``<|endofchunk|>``.
    """
    encoded = tokenizer(prompts, padding="longest", padding_side="left", return_tensors="pt")
    input_ids = encoded["input_ids"].to(model.device)
    # HF fills every setting not given here from the LM's generation_config.json, where instruct models ship
    # repetition penalties, n-gram bans, minimum lengths, sampling...; the protocol's decoding is these settings only.
    lang_model = model.lang_model
    own_config, lang_model.generation_config = lang_model.generation_config, GenerationConfig()
    # length_penalty only means something to beam search; HF warns about it under greedy decoding (num_beams=1).
    beams = {"num_beams": spec.num_beams, "length_penalty": spec.length_penalty} if spec.num_beams > 1 else {}
    try:
        output = model.generate(
            input_ids,
            attention_mask=encoded["attention_mask"].to(model.device),
            media=media,
            max_new_tokens=spec.max_new_tokens,
            do_sample=False,
            **beams,
        )
    finally:
        lang_model.generation_config = own_config
    continuations = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    return [{"raw": text, "prediction": spec.postprocess(text)} for text in continuations]
