"""Task data -> training records laid out exactly as the evaluation prompts them: one template, two uses.

A record is one evaluation prompt of the task at a given number of shots (``TaskSpec.prompt``, the call the
evaluation runner makes) followed by the query's answer and ``<|endofchunk|>``, in the ``simple`` format
(:mod:`flamingo_train.data.formats`)::

    {"text": "<image>Output:A dog on the grass.<|endofchunk|>\\n<image>Output:A red bus on a street.<|endofchunk|>",
     "images": ["images/train_7.jpg", "images/train_0.jpg"], "id": "train-0", "shots": 1}

* The demos are drawn from the same split as the query (the training pool), never the query itself nor another
  example of the query's image (whose answer could be read off it); each demo is ``template(answer) +
  <|endofchunk|> + demo_separator``, as the evaluation shows it.
* 0 shots follows the evaluation's 0-shot convention: ``zero_shot_text_demos`` text-only demos (their ``<image>``
  removed), then the query, so the record has one image.
* The query's answer is its most common reference (VQA's consensus answer; the first caption when all differ), or the
  class name for a classification task.
* Images are written relative to the output file's folder (``absolute_paths=True``: absolute).
* The draw for (seed, shots, example index) is fixed, whatever the order or the other shot counts.

The ``simple`` loader keeps the separator after each ``<|endofchunk|>``, so a record's tokens are the evaluation
prompt's tokens up to the answer (``tests/test_task_templates.py``). Beside the JSONL a data-config entry is written
(``train.jsonl`` -> ``train.data.yaml``) with ``format: simple`` and ``labels: last_answer``: only the query's answer
is trained, the text after the template's own answer marker (``Short answer:``); see
:mod:`flamingo_train.data.samples`.

Usage::

    python -m flamingo_train.task_data --task custom --custom-kind vqa --data-dir DIR --split train \\
        --shots 0,2,4 --output train.jsonl [--seed 0] [--path KEY=FILE] [--demo-separator '\\n'] \\
        [--zero-shot-text-demos 2] [--absolute-paths]

Tiny CPU run (fixture data in every benchmark's official format, a second or two)::

    python -m flamingo_eval.testing /tmp/fx
    python -m flamingo_train.task_data --task custom --custom-kind caption --data-dir /tmp/fx --shots 0 2 \\
        --output /tmp/fx/caption-train.jsonl

Benchmarks read by ``flamingo_eval.data.load_task_data`` work the same way (``--task vqav2 --data-dir /data``;
``--split train`` is the demo pool the evaluation draws from). Binding episodes carry their own demos and are not
converted here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN
from flamingo_eval.data import load_task_data
from flamingo_eval.prompts import TaskSpec
from flamingo_eval.tasks import custom_kinds, get_task, get_task_spec, task_names

SPLITS = {"train": "support", "test": "query"}  # --split -> the TaskData field (the evaluation's names)
LABELS = "last_answer"  # what the written data-config entry trains: the query's answer only


def answer_marker(spec: TaskSpec) -> str:
    """The template's text just before ``{answer}``, after its last field or ``<image>``: ``"Short answer:"`` for
    VQA, ``"Output:"`` for captions. Answer labels train what follows it."""
    if not spec.template.endswith("{answer}"):
        raise ValueError(f"Task {spec.name!r}: template {spec.template!r} must end with {{answer}}; a training record "
                         "is the evaluation prompt followed by the answer.")
    head = spec.template[: -len("{answer}")]
    marker = head.rsplit("}", 1)[-1].rsplit(MEDIA_TOKEN, 1)[-1].strip()
    if not marker:
        raise ValueError(f"Task {spec.name!r}: template {spec.template!r} has no text before {{answer}} to mark it.")
    return marker


def query_answer(spec: TaskSpec, example) -> str:
    """The answer a record trains for ``example``: its most common reference, or its class name."""
    if spec.kind in ("classification", "binding"):
        return spec.demo_answer(example)
    answers = [a.strip() for a in example.answers if a.strip()]
    if not answers:
        raise ValueError(f"Task {spec.name!r}: example {example.id!r} has no answer/caption to train.")
    # Counter.most_common keeps first-seen order among ties: the first caption when every caption differs.
    return Counter(answers).most_common(1)[0][0]


class DemoPool:
    """The split's examples as a demo pool: ``draw(index, k, ...)`` gives ``examples[index]``'s demos."""

    def __init__(self, examples: Sequence):
        self.examples = list(examples)
        self.per_image = Counter(e.image for e in self.examples)

    def draw(self, index: int, k: int, *, seed: int, shots: int) -> list:
        """``k`` demos without replacement, none showing the query's image; fixed by (seed, shots, index). ``shots``
        is the record's shot count (0 draws the text-only demos), so each count gets its own draw."""
        own = self.examples[index].image
        available = len(self.examples) - self.per_image[own]
        if available < k:
            raise ValueError(f"Example {self.examples[index].id!r} needs {k} demos but only {available} examples of "
                             "its split show another image.")
        rng = np.random.default_rng([seed, shots, index])
        chosen, seen = [], {index}
        # Rejection sampling: a few draws per demo, where a candidate list without the query's image would cost a
        # pass over the whole split per example (443k VQAv2 questions).
        while len(chosen) < k:
            j = int(rng.integers(len(self.examples)))
            if j not in seen:
                seen.add(j)
                if self.examples[j].image != own:
                    chosen.append(self.examples[j])
        return chosen


