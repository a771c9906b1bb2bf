"""One benchmark suite: the bare frozen LM, the OpenFlamingo reference and this package, timed in one process.

Run (from the repository root)::

    .venv/bin/python bench/run.py                                  # small config, CPU, a few minutes
    .venv/bin/python bench/run.py --config tiny --repeats 1        # a few seconds
    .venv/bin/python bench/run.py --config micro --cases prefill decode
    .venv/bin/python -m bench ...                                  # the same

Within each repeat every contender runs once, in a rotating order, so that drift of the machine (thermal, other
load) hits them alike; the table reports the median over repeats, its ratio to the bare LM on the same tokens
(same case), and the FLOP ratio counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention).
Results go to ``bench/RESULTS.md`` (``--out`` elsewhere).

Configs: ``small`` (Llama-style LM, 8 layers, width 512, 32k vocab; open_clip ViT-B-32 at 224 px; all random; 3
images a sample, batch 4, 96-token prompt, cross-attention before every layer), ``micro`` (the shipped model; the
reference cannot take its perceiver, so it has no OpenFlamingo rows) and ``tiny`` (the test backbones).
Cases: ``prefill`` (whole, and split into vision+perceiver / LM+cross-attention), ``decode`` (per token, with
the KV cache, via ``generate`` and via a manual loop passing the cache back), ``train`` (forward + backward + AdamW,
tokens/s, peak RSS) and ``classify`` (rank classification, 10 and 1000 classes, the prefix-cached
``flamingo_eval.classification`` against one forward per class; per-class forwards beyond ``--max-class-forwards``
are extrapolated linearly and marked so).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402
from transformers import logging as transformers_logging  # noqa: E402

import flamingo  # noqa: E402
from flamingo.testing import (  # noqa: E402
    random_images,
    register_tiny_vision_config,
    save_tiny_lm,
    save_tiny_vision_weights,
    train_tiny_tokenizer,
)
from flamingo_eval.classification import _positions, _takes_position_ids, class_log_probs, class_token_ids  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CASES = ("prefill", "decode", "train", "classify")
BARE, REFERENCE, OURS = "bare LM", "OpenFlamingo", "ours"


@dataclass
class BenchConfig:
    name: str
    images: int  # per sample
    batch: int
    prompt_tokens: int
    new_tokens: int  # decode
    classes: tuple[int, ...]
    every: int = 1  # cross_attn_every_n_layers


CONFIGS = {
    "small": BenchConfig("small", images=3, batch=4, prompt_tokens=96, new_tokens=16, classes=(10, 1000)),
    "micro": BenchConfig("micro", images=3, batch=4, prompt_tokens=48, new_tokens=16, classes=(10, 1000)),
    "tiny": BenchConfig("tiny", images=2, batch=2, prompt_tokens=24, new_tokens=4, classes=(10,), every=2),
}


@dataclass
class Setup:
    """The three contenders on the same tokens: bare LM, reference (None for micro) and ours, and one batch."""

    config: BenchConfig
    bare: torch.nn.Module
    reference: torch.nn.Module | None
    ours: flamingo.Flamingo
    processor: flamingo.FlamingoProcessor
    batch: dict  # input_ids, attention_mask (B, L); pixel_values (B, T, 1, C, H, W)
    description: str


@dataclass
class Row:
    case: str
    contender: str
    seconds: float
    ratio: float | None = None
    flop_ratio: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- building the contenders


def _small_backbones(work: Path) -> tuple[dict, str]:
    """Random ViT-B-32 weights saved to a file, and a Llama-style LM (8 x 512, 32k vocab) with a 32k tokenizer."""
    weights = save_tiny_vision_weights("ViT-B-32", work / "vit-b-32.pt")
    lm_dir = work / "lm"
    tokenizer = train_tiny_tokenizer(str(lm_dir), add_pad=False, bos_eos_style="llama")
    # OpenFlamingo (and our importer) resize the LM to the tokenizer, so the tokenizer must span the 32k rows.
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(32000 - len(tokenizer))])
    tokenizer.save_pretrained(lm_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(lm_dir)
    return {"name": "ViT-B-32", "weights": weights}, str(lm_dir)


def _with_reference(vision: dict, lm_dir: str, every: int, work: Path):
    """OpenFlamingo's model with randomised trainable weights, and ours imported from its checkpoint (same weights)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import openflamingo_reference as ofr

    ofr.CROSS_ATTN_EVERY = every  # build_reference reads the module constant
    with openflamingo_patched():
        reference, _ = ofr.build_reference("llama", vision, lm_dir)
    torch.save(reference.state_dict(), work / "openflamingo.pt")
    ours, processor = flamingo.load_openflamingo(
        work / "openflamingo.pt", vision_encoder=vision["name"], vision_pretrained=vision["weights"],
        lang_model=lm_dir, cross_attn_every_n_layers=every,
    )
    return reference.eval(), ours.eval(), processor


