"""Per-task prompts, decoding settings and post-processing: OpenFlamingo's, so our numbers compare with theirs.

Every setting is a field of :class:`TaskSpec`; override one with ``dataclasses.replace(get_task_spec("coco"),
max_new_tokens=30)`` (or the CLI's ``--num-beams`` / ``--max-new-tokens`` / ``--demo-separator`` /
``--zero-shot-text-demos``).

Prompts (``{answer}`` is empty for the query, which also gets no ``<|endofchunk|>``)::

    captioning      <image>Output:{answer}<|endofchunk|>
    VQA             <image>Question:{question} Short answer:{answer}<|endofchunk|>
    HatefulMemes    <image>is an image with: '{text}' written on it. Is it hateful? Answer:{answer}<|endofchunk|>
    classification  <image>Output:{answer}<|endofchunk|>
    binding         <image>This is a {word}.<|endofchunk|>      (query: <image>This is a)

Captioning, VQA and binding demos are each followed by "\\n"; classification demos are joined with nothing, as in
OpenFlamingo's ``evaluate.py``. "0-shot" uses two text-only demos (their ``<image>`` removed), following Flamingo
and OpenFlamingo (``zero_shot_text_demos``; ``--zero-shot-text-demos 0`` makes 0-shot the query alone); binding's
0-shot is the query alone (its demos belong to the episode, and there is no answer format to show).

Decoding budget: ``max_new_tokens`` is the task's (OpenFlamingo's: captions 20, VQA 5, TextVQA 10). A spec with
``answer_margin_tokens`` (the custom caption and VQA tasks) takes it from the data instead: the longest reference
answer in tokens plus that margin (``flamingo_eval.tasks.spec_for_data``), so a custom answer longer than five
tokens is not cut short. An explicit ``--max-new-tokens`` wins over both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN


def binding_continuation(word: str) -> str:
    """What follows ``This is a`` for ``word``: the demo's answer, and the text each choice is ranked by."""
    return f" {word}."


@dataclass(frozen=True)
class TaskSpec:
    """How one task is prompted, decoded and scored.

    template: format string with ``{answer}`` and optionally ``{question}`` / ``{text}`` (the Example's fields).
    kind: "caption" and "vqa" generate; "classification" ranks ``class_names`` by mean per-token log-probability;
        "binding" ranks each query's own ``Example.choices`` the same way.
    stop_words: the generation is cut at the first of these (the model continuing with the next demo's template).
    split_comma: also cut at the first ", " (VQA answers are short; captions legitimately contain commas).
    answer_margin_tokens: None -- ``max_new_tokens`` is fixed; an int -- ``spec_for_data`` sets ``max_new_tokens`` to
        the longest reference answer's token count plus this margin (room for ``<|endofchunk|>`` and a token more).
    """

    name: str
    kind: str
    template: str
    metric: str  # the key score_files / score_records report: "cider" | "accuracy" | "roc_auc"
    demo_separator: str = "\n"
    max_new_tokens: int = 20
    num_beams: int = 3
    length_penalty: float = 0.0
    stop_words: tuple[str, ...] = ("Output", "Question", "Answer", "Short")
    split_comma: bool = False
    remove_quotes: bool = False  # OpenFlamingo drops '"' from captions
    stem: bool = False  # OK-VQA: answers are stemmed before matching
    zero_shot_text_demos: int = 2  # Flamingo's 0-shot: two text-only demos show the answer format
    answer_margin_tokens: int | None = None
    class_names: tuple[str, ...] | None = None  # classification; index = Example.label

    def demo_text(self, example, *, with_image: bool = True) -> str:
        """One in-context example: the template filled with its answer, closed by ``<|endofchunk|>``."""
        text = self.template.format(answer=self.demo_answer(example), question=example.question, text=example.text)
        text = text + END_OF_CHUNK_TOKEN + self.demo_separator
        return text if with_image else text.replace(MEDIA_TOKEN, "")

    def query_text(self, example) -> str:
        """The query: the template with an empty answer and no ``<|endofchunk|>``."""
        return self.template.format(answer="", question=example.question, text=example.text)

    def prompt(self, demos, query, *, zero_shot: bool) -> str:
        """Demos then query. With ``zero_shot`` the demos are text-only, so the prompt has one ``<image>``."""
        return "".join(self.demo_text(d, with_image=not zero_shot) for d in demos) + self.query_text(query)

    def demo_answer(self, example) -> str:
        """The answer shown in a demo: the first reference caption / human answer, the class name, or (binding) the
        episode's word as the continuation that is ranked (``binding_continuation``)."""
        if self.kind == "binding":
            return binding_continuation(example.answers[0])
        if self.kind == "classification":
            if self.class_names is None:
                raise ValueError(f"Task {self.name!r} has no class names.")
            return self.class_names[example.label]
        if not example.answers:
            raise ValueError(f"{self.name} support example {example.id!r} has no answer/caption to show as a demo.")
        return example.answers[0].strip()

    def postprocess(self, generated: str) -> str:
        """Cut a generated continuation down to the answer (OpenFlamingo's post-processing)."""
        if self.stop_words:
            generated = re.split("|".join(map(re.escape, self.stop_words)), generated, maxsplit=1)[0]
        if self.split_comma:
            generated = generated.split(", ", 1)[0]
        if self.remove_quotes:
            generated = generated.replace('"', "")
        return generated.strip()

    def stops_in(self, generated: str) -> bool:
        """Whether ``postprocess`` cuts ``generated`` at a stop word (or, with ``split_comma``, at ", "): the answer
        ended before the text did, so running out of ``max_new_tokens`` did not cut it short."""
        if any(word in generated for word in self.stop_words):
            return True
        return self.split_comma and ", " in generated


CAPTION_TEMPLATE = "<image>Output:{answer}"
VQA_TEMPLATE = "<image>Question:{question} Short answer:{answer}"
HATEFUL_TEMPLATE = "<image>is an image with: '{text}' written on it. Is it hateful? Answer:{answer}"
BINDING_TEMPLATE = "<image>This is a{answer}"  # {answer} = binding_continuation(word) = " dax."


def caption_spec(name: str, *, answer_margin_tokens: int | None = None) -> TaskSpec:
    return TaskSpec(
        name=name,
        kind="caption",
        template=CAPTION_TEMPLATE,
        metric="cider",
        max_new_tokens=20,
        remove_quotes=True,
        answer_margin_tokens=answer_margin_tokens,
    )


def vqa_spec(
    name: str, *, max_new_tokens: int = 5, stem: bool = False, answer_margin_tokens: int | None = None
) -> TaskSpec:
    return TaskSpec(
        name=name,
        kind="vqa",
        template=VQA_TEMPLATE,
        metric="accuracy",
        max_new_tokens=max_new_tokens,
        split_comma=True,
        stem=stem,
        answer_margin_tokens=answer_margin_tokens,
    )


def classification_spec(name: str, *, template: str = CAPTION_TEMPLATE, metric: str = "accuracy", class_names=None) -> TaskSpec:
    return TaskSpec(
        name=name, kind="classification", template=template, metric=metric, demo_separator="", class_names=class_names
    )


def binding_spec(name: str) -> TaskSpec:
    # Nothing is generated, so the decoding fields keep their defaults; no text-only demos at 0 shots.
    return TaskSpec(name=name, kind="binding", template=BINDING_TEMPLATE, metric="accuracy", zero_shot_text_demos=0)
