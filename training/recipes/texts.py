"""The text side of the micro world: what the micro LM reads in pretraining, in the layouts Flamingo uses.

The LM never sees an image. It reads the world's documents in Flamingo's own layout, ``<image>`` markers and
``<|endofchunk|>`` included (they are tokens of its vocabulary, so Flamingo reuses its rows):

* captions ``<image>Output:a small red circle<|endofchunk|>`` and questions
  ``<image>Question:what colour is the circle? Short answer:red<|endofchunk|>``, with nothing telling the LM what
  the image holds: it learns the language and the answers' priors, and Flamingo's cross-attention supplies the rest;
* binding episodes, with one *kind token* per object kind where Flamingo's prompt has the article:
  ``<image>This is<red star> dax.<|endofchunk|>`` against Flamingo's ``<image>This is a dax.<|endofchunk|>``. The
  word comes right after the kind token, so the LM learns the plainest in-context copy (an induction head: find the
  earlier kind token, copy the word after it), and Flamingo has one position to fill from the image, the token ``a``;
* copy runs, words said twice, which grow the induction heads fast.

Kind tokens are soft during the LM's second half of training (``micro_backbones.train_lm``): their input embedding
is mixed with the embedding of `` a`` by a random amount, so the LM learns to read a kind from anywhere on the line
between `` a`` (nothing known: either word) and the kind token. Flamingo starts at `` a`` and the gradient points
along that line; with hard tokens only, the cross-attention did not find the kind tokens from there (measured:
4-shot binding at chance after 3000 steps, against 0.93 with soft tokens).

Axes: none; everything here is strings.
"""

from __future__ import annotations

import random
import re

from flamingo.micro.world import (
    COLOURS,
    KINDS,
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
from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN

# The evaluation prompts of flamingo_eval's caption and VQA tasks (OpenFlamingo's), and the binding prompt.
CAPTION_PROMPT = "Output:{caption}"
VQA_PROMPT = "Question:{question} Short answer:{answer}"
BINDING_PROMPT = "This is a {word}."
BINDING_QUERY = "This is a"
# One token per object kind, standing where Flamingo's binding prompt has " a" (the LM's text never has " a" there).
KIND_TOKENS = tuple(f"<{colour} {shape}>" for colour, shape in KINDS)
ARTICLE = " a"
# Shares of the LM's documents; the rest are captions and questions.
COPY_SHARE = 0.2
BINDING_SHARE = 0.6


def kind_token(scene: Scene) -> str:
    """The kind token of a one-object scene."""
    obj = scene.shapes[0]
    return f"<{obj.colour} {obj.shape}>"


def chunk(text: str) -> str:
    return f"{MEDIA_TOKEN}{text}{END_OF_CHUNK_TOKEN}"


def binding_text(episode: Episode) -> str:
    """The episode with each image's kind token in place of Flamingo's article; ends with the query's answer."""
    items = [*episode.demos, (episode.query, episode.answer)]
    return "".join(chunk(f"This is{kind_token(scene)} {word}.") for scene, word in items)


def caption_text(scene: Scene, rng: random.Random) -> str:
    return chunk(CAPTION_PROMPT.format(caption=captions(scene)[0]))


def vqa_text(scene: Scene, rng: random.Random) -> str:
    question = pick_question(scene, rng)
    return chunk(VQA_PROMPT.format(question=question.question, answer=question.answer))


def copy_text(rng: random.Random) -> str:
    """A random run of world words and nonsense words, said twice: the plainest lesson in copying from context
    (it is what grows induction heads in small transformers fast)."""
    vocabulary = [*TRAIN_WORDS, *SHAPES, *COLOURS, *SIZES]
    run = " ".join(rng.choice(vocabulary) for _ in range(rng.randint(4, 12)))
    return f"{run}. {run}."


def lm_document(index: int) -> str:
    """Pretraining document ``index``: a copy run, one binding episode, or one to five captions or questions."""
    rng = rng_for("train", "lm-document", index)
    kind = rng.random()
    if kind < COPY_SHARE:
        return copy_text(rng)
    if kind < COPY_SHARE + BINDING_SHARE:
        return binding_text(binding_episode("train", 1_000_000 + index, shots=rng.choice((4, 6, 8, 10))))
    scenes = [make_scene(rng) for _ in range(rng.randint(1, 5))]
    make = caption_text if rng.random() < 0.4 else vqa_text
    return "".join(make(scene, rng) for scene in scenes)


def tokenizer_corpus(num_documents: int) -> list[str]:
    """Texts to learn the BPE merges from: the pretraining documents without their special tokens and nonsense words
    (those are tokens of their own: the words' syllables, so that every word, train or test, is two known tokens)."""
    special = re.compile("|".join(re.escape(t) for t in (MEDIA_TOKEN, END_OF_CHUNK_TOKEN, *KIND_TOKENS)))
    words = re.compile(r" (?:" + "|".join(TRAIN_WORDS) + r")\b")
    return [words.sub("", special.sub("\n", text)) for text in map(lm_document, range(num_documents))]


__all__ = [
    "ARTICLE",
    "BINDING_PROMPT",
    "BINDING_QUERY",
    "CAPTION_PROMPT",
    "KIND_TOKENS",
    "TRAIN_WORDS",
    "VQA_PROMPT",
    "binding_text",
    "kind_token",
    "lm_document",
    "tokenizer_corpus",
]
