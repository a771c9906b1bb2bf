"""Fixture writers: tiny datasets in each task's official file format, for tests and CPU dry runs.

Each task (``flamingo_eval.tasks``) names its writer; ``flamingo_eval.testing.write_fixture_data`` calls them. A
writer is ``write(folder, rng, images, num_support, num_query)``: it writes the task's files under ``folder`` in the
layout of ``flamingo_eval.data``, drawing text from ``rng`` (``random.Random``) and saving pictures with ``images``
(:class:`FixtureImages`). Captions, questions and answers come from small word lists, so metrics on them are
non-trivial (answers sometimes agree, sometimes not; both HatefulMemes labels occur).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from flamingo.io import atomic_write_text

_SUBJECTS = ["a dog", "two cats", "a man", "a woman", "a red bus", "three birds", "a child", "an old train"]
_ACTIONS = ["sitting on", "running across", "standing next to", "looking at", "riding", "parked near"]
_PLACES = ["a wooden bench", "the street", "a grassy field", "the beach", "a kitchen table", "a snowy hill"]
_QUESTIONS = [
    ("What color is the bus?", ["red", "blue", "white", "Red"]),
    ("How many birds are there?", ["3", "three", "2", "4"]),
    ("Is the man smiling?", ["yes", "no"]),
    ("What is the dog doing?", ["sitting", "running", "sleeping", "eating"]),
    ("What does the sign say?", ["stop", "STOP!", "exit", "don't walk"]),
]
_CLASSES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def _caption(rng: random.Random) -> str:
    text = f"{rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}"
    # Real captions vary in case and final punctuation; PTB tokenisation must see both.
    return (text[0].upper() + text[1:] if rng.random() < 0.5 else text) + rng.choice(["", ".", " ."])


def _qa(rng: random.Random) -> tuple[str, list[str]]:
    question, pool = rng.choice(_QUESTIONS)
    if rng.random() < 0.25:  # all ten human answers identical: the official evaluator skips normalisation
        return question, [pool[0]] * 10
    return question, [rng.choice(pool) for _ in range(10)]


def _write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class FixtureImages:
    """Saves a fresh small random image under each name it is given."""

    def __init__(self, seed: int):
        self.seed = seed

    def save(self, path: Path) -> None:
        # Imported here: the task registry names these writers, and the command lines that read it start without them.
        import numpy as np
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        # Random non-square pixels (like flamingo.testing.random_images, without importing the model stack).
        pixels = np.random.default_rng(self.seed).integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        self.seed += 1
        image.save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")


def write_coco(root: Path, rng, images, n_support, n_query) -> None:
    entries = []
    # Karpathy's json lists train (train2014), restval, val and test (val2014) images; val must not be read.
    splits = ["train"] * (n_support - 1) + ["restval"] + ["val"] * 2 + ["test"] * n_query
    for index, split in enumerate(splits):
        cocoid = 100 + index
        folder = "train2014" if split == "train" else "val2014"
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        images.save(root / folder / filename)
        sentences = [{"raw": _caption(rng), "sentid": 5 * index + j} for j in range(5)]
        entries.append({"filepath": folder, "filename": filename, "cocoid": cocoid, "imgid": index, "split": split,
                        "sentences": sentences, "sentids": [s["sentid"] for s in sentences]})
    _write_json(root / "dataset_coco.json", {"images": entries, "dataset": "coco"})


def write_flickr30k(root: Path, rng, images, n_support, n_query) -> None:
    entries = []
    splits = ["train"] * n_support + ["val"] * 2 + ["test"] * n_query
    for index, split in enumerate(splits):
        filename = f"{1000092795 + 7 * index}.jpg"
        images.save(root / "flickr30k_images" / filename)
        sentences = [{"raw": _caption(rng), "sentid": 5 * index + j} for j in range(5)]
        entries.append({"filename": filename, "imgid": index, "split": split, "sentences": sentences})
    _write_json(root / "dataset_flickr30k.json", {"images": entries, "dataset": "flickr30k"})


def write_coco_vqa(prefix_questions: str, prefix_annotations: str):
    def write(root: Path, rng, images, n_support, n_query) -> None:
        for subtype, count in (("train2014", n_support), ("val2014", n_query)):
            questions, annotations = [], []
            # Two questions per image, as in VQAv2 (several questions share one image).
            for index in range(count):
                image_id = 500 + index // 2 + (0 if subtype == "train2014" else 1000)
                question_id = image_id * 1000 + index % 2
                path = root / subtype / f"COCO_{subtype}_{image_id:012d}.jpg"
                if not path.exists():
                    images.save(path)
                question, answers = _qa(rng)
                questions.append({"image_id": image_id, "question": question, "question_id": question_id})
                annotations.append({
                    "question_id": question_id, "image_id": image_id, "question_type": "what",
                    "answer_type": "other", "multiple_choice_answer": answers[0],
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
                })
            # Annotations listed in a different order from the questions: readers must join on question_id.
            annotations.reverse()
            _write_json(root / prefix_questions.format(subtype),
                        {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype, "questions": questions})
            _write_json(root / prefix_annotations.format(subtype),
                        {"data_type": "mscoco", "data_subtype": subtype, "annotations": annotations})

    return write


def write_textvqa(root: Path, rng, images, n_support, n_query) -> None:
    for split, count in (("train", n_support), ("val", n_query)):
        data = []
        for index in range(count):
            image_id = f"{rng.getrandbits(64):016x}"
            images.save(root / "train_images" / f"{image_id}.jpg")
            question, answers = _qa(rng)
            data.append({"question": question, "image_id": image_id, "image_classes": ["Sign"], "answers": answers,
                         "question_id": (0 if split == "train" else 34602) + index, "set_name": split,
                         "question_tokens": question.lower().rstrip("?").split()})
        _write_json(root / f"TextVQA_0.5.1_{split}.json",
                    {"dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})


def write_vizwiz(root: Path, rng, images, n_support, n_query) -> None:
    for split, count in (("train", n_support), ("val", n_query)):
        records = []
        for index in range(count):
            name = f"VizWiz_{split}_{index:08d}.jpg"
            images.save(root / split / name)
            question, answers = _qa(rng)
            records.append({"image": name, "question": question, "answerable": 1, "answer_type": "other",
                            "answers": [{"answer": a, "answer_confidence": "yes"} for a in answers]})
        _write_json(root / f"{split}.json", records)


def write_hateful_memes(root: Path, rng, images, n_support, n_query) -> None:
    for split, count in (("train", n_support), ("test_seen", n_query)):
        records = []
        for index in range(count):
            meme_id = (10000 if split == "train" else 20000) + index
            images.save(root / "img" / f"{meme_id:05d}.png")
            records.append({"id": meme_id, "img": f"img/{meme_id:05d}.png", "label": index % 2,
                            "text": f"{rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)}"})
        _write_jsonl(root / f"{split}.jsonl", records)


def write_imagenet(root: Path, rng, images, n_support, n_query) -> None:
    classes = sorted(_CLASSES)
    for split, count in (("train", n_support), ("val", n_query)):
        for index in range(count):
            images.save(root / split / classes[index % len(classes)] / f"ILSVRC2012_{split}_{index:08d}.JPEG")
    _write_json(root / "class_names.json", _CLASSES)


def write_custom(root: Path, rng, images, n_support, n_query) -> None:
    for split, count in (("train", n_support), ("test", n_query)):
        records = []
        for index in range(count):
            images.save(root / "images" / f"{split}_{index}.jpg")
            question, answers = _qa(rng)
            records.append({"id": f"{split}-{index}", "question_id": f"{split}-{index}", "image": f"images/{split}_{index}.jpg",
                            "captions": [_caption(rng) for _ in range(2)], "question": question, "answers": answers})
        _write_jsonl(root / f"{split}.jsonl", records)


_WORDS = ["dax", "blicket", "wug", "toma", "fep", "zorb", "kiki", "bouba"]


def write_binding(root: Path, rng, images, n_support, n_query) -> None:
    """Episodes of 4 demos over two words (one picture per word, shown twice), so 0, 2 and 4 shots all run; every
    third episode lists three ``choices``, and the query is the first or the second word's picture at random."""
    for split, count in (("train", n_support), ("test", n_query)):
        records = []
        for index in range(count):
            episode = f"{split}-ep{index}"
            words = rng.sample(_WORDS, 3)
            pictures = []
            for w in range(2):
                name = f"images/{episode}-{w}.png"
                images.save(root / name)
                pictures.append(name)
            order = [0, 1, 0, 1] if rng.random() < 0.5 else [1, 0, 1, 0]
            demos = [{"image": pictures[w], "word": words[w]} for w in order]
            target = rng.randrange(2)
            record = {"id": episode, "demos": demos, "image": pictures[target], "answer": words[target]}
            if index % 3 == 2:
                record["choices"] = [words[2], words[1], words[0]]
            records.append(record)
        _write_jsonl(root / f"{split}.jsonl", records)
