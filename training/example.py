"""A ready-to-run tiny training example that needs no download: a self-contained random Flamingo model, a small
learnable synthetic dataset in the documented ``simple`` JSONL format, and a config that fine-tunes one on the other.

Run::

    python -m flamingo_train.example --out runs/example       # writes the files, prints the training command
    flamingo-train --config runs/example/config.yaml          # about a minute on a laptop CPU

The synthetic images are coloured shapes and each caption names them ("a red circle."), so most of the loss can only
be removed by reading the images. After the 100 steps the loss is about 0.2 (from 6.6), and it rises about fivefold
when every sample is given another sample's images (tests/test_entry_points.py checks both).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import flamingo
from flamingo.backbones import no_transformers_bars
from flamingo.io import atomic_write_text
from flamingo.testing import register_tiny_vision_config, save_tiny_lm, save_tiny_vision_weights
from flamingo_train.data.synthetic import write_synthetic_dataset

CONFIG_TEMPLATE = """\
# Tiny CPU fine-tune written by `python -m flamingo_train.example`.
# Run: flamingo-train --config {config}
model:
  pretrained: {model}          # self-contained dir (save_pretrained(save_backbones=True)) + processor
data:
  - name: shapes
    path: {data}
    format: simple             # {{"text": "<image>a red circle.<image>...", "images": ["images/...png", ...]}}
    batch_size: {batch_size}
    max_tokens: 64
    max_images: 3
    num_workers: 0
optim:
  lr: {lr}
  weight_decay: 0.0
schedule:
  kind: constant
  warmup_steps: 5
run:
  output_dir: {output_dir}
  max_steps: {max_steps}
  save_every: {save_every}
  keep_last: 2
  log_every: 5
  max_grad_norm: 1.0
  report_to: null
  seed: 0
"""


def sharpen_output_layer(lm_dir: Path, *, scale: float) -> Path:
    """Scale the saved LM's output layer by ``scale``, in place.

    A random LM initialised at std 0.02 has logits within about +-1 whatever its hidden state, so with the LM frozen
    no Flamingo on top of it can predict any token confidently (the loss stalls near ln(vocab)). A trained LM's output
    layer has a logit range of tens; scaling the random one gives the tiny model that headroom.
    """
    with no_transformers_bars():
        lm = AutoModelForCausalLM.from_pretrained(lm_dir)
    head = lm.get_output_embeddings()
    if head is lm.get_input_embeddings():
        raise ValueError(f"{lm_dir}: the output layer is tied to the input embeddings; use an untied family.")
    with torch.no_grad():
        head.weight.mul_(scale)
    with no_transformers_bars():
        lm.save_pretrained(lm_dir)
    return lm_dir


def write_example(
    out: str | Path,
    *,
    max_steps: int = 100,
    batch_size: int = 8,
    lr: float = 1e-3,
    num_records: int = 64,
    save_every: int = 50,
    family: str = "llama",
    head_scale: float = 10.0,
) -> Path:
    """Write ``out/model``, ``out/data`` and ``out/config.yaml`` (which trains into ``out/run``); return the config."""
    out = Path(out).resolve()
    torch.manual_seed(0)
    vision = register_tiny_vision_config()
    backbones = out / "backbones"
    weights = save_tiny_vision_weights(vision, backbones / "vision.pt")
    lm_dir = sharpen_output_layer(save_tiny_lm(backbones / "lm", family), scale=head_scale)
    model, processor = flamingo.create_model_and_processor(
        vision_model=vision,
        vision_pretrained=weights,
        lang_model=str(lm_dir),
        cross_attn_every_n_layers=2,
        perceiver=flamingo.PerceiverConfig(depth=2, num_latents=8, heads=2, dim_head=32, max_frames=1),
        cross_attention=flamingo.CrossAttentionConfig(heads=2, dim_head=32),
    )
    model.save_pretrained(out / "model", save_backbones=True)
    processor.save_pretrained(out / "model")
    data = write_synthetic_dataset(out / "data", format="simple", num_records=num_records, seed=0)
    config = out / "config.yaml"
    text = CONFIG_TEMPLATE.format(
        config=config, model=out / "model", data=data, batch_size=batch_size, lr=lr,
        output_dir=out / "run", max_steps=max_steps, save_every=save_every,
    )
    atomic_write_text(config, text)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flamingo_train.example", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the model, data and config")
    parser.add_argument("--max-steps", type=int, default=100)
    args = parser.parse_args(argv)
    config = write_example(args.out, max_steps=args.max_steps)
    print(f"wrote {args.out}/model, {args.out}/data and {config}")
    print("train on one process:")
    print(f"  flamingo-train --config {config}")
    print("or on two CPU processes with the same global batch (--multi_gpu starts torchrun; on a machine without")
    print("GPUs the loop runs them on CPU with gloo. accelerate's --cpu flag alone starts one process):")
    print(
        "  accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no "
        f"-m flamingo_train --config {config} data.0.batch_size=4"
    )


if __name__ == "__main__":
    main()
