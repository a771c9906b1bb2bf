"""The model-level cases: prefill, decode (``generate`` and a hand-written loop) and a training step."""

from __future__ import annotations

import time

import torch

from transformers import LogitsProcessor, LogitsProcessorList

from .contenders import BARE, OURS, REFERENCE, Setup
from .measure import Row, count_flops, interleaved, peak_memory_of_training, profile_breakdown, rows_for


def reference_pixels(reference, pixels: torch.Tensor) -> torch.Tensor:
    """The pixels in the reference's own dtype: OpenFlamingo casts its whole model (bf16 configs), ours keeps its
    trainable modules in float32 and casts for the frozen tower itself."""
    return pixels.to(next(reference.parameters()).dtype)


def _models(setup: Setup) -> list[torch.nn.Module]:
    return [m for m in (setup.bare, setup.reference, setup.ours) if m is not None]


@torch.no_grad()
def case_prefill(setup: Setup, repeats: int) -> list[Row]:
    b, ref, ours = setup.batch, setup.reference, setup.ours
    ids, mask, pixels = b["input_ids"], b["attention_mask"], b["pixel_values"]
    media = ours.encode_media(pixels)
    bare = lambda: setup.bare(input_ids=ids, attention_mask=mask, use_cache=True)  # noqa: E731
    whole = {BARE: bare, OURS: lambda: ours(ids, pixel_values=pixels, attention_mask=mask, use_cache=True)}
    vision = {OURS: lambda: ours.encode_media(pixels)}
    lm = {BARE: bare, OURS: lambda: ours(ids, media=media, attention_mask=mask, use_cache=True)}
    if ref is not None:
        ref_pixels = reference_pixels(ref, pixels)
        whole[REFERENCE] = lambda: ref(vision_x=ref_pixels, lang_x=ids, attention_mask=mask, use_cache=True)

        def ref_vision():
            ref._encode_vision_x(vision_x=ref_pixels)
            ref.lang_encoder.clear_conditioned_layers()

        def ref_lm():
            # The media are encoded once (outside the timing) and conditioned; the prompt holds the image tokens,
            # so OpenFlamingo's LM conditions the media locations as in a plain forward.
            return ref(vision_x=None, lang_x=ids, attention_mask=mask, use_cache=True, clear_conditioned_layers=False)

        vision[REFERENCE] = ref_vision
        lm[REFERENCE] = ref_lm
    models, sync = _models(setup), setup.sync
    rows = rows_for("prefill (vision + LM)", interleaved(whole, repeats, sync),
                    {k: count_flops(f, models) for k, f in whole.items()})
    v = interleaved(vision, repeats, sync)
    rows += [Row("prefill: vision + perceiver", k, s, None, None, "ratio n/a: the bare LM has no vision") for k, s in v.items()]
    if ref is not None:
        ref.cache_media(input_ids=ids, vision_x=ref_pixels)
    try:
        rows += rows_for("prefill: LM + cross-attn", interleaved(lm, repeats, sync),
                         {k: count_flops(f, models) for k, f in lm.items()})
    finally:
        if ref is not None:
            ref.uncache_media()
    return rows


