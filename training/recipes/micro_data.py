"""The micro world written to disk in the package's documented formats, so training and evaluation read it through
their ordinary data paths.

Training (``flamingo-train`` ``simple`` JSONL, images as PNG files next to it)::

    train/vqa.jsonl        {"text": "<image>Question:what colour is the star? Short answer:red<image>Question:...",
                            "images": ["images/s12.png", ...]}          1-4 scenes per document
    train/captions.jsonl   {"text": "<image>Output:a small red star above a large blue circle", "images": [...]}
    train/documents.jsonl  interleaved: several scenes, each followed by its caption and/or a question
    train/binding.jsonl    {"text": "<image>This is a dax.<image>This is a blicket.<image>This is a dax.", ...}

Evaluation (``flamingo-eval`` custom tasks: ``--task custom --custom-kind caption|vqa|binding --data-dir ...``)::

    eval/caption/{train,test}.jsonl   {"id", "image", "captions": [...]}   train = demo pool, test = held-out scenes
    eval/vqa/{train,test}.jsonl       {"question_id", "image", "question", "answers": [answer] * 10}
    eval/binding/{train,test}.jsonl   {"id", "demos": [{"image", "word"}, ...], "image", "answer", "choices"}
    eval/<kind>/images/*.png          each task's own images (an evaluation reads only images in its folder)

A VQA answer is written as ten identical references: the VQAv2 accuracy formula (leave-one-out over ten human
answers) then reads as exact match, as it should for a world with one right answer.

Every test item comes from the ``"test"`` split of :mod:`flamingo.micro.world` (new scenes; binding words from
``TEST_WORDS``), every training item from ``"train"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from flamingo.micro.world import Scene, binding_episode, captions, make_scene, pick_question, render, rng_for
from flamingo.tokens import MEDIA_TOKEN

from .texts import BINDING_PROMPT, CAPTION_PROMPT, VQA_PROMPT


@dataclass
class DataRecipe:
    """How many records of each kind are written."""

    vqa_documents: int = 12000
    caption_documents: int = 3000
    interleaved_documents: int = 2000
    binding_episodes: int = 6000
    eval_support: int = 256  # demo pool of the caption and VQA tasks
    eval_queries: int = 300  # held-out scenes (and binding episodes) evaluated
    eval_binding_shots: int = 4


class ImageWriter:
    """Renders each scene once to ``<root>/images/<key>.png`` and returns its path relative to ``root``."""

    def __init__(self, root: Path):
        self.root = root
        (root / "images").mkdir(parents=True, exist_ok=True)

    def __call__(self, scene: Scene, key: str) -> str:
        relative = f"images/{key}.png"
        path = self.root / relative
        if not path.exists():
            render(scene).save(path)
        return relative


def _write_jsonl(path: Path, records) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            count += 1
    return count


def _vqa_chunk(scene: Scene, rng) -> str:
    question = pick_question(scene, rng)
    return VQA_PROMPT.format(question=question.question, answer=question.answer)


def _caption_chunk(scene: Scene, rng) -> str:
    return CAPTION_PROMPT.format(caption=rng.choice(captions(scene)))


def _documents(kind: str, count: int, images: ImageWriter, chunks, max_scenes: int):
    for index in tqdm(range(count), desc=f"data: {kind}", leave=False):
        rng = rng_for("train", f"{kind}-document", index)
        scenes = [make_scene(rng_for("train", f"{kind}-scene", index * 8 + j)) for j in range(rng.randint(1, max_scenes))]
        texts = [chunks(scene, rng) for scene in scenes]
        yield {"text": "".join(MEDIA_TOKEN + t for t in texts),
               "images": [images(s, f"{kind}{index}_{j}") for j, s in enumerate(scenes)]}


def _interleaved_chunk(scene: Scene, rng) -> str:
    """A scene's caption, its caption then a question, or a question: what a web page's image text varies like."""
    kind = rng.random()
    if kind < 0.4:
        return _caption_chunk(scene, rng)
    if kind < 0.7:
        return _caption_chunk(scene, rng) + " " + _vqa_chunk(scene, rng)
    return _vqa_chunk(scene, rng)


def _binding_records(count: int, images: ImageWriter):
    for index in tqdm(range(count), desc="data: binding", leave=False):
        rng = rng_for("train", "binding-shots", index)
        episode = binding_episode("train", index, shots=rng.choice((2, 4, 4, 6)))
        items = [*episode.demos, (episode.query, episode.answer)]
        yield {"text": "".join(MEDIA_TOKEN + BINDING_PROMPT.format(word=w) for _, w in items),
               "images": [images(s, f"bind{index}_{j}") for j, (s, _) in enumerate(items)]}


def write_training_data(root: Path, recipe: DataRecipe) -> dict[str, Path]:
    """The four training files under ``root`` (see the module docstring); returns ``{name: path}``."""
    images = ImageWriter(root)
    files = {
        "vqa": _documents("vqa", recipe.vqa_documents, images, _vqa_chunk, 4),
        "captions": _documents("caption", recipe.caption_documents, images, _caption_chunk, 3),
        "documents": _documents("doc", recipe.interleaved_documents, images, _interleaved_chunk, 4),
        "binding": _binding_records(recipe.binding_episodes, images),
    }
    paths = {}
    for name, records in files.items():
        paths[name] = root / f"{name}.jsonl"
        _write_jsonl(paths[name], records)
    return paths


def write_eval_data(root: Path, recipe: DataRecipe) -> dict[str, Path]:
    """The three custom evaluation tasks under ``root/<kind>/`` (see the module docstring); returns ``{kind: dir}``.

    Each task folder holds its own ``images/`` (the caption and VQA tasks render the same scenes): an evaluation reads
    only images inside its data folder (flamingo.file_access)."""
    writers = {kind: ImageWriter(root / kind) for kind in ("caption", "vqa", "binding")}

    def scenes(split: str, count: int):
        return [(i, make_scene(rng_for(split, "eval-scene", i))) for i in range(count)]

    sizes = {"train": recipe.eval_support, "test": recipe.eval_queries}
    for split, count in sizes.items():
        pool = scenes(split, count)
        images = writers["caption"]
        _write_jsonl(root / "caption" / f"{split}.jsonl",
                     ({"id": i, "image": images(s, f"{split}{i}"), "captions": captions(s)} for i, s in pool))
        images = writers["vqa"]
        _write_jsonl(root / "vqa" / f"{split}.jsonl", (
            {"question_id": i, "image": images(s, f"{split}{i}"), "question": q.question,
             "answers": [q.answer] * 10}
            for i, s in pool for q in [pick_question(s, rng_for(split, "eval-question", i))]))
        episodes = [binding_episode(split, 10_000_000 + i, shots=recipe.eval_binding_shots) for i in range(count)]
        images = writers["binding"]
        _write_jsonl(root / "binding" / f"{split}.jsonl", (
            {"id": f"{split}{i}",
             "demos": [{"image": images(s, f"{split}ep{i}_{j}"), "word": w} for j, (s, w) in enumerate(e.demos)],
             "image": images(e.query, f"{split}ep{i}_q"), "answer": e.answer, "choices": list(e.words)}
            for i, e in enumerate(episodes)))
    return {kind: root / kind for kind in ("caption", "vqa", "binding")}


def eval_config(model_dir: Path, kind: str, directory: Path, *, shots: list[int], output: Path,
                num_samples: int | None = None, batch_size: int = 16, predictions_dir: Path | None = None):
    """The ``flamingo-eval`` run of one micro custom task (``kind``: caption | vqa | binding), laid out as the training
    data is (no separator between chunks) and decoded greedily; the recipe and ``flamingo_train.demo`` both evaluate so."""
    from flamingo_eval.config import EvalConfig

    return EvalConfig(
        model=model_dir, tasks=["custom"], custom_kind=kind, data_dir=directory, shots=shots,
        num_samples=num_samples, batch_size=batch_size, demo_separator="", num_beams=1, output=output,
        predictions_dir=predictions_dir,
    )
