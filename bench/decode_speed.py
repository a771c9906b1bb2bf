"""Decode time per token: Flamingo generate vs the bare language model's generate, same prompt, same tokens.

Run (CPU, about a minute):  .venv/bin/python bench/decode_speed.py
Options: --hidden 256 --layers 8 --every 2 --new-tokens 64 --images 2 --repeats 3 --dtype float32|bfloat16

Per-token decode time excludes the prefill: t(N new tokens) - t(1 new token), divided by N - 1.
Also prints how many times the media keys/values were computed per generate call (one per cross-attention block
means they are cached across decoding steps).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

import flamingo
from flamingo.cross_attention import MaskedCrossAttention
from flamingo.testing import random_images, register_tiny_vision_config, save_tiny_lm, save_tiny_vision_weights


def timed_generate(generate, new_tokens: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        generate(new_tokens)
        best = min(best, time.perf_counter() - start)
    return best


def per_token(generate, new_tokens: int, repeats: int) -> float:
    generate(2)  # warm-up
    return (timed_generate(generate, new_tokens, repeats) - timed_generate(generate, 1, repeats)) / (new_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--every", type=int, default=2, help="cross_attn_every_n_layers")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)

    work = tempfile.mkdtemp(prefix="flamingo-bench-")
    vision = register_tiny_vision_config()
    weights = save_tiny_vision_weights(vision, f"{work}/vit.pt")
    lm_dir = save_tiny_lm(f"{work}/lm", "llama", hidden=args.hidden, num_layers=args.layers, heads=args.hidden // 64)
    model, processor = flamingo.create_model_and_processor(
        vision_model=vision, vision_pretrained=weights, lang_model=lm_dir, cross_attn_every_n_layers=args.every
    )
    model.to(dtype).eval()
    bare = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=dtype).eval()
    bare.resize_token_embeddings(model.config.vocab_size, mean_resizing=False)

    parts = []
    for i, image in enumerate(random_images(args.images)):
        parts += [image, f"Output: a photo of thing number {i}."]
    batch = processor(parts[:-1] + ["Output:"])
    common = dict(do_sample=False, eos_token_id=None, pad_token_id=model.config.pad_token_id)

    def flamingo_generate(n):
        return model.generate(**batch, max_new_tokens=n, min_new_tokens=n, **common)

    def bare_generate(n):
        return bare.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=n, min_new_tokens=n, **common
        )

    calls = 0
    original = MaskedCrossAttention.keys_values

    def counting(self, media):
        nonlocal calls
        calls += 1
        return original(self, media)

    MaskedCrossAttention.keys_values = counting
    with torch.no_grad():
        flamingo_generate(8)
        kv_per_call = calls
        ours = per_token(flamingo_generate, args.new_tokens, args.repeats)
        reference = per_token(bare_generate, args.new_tokens, args.repeats)
    MaskedCrossAttention.keys_values = original

    print(
        f"config: llama hidden={args.hidden} layers={args.layers} cross-attn every {args.every} "
        f"({len(model.cross_attn_blocks)} blocks), {args.images} images x {model.config.perceiver.num_latents} latents, "
        f"prompt {batch['input_ids'].shape[1]} tokens, {args.dtype}, torch threads {torch.get_num_threads()}"
    )
    print(f"media keys/values computed {kv_per_call} times in one 8-token generate ({len(model.cross_attn_blocks)} blocks)")
    print(f"decode per token: flamingo {ours * 1e3:.2f} ms, bare LM {reference * 1e3:.2f} ms, ratio {ours / reference:.2f}x")
    # Per decoded token each weight is used once (2 FLOPs per parameter); media keys/values are cached, so the
    # blocks' to_kv weights do not count. Attention-score FLOPs are left out of both sides.
    layer_params = sum(p.numel() for p in bare.model.layers.parameters()) + bare.lm_head.weight.numel()
    block_params = sum(p.numel() for n, p in model.cross_attn_blocks.named_parameters() if "to_kv" not in n)
    print(f"parameter-FLOP estimate of the ratio: {(layer_params + block_params) / layer_params:.2f}x")


if __name__ == "__main__":
    main()
