"""Task kinds: the behaviour tasks share, once per kind -- how answers are decoded, written and scored.

A :class:`flamingo_eval.tasks.Task` holds one kind object; generic code (runner, score) asks it, never a task name::

    kind.predict(model, tokenizer, prompts=..., media=..., spec=..., queries=..., class_batch_size=8)
        -> [{"prediction": ..., ...}] per query          (generate, or rank candidates by mean token log-prob)
    kind.prediction_record(example, kind.output(record)) -> one record of the official results format
    kind.score_records(records, examples, stem=...)      -> {metric: %}, against the loaded query examples
    kind.score_files(predictions, annotations, questions, subset=..., stem=...) -> {metric: %}, official files

Both scorers may report more than ``{metric: %}``: VQA adds which accuracy rule applied (``"vqa_rule"``,
``"vqa_rule_counts"``; ``flamingo_eval.metrics.vqa``). Custom tasks score files too: their ``reference_file`` reads
the annotations from the task's own ``test.jsonl`` (``flamingo_eval.readers``) instead of an official format.

Kinds here: :class:`Captioning` (CIDEr), :class:`Vqa` (VQA accuracy, OK-VQA stemming by ``stem``) and
:class:`Classification` (top-1 accuracy, or ROC-AUC of one class's probability). Binding (episodic word binding)
is ``flamingo_eval.binding.Binding``. Per-task variations (COCO's ids, VizWiz's "image" key, HatefulMemes' "yes")
are fields of the kind object, so two tasks of one kind differ only in data.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from .files import Example
from .metrics import cider, roc_auc, vqa_accuracy
from .metrics.vqa import vqa_rule
from .official import caption_references, check_ids, id_key, jsonl_labels, predictions_by_id, vqa_answers


class Kind:
    """The interface every kind implements; defaults for kinds that draw demos from the support pool."""

    name: ClassVar[str]
    episodic: ClassVar[bool] = False  # True: each query carries its own demos (Example.demos), no support pool

    @property
    def metric(self) -> str:
        """The key ``score_records`` / ``score_files`` report: "cider" | "accuracy" | "roc_auc"."""
        raise NotImplementedError

    @property
    def scores_files(self) -> bool:
        """Whether ``score_files`` reads an official annotation format for this kind."""
        return False

    def predict(self, model, tokenizer, *, prompts, media, spec, queries, class_batch_size: int) -> list[dict]:
        raise NotImplementedError

    def output(self, record: dict) -> Any:
        """The value of a runner record (one query's ``predict`` output) that ``prediction_record`` takes."""
        return record["prediction"]

    def prediction_record(self, example: Example, output: Any) -> dict:
        raise NotImplementedError

    def has_references(self, examples: Sequence[Example]) -> bool:
        """Whether ``examples`` carry what the metric compares against (a test-dev export has no answers)."""
        return all(e.answers for e in examples)

    def score_records(self, records: list[dict], examples: Sequence[Example], *, stem: bool) -> dict[str, float]:
        raise NotImplementedError

    def score_files(self, predictions: Path, annotations: Path, questions: Path | None, *, subset: bool, stem: bool):
        raise ValueError(f"{self.name} predictions have no official annotation format to score against")

    def episode_demos(self, data):
        """A demo sampler over each query's own episode, or None: demos come from the support pool."""
        return None


def _generate(model, tokenizer, **kwargs) -> list[dict]:
    # Imported here, not at the top: generation needs torch and transformers, and the task registry (which the
    # command lines read for their choices) must load without them.
    from .generation import generate_answers

    return generate_answers(model, tokenizer, **kwargs)


def records_by_id(records: list[dict], examples: Sequence[Example], what: str) -> dict[str, dict]:
    """id -> record, or a ValueError naming some examples that have no record."""
    by_id = {id_key(r["id"]): r for r in records}
    missing = [e.id for e in examples if id_key(e.id) not in by_id]
    if missing:
        raise ValueError(f"score_records({what!r}): no prediction for {len(missing)} example(s), e.g. {missing[:5]}")
    return by_id


def references_by_id(examples: Sequence[Example], path: Path) -> dict[str, list[str]]:
    """id -> reference answers of the examples read from annotation file ``path``; ids must be unique."""
    references: dict[str, list[str]] = {}
    for example in examples:
        key = id_key(example.id)
        if key in references:
            raise ValueError(f"{path}: id {example.id!r} appears more than once; every scored item needs its own id")
        if not example.answers:
            raise ValueError(f"{path}: item {example.id!r} has no reference answers to score against")
        references[key] = list(example.answers)
    if not references:
        raise ValueError(f"{path}: no records to score against")
    return references


@dataclass(frozen=True)
class Captioning(Kind):
    """Generated captions, ``[{"image_id", "caption"}]``, scored by CIDEr-D.

    cocoid: Karpathy-split ids are the ``cocoid`` (COCO), else the file name's stem (Flickr30K).
    reference_file: ``path -> [Example]`` reading the annotation file ``score_files`` takes (custom: the task's
        ``test.jsonl``); None: a COCO-format captions file or a Karpathy split file.
    """

    cocoid: bool = False
    reference_file: Callable[[Path], list[Example]] | None = None
    name: ClassVar[str] = "caption"

    @property
    def scores_files(self) -> bool:
        return True

    @property
    def metric(self) -> str:
        return "cider"

    def predict(self, model, tokenizer, *, prompts, media, spec, queries, class_batch_size: int) -> list[dict]:
        return _generate(model, tokenizer, prompts=prompts, media=media, spec=spec)

    def prediction_record(self, example: Example, output: Any) -> dict:
        return {"image_id": example.id, "caption": str(output)}

    def score_records(self, records, examples, *, stem: bool) -> dict[str, float]:
        return {"cider": cider({id_key(r["image_id"]): r["caption"] for r in records},
                               {id_key(e.id): list(e.answers) for e in examples})}

    def score_files(self, predictions, annotations, questions, *, subset: bool, stem: bool) -> dict[str, float]:
        if self.reference_file is None:
            references = caption_references(annotations, cocoid=self.cocoid)
        else:
            references = references_by_id(self.reference_file(Path(annotations)), annotations)
        captions = predictions_by_id(predictions, ["image_id"], ["caption"], str)
        references = check_ids(captions, references, predictions, annotations, subset=subset)
        return {"cider": cider(captions, references)}


@dataclass(frozen=True)
class Vqa(Kind):
    """Generated short answers, ``[{"question_id", "answer"}]``, scored by the official VQA accuracy.

    image_key: records also carry ``"image"`` (= the id), the key VizWiz's server reads; the scorer reads either.
    reference_file: ``path -> [Example]`` reading the annotation file ``score_files`` takes (custom: the task's
        ``test.jsonl``, questions included); None: the VQA v2 / OK-VQA, TextVQA or VizWiz annotation formats.

    Scores carry the accuracy rule beside the accuracy: ``{"accuracy", "vqa_rule", "vqa_rule_counts"}``.
    """

    image_key: bool = False
    reference_file: Callable[[Path], list[Example]] | None = None
    name: ClassVar[str] = "vqa"

    @property
    def scores_files(self) -> bool:
        return True

    @property
    def metric(self) -> str:
        return "accuracy"

    def predict(self, model, tokenizer, *, prompts, media, spec, queries, class_batch_size: int) -> list[dict]:
        return _generate(model, tokenizer, prompts=prompts, media=media, spec=spec)

    def prediction_record(self, example: Example, output: Any) -> dict:
        if self.image_key:
            return {"question_id": example.id, "image": example.id, "answer": str(output)}
        return {"question_id": example.id, "answer": str(output)}

    def score_records(self, records, examples, *, stem: bool) -> dict:
        answers = {id_key(e.id): list(e.answers) for e in examples}
        accuracy = vqa_accuracy({id_key(r["question_id"]): r["answer"] for r in records}, answers, stem=stem)
        return {"accuracy": accuracy, **vqa_rule(answers)}

    def score_files(self, predictions, annotations, questions, *, subset: bool, stem: bool) -> dict:
        if stem:  # a missing stemming package is a setup error: one line, as for a bad file
            from .metrics.okvqa_stem import require_stem_backend

            require_stem_backend()
        if self.reference_file is None:
            answers = vqa_answers(annotations, Path(questions) if questions is not None else None)
        elif questions is not None:
            raise ValueError(f"questions file {questions}: not read here, the annotation records carry their questions")
        else:
            answers = references_by_id(self.reference_file(Path(annotations)), annotations)
        id_keys = ["question_id", "image"] if self.image_key else ["question_id"]
        predicted = predictions_by_id(predictions, id_keys, ["answer"], str)
        answers = check_ids(predicted, answers, predictions, annotations, subset=subset)
        return {"accuracy": vqa_accuracy(predicted, answers, stem=stem), **vqa_rule(answers)}


@dataclass(frozen=True)
class Classification(Kind):
    """Rank classification over the spec's ``class_names``.

    positive: None -- records ``[{"id", "prediction": class index, "label"}]``, top-1 accuracy (ImageNet, custom).
    A class name ("yes" for HatefulMemes) -- records ``[{"id", "score": P(positive), "label"}]`` (the probability
    softmaxed over the class names, as OpenFlamingo scores HatefulMemes), ROC-AUC, and a jsonl of ``{"id",
    "label"}`` lines as the official annotation file.
    """

    positive: str | None = None

    name: ClassVar[str] = "classification"

    @property
    def scores_files(self) -> bool:
        return self.positive is not None

    @property
    def metric(self) -> str:
        return "accuracy" if self.positive is None else "roc_auc"

    def predict(self, model, tokenizer, *, prompts, media, spec, queries, class_batch_size: int) -> list[dict]:
        from .classification import class_log_probs  # torch: imported when a model runs, not with the registry

        scores = class_log_probs(
            model, tokenizer, prompts=prompts, media=media, class_names=spec.class_names, class_batch_size=class_batch_size
        )
        probs = scores.softmax(-1)  # over the class names
        out = [{"prediction": int(row.argmax()), "probability": float(prob.max())} for row, prob in zip(scores, probs)]
        if self.positive is not None:
            for o, prob in zip(out, probs):
                o["score"] = float(prob[spec.class_names.index(self.positive)])
        return out

    def output(self, record: dict) -> Any:
        return record["prediction"] if self.positive is None else record["score"]

    def prediction_record(self, example: Example, output: Any) -> dict:
        if self.positive is None:
            return {"id": example.id, "prediction": output, "label": example.label}
        return {"id": example.id, "score": float(output), "label": example.label}

    def has_references(self, examples) -> bool:
        return True  # every reader of a classification task requires the labels

    def score_records(self, records, examples, *, stem: bool) -> dict[str, float]:
        by_id = records_by_id(records, examples, self.name)
        if self.positive is not None:
            return {"roc_auc": roc_auc([e.label for e in examples], [by_id[id_key(e.id)]["score"] for e in examples])}
        correct = sum(1 for e in examples if by_id[id_key(e.id)]["prediction"] == by_id[id_key(e.id)]["label"])
        return {"accuracy": 100.0 * correct / len(examples)}

    def score_files(self, predictions, annotations, questions, *, subset: bool, stem: bool) -> dict[str, float]:
        if self.positive is None:
            return super().score_files(predictions, annotations, questions, subset=subset, stem=stem)
        labels = jsonl_labels(annotations)
        scores = predictions_by_id(predictions, ["id"], ["score", "proba"], (int, float))
        labels = check_ids(scores, labels, predictions, annotations, subset=subset)
        ids = list(labels)
        return {"roc_auc": roc_auc([labels[i] for i in ids], [scores[i] for i in ids])}
