"""FlamingoProcessor: text and images in, ``input_ids`` / ``attention_mask`` / ``pixel_values`` out.

Two input styles, each for one sample or a batch:

* interleaved: ``[img1, "An image of two cats.", img2, "An image of"]``. Each image becomes an ``<image>`` token;
  text that is followed by another image is closed with ``<|endofchunk|>`` (unless it already ends with it);
* marked text: ``text="<image>An image of two cats.<|endofchunk|><image>An image of", images=[img1, img2]``.

Images may be PIL images of any mode, file paths (``str`` or ``Path`` in marked-text style, ``Path`` in interleaved
style, where a ``str`` is text), raw bytes, numpy arrays (HWC or HW) or torch tensors (CHW, HWC or HW); how each is
turned into RGB (16-bit and float data, EXIF orientation, alpha) is documented in :mod:`flamingo.images`. Bad input
raises a ValueError that names the sample and image.

A batch may mix samples with different numbers of images: ``pixel_values`` is zero-padded to the largest count, and the
model never attends to padded slots (they have no ``<image>`` token). Padding of the text is on the left by default, as
generation needs.

Shapes: input_ids, attention_mask (B, L); pixel_values (B, T_img, 1, C, H, W).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from transformers import BatchFeature

from .images import ImageLike, is_image, load_image
from .io import atomic_write_text, read_json
from .micro.shipped import is_shipped_model, resolve_model_path
from .tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")

__all__ = ["FlamingoProcessor", "ImageLike", "load_image"]


def _check_not_an_image_name(text: str, index: int, position: int) -> None:
    """A lone file name such as ``"cat.png"`` in an interleaved list is text, which would silently give no image."""
    name = text.strip()
    if name and not any(c.isspace() for c in name) and name.lower().endswith(IMAGE_FILE_SUFFIXES):
        raise ValueError(
            f"Sample {index}, item {position} is the text {name!r}, which reads as an image file name. In an "
            f"interleaved list a str is text; give the image as pathlib.Path({name!r}) or PIL.Image.open({name!r})."
        )


def _check_text(text: Any, index: int) -> None:
    """Catch at the boundary what the tokenizer would report as a TypeError from deep inside Rust."""
    if not isinstance(text, str):
        raise ValueError(f"Sample {index}: text must be a str; got {type(text).__name__}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:  # lone surrogates ("\ud83d"), e.g. half of a badly split emoji
        bad = text[error.start : error.end]
        raise ValueError(
            f"Sample {index}: text is not valid Unicode ({bad!r} at position {error.start} is a lone surrogate)."
        ) from error


class FlamingoProcessor:
    """Tokenizer + image transform. ``processor.tokenizer`` is the HF tokenizer with the Flamingo tokens added."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, preprocess_cfg: dict[str, Any]):
        from open_clip.transform import PreprocessCfg, image_transform_v2  # here: open_clip takes seconds to import

        self.tokenizer = tokenizer
        self.preprocess_cfg = dict(preprocess_cfg)
        self.image_transform = image_transform_v2(PreprocessCfg(**self.preprocess_cfg), is_train=False)
        self.media_token_id = tokenizer.convert_tokens_to_ids(MEDIA_TOKEN)
        self.end_of_chunk_token_id = tokenizer.convert_tokens_to_ids(END_OF_CHUNK_TOKEN)
        if self.media_token_id is None or self.media_token_id == tokenizer.unk_token_id:
            raise ValueError(f"The tokenizer has no {MEDIA_TOKEN} token; call add_flamingo_tokens(tokenizer) first.")

    # ---------------------------------------------------------------------------------------------- inputs
    def __call__(
        self,
        inputs: Sequence[Any] | None = None,
        *,
        text: str | Sequence[str] | None = None,
        images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None = None,
        padding_side: str = "left",
        return_tensors: str = "pt",
        add_special_tokens: bool = True,
    ) -> BatchFeature:
        """Tokens and pixels of one sample or a batch (module docstring). ``add_special_tokens=False``: no BOS (or other
        special tokens the tokenizer adds around a text), for text that continues an earlier call's (a chat turn)."""
        if return_tensors != "pt":
            raise ValueError(f"Only return_tensors='pt' is supported, got {return_tensors!r}.")
        if inputs is not None:
            if text is not None or images is not None:
                raise ValueError("Give either an interleaved sequence or text= and images=, not both.")
            texts, image_lists = self._from_interleaved(inputs)
        elif text is not None:
            texts, image_lists = self._from_marked_text(text, images)
        else:
            raise ValueError("Nothing to process: give an interleaved sequence, or text= (with images=).")

        for index, sample_text in enumerate(texts):
            _check_text(sample_text, index)
        encoded = self.tokenizer(texts, padding="longest", padding_side=padding_side, return_tensors="pt",
                                 add_special_tokens=add_special_tokens)
        input_ids = encoded["input_ids"]
        lengths = encoded["attention_mask"].sum(dim=1).tolist()
        if 0 in lengths:
            # A row of padding only would leave the LM nothing to attend to (NaN logits), so stop it here.
            raise ValueError(f"Sample {lengths.index(0)} is empty: its text encodes to no tokens and it has no images.")
        counts = (input_ids == self.media_token_id).sum(dim=1).tolist()
        for index, (count, sample_images) in enumerate(zip(counts, image_lists)):
            if count != len(sample_images):
                raise ValueError(
                    f"Sample {index} has {count} {MEDIA_TOKEN} token(s) but {len(sample_images)} image(s) were given."
                )
        return BatchFeature(
            {
                "input_ids": input_ids,
                "attention_mask": encoded["attention_mask"],
                "pixel_values": self.preprocess_images(image_lists),
            }
        )

    def preprocess_images(self, image_lists: Sequence[Sequence[ImageLike]]) -> torch.Tensor:
        """Per-sample image lists -> (B, T_max, 1, C, H, W), zero-padded where a sample has fewer images."""
        c, (h, w) = 3, self._size()
        most = max((len(x) for x in image_lists), default=0)
        pixels = torch.zeros(len(image_lists), max(most, 1), 1, c, h, w)
        for b, sample in enumerate(image_lists):
            for t, image in enumerate(sample):
                try:
                    rgb = load_image(image)
                except ValueError as error:
                    raise ValueError(f"Sample {b}, image {t}: {error}") from error
                pixels[b, t, 0] = self.image_transform(rgb)
        return pixels

    def _size(self) -> tuple[int, int]:
        size = self.preprocess_cfg["size"]
        return tuple(size) if isinstance(size, (list, tuple)) else (size, size)

    @staticmethod
    def _is_batch_of_interleaved(inputs: Sequence[Any]) -> bool:
        return len(inputs) > 0 and all(isinstance(x, (list, tuple)) for x in inputs)

    def _from_interleaved(self, inputs: Sequence[Any]) -> tuple[list[str], list[list[ImageLike]]]:
        if not isinstance(inputs, (list, tuple)):
            raise ValueError(
                "An interleaved input is a list of texts and images (or a list of such lists); "
                f"got {type(inputs).__name__}."
            )
        if len(inputs) == 0:
            raise ValueError("The interleaved input is an empty list; give at least one text or image.")
        samples = inputs if self._is_batch_of_interleaved(inputs) else [inputs]
        texts, image_lists = [], []
        for index, sample in enumerate(samples):
            parts: list[str] = []
            sample_images: list[ImageLike] = []
            if len(sample) == 0:
                raise ValueError(f"Sample {index} of the interleaved batch is empty; give at least one text or image.")
            for position, item in enumerate(sample):
                if isinstance(item, str):
                    _check_not_an_image_name(item, index, position)
                    parts.append(item)
                elif is_image(item):
                    # Text that is followed by another image ends its chunk.
                    if parts and not parts[-1].rstrip().endswith(END_OF_CHUNK_TOKEN):
                        parts.append(END_OF_CHUNK_TOKEN)
                    parts.append(MEDIA_TOKEN)
                    sample_images.append(item)
                else:
                    raise ValueError(
                        f"Sample {index}, item {position}: interleaved items must be text (str) or images "
                        f"(PIL.Image, pathlib.Path, bytes, numpy array, torch tensor); got {type(item).__name__}."
                    )
            texts.append("".join(parts))
            image_lists.append(sample_images)
        return texts, image_lists

    @staticmethod
    def _from_marked_text(
        text: str | Sequence[str], images: Sequence[ImageLike] | Sequence[Sequence[ImageLike]] | None
    ) -> tuple[list[str], list[list[ImageLike]]]:
        if isinstance(text, str):
            if images is None:
                return [text], [[]]
            if is_image(images) or isinstance(images, str):  # one image for one text
                return [text], [[images]]
            if not isinstance(images, (list, tuple)):
                raise ValueError(f"images= must be a list of images; got {type(images).__name__}.")
            if any(isinstance(x, (list, tuple)) for x in images):
                raise ValueError("For one text, give images as a flat list, not a list of lists.")
            return [text], [list(images)]
        if not isinstance(text, (list, tuple)):
            raise ValueError(f"text= must be a string or a list of strings; got {type(text).__name__}.")
        if len(text) == 0:
            raise ValueError("text= is an empty list; give at least one text.")
        texts = list(text)
        if images is None:
            return texts, [[] for _ in texts]
        if not isinstance(images, (list, tuple)) or not all(isinstance(x, (list, tuple)) for x in images):
            found = type(images).__name__ if not isinstance(images, (list, tuple)) else "a flat list of images"
            raise ValueError(
                f"For a list of {len(texts)} texts, images= must be a list of {len(texts)} lists, one list of images "
                f"per text (e.g. images=[[img_a], [img_b, img_c]]); got {found}."
            )
        image_lists = [list(x) for x in images]
        if len(image_lists) != len(texts):
            raise ValueError(f"Got {len(texts)} texts but {len(image_lists)} image lists; give one list per text.")
        return texts, image_lists

    # ---------------------------------------------------------------------------------------------- decoding
    def batch_decode(self, token_ids: torch.Tensor, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, **kwargs)

    def decode(self, token_ids: torch.Tensor, **kwargs) -> str:
        return self.tokenizer.decode(token_ids, **kwargs)

    # ---------------------------------------------------------------------------------------------- files
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        atomic_write_text(directory / PREPROCESSOR_CONFIG_NAME, json.dumps(self.preprocess_cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, *, trust_remote_code: bool = False, **tokenizer_kwargs
    ) -> FlamingoProcessor:
        """The processor saved in ``directory``; ``"micro"`` is the shipped micro model's (as in
        :meth:`Flamingo.from_pretrained`). trust_remote_code: run the tokenizer's own code, if it has any (only this
        argument allows it; never for the shipped model). tokenizer_kwargs go to ``AutoTokenizer.from_pretrained``."""
        directory = resolve_model_path(directory)
        trust_remote_code = trust_remote_code and not is_shipped_model(directory)
        path = directory / PREPROCESSOR_CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"{directory} holds no {PREPROCESSOR_CONFIG_NAME}; was it written by save_pretrained?")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code, **tokenizer_kwargs)
        return cls(tokenizer, read_json(path))