def task_record(spec: TaskSpec, demos: Sequence, query, *, zero_shot: bool) -> dict:
    """``{"text", "images"}``: the evaluation prompt for (demos, query) + the query's answer + ``<|endofchunk|>``.
    Images are the examples' own paths as strings (the evaluation's image list: the demos' unless ``zero_shot``,
    then the query's)."""
    text = spec.prompt(demos, query, zero_shot=zero_shot) + query_answer(spec, query) + END_OF_CHUNK_TOKEN
    images = ([] if zero_shot else [d.image for d in demos]) + [query.image]
    return {"text": text, "images": [str(image) for image in images]}


def task_records(spec: TaskSpec, examples: Sequence, *, shots: Sequence[int], seed: int = 0) -> Iterator[dict]:
    """One record per (example, shot count), example by example, each with its ``id`` and ``shots``."""
    if spec.kind == "binding":
        raise ValueError(f"Task {spec.name!r} is episodic (binding): its demos come with each episode; there is no "
                         "pool to draw them from.")
    answer_marker(spec)  # the template must end with {answer}
    pool = DemoPool(examples)
    for index, example in enumerate(pool.examples):
        for k in shots:
            demos = pool.draw(index, k or spec.zero_shot_text_demos, seed=seed, shots=k)
            record = task_record(spec, demos, example, zero_shot=k == 0)
            yield {**record, "id": str(example.id), "shots": k}


def data_config_entry(spec: TaskSpec, output: Path, *, name: str, shots: Sequence[int],
                      image_root: Path | None = None) -> dict:
    """The ``data:`` entry of a training config that reads ``output`` as the evaluation lays it out; ``image_root``
    when the images are not inside ``output``'s folder."""
    entry = {
        "name": name,
        "path": str(Path(output).resolve()),
        "format": "simple",
        "labels": LABELS,
        "answer_markers": [answer_marker(spec)],
        "max_images": max(1, max(shots) + 1),  # every demo image and the query's
    }
    if image_root is not None:
        entry["image_root"] = str(image_root)
    return entry


