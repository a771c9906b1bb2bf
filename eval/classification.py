"""Rank classification (ImageNet, HatefulMemes, binding): score each candidate by its mean per-token log-probability.

The prompt (demos + query image + "Output:") is the same for every class, so it is run ONCE with a KV cache; the
class names are then scored against copies of that cache, ``class_batch_size`` classes at a time. The class tokens
continue from the cache with the prefix's ``media_state``, so they attend to the query image (OpenFlamingo's cached
path dropped the images there) through keys/values projected once for the prefix. :func:`class_log_probs_reference`
is the plain computation, one full forward per (sample, class), kept for the equivalence test and the benchmark.

:func:`candidate_log_probs` is that computation for per-row candidate lists (binding ranks each episode's own
words, tokenized in context by :func:`continuation_token_ids`); :func:`class_log_probs` is it with the same class
names in every row.

Memory: a class batch holds ``B * class_batch_size`` copies of the prompt's cache; lower ``class_batch_size`` for
long prompts on large models (1 reproduces OpenFlamingo's loop over classes).
"""

from __future__ import annotations

import copy
import inspect

import torch


def class_token_ids(tokenizer, class_names) -> list[list[int]]:
    """Each class name tokenized on its own, without special tokens (OpenFlamingo's convention)."""
    ids = tokenizer(list(class_names), add_special_tokens=False)["input_ids"]
    empty = [name for name, tokens in zip(class_names, ids) if not tokens]
    if empty:
        raise ValueError(f"Class names {empty[:5]} tokenize to nothing; every class needs at least one token.")
    return ids


def _takes_position_ids(lang_model) -> bool:
    return "position_ids" in inspect.signature(lang_model.forward).parameters


