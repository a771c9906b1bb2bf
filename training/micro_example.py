"""The README's fine-tuning example: a custom VQA task -> fine-tune the micro model -> evaluate, on a CPU.

The task is a question the micro model was never asked: **"what is this?"** about a one-object scene of the micro
world, answered with the object's kind, ``"red star"`` (30 kinds: 6 colours x 5 shapes). The micro model knows the
words from its captions and VQA, but not this question or answer format (it scores 0% before fine-tuning). The
images matter: the question text is always the same, so without them the best answer is the most common kind, right
for a few percent of the questions, and so is any answer given another scene's image.

Run::

    python -m flamingo_train.micro_example --out runs/what-is-this    # task data, training records, config
    flamingo-train --config runs/what-is-this/config.yaml               # ~1 min; held-out accuracy every 50 steps
    flamingo-eval run --model runs/what-is-this/run/best --tasks custom --custom-kind vqa \\
        --data-dir runs/what-is-this/task --shots 0 4 --output runs/what-is-this/results.json

What it writes under ``--out``:

* ``task/``: the task in ``flamingo-eval``'s custom VQA layout (``train.jsonl``, the demo and training pool, from the
  world's train split; ``test.jsonl``, held-out scenes of its test split; ``images/``);
* ``train-records.jsonl`` (+ ``.data.yaml``): the training pool as the evaluation prompts it, at 0 and 2 shots
  (``flamingo-train convert-task``), trained on the query's answer only;
* ``config.yaml``: continue from ``micro``, evaluate on 100 held-out questions every 50 steps (the score is in the
  progress bar and ``run/metrics.jsonl``), keep the best model in ``run/best`` and draw ``run/metrics.png``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import yaml

from flamingo.io import atomic_write_text
from flamingo.micro.world import Scene, make_scene, render, rng_for
from flamingo_eval.files import read_jsonl
from flamingo_train.task_data import write_task_records

QUESTION = "what is this?"


def what_is_this(split: str, index: int) -> tuple[Scene, str]:
    """Scene ``index`` of ``split`` (one object, any size and position) and its answer, ``"<colour> <shape>"``."""
    scene = make_scene(rng_for(split, "what-is-this", index), num_shapes=1)
    (obj,) = scene.shapes
    return scene, f"{obj.colour} {obj.shape}"


def write_task(root: str | Path, *, num_train: int = 1000, num_test: int = 200) -> Path:
    """``root/train.jsonl``, ``root/test.jsonl`` and ``root/images/``: flamingo-eval's custom VQA layout, one
    answer per question (scored by exact match, see ``flamingo_eval.metrics.vqa``). Returns ``root``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("test", num_test)):
        lines = []
        for index in range(count):
            scene, answer = what_is_this(split, index)
            image = f"images/{split}{index}.png"
            render(scene).save(root / image)
            lines.append(json.dumps({"question_id": f"{split}{index}", "image": image, "question": QUESTION,
                                     "answer": answer}))
        atomic_write_text(root / f"{split}.jsonl", "\n".join(lines) + "\n")
    return root


def with_shuffled_images(task: str | Path, out: str | Path, *, seed: int = 0) -> Path:
    """A copy of ``task``'s custom VQA layout whose test questions carry another test question's image (a fixed
    permutation): what is left of the accuracy there is what the model gets without the right image. The images are
    copied into ``out`` (an evaluation reads only images inside its data folder)."""
    task, out = Path(task), Path(out)
    train, test = read_jsonl(task / "train.jsonl"), read_jsonl(task / "test.jsonl")
    for relative in {record["image"] for record in train + test}:
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(task / relative, out / relative)
    images = [record["image"] for record in test]
    random.Random(seed).shuffle(images)
    atomic_write_text(out / "test.jsonl", "".join(json.dumps({**record, "image": image}) + "\n"
                                                  for record, image in zip(test, images)))
    atomic_write_text(out / "train.jsonl", "".join(json.dumps(record) + "\n" for record in train))
    return out


def question_only_accuracy(task: str | Path) -> float:
    """Accuracy (%) on ``task``'s test questions of the most common training answer to the same question text (the
    best a model that ignores the images can do on this data)."""
    answers: dict[str, Counter] = {}
    for record in read_jsonl(Path(task) / "train.jsonl"):
        answers.setdefault(record["question"], Counter())[record["answer"]] += 1
    test = read_jsonl(Path(task) / "test.jsonl")
    hits = sum(record["question"] in answers and answers[record["question"]].most_common(1)[0][0] == record["answer"]
               for record in test)
    return 100.0 * hits / len(test)


def config_dict(out: Path, data_entry: dict, *, max_steps: int, eval_every: int, eval_samples: int) -> dict:
    """The training config: micro's trainable modules on the records, with in-loop evaluation on the test split."""
    return {
        "model": {"pretrained": "micro"},
        "data": [{**data_entry, "batch_size": 16, "max_tokens": 192, "num_workers": 0}],
        "optim": {"lr": 2e-3, "weight_decay": 0.0},
        "schedule": {"kind": "cosine", "warmup_steps": min(20, max(1, max_steps // 5)), "min_lr_ratio": 0.1},
        "run": {"output_dir": str(out / "run"), "max_steps": max_steps, "save_every": 0, "log_every": 10,
                "report_to": None, "seed": 0},
        "eval": {"every": eval_every, "tasks": ["custom"], "custom_kind": "vqa", "data_dir": str(out / "task"),
                 "shots": [0], "num_samples": eval_samples, "batch_size": 25, "keep_best": True},
    }


def write_example(out: str | Path, *, max_steps: int = 400, eval_every: int = 50, eval_samples: int = 100,
                  num_train: int = 1000, num_test: int = 200) -> Path:
    """Write the task, the training records and ``out/config.yaml``; return the config's path."""
    out = Path(out).resolve()
    task = write_task(out / "task", num_train=num_train, num_test=num_test)
    _, snippet = write_task_records("custom", custom_kind="vqa", data_dir=task, split="train", shots=[0, 2],
                                    output=out / "train-records.jsonl")
    (entry,) = yaml.safe_load(snippet.read_text())
    config = config_dict(out, entry, max_steps=max_steps, eval_every=eval_every, eval_samples=eval_samples)
    path = out / "config.yaml"
    atomic_write_text(path, f"# Written by python -m flamingo_train.micro_example.\n# Run: flamingo-train --config "
                            f"{path}\n" + yaml.safe_dump(config, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for the task, records and config")
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--eval-every", type=int, default=50)
    args = parser.parse_args(argv)
    config = write_example(args.out, max_steps=args.max_steps, eval_every=args.eval_every)
    out = args.out
    print(f"wrote {out}/task (train.jsonl, test.jsonl, images/), {out}/train-records.jsonl and {config}")
    print(f"  flamingo-train --config {config}")
    print(f"  flamingo-eval run --model {out}/run/best --tasks custom --custom-kind vqa --data-dir {out}/task "
          f"--shots 0 4 --output {out}/results.json")


if __name__ == "__main__":
    main()
