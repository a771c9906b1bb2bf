"""Helpers for tests/test_train_data.py: a tiny processor, small data files and loader shortcuts."""

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoTokenizer

from flamingo.processing import FlamingoProcessor
from flamingo.tokens import add_flamingo_tokens
from flamingo.vision import load_vision_encoder
from flamingo_train.data import DataConfig, build_dataloader


def tiny_processor(vision, lm_dir):
    """A FlamingoProcessor for the tiny LM's tokenizer and the tiny ViT's preprocessing (no model built)."""
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    add_flamingo_tokens(tokenizer)
    _, preprocess_cfg, _ = load_vision_encoder(vision["name"], vision["weights"])
    return FlamingoProcessor(tokenizer, preprocess_cfg)


def solid_image(index, size=24):
    """A distinct solid-colour image per index, so images can be told apart after the transform."""
    rgb = np.array([(37 * index) % 256, (91 * index + 50) % 256, (53 * index + 100) % 256], dtype=np.uint8)
    return Image.fromarray(np.broadcast_to(rgb, (size, size + 4, 3)).copy())


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(folder, count):
    """Save ``count`` distinct images as folder/img{i}.png; return their names relative to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        solid_image(i).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def write_jsonl(path, records):
    Path(path).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def loader(processor, path, *, fmt="simple", batch_size=4, num_workers=0, rank=0, world_size=1, seed=0,
           strict=False, start=None, **fields):
    config = DataConfig(name="test", path=str(path), format=fmt, batch_size=batch_size, num_workers=num_workers,
                        **fields)
    return build_dataloader(config, processor, rank=rank, world_size=world_size, seed=seed, strict=strict,
                            start=start)


def take(data_loader, steps):
    batches = []
    for batch in data_loader:
        batches.append(batch)
        if len(batches) == steps:
            return batches
    raise AssertionError("the loader ended; it should never end")


def rows(batch):
    """The batch's samples as tuples of their non-padding token ids."""
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