@contextlib.contextmanager
def openflamingo_patched():
    """open_flamingo 2.0.1 on transformers 5: the test suite's three patches, undone on exit."""
    sys.path.insert(0, str(ROOT / "tests"))
    from openflamingo_reference import patched_forwards

    saved = {}
    try:
        for (owner, name), replacement in patched_forwards().items():
            saved[(owner, name)] = owner.__dict__.get(name)
            setattr(owner, name, replacement)
        yield
    finally:
        for (owner, name), original in saved.items():
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def _prompt_batch(processor, config: BenchConfig) -> dict:
    """``batch`` samples of exactly ``prompt_tokens`` tokens with ``images`` interleaved images each, no padding."""
    words = "a photo of the cat and two dogs in the park".split()
    filler = lambda n: " ".join(words[i % len(words)] for i in range(n))  # noqa: E731
    per_chunk = max(1, config.prompt_tokens // (4 * (config.images + 1)))
    text = "".join(f"<image>Output: {filler(per_chunk)}<|endofchunk|>" for _ in range(config.images))
    text += filler(config.prompt_tokens)
    images = random_images(config.images * config.batch, seed=1)
    batch = processor(
        text=[text] * config.batch,
        images=[images[i * config.images : (i + 1) * config.images] for i in range(config.batch)],
    )
    batch["input_ids"] = batch["input_ids"][:, : config.prompt_tokens].contiguous()
    batch["attention_mask"] = batch["attention_mask"][:, : config.prompt_tokens].contiguous()
    assert batch["input_ids"].shape[1] == config.prompt_tokens, "prompt text too short for --prompt-tokens"
    assert int((batch["input_ids"][0] == processor.media_token_id).sum()) == config.images
    return dict(batch)


def build(config: BenchConfig, work: Path) -> Setup:
    torch.manual_seed(0)
    if config.name == "micro":
        from flamingo.micro.shipped import MICRO_MODEL_DIR

        ours = flamingo.Flamingo.from_pretrained("micro").eval()
        processor = flamingo.FlamingoProcessor.from_pretrained("micro")
        lm_dir, reference = str(MICRO_MODEL_DIR / "language_model"), None
    else:
        if config.name == "small":
            vision, lm_dir = _small_backbones(work)
        else:
            name = register_tiny_vision_config()
            vision = {"name": name, "weights": save_tiny_vision_weights(name, work / "vit.pt")}
            lm_dir = save_tiny_lm(work / "lm", "llama")
        reference, ours, processor = _with_reference(vision, lm_dir, config.every, work)
    bare = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    bare.resize_token_embeddings(ours.config.vocab_size, mean_resizing=False)
    batch = _prompt_batch(processor, config)
    lm = bare.config
    description = (
        f"config {config.name}: {lm.model_type} LM {lm.num_hidden_layers} layers x {lm.hidden_size}, vocab "
        f"{lm.vocab_size}; vision {ours.config.vision_model}; {len(ours.cross_attn_blocks)} cross-attention blocks; "
        f"batch {config.batch} x {config.prompt_tokens} tokens, {config.images} images a sample "
        f"({tuple(batch['pixel_values'].shape[-2:])} px); torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    return Setup(config, bare, reference, ours, processor, batch, description)


# ---------------------------------------------------------------- timing


def interleaved(contenders: dict, repeats: int) -> dict[str, float]:
    """Median seconds per contender. Each is warmed up once; then each repeat runs all, in a rotating order.

    A contender may return its own measured seconds (to leave out a part it must run, e.g. the prefill before the
    decode steps); otherwise its wall time counts.
    """
    names = list(contenders)
    for name in names:
        contenders[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            measured = contenders[name]()
            elapsed = time.perf_counter() - start
            times[name].append(measured if isinstance(measured, float) else elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


_MODELS: list[torch.nn.Module] = []  # every contender's modules, for count_flops


@contextlib.contextmanager
def _no_param_grads():
    # FlopCounterMode's module tracker asserts on tensors that require grad without a grad_fn, which views of
    # parameters taken under no_grad are; without grad mode nothing needs requires_grad, so drop it meanwhile.
    params = [p for m in _MODELS for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def count_flops(fn) -> int:
    """Matmul and attention FLOPs of one call of ``fn``."""
    with _no_param_grads() if not torch.is_grad_enabled() else contextlib.nullcontext():
        with FlopCounterMode(display=False) as counter:
            fn()
    return counter.get_total_flops()


def rows_for(case: str, seconds: dict[str, float], flops: dict[str, int] | None = None, notes=None) -> list[Row]:
    """Rows with the ratio to the bare-LM entry (the first key holding BARE) and to its FLOPs."""
    base = next((k for k in seconds if k.startswith(BARE)), None)
    rows = []
    for name, s in seconds.items():
        flop_ratio = None
        if flops and base in flops and name in flops and flops[base]:
            flop_ratio = flops[name] / flops[base]
        rows.append(Row(case, name, s, s / seconds[base] if base else None, flop_ratio, (notes or {}).get(name, "")))
    return rows


# ---------------------------------------------------------------- cases


@torch.no_grad()
def case_prefill(setup: Setup, repeats: int) -> list[Row]:
    b, ref, ours = setup.batch, setup.reference, setup.ours
    ids, mask, pixels = b["input_ids"], b["attention_mask"], b["pixel_values"]
    media = ours.encode_media(pixels)
    bare = lambda: setup.bare(input_ids=ids, attention_mask=mask, use_cache=True)  # noqa: E731
    contenders = {BARE: bare}
    whole = {f"{BARE}": bare, OURS: lambda: ours(ids, pixel_values=pixels, attention_mask=mask, use_cache=True)}
    vision = {OURS: lambda: ours.encode_media(pixels)}
    lm = {BARE: bare, OURS: lambda: ours(ids, media=media, attention_mask=mask, use_cache=True)}
    if ref is not None:
        whole[REFERENCE] = lambda: ref(vision_x=pixels, lang_x=ids, attention_mask=mask, use_cache=True)

        def ref_vision():
            ref._encode_vision_x(vision_x=pixels)
            ref.lang_encoder.clear_conditioned_layers()

        def ref_lm():
            # The media are encoded once (outside the timing) and conditioned; the prompt holds the image tokens,
            # so OpenFlamingo's LM conditions the media locations as in a plain forward.
            return ref(vision_x=None, lang_x=ids, attention_mask=mask, use_cache=True, clear_conditioned_layers=False)

        vision[REFERENCE] = ref_vision
        lm[REFERENCE] = ref_lm
    del contenders
    rows = rows_for("prefill (vision + LM)", interleaved(whole, repeats), {k: count_flops(f) for k, f in whole.items()})
    v = interleaved(vision, repeats)
    rows += [Row("prefill: vision + perceiver", k, s, None, None, "ratio n/a: the bare LM has no vision") for k, s in v.items()]
    if ref is not None:
        ref.cache_media(input_ids=ids, vision_x=pixels)
    try:
        rows += rows_for("prefill: LM + cross-attn", interleaved(lm, repeats), {k: count_flops(f) for k, f in lm.items()})
    finally:
        if ref is not None:
            ref.uncache_media()
    return rows


def _greedy(logits: torch.Tensor, banned: int | None) -> torch.Tensor:
    logits = logits[:, -1].float()
    if banned is not None:  # an <image> token with no image behind it is an error in our forward
        logits[:, banned] = float("-inf")
    return logits.argmax(-1, keepdim=True)


def _grow(mask: torch.Tensor) -> torch.Tensor:
    return torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)


@torch.no_grad()
def case_decode(setup: Setup, repeats: int) -> list[Row]:
    """Per generated token, the prefill excluded: manual loops time their steps; generate is t(N) - t(1) over N - 1."""
    b, ref, ours, lm = setup.batch, setup.reference, setup.ours, setup.bare
    ids, mask, pixels = b["input_ids"], b["attention_mask"], b["pixel_values"]
    n = setup.config.new_tokens
    media_token = ours.config.media_token_id

    def bare_loop():
        out = lm(input_ids=ids, attention_mask=mask, use_cache=True)
        m, start = mask, time.perf_counter()
        for _ in range(n):
            m = _grow(m)
            out = lm(input_ids=_greedy(out.logits, media_token), attention_mask=m, cache=out.cache,
                     use_cache=True)
        return (time.perf_counter() - start) / n

    def ours_loop():
        media = ours.encode_media(pixels)  # the images are encoded once; each step is given their latents
        out = ours(ids, media=media, attention_mask=mask, use_cache=True)
        m, start = mask, time.perf_counter()
        for _ in range(n):
            m = _grow(m)
            out = ours(_greedy(out.logits, media_token), media=media, attention_mask=m, cache=out.cache,
                       images_before=out.images_seen, use_cache=True)
        return (time.perf_counter() - start) / n

    def ref_loop():
        # OpenFlamingo's own cache handling (what its generate does): after the prompt, mark the media as cached, so
        # that the new tokens (no <image> among them) attend to the last image; the LM's KV cache is passed back.
        out = ref(vision_x=pixels, lang_x=ids, attention_mask=mask, use_cache=True, clear_conditioned_layers=False)
        ref.lang_encoder._use_cached_vision_x = True
        m, start = mask, time.perf_counter()
        try:
            for _ in range(n):
                m = _grow(m)
                out = ref(vision_x=None, lang_x=_greedy(out.logits, media_token), attention_mask=m,
                          past_key_values=out.past_key_values, use_cache=True, clear_conditioned_layers=False)
            return (time.perf_counter() - start) / n
        finally:
            ref.uncache_media()

    loops = {f"{BARE}, manual loop": bare_loop, f"{OURS}, manual loop": ours_loop}
    if ref is not None:
        loops[f"{REFERENCE}, manual loop"] = ref_loop
    common = dict(do_sample=False, eos_token_id=None, pad_token_id=ours.config.pad_token_id)
    gens = {}
    for k in (1, n):
        gens[f"{BARE} generate {k}"] = lambda k=k: lm.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, **common)
        gens[f"{OURS} generate {k}"] = lambda k=k: ours.generate(
            ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, **common)
    g = interleaved(gens, repeats)
    per_token = {f"{who}, generate": (g[f"{who} generate {n}"] - g[f"{who} generate 1"]) / (n - 1) for who in (BARE, OURS)}

    # FLOPs of one decode step after the prompt.
    bare_prefix = lm(input_ids=ids, attention_mask=mask, use_cache=True)
    media = ours.encode_media(pixels)
    ours_prefix = ours(ids, media=media, attention_mask=mask, use_cache=True)
    token, m1 = _greedy(ours_prefix.logits, media_token), _grow(mask)
    flops = {
        f"{BARE}, manual loop": count_flops(lambda: lm(
            input_ids=token, attention_mask=m1, cache=copy.deepcopy(bare_prefix.cache), use_cache=True)),
        f"{OURS}, manual loop": count_flops(lambda: ours(
            token, media=media, attention_mask=m1, cache=copy.deepcopy(ours_prefix.cache), images_before=ours_prefix.images_seen,
            use_cache=True)),
    }
    if ref is not None:
        out = ref(vision_x=pixels, lang_x=ids, attention_mask=mask, use_cache=True, clear_conditioned_layers=False)
        ref.lang_encoder._use_cached_vision_x = True
        try:
            flops[f"{REFERENCE}, manual loop"] = count_flops(lambda: ref(
                vision_x=None, lang_x=token, attention_mask=m1, past_key_values=out.past_key_values, use_cache=True,
                clear_conditioned_layers=False))
        finally:
            ref.uncache_media()
    # Not counted for generate: it computes the media keys/values once per call, a manual step once per step.
    seconds = {**interleaved(loops, repeats), **per_token}
    notes = {f"{REFERENCE}, generate": ""}
    rows = rows_for(f"decode, per token ({n} new)", seconds, flops, notes)
    if ref is not None:
        rows.append(Row(f"decode, per token ({n} new)", f"{REFERENCE}, generate", float("nan"), None, None,
                        "not run: open_flamingo 2.0.1's generate breaks on transformers 5"))
    # Ratios of generate rows against the bare LM's generate, not its manual loop.
    for row in rows:
        if row.contender.endswith("generate") and row.contender != f"{REFERENCE}, generate":
            row.ratio = row.seconds / seconds[f"{BARE}, generate"]
    return rows


def case_train(setup: Setup, repeats: int) -> list[Row]:
    """forward + backward + AdamW step; the bare LM trains all its weights (it has nothing else to train), the
    Flamingo models their own trainable parameters (perceiver, cross-attention, added or input embeddings)."""
    b, ref, ours, lm = setup.batch, setup.reference, setup.ours, setup.bare
    ids, mask, pixels = b["input_ids"], b["attention_mask"], b["pixel_values"]
    labels = ids.masked_fill(mask == 0, -100)

    def stepper(model, loss):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6)

        def step():
            loss().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step, sum(p.numel() for p in params)

    lm_params = {n: p.requires_grad for n, p in lm.named_parameters()}
    for p in lm.parameters():
        p.requires_grad_(True)
    contenders, trainable = {}, {}
    contenders[BARE], trainable[BARE] = stepper(lm, lambda: lm(input_ids=ids, attention_mask=mask, labels=labels).loss)
    if ref is not None:
        contenders[REFERENCE], trainable[REFERENCE] = stepper(
            ref, lambda: ref(vision_x=pixels, lang_x=ids, attention_mask=mask, labels=labels)[0])
    contenders[OURS], trainable[OURS] = stepper(
        ours, lambda: ours(ids, pixel_values=pixels, attention_mask=mask, labels=labels).loss)

    # Peak RSS is per process; each contender's first step runs alone here, and its rise of the peak is recorded.
    rss = {}
    for name, step in contenders.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        rss[name] = (before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    flops = {}
    for name, step in contenders.items():
        flops[name] = count_flops(step)
    for model in (lm, ours) + ((ref,) if ref is not None else ()):
        model.train()
    try:
        seconds = interleaved(contenders, repeats)
    finally:
        for model in (lm, ours) + ((ref,) if ref is not None else ()):
            model.eval()
        for n, p in lm.named_parameters():
            p.requires_grad_(lm_params[n])
    tokens = int(mask.sum())
    notes = {
        name: f"{tokens / seconds[name]:,.0f} tokens/s; {trainable[name] / 1e6:.1f} M trainable; peak RSS "
        f"{rss[name][1] / 1024:,.0f} MB (first step raised it {(rss[name][1] - rss[name][0]) / 1024:,.0f} MB)"
        for name in contenders
    }
    return rows_for("train step (fwd + bwd + AdamW)", seconds, flops, notes)


@torch.no_grad()
def per_class_forward(model, tokenizer, *, prompts, media, class_names, max_classes=None) -> torch.Tensor:
    """Baseline: for each class, one forward of (prompt + class name) over the batch; (B, C) mean log-probs.

    ``model`` is ours (with ``media``) or the bare LM (``media=None``). Stops after ``max_classes`` classes.
    """
    encoded = tokenizer(prompts, padding="longest", padding_side="left", return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    lang_model = getattr(model, "lang_model", model)
    class_ids = class_token_ids(tokenizer, class_names)[:max_classes]
    scores = torch.empty(len(prompts), len(class_ids))
    for j, tokens in enumerate(class_ids):
        t = torch.tensor(tokens).expand(len(prompts), -1)
        full_ids, full_mask = torch.cat([ids, t], 1), torch.cat([mask, torch.ones_like(t)], 1)
        extra = {"position_ids": _positions(full_mask)} if _takes_position_ids(lang_model) else {}
        if media is not None:
            extra["media"] = media
        logits = model(full_ids, attention_mask=full_mask, **extra).logits
        log_probs = logits[:, -len(tokens) - 1 : -1].float().log_softmax(-1)
        scores[:, j] = log_probs.gather(2, t[:, :, None]).squeeze(-1).mean(1)
    return scores


def case_classify(setup: Setup, repeats: int, max_forwards: int) -> list[Row]:
    ours, tokenizer, cfg = setup.ours, setup.processor.tokenizer, setup.config
    prompt = "".join(f"<image>Output:class {i}<|endofchunk|>" for i in range(cfg.images - 1)) + "<image>Output:"
    prompts = [prompt] * cfg.batch
    with torch.no_grad():
        media = ours.encode_media(setup.batch["pixel_values"])
    bare_prompts = [p.replace("<image>", "").replace("<|endofchunk|>", " ") for p in prompts]
    rows = []
    for classes in cfg.classes:
        names = [f"class name number {i}" for i in range(classes)]
        k = min(classes, max_forwards)
        scale = classes / k
        contenders = {
            f"{BARE}, one forward per class": lambda: per_class_forward(
                setup.bare, tokenizer, prompts=bare_prompts, media=None, class_names=names, max_classes=k),
            f"{OURS}, one forward per class": lambda: per_class_forward(
                ours, tokenizer, prompts=prompts, media=media, class_names=names, max_classes=k),
            f"{OURS}, prefix cache (eval)": lambda: class_log_probs(
                ours, tokenizer, prompts=prompts, media=media, class_names=names),
        }
        seconds = interleaved(contenders, repeats)
        note = f"extrapolated from {k} classes" if k < classes else ""
        for name in seconds:
            if "one forward" in name:
                seconds[name] *= scale
        rows += rows_for(f"rank classification, {classes} classes", seconds,
                         notes={n: note for n in seconds if "one forward" in n})
    return rows


# ---------------------------------------------------------------- report


def _fmt_time(s: float) -> str:
    if s != s:
        return "-"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def markdown(rows: list[Row], description: str, repeats: int) -> str:
    lines = [
        "# Benchmark results", "", description, "",
        f"Median of {repeats} interleaved repeat(s) in one process. Ratio: time / the bare LM's time in the same case "
        "(same tokens). FLOP ratio: FlopCounterMode's count / the bare LM's.", "",
        "| case | contender | median time | ratio to bare LM | FLOP ratio | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        flop = "-" if r.flop_ratio is None else f"{r.flop_ratio:.2f}x"
        lines.append(f"| {r.case} | {r.contender} | {_fmt_time(r.seconds)} | {ratio} | {flop} | {r.note} |")
    return "\n".join(lines) + "\n"


def run(config: str = "small", repeats: int = 3, cases=CASES, out: Path | None = None, max_class_forwards: int = 20):
    """Build the contenders, time the cases in order and write the markdown table; returns (rows, markdown)."""
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    unknown = set(cases) - set(CASES)
    if unknown:
        raise ValueError(f"unknown case(s) {sorted(unknown)}; expected some of {CASES}")
    cfg = CONFIGS[config]
    work = Path(tempfile.mkdtemp(prefix="flamingo-bench-"))
    with openflamingo_patched():
        setup = build(cfg, work)
        _MODELS[:] = [m for m in (setup.bare, setup.reference, setup.ours) if m is not None]
        print(setup.description, flush=True)
        rows = []
        for case in CASES:
            if case not in cases:
                continue
            start = time.perf_counter()
            if case == "prefill":
                rows += case_prefill(setup, repeats)
            elif case == "decode":
                rows += case_decode(setup, repeats)
            elif case == "train":
                rows += case_train(setup, repeats)
            elif case == "classify":
                rows += case_classify(setup, repeats, max_class_forwards)
            print(f"{case}: {time.perf_counter() - start:.1f}s", flush=True)
    text = markdown(rows, setup.description, repeats)
    out = Path(out) if out is not None else ROOT / "bench" / "RESULTS.md"
    out.write_text(text)
    return rows, text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default bench/RESULTS.md)")
    parser.add_argument("--max-class-forwards", type=int, default=20,
                        help="one-forward-per-class baselines run this many classes and are scaled up")
    args = parser.parse_args(argv)
    _, text = run(args.config, args.repeats, args.cases, args.out, args.max_class_forwards)
    print(text)


if __name__ == "__main__":
    main()
