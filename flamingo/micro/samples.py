"""Sample files of micro's world for the prompt CLI, the chat session and the web demo: held-out scenes as PNG files
and few-shot demo sets (:mod:`flamingo.demos`)::

    python -m flamingo.micro.samples DIR

writes ``DIR/scene-<i>.png`` (held-out scenes, 64 px) with ``DIR/scenes.json`` (each file's captions and one question
with its answer), and the demo folders ``DIR/demos/caption`` (``Output:`` captions) and ``DIR/demos/vqa``
(``Question:... Short answer:`` pairs), from the world's training split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..demos import write_demos
from ..io import atomic_write_text
from .world import captions, make_scene, pick_question, render, rng_for

VQA_TEMPLATE = "Question:{question} Short answer:"
CAPTION_TEMPLATE = "Output:"
DEMO_SETS = ("caption", "vqa")


def demo_set(kind: str, shots: int = 4) -> list[tuple]:
    """``shots`` (image, text) demos of ``kind`` ("caption" or "vqa") from the training split."""
    if kind not in DEMO_SETS:
        raise ValueError(f"kind must be one of {DEMO_SETS}; got {kind!r}.")
    demos = []
    for index in range(shots):
        rng = rng_for("train", f"samples-{kind}", index)
        scene = make_scene(rng)
        if kind == "caption":
            text = CAPTION_TEMPLATE + captions(scene)[0]
        else:
            question = pick_question(scene, rng)
            text = VQA_TEMPLATE.format(question=question.question) + question.answer
        demos.append((render(scene), text))
    return demos


def write_samples(out: str | Path, *, scenes: int = 4, shots: int = 4) -> Path:
    """Write the sample scenes and demo sets under ``out`` (module docstring); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    described = {}
    for index in range(scenes):
        rng = rng_for("test", "samples", index)
        scene = make_scene(rng)
        name = f"scene-{index}.png"
        render(scene).save(out / name)
        question = pick_question(scene, rng)
        described[name] = {"captions": captions(scene), "question": question.question, "answer": question.answer}
    atomic_write_text(out / "scenes.json", json.dumps(described, indent=1) + "\n")
    for kind in DEMO_SETS:
        write_demos(out / "demos" / kind, demo_set(kind, shots))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flamingo.micro.samples", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write into")
    parser.add_argument("--scenes", type=int, default=4, help="held-out scenes to write")
    parser.add_argument("--shots", type=int, default=4, help="demos per set")
    args = parser.parse_args(argv)
    write_samples(args.out, scenes=args.scenes, shots=args.shots)
    print(f"wrote {args.out}: scene-0.png .. scene-{args.scenes - 1}.png, scenes.json, demos/caption, demos/vqa")


if __name__ == "__main__":
    main()
