"""Document -> token ids, labels and images: the text layout, truncation and label masking rules.

Layout (OpenFlamingo's)::

    [bos] prefix <image>text 1<|endofchunk|>[separator 1]<image>text 2<|endofchunk|> ... [eos]

* bos is added when the tokenizer adds one itself (Llama-style); eos always ends a complete document.
* Each image's text chunk ends with ``<|endofchunk|>``; the text before the first image (``prefix``) does not.
  An image-text pair is therefore ``[bos]<image>{caption}<|endofchunk|>{eos}``.
* A chunk's separator (``Document.separators``: the whitespace a ``simple`` record puts after its
  ``<|endofchunk|>``, such as the evaluation's ``"\n"`` between demos) follows its ``<|endofchunk|>``; most
  documents have none. So a task record (:mod:`flamingo_train.task_data`) is tokenized as ``[bos]`` + the
  evaluation prompt + its answer + ``<|endofchunk|>`` + eos, the same ids the evaluation gives its prompt.

Truncation (in this order, on token ids):

1. Images beyond ``max_images`` are cut together with everything after them.
2. The sequence is cut to ``max_tokens`` (a cut document gets no eos: it did not end there).
3. A trailing ``<image>`` with no text after it (only ``<|endofchunk|>``/eos, or nothing) is dropped, repeatedly
   (a complete document keeps its eos).

so every kept ``<image>`` token has its image and every kept image has its token.

Bounded work: the text is cut to ``max_chars`` characters before it is tokenized, so a 50 MB record costs what a
record of ``max_chars`` characters does. No token spans more characters than the vocabulary's longest token, so the
first ``max_tokens`` tokens lie within ``max_tokens * longest`` characters; ``max_chars`` is twice that plus 1024,
far beyond where a BPE merge or a normalizer that joins characters (NFC) could reach back from the cut. The ids are
those that tokenizing the whole text gives (tests/test_hostile_data.py compares them). Likewise a record's images
after the first ``max_images`` are never looked at (:mod:`flamingo_train.data.formats`).

Labels (``-100`` is ignored by the loss):

* padding is masked (by attention mask, so an eos that doubles as the pad token is still trained);
* every ``<image>`` token is masked: the model cannot predict where an image will be;
* bos is masked, and so is all text before the first image unless ``mask_text_before_first_image=False``
  (a document with no image then has nothing to learn and is skipped);
* ``<|endofchunk|>`` and eos are trained, so the model learns to end a caption and a document;
* a sample left with no trained token is skipped as ``empty``.

Answer-only labels (``labels="answers"``, for task data such as captions, VQA and binding episodes): in each chunk
only the answer is trained, i.e. the text after the last of the ``answer_markers`` in that chunk (by default the
evaluation templates' ``Output:``, ``Short answer:``, ``Answer:`` and ``This is a``), and its ``<|endofchunk|>``.
The question, a chunk without a marker, the prefix, separators and eos are context only. Token and character
positions are matched through the tokenizer's offsets, so an answer is the same tokens it is in the whole text (a
fast tokenizer is needed).

Query-only labels (``labels="last_answer"``, the default that :mod:`flamingo_train.task_data` writes for its
records): the same rule applied to the document's last chunk alone. A task record is one evaluation prompt (demos,
then the query) with the query's answer, so only the answer the evaluation scores is trained; the demos' answers are
context, as they are at evaluation (training them too would weight each example by how often it is drawn as a demo,
and teach 1..k-shot answers that no prompt of the record's shot count asks for). A record whose query answer is cut
by truncation has nothing left to train and is skipped as ``empty``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from PIL import Image

from flamingo.images import MAX_IMAGE_PIXELS, ImageTooLarge
from flamingo.processing import FlamingoProcessor, load_image
from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN

from .formats import BadRecord, Document

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One training sample: ``input_ids`` and ``labels`` (L,) as lists, ``images`` the references still to decode."""

    input_ids: list[int]
    labels: list[int]
    images: list[Any]


