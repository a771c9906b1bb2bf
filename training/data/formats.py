"""Record formats -> :class:`Document`: the text before the first image, then one (image, text after it) per image.

Three layouts are read from files (``.jsonl``, ``.json``, ``.parquet``, ``.arrow`` or a ``save_to_disk`` directory):

* ``simple``: ``{"text": "Intro <image>about image 1 <image>about image 2", "images": ["a.jpg", "b.jpg"]}``.
  The ``k``-th ``<image>`` marks where ``images[k]`` goes; their counts must match.
* ``obelics``: ``{"texts": ["Intro", null, "about image 1"], "images": [null, "a.jpg", null]}``: aligned lists
  where exactly one of the pair is null at each position (the OBELICS layout). Consecutive texts are joined by a
  space.
* ``pairs``: ``{"image": "a.jpg", "caption": "a cat on a sofa"}``.

An image is a path (relative paths resolve against ``image_root``, by default the data file's folder), raw bytes,
or a ``datasets`` Image value (``{"bytes": ..., "path": ...}``). A path must stay inside that root, symlinks followed
(:func:`flamingo.file_access.confined_path`): ``../``, an absolute path elsewhere, or a symlink out of it is a bad
record (``outside_data_root``) unless ``allow_outside`` (``DataConfig.allow_outside_paths``).

Bounded work: with ``max_images``, a record's images after the first ``max_images`` are neither resolved nor
checked; the document is cut before the next image (``Document.complete`` False, so no eos follows), which is what
the layout's truncation would make of it (:mod:`flamingo_train.data.samples`, rule 1). A record with a million
images costs what one with ``max_images + 1`` does.

A JSON Lines record arrives as the line's bytes and must be UTF-8 (``not_utf8`` otherwise); a UTF-8 byte-order mark
is dropped.

``webdataset`` records come from ``.tar`` shards whose members are grouped by key (the member name up to its first
dot, as in WebDataset): ``KEY.jpg`` (or ``.jpeg``/``.png``/``.webp``) + ``KEY.txt`` is an image-text pair (a
``KEY.json`` beside them is metadata and ignored), and ``KEY.json`` without ``KEY.txt`` is an interleaved document in the simple or OBELICS layout whose image entries name members of the same
sample, either by field (``"0.jpg"`` for the member ``KEY.0.jpg``) or by full member name (``"KEY.0.jpg"``).

A ``<|endofchunk|>`` that a record already puts at the end of a chunk is dropped here: the layout
(:mod:`flamingo_train.data.samples`) adds exactly one per image.

Separators (``simple`` only): whitespace that a record puts after a chunk's closing ``<|endofchunk|>``, before the
next ``<image>``, is kept as that chunk's ``separator`` and laid out after the ``<|endofchunk|>`` again: the evaluation
joins its demos with ``"\n"`` (``TaskSpec.demo_separator``), and a task record written by
:mod:`flamingo_train.task_data` must tokenize as the evaluation prompt does. Likewise text before the first image
that ends in ``<|endofchunk|>`` (+ whitespace) keeps both, since the layout adds nothing to it (0-shot prompts open
with text-only demos). Without such an ``<|endofchunk|>`` trailing whitespace is trimmed as before, and the text after
the last chunk never outlives it (eos follows). A ``simple`` record that closes every chunk itself is thus laid out
exactly as written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flamingo.file_access import OutsideDataRoot, confined_path
from flamingo.tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class BadRecord(Exception):
    """A record that cannot become a training sample. ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Document:
    """``prefix`` text, then for each image the text that follows it. Images are still undecoded references.

    ``separators[k]`` is the text laid out after chunk ``k``'s ``<|endofchunk|>`` (see the module docstring); a
    missing entry is "" (no separator), so ``Document(prefix, chunks)`` is a document without any. ``complete`` is
    False for a document cut after ``max_images`` images: it did not end there, so the layout adds no eos.
    """

    prefix: str = ""
    chunks: list[tuple[Any, str]] = field(default_factory=list)
    separators: list[str] = field(default_factory=list)
    complete: bool = True

    @property
    def images(self) -> list[Any]:
        return [image for image, _ in self.chunks]

    def separator(self, k: int) -> str:
        return self.separators[k] if k < len(self.separators) else ""


