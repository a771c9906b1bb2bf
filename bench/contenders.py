"""The benchmark configs and the three contenders built on them: the bare LM, the OpenFlamingo reference and ours.

All three run on the same tokens; the reference and ours share every weight (ours is imported from the reference's
checkpoint with :func:`flamingo.load_openflamingo`). ``build`` writes the backbones to a work folder and records
them in ``setup.json`` there, so that a second process (the peak-memory probe) can build one contender alone.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import flamingo
from flamingo.testing import random_images, register_tiny_vision_config, save_tiny_lm, save_tiny_vision_weights
from flamingo.testing import train_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
BARE, REFERENCE, OURS = "bare LM", "OpenFlamingo", "ours"


@dataclass(frozen=True)
class LMShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 32000


@dataclass(frozen=True)
class BenchConfig:
    name: str
    images: int  # per sample
    batch: int
    prompt_tokens: int
    new_tokens: int  # decode
    classes: tuple[int, ...]
    every: int = 1  # cross_attn_every_n_layers
    lm: LMShape | None = None  # None: the tiny test LM (tiny) or the shipped one (micro)
    vision: str = "ViT-B-32"
    device: str = "cpu"
    dtype: str = "float32"
    episode_queries: int = 8  # feature reuse: queries sharing one set of demo images
    episode_shots: int = 4


CONFIGS = {
    "small": BenchConfig(
        "small", images=3, batch=4, prompt_tokens=96, new_tokens=16, classes=(10, 1000),
        lm=LMShape(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376),
    ),
    "micro": BenchConfig("micro", images=3, batch=4, prompt_tokens=48, new_tokens=16, classes=(10, 1000)),
    "tiny": BenchConfig("tiny", images=2, batch=2, prompt_tokens=24, new_tokens=4, classes=(10,), every=2,
                        episode_queries=3, episode_shots=2),
    # The gpu config's dtype handling, on CPU (CI runs it: the gpu config itself cannot run there).
    "tiny-bf16": BenchConfig("tiny-bf16", images=2, batch=2, prompt_tokens=24, new_tokens=4, classes=(10,), every=2,
                             episode_queries=3, episode_shots=2, dtype="bfloat16"),
    # For an accelerator: a 1B Llama-shape LM with ViT-L/14, bf16, cross-attention every 4th layer.
    "gpu": BenchConfig(
        "gpu", images=3, batch=8, prompt_tokens=256, new_tokens=32, classes=(10, 1000), every=4,
        lm=LMShape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192), vision="ViT-L-14",
        device="cuda", dtype="bfloat16",
    ),
}


@dataclass
class Setup:
    """The contenders on the same tokens: bare LM, reference (None for micro) and ours, and one batch."""

    config: BenchConfig
    bare: torch.nn.Module
    reference: torch.nn.Module | None
    ours: flamingo.Flamingo
    processor: flamingo.FlamingoProcessor
    batch: dict  # input_ids, attention_mask (B, L); pixel_values (B, T, 1, C, H, W), on the device
    description: str
    work: Path

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.device)

    def sync(self) -> None:
        """Wait for the accelerator, so that a timer reads the end of the work (a no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()


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


def _random_backbones(config: BenchConfig, work: Path) -> tuple[dict, str]:
    """Random open_clip weights saved to a file, and a random Llama-shape LM with a tokenizer spanning its vocab."""
    weights = save_tiny_vision_weights(config.vision, work / "vision.pt")
    lm_dir = work / "lm"
    tokenizer = train_tiny_tokenizer(str(lm_dir), add_pad=False, bos_eos_style="llama")
    # OpenFlamingo (and our importer) resize the LM to the tokenizer, so the tokenizer must span the vocabulary.
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(config.lm.vocab - len(tokenizer))])
    tokenizer.save_pretrained(lm_dir)
    shape = config.lm
    lm_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(lm_config).save_pretrained(lm_dir)
    return {"name": config.vision, "weights": weights}, str(lm_dir)


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


