"""A small, learnable interleaved dataset for smoke tests and tiny CPU training runs.

Each image is a solid colour or a coloured shape on white, and the text after it names the colour and shape in a
few fixed words ("a red circle."). A tiny Flamingo whose language model is frozen and random can only lower its loss
on those words by reading the image, so a falling loss shows that images reach the language model.

Usage::

    path = write_synthetic_dataset("/tmp/shapes", format="simple", num_records=64)
    config = DataConfig(name="shapes", path=str(path), format="simple")

The same records are written in each format: ``simple`` and ``obelics`` (``data.jsonl`` with image files under
``images/``), ``pairs`` (one caption per image) and ``webdataset`` (two ``.tar`` shards of ``KEY.png`` +
``KEY.txt`` pairs).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from flamingo.io import atomic_write_text

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "black": (10, 10, 10),
    "purple": (140, 40, 170),
}
SHAPES = ("square", "circle", "cross")
FORMATS = ("simple", "obelics", "pairs", "webdataset")


def draw(colour: str, shape: str, size: int) -> Image.Image:
    """A ``size`` x ``size`` RGB image: a solid ``colour`` (square), a disc of it, or a cross of it on white."""
    rgb = np.array(COLOURS[colour], dtype=np.uint8)
    if shape == "square":
        return Image.fromarray(np.broadcast_to(rgb, (size, size, 3)).copy())
    pixels = np.full((size, size, 3), 255, dtype=np.uint8)
    y, x = np.mgrid[0:size, 0:size]
    if shape == "circle":
        inside = (y - size / 2 + 0.5) ** 2 + (x - size / 2 + 0.5) ** 2 <= (size * 0.4) ** 2
    elif shape == "cross":
        inside = (np.abs(y - size / 2 + 0.5) < size / 8) | (np.abs(x - size / 2 + 0.5) < size / 8)
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")
    pixels[inside] = rgb
    return Image.fromarray(pixels)


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}."


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_synthetic_dataset(
    out_dir: str | Path, *, format: str = "simple", num_records: int = 64, seed: int = 0, image_size: int = 32
) -> Path:
    """Write ``num_records`` records in ``format`` under ``out_dir``; return the path to give ``DataConfig.path``.

    Interleaved records (simple, obelics) hold 1-3 images each; pairs and webdataset hold one image per record.
    The dataset is a deterministic function of ``seed``.
    """
    if format not in FORMATS:
        raise ValueError(f"write_synthetic_dataset: format must be one of {FORMATS}, got {format!r}.")
    if num_records < 1:
        raise ValueError(f"write_synthetic_dataset: num_records must be >= 1, got {num_records}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    interleaved = format in ("simple", "obelics")

    records = []  # per record: list of (key, PIL image, caption)
    for index in range(num_records):
        count = int(rng.integers(1, 4)) if interleaved else 1
        items = []
        for slot in range(count):
            colour, shape = names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))]
            items.append((f"{index:06d}_{slot}", draw(colour, shape, image_size), caption(colour, shape)))
        records.append(items)

    if format == "webdataset":
        shards = [records[: (num_records + 1) // 2], records[(num_records + 1) // 2 :]]
        for number, shard in enumerate(shards):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                for items in shard:
                    for key, image, text in items:
                        for name, data in ((f"{key}.png", _png_bytes(image)), (f"{key}.txt", text.encode())):
                            info = tarfile.TarInfo(name)
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
            tmp = out_dir / f".shard-{number:05d}.tar.tmp"
            tmp.write_bytes(buffer.getvalue())
            tmp.replace(out_dir / f"shard-{number:05d}.tar")
        return out_dir / "shard-*.tar"

    (out_dir / "images").mkdir(exist_ok=True)
    lines = []
    for items in records:
        paths = []
        for key, image, _ in items:
            image.save(out_dir / "images" / f"{key}.png")
            paths.append(f"images/{key}.png")
        captions = [text for _, _, text in items]
        if format == "simple":
            record = {"text": "".join(f"<image>{text}" for text in captions), "images": paths}
        elif format == "obelics":
            record = {"texts": [], "images": []}
            for path, text in zip(paths, captions):
                record["texts"] += [None, text]
                record["images"] += [path, None]
        else:
            record = {"image": paths[0], "caption": captions[0]}
        lines.append(json.dumps(record))
    atomic_write_text(out_dir / "data.jsonl", "\n".join(lines) + "\n")
    return out_dir / "data.jsonl"
