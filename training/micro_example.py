"""The README's fine-tuning example: a custom VQA task -> fine-tune the micro model -> evaluate, on a CPU.

The task is a question the micro model was never asked: **"what is this?"** about a one-object scene of the micro
world, answered with the object's kind, ``"red star"`` (30 kinds: 6 colours x 5 shapes). The micro model knows the
words from its captions and VQA, but not this question or answer format (it scores 0% before fine-tuning). The
images matter: the question text is always the same, so without them the best answer is the most common kind, right
for a few percent of the questions, and so is any answer given another scene's image.

Run::

    python -m flamingo_train.micro_example --out runs/what-is-this    # task data, training records, config
    flamingo-train --config runs/what-is-this/config.yaml               # 150 steps; held-out accuracy every 10
    flamingo-eval run --model runs/what-is-this/run/best --tasks custom --custom-kind vqa \\
        --data-dir runs/what-is-this/task --shots 0 4 --output runs/what-is-this/results.json

What it writes under ``--out``:

* ``task/``: the task in ``flamingo-eval``'s custom VQA layout (``train.jsonl``, the demo and training pool, from the
  world's train split; ``test.jsonl``, held-out scenes of its test split; ``images/``);
* ``train-records.jsonl`` (+ ``.data.yaml``): the training pool as the evaluation prompts it, at 0 and 2 shots
  (``flamingo-train convert-task``), trained on the query's answer only;
* ``config.yaml``: continue from ``micro`` at a low learning rate (:func:`config_dict` says why), evaluate on 100
  held-out questions every 10 steps (the score is in the progress bar and ``run/metrics.jsonl``), keep the best model
  in ``run/best`` and draw ``run/metrics.png``.

The loss does not fall to 0: it flattens at about 0.32 with every answer right, because micro's LM, frozen, cannot
put much more than 0.6 on any one colour or shape word (:func:`loss_floor` computes that floor).
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
from flamingo.tokens import END_OF_CHUNK_TOKEN
from flamingo_eval.files import read_jsonl
from flamingo_eval.prompts import VQA_TEMPLATE
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


def loss_floor(model, processor, answers: list[str], *, steps: int = 200) -> float:
    """The lowest mean loss per trained token that any Flamingo on ``model``'s frozen LM can reach on ``answers``.

    The trained tokens are each answer's and its ``<|endofchunk|>`` (``labels: last_answer``), weighted as the loss
    weights them. The LM ends in ``logits = W @ RMSNorm(h)`` (micro's LM is a Llama), all frozen: RMSNorm fixes the
    hidden state's length, so whatever the cross-attention adds to ``h``, one word's logit can only lead its
    neighbours' (the other colours) by so much. For each trained token this finds, by gradient ascent, the ``h``
    that gives it the highest probability; the floor is the mean of ``-log`` of those. A model that ranks every
    answer first but sits at this loss has learnt all that the frozen LM lets it express.
    """
    import torch  # here: the example's CLI writes files only, and answers --help without torch

    lm = model.lang_model
    tokenizer = processor.tokenizer
    prompt = VQA_TEMPLATE.format(question=QUESTION, answer="")
    context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    targets = []
    for answer in answers:
        ids = tokenizer(prompt + answer + END_OF_CHUNK_TOKEN, add_special_tokens=False)["input_ids"]
        if ids[: len(context)] != context:
            raise ValueError(f"{answer!r} does not tokenize as a continuation of the prompt {prompt!r}.")
        targets += ids[len(context) :]
    tokens, counts = torch.tensor(targets).unique(return_counts=True)
    hidden = torch.randn(len(tokens), lm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    hidden.requires_grad_(True)
    optimizer = torch.optim.Adam([hidden], lr=0.2)
    for _ in range(steps):
        log_probs = lm.get_output_embeddings()(lm.model.norm(hidden)).float().log_softmax(-1)
        loss = -log_probs.gather(1, tokens[:, None]).sum()
        (hidden.grad,) = torch.autograd.grad(loss, [hidden])  # the model's own .grad stay untouched
        optimizer.step()
    with torch.no_grad():
        log_probs = lm.get_output_embeddings()(lm.model.norm(hidden)).float().log_softmax(-1)
        best = -log_probs.gather(1, tokens[:, None]).squeeze(1)
    return float((best * counts).sum() / counts.sum())


def config_dict(out: Path, data_entry: dict, *, max_steps: int, eval_every: int, eval_samples: int) -> dict:
    """The training config: micro's trainable modules on the records, with in-loop evaluation on the test split.

    The learning rate is low on purpose. micro already sees colours and shapes and has the words; what it learns here
    is a new question and answer format, and at 2e-3 it learns that in about 10 steps, so the held-out accuracy is a
    step from 0 to 100% between two evaluations. At 1e-4, constant after a short warmup, it climbs over about 50 steps
    (docs/training.md has the curves of three seeds).
    """
    return {
        "model": {"pretrained": "micro"},
        "data": [{**data_entry, "batch_size": 16, "max_tokens": 192, "num_workers": 0}],
        "optim": {"lr": 1e-4, "weight_decay": 0.0},
        "schedule": {"kind": "constant", "warmup_steps": min(10, max(1, max_steps // 5))},
        "run": {"output_dir": str(out / "run"), "max_steps": max_steps, "save_every": 0, "log_every": 10,
                "report_to": None, "seed": 0},
        "eval": {"every": eval_every, "tasks": ["custom"], "custom_kind": "vqa", "data_dir": str(out / "task"),
                 "shots": [0], "num_samples": eval_samples, "batch_size": 25, "keep_best": True},
    }


def write_example(out: str | Path, *, max_steps: int = 150, eval_every: int = 10, eval_samples: int = 100,
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
    parser = argparse.ArgumentParser(
        prog="python -m flamingo_train.micro_example", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="directory for the task, records and config")
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args(argv)
    config = write_example(args.out, max_steps=args.max_steps, eval_every=args.eval_every)
    out = args.out
    print(f"wrote {out}/task (train.jsonl, test.jsonl, images/), {out}/train-records.jsonl and {config}")
    print(f"  flamingo-train --config {config}")
    print(f"  flamingo-eval run --model {out}/run/best --tasks custom --custom-kind vqa --data-dir {out}/task "
          f"--shots 0 4 --output {out}/results.json")


if __name__ == "__main__":
    main()