def prepare_backbones(config: BenchConfig, work: Path) -> dict:
    """Write (or find) the backbones and the reference checkpoint; returns the ``setup.json`` record."""
    record_path = work / "setup.json"
    if config.name.startswith("tiny"):
        register_tiny_vision_config()  # open_clip knows the tiny tower only once registered, in every process
    if record_path.exists():
        return json.loads(record_path.read_text())
    if config.name == "micro":
        from flamingo.micro.shipped import MICRO_MODEL_DIR

        record = {"vision": None, "lm_dir": str(MICRO_MODEL_DIR / "language_model")}
    else:
        if config.name.startswith("tiny"):
            name = register_tiny_vision_config()
            vision = {"name": name, "weights": save_tiny_vision_weights(name, work / "vision.pt")}
            lm_dir = save_tiny_lm(work / "lm", "llama")
        else:
            vision, lm_dir = _random_backbones(config, work)
        record = {"vision": vision, "lm_dir": str(lm_dir)}
    record_path.write_text(json.dumps(record))
    return record


def build_one(config: BenchConfig, work: Path, which: str):
    """One contender (``BARE``, ``REFERENCE`` or ``OURS``) on its device and dtype, in eval mode; for ours and the
    reference also their processor / tokenizer. The reference's checkpoint is written on first use, and ours is
    imported from it, so the two share every weight."""
    record = prepare_backbones(config, work)
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    if which == BARE:
        bare = AutoModelForCausalLM.from_pretrained(record["lm_dir"], dtype=dtype).eval()
        vocab = json.loads((work / "vocab.json").read_text())["vocab"] if (work / "vocab.json").exists() else None
        if vocab is not None:
            bare.resize_token_embeddings(vocab, mean_resizing=False)
        return bare.to(device), None
    if which == OURS and config.name == "micro":
        ours = flamingo.Flamingo.from_pretrained("micro", dtype=dtype).eval()
        return ours.to(device), flamingo.FlamingoProcessor.from_pretrained("micro")
    sys.path.insert(0, str(ROOT / "tests"))
    import openflamingo_reference as ofr

    checkpoint = work / "openflamingo.pt"
    if which == REFERENCE or not checkpoint.exists():
        ofr.CROSS_ATTN_EVERY = config.every  # build_reference reads the module constant
        reference, tokenizer = ofr.build_reference("llama", record["vision"], record["lm_dir"])
        if not checkpoint.exists():
            torch.save(reference.state_dict(), checkpoint)
        if which == REFERENCE:
            return reference.to(device=device, dtype=dtype).eval(), tokenizer
    vision = record["vision"]
    ours, processor = flamingo.load_openflamingo(
        checkpoint, vision_encoder=vision["name"], vision_pretrained=vision["weights"], lang_model=record["lm_dir"],
        cross_attn_every_n_layers=config.every,
    )
    if dtype != torch.float32:  # the frozen backbones in the config's dtype; the trainable modules stay float32
        ours.lang_model.to(dtype)
        ours.vision_encoder.to(dtype)
    return ours.to(device).eval(), processor


def build(config: BenchConfig, work: Path) -> Setup:
    torch.manual_seed(0)
    with openflamingo_patched():
        reference = None
        if config.name != "micro":
            reference, _ = build_one(config, work, REFERENCE)
        ours, processor = build_one(config, work, OURS)
        (work / "vocab.json").write_text(json.dumps({"vocab": ours.config.vocab_size}))
        processor.save_pretrained(work / "processor")  # for the memory probe, which builds one contender alone
        bare, _ = build_one(config, work, BARE)
    batch = {k: v.to(config.device) for k, v in _prompt_batch(processor, config).items()}
    batch["pixel_values"] = batch["pixel_values"].to(ours.dtype)
    lm = bare.config
    description = (
        f"config {config.name}: {lm.model_type} LM {lm.num_hidden_layers} layers x {lm.hidden_size}, vocab "
        f"{lm.vocab_size}; vision {ours.config.vision_model}; {len(ours.cross_attn_blocks)} cross-attention blocks; "
        f"batch {config.batch} x {config.prompt_tokens} tokens, {config.images} images a sample "
        f"({tuple(batch['pixel_values'].shape[-2:])} px); {config.device}, {config.dtype}"
    )
    return Setup(config, bare, reference, ours, processor, batch, description, work)
