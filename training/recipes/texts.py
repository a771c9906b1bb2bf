"""The text side of the micro world: what the micro LM reads in pretraining, and the prompt layouts it shares with
Flamingo training and evaluation.

The LM never sees an image. It learns the world's language from text descriptions of scenes instead, in the same
layouts the few-shot prompts use, with a scene's description where the image will be:

* captions ``Output:a small red circle``;
* question answering ``Question:what colour is the circle? Short answer:red`` after a description;
* binding episodes, in text: ``a red circle. This is a dax.`` lines followed by a query that can only be completed
  by copying the word bound to the matching shape. This gives the LM the in-context copying that Flamingo's
  in-context binding needs, as web text does for a real LM.

Axes: none; everything here is strings.
"""

from __future__ import annotations

import random
import re

from flamingo.micro.world import (
    COLOURS,
    SHAPES,
    SIZES,
    TRAIN_WORDS,
    Episode,
    Scene,
    binding_episode,
    captions,
    make_scene,
    pick_question,
    rng_for,
)

# The evaluation prompts of flamingo_eval's caption and VQA tasks (OpenFlamingo's), and the binding prompt.
CAPTION_PROMPT = "Output:{caption}"
VQA_PROMPT = "Question:{question} Short answer:{answer}"
BINDING_PROMPT = "This is a {word}."
BINDING_QUERY = "This is a"
# Shares of the LM's documents (the rest: captions and QA). Measured on the text-only LM (2 layers, 2000 steps,
# lr 1e-3), 4-shot binding of held-out words: 0.55 with 0.4 binding / 0.3 copy, 0.91 with 0.6 / 0.2.
BINDING_SHARE = 0.6
COPY_SHARE = 0.2


def describe(scene: Scene, rng: random.Random) -> str:
    """A scene as the LM reads it in place of an image: one of its captions."""
    return rng.choice(captions(scene))


def caption_text(scene: Scene, rng: random.Random) -> str:
    return CAPTION_PROMPT.format(caption=captions(scene)[0])


def vqa_text(scene: Scene, rng: random.Random) -> str:
    """A question and its answer, after the scene's description half of the time (so the LM learns to read answers
    off a description, which the cross-attention later supplies from the image)."""
    question = pick_question(scene, rng)
    text = VQA_PROMPT.format(question=question.question, answer=question.answer)
    return f"{describe(scene, rng)}\n{text}" if rng.random() < 0.5 else text


def binding_text(episode: Episode, rng: random.Random) -> str:
    """The episode in the binding prompt, each scene's description right before its word
    (``This is a small red triangle fephib.``); ends with the query's answer. In Flamingo's prompt the image stands
    where the description is (``<image>This is a fephib.``)."""
    items = [*episode.demos, (episode.query, episode.answer)]
    return "\n".join(f"This is {describe(scene, rng)} {word}." for scene, word in items)


def copy_text(rng: random.Random) -> str:
    """A random run of world words and nonsense words, said twice: the plainest lesson in copying from context
    (it is what grows induction heads in small transformers fast)."""
    vocabulary = [*TRAIN_WORDS, *SHAPES, *COLOURS, *SIZES]
    run = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(4, 12)))
    return f"{run}. {run}."


def lm_document(index: int) -> str:
    """Pretraining document ``index``: several caption / QA examples, or one binding episode, one per line."""
    rng = rng_for("train", "lm-document", index)
    kind = rng.random()
    if kind < COPY_SHARE:
        return copy_text(rng)
    if kind < COPY_SHARE + BINDING_SHARE:
        episode = binding_episode("train", 1_000_000 + index, shots=rng.choice((4, 6, 8, 10)))
        return binding_text(episode, rng)
    scenes = [make_scene(rng) for _ in range(rng.randint(1, 5))]
    make = caption_text if rng.random() < 0.4 else vqa_text
    return "\n".join(make(scene, rng) for scene in scenes)


def tokenizer_corpus(num_documents: int) -> list[str]:
    """Texts to learn the BPE merges from: the pretraining documents without their nonsense words. (The words'
    syllables become tokens of their own, so that every word, train or test, is the same three tokens.)"""
    words = re.compile(r" (?:" + "|".join(TRAIN_WORDS) + r")\b")
    return [words.sub("", text) for text in map(lm_document, range(num_documents))]


__all__ = [
    "BINDING_PROMPT",
    "BINDING_QUERY",
    "CAPTION_PROMPT",
    "TRAIN_WORDS",
    "VQA_PROMPT",
    "binding_text",
    "lm_document",
    "tokenizer_corpus",
]