def write_task_records(
    task: str,
    *,
    output: Path,
    shots: Sequence[int],
    data_dir: Path | None = None,
    paths: dict[str, str] | None = None,
    custom_kind: str | None = None,
    split: str = "train",
    seed: int = 0,
    demo_separator: str | None = None,
    zero_shot_text_demos: int | None = None,
    absolute_paths: bool = False,
) -> tuple[Path, Path]:
    """Read ``task``'s ``split`` (``flamingo_eval.data.load_task_data``), write its records to ``output`` (JSONL)
    and the data-config entry to ``<output stem>.data.yaml``; returns both paths. ``demo_separator`` and
    ``zero_shot_text_demos`` override the task's own, as the same flamingo-eval options do: set them as the
    evaluation run does, or the records will not be its prompts."""
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {sorted(SPLITS)}, got {split!r}.")
    if not shots or any(k < 0 for k in shots):
        raise ValueError(f"--shots must be one or more counts >= 0, got {list(shots)}.")
    output = Path(output)
    data = load_task_data(task, data_dir=data_dir, paths=paths, custom_kind=custom_kind)
    spec = get_task_spec(task, custom_kind=custom_kind, class_names=data.class_names)
    if demo_separator is not None:
        spec = replace(spec, demo_separator=demo_separator)
    if zero_shot_text_demos is not None:  # 0: a 0-shot record is the query alone
        if zero_shot_text_demos < 0:
            raise ValueError(f"--zero-shot-text-demos must be >= 0, got {zero_shot_text_demos}.")
        spec = replace(spec, zero_shot_text_demos=zero_shot_text_demos)
    examples = getattr(data, SPLITS[split])
    # Training confines image paths to the data root (flamingo.file_access.confined_path): the output's folder when
    # every image is inside it, else the images' common folder, which the data entry names as image_root.
    folder = output.resolve().parent
    images = {Path(example.image).resolve() for example in examples}
    image_root = None if all(folder in image.parents for image in images) else Path(
        os.path.commonpath([str(image.parent) for image in images]))

    def image_path(image) -> str:
        image = Path(image).resolve()
        return str(image) if absolute_paths else os.path.relpath(image, image_root or folder)

    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    count, longest = 0, 0
    try:  # a bad example half-way leaves no half-written file behind
        with open(temporary, "w", encoding="utf-8") as file:
            for record in task_records(spec, examples, shots=shots, seed=seed):
                record["images"] = [image_path(image) for image in record["images"]]
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
                count, longest = count + 1, max(longest, len(record["text"]))
        os.replace(temporary, output)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise

    label = get_task(task, custom_kind=custom_kind).label
    name = task if custom_kind is None or not custom_kinds(task) else f"{task}-{custom_kind}"
    entry = data_config_entry(spec, output, name=name, shots=shots, image_root=image_root)
    header = (
        f"# flamingo-train data entry for {output.name}: {count} records of {label} ({split} split) at shots "
        f"{','.join(map(str, shots))}, seed {seed},\n# written by flamingo_train.task_data. Paste it under `data:`. "
        f"labels: {LABELS} trains the query's answer only.\n# Longest record: {longest} characters; raise max_tokens "
        "(default 256) if queries get cut: such records are skipped as 'empty'.\n"
    )
    snippet = output.with_suffix(".data.yaml")
    snippet.write_text(header + yaml.safe_dump([entry], sort_keys=False, allow_unicode=True), encoding="utf-8")
    return output, snippet


def parse_shots(values: Sequence[str]) -> list[int]:
    """``["0,2,4"]`` or ``["0", "2", "4"]`` -> ``[0, 2, 4]``."""
    try:
        return [int(v) for value in values for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--shots takes whole numbers (0,2,4 or 0 2 4), got {' '.join(values)!r}") from None


def build_parser(prog: str = "python -m flamingo_train.task_data") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", required=True, choices=task_names(), help="a flamingo-eval task")
    parser.add_argument("--custom-kind", choices=[k for k in custom_kinds() if k != "binding"], default=None,
                        help="what --task custom holds")
    parser.add_argument("--data-dir", type=Path, default=None, help="the task's folder (flamingo_eval.data layout)")
    parser.add_argument("--path", action="append", default=[], metavar="KEY=FILE", help="override one data file")
    parser.add_argument("--split", choices=sorted(SPLITS), default="train", help="which split becomes records")
    parser.add_argument("--shots", nargs="+", required=True, help="shot counts: 0,2,4 or 0 2 4")
    parser.add_argument("--seed", type=int, default=0, help="fixes every record's demos")
    parser.add_argument("--output", type=Path, required=True, help="the JSONL file to write")
    parser.add_argument("--demo-separator", default=None,
                        help="as flamingo-eval's (escapes decoded: '\\n'); default: the task's own")
    parser.add_argument("--zero-shot-text-demos", type=int, default=None,
                        help="text-only demos of a 0-shot record, as flamingo-eval's; default: the task's own (2)")
    parser.add_argument("--absolute-paths", action="store_true", help="write absolute image paths")
    return parser


def main(argv: list[str] | None = None, *, prog: str = "python -m flamingo_train.task_data") -> int:
    """The command; ``prog`` names it in usage and errors (``flamingo-train convert-task`` as a subcommand)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        shots = parse_shots(args.shots)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    separator = args.demo_separator
    if separator is not None:
        from flamingo_eval.cli import parse_escapes

        try:
            separator = parse_escapes(separator)
        except argparse.ArgumentTypeError as error:
            parser.error(f"--demo-separator: {error}")
    try:
        paths = {}
        for item in args.path:
            key, equals, value = item.partition("=")
            if not equals:
                raise ValueError(f"--path {item!r}: expected KEY=FILE.")
            paths[key] = value
        output, snippet = write_task_records(
            args.task, output=args.output, shots=shots, data_dir=args.data_dir, paths=paths or None,
            custom_kind=args.custom_kind, split=args.split, seed=args.seed, demo_separator=separator,
            zero_shot_text_demos=args.zero_shot_text_demos, absolute_paths=args.absolute_paths,
        )
    except ValueError as error:
        # Bad inputs end with one line naming the file, field or example, as flamingo-eval's do.
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"records: {output}\ndata config entry: {snippet}")
    print(snippet.read_text(encoding="utf-8"), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
