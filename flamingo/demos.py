"""Few-shot demos as files: a folder with ``demos.jsonl`` and its images, read by ``flamingo-generate --demos`` and
the web demo, and written by :func:`write_demos` (``python -m flamingo.micro.samples`` writes sets for ``micro``).

``demos.jsonl`` holds one demo a line, in prompt order: ``{"image": "cat.png", "text": "Output:a cat."}``. The image
path is relative to the folder and must stay inside it; the text is what follows the image in the prompt, the
template with its answer. A prompt is the demos' (image, text) pairs, then the query's image and template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .file_access import confined_path
from .io import atomic_write_text

if TYPE_CHECKING:
    from PIL import Image

DEMOS_FILE = "demos.jsonl"

__all__ = ["DEMOS_FILE", "Demo", "read_demos", "write_demos", "interleave"]


@dataclass(frozen=True)
class Demo:
    """One demo: an image file and the text that follows it in the prompt."""

    image: Path
    text: str


def read_demos(folder: str | Path) -> list[Demo]:
    """The demos of ``folder/demos.jsonl``, in order. A ValueError names the file, line and field of a bad one."""
    folder = Path(folder)
    path = folder / DEMOS_FILE
    if not path.is_file():
        raise ValueError(f"{folder}: no {DEMOS_FILE} in it; a demos folder holds {DEMOS_FILE} and its images.")
    demos = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not JSON ({error.msg}).") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a demo is a JSON object with 'image' and 'text'.")
        for field in ("image", "text"):
            if not isinstance(record.get(field), str) or not record[field]:
                raise ValueError(f"{where}: field '{field}' must be a non-empty string.")
        image = confined_path(record["image"], folder, what=f"{where}, field 'image'")
        if not image.is_file():
            raise ValueError(f"{where}, field 'image': {image} does not exist.")
        demos.append(Demo(image, record["text"]))
    if not demos:
        raise ValueError(f"{path} holds no demos.")
    return demos


def write_demos(folder: str | Path, demos: list[tuple[Image.Image, str]]) -> Path:
    """Write ``demos`` ((PIL image, text) pairs) as ``folder/demo-<i>.png`` and ``folder/demos.jsonl``; returns the
    folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (image, text) in enumerate(demos):
        name = f"demo-{index}.png"
        image.save(folder / name)
        lines.append(json.dumps({"image": name, "text": text}))
    atomic_write_text(folder / DEMOS_FILE, "\n".join(lines) + "\n")
    return folder


def interleave(demos: list[Demo]) -> list:
    """The demos as an interleaved prompt prefix for the processor: ``[image, text, image, text, ...]`` (images as
    ``Path``, which the processor reads as files)."""
    items: list = []
    for demo in demos:
        items += [demo.image, demo.text]
    return items