class SampleBuilder:
    """Applies the layout, truncation and label rules of this module's docstring with one tokenizer."""

    def __init__(self, processor: FlamingoProcessor, *, max_tokens: int, max_images: int,
                 mask_text_before_first_image: bool = True, labels: str = "all",
                 answer_markers: tuple[str, ...] = ()):
        tokenizer = processor.tokenizer
        if labels in ("answers", "last_answer") and not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"labels={labels!r} needs a fast tokenizer (for character offsets); "
                             f"{type(tokenizer).__name__} is not one.")
        self.answers_only = labels in ("answers", "last_answer")
        self.last_answer_only = labels == "last_answer"
        self.answer_markers = tuple(m for m in answer_markers if m)
        self.tokenizer = tokenizer
        self.media_id = processor.media_token_id
        self.end_of_chunk_id = processor.end_of_chunk_token_id
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("The tokenizer has no eos token; the training layout ends each document with eos.")
        # Add bos only where the tokenizer itself would (Llama yes, GPT-2 no).
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id] else None
        self.max_tokens = max_tokens
        self.max_images = max_images
        self.mask_text_before_first_image = mask_text_before_first_image
        longest = max(len(token) for token in tokenizer.get_vocab())  # added tokens included
        self.max_chars = 2 * max_tokens * longest + 1024

    @staticmethod
    def _parts(document: Document):
        """:meth:`layout`'s pieces in order, as (is a special token, text)."""
        yield False, document.prefix
        for k, (_, text) in enumerate(document.chunks):
            yield from ((True, MEDIA_TOKEN), (False, text), (True, END_OF_CHUNK_TOKEN), (False, document.separator(k)))

    def layout(self, document: Document) -> str:
        return "".join(part for _, part in self._parts(document))

    def bounded_layout(self, document: Document) -> tuple[str, int, bool]:
        """:meth:`layout`'s text cut to ``max_chars`` characters (a prefix of it, cut inside a text, never inside
        ``<image>`` or ``<|endofchunk|>``), the number of ``<image>`` tokens in it, and whether it is whole."""
        kept, room, images = [], self.max_chars, 0
        for special, part in self._parts(document):
            if len(part) > room:
                if not special:
                    kept.append(part[:room])
                return "".join(kept), images, False
            kept.append(part)
            room -= len(part)
            images += part == MEDIA_TOKEN and special
        return "".join(kept), images, True

    def answer_spans(self, document: Document) -> list[tuple[int, int]]:
        """Character spans of :meth:`layout`'s text that answer labels train: each chunk's text after its last
        answer marker, with the chunk's ``<|endofchunk|>`` (``labels="last_answer"``: the last chunk's only)."""
        spans, position = [], len(document.prefix)
        for k, (_, text) in enumerate(document.chunks):
            start = position + len(MEDIA_TOKEN)
            ends = [text.rfind(m) + len(m) for m in self.answer_markers if m in text]
            last = k == len(document.chunks) - 1 and document.complete  # a cut document lost its last chunk
            if ends and (not self.last_answer_only or last):
                spans.append((start + max(ends), start + len(text) + len(END_OF_CHUNK_TOKEN)))
            position = start + len(text) + len(END_OF_CHUNK_TOKEN) + len(document.separator(k))
        return spans

    def answer_mask(self, document: Document, text: str | None = None) -> list[bool]:
        """Per token of :meth:`token_ids` (before truncation): whether it lies in an answer span. ``text``: the
        layout or a prefix of it (:meth:`bounded_layout`); the spans are those of the whole document."""
        text = self.layout(document) if text is None else text
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        spans = self.answer_spans(document)
        mask = [any(lo <= begin < hi for lo, hi in spans) for begin, _ in offsets]
        return ([False] if self.bos_id is not None else []) + mask + [False]

    def token_ids(self, document: Document) -> list[int]:
        """The whole document's ids, ``[bos] ... [eos]``, before truncation (no eos if the document was cut)."""
        return self._ids(self.layout(document), len(document.chunks), document.complete)

    def _ids(self, text: str, images: int, complete: bool) -> list[int]:
        """``[bos]`` + the ids of ``text``, which lays out ``images`` images, + ``[eos]`` if ``complete``."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            # JSON allows escaped lone surrogates ("\ud83d", an emoji cut in half by a scraper); the tokenizer
            # raises TypeError on them, which would end the whole run.
            raise BadRecord("malformed_record", f"its text is not valid Unicode ({error})") from None
        body = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if body.count(self.media_id) != images:
            raise BadRecord(
                "image_count_mismatch",
                f"its text holds a literal {MEDIA_TOKEN}: {body.count(self.media_id)} tokens for {images} images",
            )
        return ([self.bos_id] if self.bos_id is not None else []) + body + ([self.eos_id] if complete else [])

    def build(self, document: Document) -> Sample:
        text, laid_out, whole = self.bounded_layout(document)
        full = self._ids(text, laid_out, whole and document.complete)
        ids = self.truncate(full)
        images = document.images[: ids.count(self.media_id)]
        labels = self.labels(ids)
        if self.answers_only:
            # truncate() keeps a prefix of the ids (plus, at most, an eos of its own, which is not an answer)
            mask = self.answer_mask(document, text)
            labels = [label if i < len(full) and ids[i] == full[i] and mask[i] else IGNORE_INDEX
                      for i, label in enumerate(labels)]
        if all(label == IGNORE_INDEX for label in labels):
            raise BadRecord("empty", "has no trainable token after truncation and masking")
        return Sample(ids, labels, images)

    def truncate(self, ids: list[int]) -> list[int]:
        media = [i for i, token in enumerate(ids) if token == self.media_id]
        if len(media) > self.max_images:
            ids = ids[: media[self.max_images]]
        ids = ids[: self.max_tokens]
        closing = {self.end_of_chunk_id, self.eos_id}
        complete = ids[-1:] == [self.eos_id]
        while self.media_id in ids:
            last = len(ids) - 1 - ids[::-1].index(self.media_id)
            if any(token not in closing for token in ids[last + 1 :]):
                break
            # A document that ended still ends with eos after its textless last image goes.
            ids = ids[:last] + ([self.eos_id] if complete else [])
        return ids

    def labels(self, ids: list[int]) -> list[int]:
        labels = list(ids)
        first_image = ids.index(self.media_id) if self.media_id in ids else len(ids)
        for i, token in enumerate(ids):
            before_first = i < first_image and self.mask_text_before_first_image
            is_bos = i == 0 and self.bos_id is not None
            if token == self.media_id or before_first or is_bos:
                labels[i] = IGNORE_INDEX
        return labels


def decode_images(sample: Sample, processor: FlamingoProcessor, *,
                  max_pixels: int | None = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Load and transform a sample's images -> (T, 1, C, H, W); raises BadRecord naming the image that failed.

    Reasons: ``missing_image`` (no regular file at the path: absent, a directory, a FIFO or a device, which is never
    opened for reading), ``image_too_large`` (over ``max_pixels`` pixels by its header; None: no limit),
    ``corrupt_image`` (anything else that does not decode).
    """
    pixels = []
    for index, image in enumerate(sample.images):
        try:
            pixels.append(processor.image_transform(load_image(image, max_pixels=max_pixels)))
        except ImageTooLarge as error:
            raise BadRecord("image_too_large", f"image {index}: {error}") from None
        except ValueError as error:
            missing = isinstance(image, str) and not os.path.isfile(image)  # stat only: a FIFO is not opened
            raise BadRecord("missing_image" if missing else "corrupt_image", f"image {index}: {error}") from None
        except Image.DecompressionBombError as error:  # a huge (or corrupt-header) web image: not an OSError
            raise BadRecord("corrupt_image", f"image {index}: {error}") from None
    return torch.stack(pixels).unsqueeze(1) if pixels else torch.zeros(0, 1, 0, 0, 0)


def collate(samples: Sequence[Sample], pixels: Sequence[torch.Tensor], *, pad_id: int,
            image_shape: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (B, L); pixel_values (B, T_max, 1, C, H, W)."""
    length = max(len(s.input_ids) for s in samples)
    most = max(max(p.shape[0] for p in pixels), 1)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    pixel_values = torch.zeros(len(samples), most, 1, *image_shape)
    for b, (sample, sample_pixels) in enumerate(zip(samples, pixels)):
        n = len(sample.input_ids)
        input_ids[b, :n] = torch.tensor(sample.input_ids)
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.tensor(sample.labels)
        if sample_pixels.shape[0]:  # a text-only sample (mask_text_before_first_image=False) has no pixels
            pixel_values[b, : sample_pixels.shape[0]] = sample_pixels
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "pixel_values": pixel_values}
