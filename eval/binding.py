"""In-context word binding (Frozen, Tsimpoukelli et al. 2021; Flamingo's "fast binding"): episodic few-shot tasks.

Each episode binds made-up words to images in its own demos; the query image must be named with the word its
demos bound to that kind of image. Run it as ``flamingo-eval run --tasks custom --custom-kind binding --data-dir
DIR ...``.

Data: ``DIR/test.jsonl`` (the queries) and optionally ``DIR/train.jsonl`` (read and checked like the test file,
never used for demos). One episode per line, images relative to the jsonl file::

    {"id": "ep0", "demos": [{"image": "a.png", "word": "dax"}, {"image": "b.png", "word": "blicket"}, ...],
     "image": "q.png", "answer": "dax", "choices": ["dax", "blicket"]}

``id`` defaults to the line's index among the file's records; ``choices`` defaults to the distinct demo words in
order of first appearance and must hold ``answer``.

Demos: k shots = the episode's own first k demos, in file order (no support pool, no RICES); 0 shots = the query
alone. Prompt (``flamingo_eval.prompts``)::

    <image>This is a dax.<|endofchunk|>\\n<image>This is a blicket.<|endofchunk|>\\n<image>This is a

Decoding: every choice is scored by the mean per-token log-probability of its continuation " {word}." after the
prompt (``candidate_log_probs``, the KV-cached path of rank classification, with each episode's own choices);
the prediction is the best choice and the metric is accuracy. With two choices, 0-shot accuracy is chance by
construction: nothing in the query says which word is which.

Predictions file: ``[{"id", "prediction": word, "answer": word}]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .files import Example, TaskData, field_of, read_jsonl_lines
from .kinds import Kind, records_by_id
from .official import id_key
from .prompts import binding_continuation


# ------------------------------------------------------------------------------------------------ reading
def _words(value: Any, where: str, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(w, str) and w.strip() for w in value):
        raise ValueError(f"{where}: field {key!r} should be a non-empty list of non-empty strings, got {value!r}")
    return tuple(value)


def _image(path: Path, value: str, where: str) -> Path:
    image = path.parent / value
    if not image.is_file():
        raise ValueError(f"{where}: image {image} (field 'image') not found")
    return image


def read_episodes(path: Path, what: str) -> list[Example]:
    """The episodes of one jsonl file as query Examples: ``answers=(answer,)``, ``choices``, and ``demos`` (Examples
    with ``answers=(word,)``). Every image is checked, since an episode's demos are few and all of them are used."""
    episodes = []
    for index, (number, record) in enumerate(read_jsonl_lines(path, what)):
        episode_id = record.get("id", index)
        where = f"{path}, line {number} (episode {episode_id!r})"
        demos = []
        for j, demo in enumerate(field_of(record, "demos", where, list)):
            demo_where = f"{where}, demos[{j}]"
            word = field_of(demo, "word", demo_where, str)
            if not word.strip():
                raise ValueError(f"{demo_where}: field 'word' is empty")
            image = _image(path, field_of(demo, "image", demo_where, str), demo_where)
            demos.append(Example(id=f"{episode_id}/demo{j}", image=image, answers=(word,)))
        image = _image(path, field_of(record, "image", where, str), where)
        answer = field_of(record, "answer", where, str)
        if "choices" in record:
            choices = _words(record["choices"], where, "choices")
        else:
            choices = tuple(dict.fromkeys(d.answers[0] for d in demos))
            if not choices:
                raise ValueError(f"{where}: no 'choices' and no demos to take the words from")
        if answer not in choices:
            raise ValueError(f"{where}: field 'answer' {answer!r} is not among the choices {list(choices)}")
        episodes.append(Example(id=episode_id, image=image, answers=(answer,), choices=choices, demos=tuple(demos)))
    return episodes


def read_binding(layout: dict[str, Path | None]) -> TaskData:
    """``test_jsonl`` is the query split; ``train_jsonl`` (optional: "" or absent) is read and checked the same way
    and becomes the support split, which binding never draws demos from."""
    query = read_episodes(layout["test_jsonl"], "test_jsonl")
    train = layout.get("train_jsonl")
    support = read_episodes(train, "train_jsonl") if train is not None and train.is_file() else []
    return TaskData(task="custom", support=support, query=query)


# ------------------------------------------------------------------------------------------------ demos
class EpisodeDemos:
    """The first k demos of the query's own episode, in file order; the sampler interface of ``flamingo_eval.demos``.

    source: the query file, named in the error for an episode shorter than k.
    """

    def __init__(self, source: Path | str | None):
        self.source = source

    def select(self, *, query_index: int, query: Example, k: int) -> list[Example]:
        if k > len(query.demos):
            raise ValueError(
                f"{self.source}: episode {query.id!r} has {len(query.demos)} demos; {k} shots need at least {k}"
            )
        return list(query.demos[:k])


# ------------------------------------------------------------------------------------------------ the kind
def rank_choices(model, tokenizer, *, prompts: list[str], media, queries: Sequence[Example], class_batch_size: int = 8):
    """(B lists) mean per-token log-probability of " {word}." after each prompt, for each query's own choices."""
    # Imported here: the scoring needs torch, and the task registry (read by the command lines) must load without it.
    from .classification import candidate_log_probs, continuation_token_ids

    candidates = [
        continuation_token_ids(tokenizer, prompt, [binding_continuation(w) for w in q.choices])
        for prompt, q in zip(prompts, queries)
    ]
    return candidate_log_probs(
        model, tokenizer, prompts=prompts, media=media, candidates=candidates, class_batch_size=class_batch_size
    )


@dataclass(frozen=True)
class Binding(Kind):
    """Episodic word binding: rank each episode's choices; records ``{"id", "prediction", "answer"}``; accuracy."""

    name: ClassVar[str] = "binding"
    episodic: ClassVar[bool] = True

    @property
    def metric(self) -> str:
        return "accuracy"

    def predict(self, model, tokenizer, *, prompts, media, spec, queries, class_batch_size: int) -> list[dict]:
        scores = rank_choices(
            model, tokenizer, prompts=prompts, media=media, queries=queries, class_batch_size=class_batch_size
        )
        out = []
        for q, row in zip(queries, scores):
            best = int(row.argmax())
            out.append({"prediction": q.choices[best], "log_probs": [float(s) for s in row]})
        return out

    def prediction_record(self, example: Example, output: Any) -> dict:
        return {"id": example.id, "prediction": str(output), "answer": example.answers[0]}

    def score_records(self, records, examples, *, stem: bool) -> dict[str, float]:
        by_id = records_by_id(records, examples, self.name)
        correct = sum(1 for e in examples if by_id[id_key(e.id)]["prediction"] == e.answers[0])
        return {"accuracy": 100.0 * correct / len(examples)}

    def episode_demos(self, data: TaskData) -> EpisodeDemos:
        return EpisodeDemos(data.files.get("test_jsonl"))
