"""The evaluation cases: VQA-style generation, rank classification and feature reuse across an episode."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import torch

from flamingo.testing import random_images
from flamingo_eval.classification import _positions, _takes_position_ids, class_log_probs, class_token_ids
from flamingo_eval.runner import MediaCache

from .contenders import BARE, OURS, Setup
from .measure import Row, count_flops, interleaved, rows_for


@torch.no_grad()
def case_generation(setup: Setup, repeats: int) -> list[Row]:
    """VQA-style generation as the evaluation runs it (3 beams, 5 new tokens) on the batch: samples/s."""
    b, ours, lm = setup.batch, setup.ours, setup.bare
    ids, mask, pixels = b["input_ids"], b["attention_mask"], b["pixel_values"]
    common = dict(num_beams=3, max_new_tokens=5, min_new_tokens=5, eos_token_id=None,
                  pad_token_id=ours.config.pad_token_id)
    contenders = {
        BARE: lambda: lm.generate(input_ids=ids, attention_mask=mask, **common),
        OURS: lambda: ours.generate(ids, pixel_values=pixels, attention_mask=mask, **common),
    }
    seconds = interleaved(contenders, repeats, setup.sync)
    flops = {name: count_flops(fn, [lm, ours]) for name, fn in contenders.items()}
    notes = {name: f"{ids.shape[0] / s:,.2f} samples/s" for name, s in seconds.items()}
    notes[OURS] += "; images encoded in the call"
    return rows_for("VQA-style generation (3 beams, 5 new tokens)", seconds, flops, notes)


@torch.no_grad()
def per_class_forward(model, tokenizer, *, prompts, media, class_names, max_classes=None) -> torch.Tensor:
    """Baseline: for each class, one forward of (prompt + class name) over the batch; (B, C) mean log-probs.

    ``model`` is ours (with ``media``) or the bare LM (``media=None``). Stops after ``max_classes`` classes.
    """
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, padding="longest", padding_side="left", return_tensors="pt")
    ids, mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    lang_model = getattr(model, "lang_model", model)
    class_ids = class_token_ids(tokenizer, class_names)[:max_classes]
    scores = torch.empty(len(prompts), len(class_ids))
    for j, tokens in enumerate(class_ids):
        t = torch.tensor(tokens, device=device).expand(len(prompts), -1)
        full_ids, full_mask = torch.cat([ids, t], 1), torch.cat([mask, torch.ones_like(t)], 1)
        extra = {"position_ids": _positions(full_mask)} if _takes_position_ids(lang_model) else {}
        if media is not None:
            extra["media"] = media
        logits = model(full_ids, attention_mask=full_mask, **extra).logits
        log_probs = logits[:, -len(tokens) - 1 : -1].float().log_softmax(-1)
        scores[:, j] = log_probs.gather(2, t[:, :, None]).squeeze(-1).mean(1).cpu()
    return scores


def class_names(tokenizer, count: int) -> list[str]:
    """``count`` distinct class names of two words, each name 2 to 5 tokens long, as ImageNet's are in a 32k
    tokenizer ("great white shark"); the words are whole-word tokens of the tokenizer's vocabulary."""
    pieces = (w.lstrip("Ġ▁") for w in tokenizer.get_vocab())  # byte-level and sentencepiece word-start marks
    words = sorted({w for w in pieces if w.isalpha() and w.islower() and len(w) >= 3})
    names = []
    for first, second in itertools.permutations(words, 2):
        name = f"{first} {second}"
        if 2 <= len(tokenizer(name, add_special_tokens=False)["input_ids"]) <= 5:
            names.append(name)
            if len(names) == count:
                return names
    raise ValueError(f"the tokenizer's vocabulary gives only {len(names)} class names of 2 to 5 tokens")