def _clean(text: str) -> str:
    text = text.rstrip()
    while text.endswith(END_OF_CHUNK_TOKEN):
        text = text[: -len(END_OF_CHUNK_TOKEN)].rstrip()
    return text


def _separator(text: str) -> str:
    """The whitespace after ``text``'s closing ``<|endofchunk|>`` ("" when it does not end with one)."""
    body = text.rstrip()
    return text[len(body):] if body.endswith(END_OF_CHUNK_TOKEN) else ""


def _require(record: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in record:
        raise BadRecord("malformed_record", f"has no {key!r} field (fields: {sorted(record)})")
    value = record[key]
    if not isinstance(value, kind):
        raise BadRecord("malformed_record", f"field {key!r} is {type(value).__name__}, not {getattr(kind, '__name__', kind)}")
    return value


@dataclass(frozen=True)
class ImagePaths:
    """How a record's image paths are read: relative to ``root``, and confined to it unless ``allow_outside``.

    ``root`` None (a record parsed on its own, without a file) reads a path as written. A path that cannot be
    resolved (a NUL byte, a symlink loop) is a malformed record.
    """

    root: Path | None = None
    allow_outside: bool = False

    def __call__(self, value: str) -> str:
        if self.root is None:
            return value
        try:
            return str(confined_path(value, self.root, allow_outside=self.allow_outside, what="image path"))
        except OutsideDataRoot as error:
            raise BadRecord("outside_data_root", str(error)) from None
        except (OSError, RuntimeError, ValueError) as error:  # a symlink loop, a NUL byte in the name
            raise BadRecord("malformed_record", f"image path {value[:60]!r} cannot be resolved ({error})") from None


def _image_ref(value: Any, paths: Callable[[str], Any]) -> Any:
    """A path (``paths(value)``: an :class:`ImagePaths`, or a tar sample's member lookup), bytes, or a PIL image;
    ``datasets`` Image dicts are unpacked."""
    if isinstance(value, dict):  # a datasets Image feature read with decode=False
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        return paths(value)
    if value is not None and hasattr(value, "convert"):  # an already decoded PIL image
        return value
    raise BadRecord("malformed_record", f"image entry {str(value)[:60]!r} is not a path, bytes or an image")


def parse_simple(record: dict, paths: Callable[[str], Any], max_images: int | None = None) -> Document:
    text = _require(record, "text", str)
    images = _require(record, "images", list) if record.get("images") is not None else []
    count = text.count(MEDIA_TOKEN)
    if count != len(images):
        raise BadRecord("image_count_mismatch", f"has {count} {MEDIA_TOKEN} token(s) but {len(images)} image(s)")
    cut = max_images is not None and count > max_images
    # Cut: the prefix, max_images chunk texts, and the rest (from the next <image> on), which is dropped.
    pieces = text.split(MEDIA_TOKEN, max_images + 1)[:-1] if cut else text.split(MEDIA_TOKEN)
    prefix = pieces[0]
    # The layout adds no <|endofchunk|> to the prefix: text-only demos (a 0-shot prompt) keep theirs and the separator.
    if not (images and prefix.rstrip().endswith(END_OF_CHUNK_TOKEN)):
        prefix = _clean(prefix)
    chunks = [(_image_ref(im, paths), _clean(t)) for im, t in zip(images, pieces[1:])]
    # The last chunk of a whole document is followed by eos; that of a cut one by its separator and the next <image>.
    separators = [_separator(t) for t in pieces[1:]] if cut else [_separator(t) for t in pieces[1:-1]] + [""]
    return Document(prefix, chunks, separators if chunks else [], complete=not cut)


def parse_obelics(record: dict, paths: Callable[[str], Any], max_images: int | None = None) -> Document:
    texts, images = _require(record, "texts", list), _require(record, "images", list)
    if len(texts) != len(images):
        raise BadRecord("malformed_record", f"has {len(texts)} texts but {len(images)} images; the lists must align")
    document, current = Document(), []

    def close() -> str:
        joined = _clean(" ".join(t.strip() for t in current))
        current.clear()
        return joined

    for position, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise BadRecord("malformed_record", f"position {position} must have exactly one of text and image")
        if text is not None:
            if not isinstance(text, str):
                raise BadRecord("malformed_record", f"texts[{position}] is {type(text).__name__}, not str")
            if text.strip():
                current.append(text)
            continue
        if document.chunks:
            document.chunks[-1] = (document.chunks[-1][0], close())
        else:
            document.prefix = close()
        if max_images is not None and len(document.chunks) == max_images:
            document.complete = False  # image max_images + 1: the layout would cut here; nothing after it is read
            return document
        document.chunks.append((_image_ref(image, paths), ""))
    if document.chunks:
        document.chunks[-1] = (document.chunks[-1][0], close())
    else:
        document.prefix = close()
    return document


def parse_pair(record: dict, paths: Callable[[str], Any], max_images: int | None = None) -> Document:
    caption = _require(record, "caption", str)
    if "image" not in record or record["image"] is None:
        raise BadRecord("malformed_record", "has no 'image'")
    return Document("", [(_image_ref(record["image"], paths), _clean(caption))])


PARSERS = {"simple": parse_simple, "obelics": parse_obelics, "pairs": parse_pair}


def decode_line(line: bytes) -> str:
    """A JSON Lines line's bytes as text; :class:`BadRecord` ``not_utf8`` naming the first bad byte."""
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = line[error.start : error.start + 4]
        raise BadRecord("not_utf8", f"is not valid UTF-8 (byte {error.start}: {bad!r}); training data must be "
                                    "UTF-8") from None


def parse_record(record: Any, format: str, root: Path | None, *, allow_outside: bool = False,
                 max_images: int | None = None) -> Document:
    """One raw record (a dict, or a JSON line as ``str`` or UTF-8 ``bytes``) of ``format`` -> Document; raises
    :class:`BadRecord`. Image paths resolve against ``root`` and must stay inside it unless ``allow_outside``;
    images after the first ``max_images`` are not read (see the module docstring)."""
    if isinstance(record, bytes):
        record = decode_line(record)
    if isinstance(record, str):
        try:
            # The first line of a file saved with a UTF-8 byte-order mark (Windows tools) starts with U+FEFF.
            record = json.loads(record.removeprefix("\ufeff"))
        except json.JSONDecodeError as error:
            raise BadRecord("malformed_json", f"is not valid JSON ({error})") from None
        except (ValueError, RecursionError) as error:
            # json's own limits: an integer of over 4300 digits, nesting deeper than the stack
            raise BadRecord("malformed_json", f"is not decodable JSON ({type(error).__name__}: {error})") from None
    if not isinstance(record, dict):
        raise BadRecord("malformed_record", f"is a JSON {type(record).__name__}, not an object")
    if format == "webdataset":
        return parse_webdataset_sample(record, max_images=max_images)
    return PARSERS[format](record, ImagePaths(root, allow_outside), max_images)


def parse_webdataset_sample(sample: dict[str, Any], *, max_images: int | None = None) -> Document:
    """``{"__key__": KEY, field: bytes, ...}`` (fields as in ``KEY.field``) -> Document.

    An image + ``txt`` sample is a pair even when it also has a ``json`` member (LAION-style shards keep metadata
    there); a sample with ``json`` and no ``txt`` is an interleaved document.
    """
    key = sample.get("__key__", "")
    image_fields = [f for f in IMAGE_EXTENSIONS if f in sample]
    if image_fields and "txt" in sample:
        try:
            caption = sample["txt"].decode("utf-8")
        except UnicodeDecodeError as error:
            raise BadRecord("malformed_record", f"{key}.txt is not UTF-8 ({error})") from None
        return Document("", [(sample[image_fields[0]], _clean(caption))])
    if "json" not in sample:
        fields = sorted(f for f in sample if not f.startswith("__"))
        raise BadRecord("malformed_record", f"sample {key} has fields {fields}: need an image + txt pair or a json document")
    try:
        document = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRecord("malformed_json", f"{key}.json is not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise BadRecord("malformed_record", f"{key}.json is a JSON {type(document).__name__}, not an object")

    def member(name: str) -> bytes:  # an image entry names a member of this sample, never a path
        field_name = name[len(key) + 1 :] if name.startswith(f"{key}.") else name
        if field_name not in sample:
            raise BadRecord("missing_image", f"names image {name!r}, which is not a member of sample {key}")
        return sample[field_name]

    parse = parse_obelics if "texts" in document else parse_simple
    return parse(document, member, max_images)
