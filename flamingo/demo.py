"""A few-shot prompt end to end on a tiny random model that needs no download: build, prompt, generate, save, reload.

Run:  .venv/bin/python -m flamingo.demo [--out DIR] [--family llama|gpt2|opt|...]

With real backbones the same steps read::

    model, processor = flamingo.create_model_and_processor(
        vision_model="ViT-L-14", vision_pretrained="openai", lang_model="<hub id or path>", cross_attn_every_n_layers=1)

The tiny model's weights are random, so the generated words are too; the demo shows the moving parts.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import flamingo
from flamingo.testing import FAMILIES, random_images, register_tiny_vision_config, save_tiny_lm, save_tiny_vision_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where to write the backbones and the saved model")
    parser.add_argument("--family", choices=FAMILIES, default="llama")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="flamingo-demo-"))
    torch.manual_seed(0)

    vision = register_tiny_vision_config()
    weights = save_tiny_vision_weights(vision, out / "vision.pt")
    lm_dir = save_tiny_lm(out / "lm", args.family)
    model, processor = flamingo.create_model_and_processor(
        vision_model=vision, vision_pretrained=weights, lang_model=lm_dir, cross_attn_every_n_layers=2
    )
    model.eval()
    print(f"model: {model.num_parameters():,} parameters, {model.num_parameters(trainable_only=True):,} trainable")

    cat, dog, query = random_images(3)
    prompt = [cat, "An image of a cat.", dog, "An image of a dog.", query, "An image of"]
    batch = processor(prompt)
    print("prompt:", processor.decode(batch["input_ids"][0]))
    start = time.perf_counter()
    generated = model.generate(**batch, max_new_tokens=12, num_beams=3)
    print(f"generated in {time.perf_counter() - start:.2f}s:", processor.decode(generated[0, batch["input_ids"].shape[1] :]))

    saved = out / "flamingo-tiny"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    reloaded = flamingo.Flamingo.from_pretrained(saved).eval()
    again = reloaded.generate(**flamingo.FlamingoProcessor.from_pretrained(saved)(prompt), max_new_tokens=12, num_beams=3)
    size = sum(f.stat().st_size for f in saved.iterdir()) / 1e6
    print(f"saved to {saved} ({size:.1f} MB); reloaded model generates the same: {torch.equal(generated, again)}")


if __name__ == "__main__":
    main()