class StepClock(LogitsProcessor):
    """Notes the time at every decoding step of ``generate`` (it runs right after each forward); changes nothing."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores

    def seconds_per_step(self) -> float:
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def _greedy(logits: torch.Tensor, banned: int | None) -> torch.Tensor:
    logits = logits[:, -1].float()
    if banned is not None:  # an <image> token with no image behind it is an error in our forward
        logits[:, banned] = float("-inf")
    return logits.argmax(-1, keepdim=True)


def _grow(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)


@torch.no_grad()
def case_decode(setup: Setup, repeats: int) -> list[Row]:
    """Per generated token, the prefill excluded: manual loops time their steps; generate is t(N) - t(1) over N - 1.

    Our manual loop passes the previous output's ``media_state`` back (the images' cross-attention keys/values are
    projected once); the row "images each call" passes the encoded images instead, as callers did before it existed.
    """
    b, ref, ours, lm, sync = setup.batch, setup.reference, setup.ours, setup.bare, setup.sync
    ids, mask, pixels = b["input_ids"], b["attention_mask"], b["pixel_values"]
    n = setup.config.new_tokens
    # A decoding step is short and a shared machine's noise is not: a run of n steps costs about one prefill, so
    # take at least 7 repeats here (the medians of 3 moved by +-5% between runs).
    repeats = max(repeats, 7)
    media_token = ours.config.media_token_id

    def timed_steps(first, step):
        """Run ``first()``, then n times ``out = step(out, token, mask)``; seconds per step."""
        out, m = first(), mask
        sync()
        start = time.perf_counter()
        for _ in range(n):
            m = _grow(m)
            out = step(out, _greedy(out.logits, media_token), m)
        sync()
        return (time.perf_counter() - start) / n

    bare_first = lambda: lm(input_ids=ids, attention_mask=mask, use_cache=True)  # noqa: E731
    bare_step = lambda out, t, m: lm(input_ids=t, attention_mask=m, cache=out.cache, use_cache=True)  # noqa: E731
    ours_first = lambda: ours(ids, pixel_values=pixels, attention_mask=mask, use_cache=True)  # noqa: E731
    ours_step = lambda out, t, m: ours(t, attention_mask=m, cache=out.cache, media_state=out.media_state,  # noqa: E731
                                       use_cache=True)
    media = ours.encode_media(pixels)
    old_first = lambda: ours(ids, media=media, attention_mask=mask, use_cache=True)  # noqa: E731
    old_step = lambda out, t, m: ours(t, media=media, attention_mask=m, cache=out.cache,  # noqa: E731
                                      images_before=out.images_seen, use_cache=True)

    def ref_first():
        # OpenFlamingo's own cache handling (what its generate does): after the prompt, mark the media as cached, so
        # that the new tokens (no <image> among them) attend to the last image; the LM's KV cache is passed back.
        out = ref(vision_x=reference_pixels(ref, pixels), lang_x=ids, attention_mask=mask, use_cache=True,
                  clear_conditioned_layers=False)
        ref.lang_encoder._use_cached_vision_x = True
        return out

    ref_step = lambda out, t, m: ref(vision_x=None, lang_x=t, attention_mask=m,  # noqa: E731
                                     past_key_values=out.past_key_values, use_cache=True, clear_conditioned_layers=False)

    def ref_loop():
        try:
            return timed_steps(ref_first, ref_step)
        finally:
            ref.uncache_media()

    manual = {
        f"{BARE}, manual loop": lambda: timed_steps(bare_first, bare_step),
        f"{OURS}, manual loop": lambda: timed_steps(ours_first, ours_step),
        f"{OURS}, manual loop, images each call": lambda: timed_steps(old_first, old_step),
    }
    if ref is not None:
        manual[f"{REFERENCE}, manual loop"] = ref_loop

    def one_step_flops(first, step, cleanup=lambda: None):
        """FLOPs of one decoding step after the prompt (the prompt itself is not counted)."""
        out = first()
        try:
            token, m1 = _greedy(out.logits, media_token), _grow(mask)
            return count_flops(lambda: step(out, token, m1), _models(setup))
        finally:
            cleanup()

    flops = {
        f"{BARE}, manual loop": one_step_flops(bare_first, bare_step),
        f"{OURS}, manual loop": one_step_flops(ours_first, ours_step),
        f"{OURS}, manual loop, images each call": one_step_flops(old_first, old_step),
    }
    if ref is not None:
        flops[f"{REFERENCE}, manual loop"] = one_step_flops(ref_first, ref_step, ref.uncache_media)

    common = dict(do_sample=False, eos_token_id=None, pad_token_id=ours.config.pad_token_id)

    def clocked(generate):
        """Seconds per step of one generate call, read by a logits processor that notes the time of every step
        (so the prefill and the image encoding, whose noise would swamp a difference of two calls, are left out)."""
        clock = StepClock()
        generate(LogitsProcessorList([clock]), n)
        sync()
        return clock.seconds_per_step()

    generate = {
        f"{BARE}, generate": lambda p, k: lm.generate(
            input_ids=ids, attention_mask=mask, logits_processor=p, max_new_tokens=k, min_new_tokens=k, **common),
        f"{OURS}, generate": lambda p, k: ours.generate(
            ids, pixel_values=pixels, attention_mask=mask, logits_processor=p, max_new_tokens=k, min_new_tokens=k,
            **common),
    }
    per_token = interleaved({name: (lambda g=g: clocked(g)) for name, g in generate.items()}, repeats, sync)
    # FLOPs per step: those of n new tokens less those of 1 (the prefill), over n - 1.
    gen_flops = {}
    for name, gen in generate.items():
        counts = [count_flops(lambda k=k: gen(None, k), _models(setup)) for k in (1, n)]
        gen_flops[name] = (counts[1] - counts[0]) / (n - 1)

    case = f"decode, per token ({n} new)"
    rows = rows_for(case, interleaved(manual, repeats, sync), flops)
    generate_rows = rows_for(case, per_token, gen_flops)  # against the bare LM's generate
    if ref is not None:
        generate_rows.append(Row(case, f"{REFERENCE}, generate", float("nan"), None, None,
                                 "not run: open_flamingo 2.0.1's generate breaks on transformers 5"))
    by_name = {r.contender: r for r in rows}
    for name in (f"{OURS}, manual loop", f"{OURS}, manual loop, images each call"):
        if f"{REFERENCE}, manual loop" in by_name:
            speedup = by_name[f"{REFERENCE}, manual loop"].seconds / by_name[name].seconds
            by_name[name].note = f"{speedup:.2f}x the speed of OpenFlamingo's loop"
    return rows + generate_rows


def training_loss(which: str, model, batch: dict):
    """``(loss_fn, trainable parameters)`` of one contender on ``batch``; the bare LM trains all its weights (it has
    nothing else to train), the Flamingo models their own trainable parameters."""
    ids, mask, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    labels = ids.masked_fill(mask == 0, -100)
    if which == BARE:
        model.requires_grad_(True)
        return (lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss), list(model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    if which == REFERENCE:
        ref_pixels = reference_pixels(model, pixels)
        return (lambda: model(vision_x=ref_pixels, lang_x=ids, attention_mask=mask, labels=labels)[0]), params
    return (lambda: model(ids, pixel_values=pixels, attention_mask=mask, labels=labels).loss), params


def case_train(setup: Setup, repeats: int) -> list[Row]:
    """forward + backward + AdamW step, in tokens/s, with the peak memory of each contender trained alone."""
    models = {BARE: setup.bare, OURS: setup.ours}
    if setup.reference is not None:
        models[REFERENCE] = setup.reference
    lm_grad = {n: p.requires_grad for n, p in setup.bare.named_parameters()}
    contenders, trainable = {}, {}
    for name, model in models.items():
        loss, params = training_loss(name, model, setup.batch)
        optimizer = torch.optim.AdamW(params, lr=1e-6)

        def step(loss=loss, optimizer=optimizer):
            loss().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        contenders[name], trainable[name] = step, sum(p.numel() for p in params)
    try:
        flops = {name: count_flops(step) for name, step in contenders.items()}
        for model in models.values():
            model.train()
        seconds = interleaved(contenders, repeats, setup.sync)
        # Where a step's time goes (matrix multiplies, attention, optimizer, the rest), to explain the ratios.
        profiles = {name: profile_breakdown(step) for name, step in contenders.items()}
    finally:
        for model in models.values():
            model.eval()
        for n, p in setup.bare.named_parameters():
            p.requires_grad_(lm_grad[n])
    memory, peak_mb = {}, {}
    for name in models:
        if setup.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            contenders[name]()
            peak_mb[name] = torch.cuda.max_memory_allocated() / 2**20
            memory[name] = f"peak allocated {peak_mb[name]:,.0f} MB"
        else:
            probe = peak_memory_of_training(setup.config.name, setup.work, name)
            peak_mb[name] = probe["peak_mb"]
            memory[name] = f"peak RSS {probe['peak_mb']:,.0f} MB (+{probe['rise_mb']:,.0f} MB over the loaded model)"
    tokens = int(setup.batch["attention_mask"].sum())
    notes = {
        name: f"{tokens / seconds[name]:,.0f} tokens/s; {trainable[name] / 1e6:.1f} M trainable; {memory[name]}"
        for name in contenders
    }
    rows = rows_for("train step (fwd + bwd + AdamW)", seconds, flops, notes)
    for row in rows:
        row.extra.update(profile=profiles[row.contender], peak_mb=peak_mb[row.contender])
    if REFERENCE in seconds:
        row = next(r for r in rows if r.contender == OURS)
        row.note += f"; {seconds[REFERENCE] / seconds[OURS]:.2f}x OpenFlamingo's throughput"
    return rows
