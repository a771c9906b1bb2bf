"""Per-task prompts, decoding settings and post-processing: OpenFlamingo's, so our numbers compare with theirs.

Every setting is a field of :class:`TaskSpec`; override one with ``dataclasses.replace(get_task_spec("coco"),
max_new_tokens=30)`` (or the CLI's ``--num-beams`` / ``--max-new-tokens``).

Prompts (``{answer}`` is empty for the query, which also gets no ``<|endofchunk|>``)::

    captioning      <image>Output:{answer}<|endofchunk|>
    VQA             <image>Question:{question} Short answer:{answer}<|endofchunk|>
    HatefulMemes    <image>is an image with: '{text}' written on it. Is it hateful? Answer:{answer}<|endofchunk|>
    classification  <image>Output:{answer}<|endofchunk|>

Captioning and VQA demos are each followed by "\\n"; classification demos are joined with nothing, as in
OpenFlamingo's ``evaluate.py``. "0-shot" uses two text-only demos (their ``<image>`` removed), following Flamingo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from flamingo.processing import END_OF_CHUNK_TOKEN, MEDIA_TOKEN

CUSTOM_KINDS = ("caption", "vqa")


@dataclass(frozen=True)
class TaskSpec:
    """How one task is prompted, decoded and scored.

    template: format string with ``{answer}`` and optionally ``{question}`` / ``{text}`` (the Example's fields).
    kind: "caption" and "vqa" generate; "classification" ranks ``class_names`` by mean per-token log-probability.
    stop_words: the generation is cut at the first of these (the model continuing with the next demo's template).
    split_comma: also cut at the first ", " (VQA answers are short; captions legitimately contain commas).
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
        """The answer shown in a demo: the first reference caption / human answer, or the class name."""
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


_CAPTION = "<image>Output:{answer}"
_VQA = "<image>Question:{question} Short answer:{answer}"
_HATEFUL = "<image>is an image with: '{text}' written on it. Is it hateful? Answer:{answer}"


def _caption(name: str) -> TaskSpec:
    return TaskSpec(name=name, kind="caption", template=_CAPTION, metric="cider", max_new_tokens=20, remove_quotes=True)


def _vqa(name: str, *, max_new_tokens: int = 5, stem: bool = False) -> TaskSpec:
    return TaskSpec(
        name=name,
        kind="vqa",
        template=_VQA,
        metric="accuracy",
        max_new_tokens=max_new_tokens,
        split_comma=True,
        stem=stem,
    )


TASK_SPECS: dict[str, TaskSpec] = {
    "coco": _caption("coco"),
    "flickr30k": _caption("flickr30k"),
    "vqav2": _vqa("vqav2"),
    "okvqa": _vqa("okvqa", stem=True),
    "textvqa": _vqa("textvqa", max_new_tokens=10),
    "vizwiz": _vqa("vizwiz"),
    "hateful_memes": TaskSpec(
        name="hateful_memes",
        kind="classification",
        template=_HATEFUL,
        metric="roc_auc",
        demo_separator="",
        class_names=("no", "yes"),
    ),
    "imagenet": TaskSpec(
        name="imagenet", kind="classification", template=_CAPTION, metric="accuracy", demo_separator=""
    ),
}


def get_task_spec(task: str, *, custom_kind: str | None = None, class_names=None) -> TaskSpec:
    """The spec of a named task; ``custom`` takes ``custom_kind`` "caption" | "vqa".

    ``class_names`` (from the task's data) fills in classification tasks whose classes come with the dataset.
    """
    if task == "custom":
        if custom_kind not in CUSTOM_KINDS:
            raise ValueError(f"Task 'custom' needs custom_kind (--custom-kind) in {CUSTOM_KINDS}; got {custom_kind!r}.")
        spec = _caption("custom") if custom_kind == "caption" else _vqa("custom")
    elif task in TASK_SPECS:
        spec = TASK_SPECS[task]
    else:
        raise ValueError(f"Unknown task {task!r}; expected one of {sorted(TASK_SPECS) + ['custom']}.")
    if spec.kind == "classification" and class_names is not None and spec.class_names is None:
        spec = replace(spec, class_names=tuple(class_names))
    return spec