def case_classify(setup: Setup, repeats: int, max_forwards: int) -> list[Row]:
    """Rank classification as the evaluation runs it (prefix cache) against one forward per class.

    One forward per class is run for ``max_forwards`` classes and scaled up linearly (its cost is linear in the
    classes); its scores on those classes are compared with the cached path's. A case of more than 100 classes is
    timed once, without warm-up (the smaller case before it ran the same code; one run is 125 class batches), and
    the cached path's FLOPs are counted on 100 classes and scaled.
    """
    ours, tokenizer, cfg = setup.ours, setup.processor.tokenizer, setup.config
    # The batch's few-shot prompt (its images, prompt_tokens tokens), ending where a class name goes.
    prompts = tokenizer.batch_decode(setup.batch["input_ids"], skip_special_tokens=False)
    prompts = [p.removeprefix(tokenizer.bos_token or "") for p in prompts]
    with torch.no_grad():
        media = ours.encode_media(setup.batch["pixel_values"])
    bare_prompts = [p.replace("<image>", "").replace("<|endofchunk|>", " ") for p in prompts]
    models = [setup.bare, ours]
    all_names = class_names(tokenizer, max(cfg.classes))
    rows = []
    for classes in cfg.classes:
        names = all_names[:classes]
        k = min(classes, max_forwards)
        scores = {}

        def keep(name, fn):
            def run():
                scores[name] = fn()
            return run

        per_class = lambda model, prompts, media, names: lambda: per_class_forward(  # noqa: E731
            model, tokenizer, prompts=prompts, media=media, class_names=names, max_classes=k)
        cached = lambda names: lambda: class_log_probs(ours, tokenizer, prompts=prompts, media=media,  # noqa: E731
                                                       class_names=names)
        contenders = {
            f"{BARE}, one forward per class": per_class(setup.bare, bare_prompts, None, names),
            f"{OURS}, one forward per class": keep("plain", per_class(ours, prompts, media, names)),
            f"{OURS}, prefix cache (eval)": keep("cached", cached(names)),
        }
        long = classes > 100
        seconds = interleaved(contenders, 1 if long else repeats, setup.sync, warmup=not long)
        flops = {name: count_flops(fn, models) for name, fn in contenders.items() if "one forward" in name}
        flops = {name: f * classes / k for name, f in flops.items()}
        counted = min(classes, 100)
        flops[f"{OURS}, prefix cache (eval)"] = count_flops(cached(names[:counted]), models) * classes / counted
        for name in seconds:
            if "one forward" in name:
                seconds[name] *= classes / k
        difference = (scores["cached"][:, :k] - scores["plain"]).abs().max().item()
        note = f"extrapolated from {k} classes" if k < classes else ""
        notes = {n: note for n in seconds if "one forward" in n}
        speedup = seconds[f"{OURS}, one forward per class"] / seconds[f"{OURS}, prefix cache (eval)"]
        notes[f"{OURS}, prefix cache (eval)"] = (
            f"{speedup:.1f}x faster than one forward per class; scores equal to {difference:.1e}"
            + ("; timed once" if long else "")
        )
        rows += rows_for(f"rank classification, {classes} classes", seconds, flops, notes)
        rows[-1].extra["score_difference"] = difference  # the prefix-cache row
    return rows


def case_feature_reuse(setup: Setup, repeats: int) -> list[Row]:
    """A few-shot episode whose queries share their demo images, through the evaluation's media cache: every
    distinct image is encoded once, against encoding every image of every prompt."""
    cfg, ours, processor = setup.config, setup.ours, setup.processor
    folder = Path(tempfile.mkdtemp(prefix="episode-", dir=setup.work))
    paths = []
    for i, image in enumerate(random_images(cfg.episode_shots + cfg.episode_queries, seed=7)):
        paths.append(folder / f"{i}.png")
        image.save(paths[-1])
    demos, queries = paths[: cfg.episode_shots], paths[cfg.episode_shots :]
    batches = [[demos + [q] for q in queries[i : i + cfg.batch]] for i in range(0, len(queries), cfg.batch)]
    requested = sum(len(images) for batch in batches for images in batch)
    caches = {}

    def run(enabled: bool):
        cache = caches[enabled] = MediaCache(ours, processor, enabled=enabled)  # fresh: nothing seen before
        for batch in batches:
            cache.media(batch)

    contenders = {f"{OURS}, media cache (eval)": lambda: run(True), f"{OURS}, every image encoded": lambda: run(False)}
    seconds = interleaved(contenders, repeats, setup.sync)
    encoded = caches[True].encoded
    distinct = len(paths)
    saved = seconds[f"{OURS}, every image encoded"] / seconds[f"{OURS}, media cache (eval)"]
    notes = {
        f"{OURS}, media cache (eval)": (
            f"{encoded} of {requested} images encoded (hit rate {1 - encoded / requested:.0%}; {distinct} distinct: "
            f"{'each encoded once' if encoded == distinct else 'SOME RE-ENCODED'}); {saved:.2f}x faster"
        ),
        f"{OURS}, every image encoded": f"{caches[False].encoded} of {requested} images encoded",
    }
    case = f"feature reuse ({cfg.episode_queries} queries x {cfg.episode_shots} shared demos)"
    counts = {f"{OURS}, media cache (eval)": dict(encoded=encoded, distinct=distinct, requested=requested),
              f"{OURS}, every image encoded": dict(encoded=caches[False].encoded, distinct=distinct, requested=requested)}
    return [Row(case, name, s, None, None, notes[name], counts[name]) for name, s in seconds.items()]