def _positions(attention_mask: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    # Left padding must not shift the positions of real tokens, or a batched prompt would differ from a lone one.
    positions = attention_mask.long().cumsum(-1) - 1
    if start is not None:
        positions = positions + start[:, None]
    return positions.clamp(min=0)


@torch.no_grad()
def class_log_probs(
    model, tokenizer, *, prompts: list[str], media: torch.Tensor, class_names, class_batch_size: int = 8
) -> torch.Tensor:
    """(B, C) mean per-token log-probability of each class name after each prompt.

    prompts: B strings ending where the class name goes; media: (B, T_img, n, d) pre-encoded images.
    """
    tokens = class_token_ids(tokenizer, class_names)
    rows = candidate_log_probs(
        model, tokenizer, prompts=prompts, media=media, candidates=[tokens] * len(prompts), class_batch_size=class_batch_size
    )
    return torch.stack(rows)


def continuation_token_ids(tokenizer, prompt: str, continuations) -> list[list[int]]:
    """The tokens each continuation adds to ``prompt``: tokens(prompt + c) past tokens(prompt), as lm-eval-harness
    does, so a continuation starting with a space (" dax.") is split as it is inside running text. Where the
    prompt's own tokens change at the seam, the continuation is tokenized on its own instead."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    out = []
    for text in continuations:
        whole = tokenizer(prompt + text)["input_ids"]
        ids = whole[len(prompt_ids) :] if whole[: len(prompt_ids)] == prompt_ids else None
        out.append(ids or tokenizer(text, add_special_tokens=False)["input_ids"])
    empty = [text for text, ids in zip(continuations, out) if not ids]
    if empty:
        raise ValueError(f"Continuations {empty[:5]} tokenize to nothing; every choice needs at least one token.")
    return out


@torch.no_grad()
def candidate_log_probs(
    model, tokenizer, *, prompts: list[str], media: torch.Tensor, candidates: list[list[list[int]]], class_batch_size: int = 8
) -> list[torch.Tensor]:
    """Mean per-token log-probability of each row's own candidates: B tensors, row b of shape (len(candidates[b]),).

    prompts: B strings ending where a candidate goes; media: (B, T_img, n, d); candidates[b]: the token ids of row
    b's candidates (classification: the same class names in every row; binding: each episode's words). Rows with
    fewer candidates than the longest list are padded with copies of their last one, whose scores are dropped.
    """
    device = model.device
    encoded = tokenizer(prompts, padding="longest", padding_side="left", return_tensors="pt")
    input_ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    batch = input_ids.shape[0]
    extra = {"position_ids": _positions(mask)} if _takes_position_ids(model.lang_model) else {}
    prefix = model(input_ids, attention_mask=mask, media=media, use_cache=True, **extra)
    first_log_probs = prefix.logits[:, -1].float().log_softmax(-1)  # (B, V): predicts each class's first token
    prefix_length = mask.sum(-1)  # (B,)

    # The images' cross-attention keys/values were projected once, for the prefix; every class batch reuses them.
    state = prefix.media_state
    if model.config.cross_attention.only_attend_immediate_media and bool((state.images_seen > 0).all()):
        # The class tokens attend only to the query image (the last one seen): keep just its latents and keys/values,
        # so the B * class_batch_size copies below carry one image each, not all k + 1 (33 at 32 shots). Same scores.
        state = state.last_image_only()

    most = max(len(row) for row in candidates)
    padded = [list(row) + [row[-1]] * (most - len(row)) for row in candidates]
    scores = torch.empty(batch, most)
    for start in range(0, most, class_batch_size):
        chunks = [row[start : start + class_batch_size] for row in padded]  # B lists of c token lists
        c, longest = len(chunks[0]), max(len(t) for chunk in chunks for t in chunk)
        # Row b * c + j is (sample b, class j): the cache, media and counts are repeated sample-major to match.
        rows_ids = torch.full((batch * c, longest), tokenizer.pad_token_id or 0, dtype=torch.long, device=device)
        rows_class_mask = torch.zeros(batch * c, longest, dtype=torch.long, device=device)
        for b, chunk in enumerate(chunks):
            for j, t in enumerate(chunk):
                rows_ids[b * c + j, : len(t)] = torch.tensor(t)
                rows_class_mask[b * c + j, : len(t)] = 1
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(c)
        attention = torch.cat([mask.repeat_interleave(c, 0), rows_class_mask], dim=1)
        if extra:
            extra = {"position_ids": _positions(rows_class_mask, prefix_length.repeat_interleave(c))}
        out = model(
            rows_ids,
            attention_mask=attention,
            cache=cache,
            media_state=state.repeat_interleave(c),
            use_cache=True,
            **extra,
        )
        # Token t of a class is predicted by the prefix's last position (t = 0) or by class position t - 1.
        later = out.logits[:, :-1].float().log_softmax(-1)  # (B c, Lc - 1, V)
        first = first_log_probs.repeat_interleave(c, 0).gather(1, rows_ids[:, :1])  # (B c, 1)
        rest = later.gather(2, rows_ids[:, 1:, None]).squeeze(-1)  # (B c, Lc - 1)
        per_token = torch.cat([first, rest], dim=1) * rows_class_mask
        mean = per_token.sum(1) / rows_class_mask.sum(1)
        scores[:, start : start + c] = mean.view(batch, c).cpu()
    return [scores[b, : len(row)] for b, row in enumerate(candidates)]


@torch.no_grad()
def class_log_probs_reference(model, processor, *, prompts: list[str], images: list[list], class_names) -> torch.Tensor:
    """The plain computation of :func:`class_log_probs`: one full, unpadded forward per (sample, class)."""
    tokens = class_token_ids(processor.tokenizer, class_names)
    scores = torch.empty(len(prompts), len(tokens))
    for b, (prompt, sample_images) in enumerate(zip(prompts, images)):
        batch = processor(text=prompt, images=sample_images)
        for j, t in enumerate(tokens):
            ids = torch.cat([batch["input_ids"], torch.tensor([t])], dim=1).to(model.device)
            logits = model(ids, pixel_values=batch["pixel_values"].to(model.device)).logits[0].float()
            log_probs = logits[-len(t) - 1 : -1].log_softmax(-1)  # (len(t), V)
            scores[b, j] = log_probs.gather(1, torch.tensor(t, device=model.device)[:, None]).mean().cpu()
    return scores
