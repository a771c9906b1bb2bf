"""Turn whatever a user calls an image into an 8-bit RGB PIL image, or raise a ValueError that says why not.

Accepted, each converted the documented way and never silently clipped:

* PIL images of any mode. 8-bit modes (``1``, ``L``, ``P``, ``LA``, ``RGBA``, ``CMYK``, ...) go through Pillow's own
  ``convert("RGB")``; alpha is dropped, as open_clip's ``_convert_to_rgb`` does. Pillow would clip the wide modes to
  0..255 (a 16-bit PNG comes out white), so they are rescaled here instead: ``I;16*`` and ``I`` (how 16-bit PNGs
  open) from 0..65535 to 0..255, and ``F`` from 0..1 like a float array.
* file paths and encoded bytes: opened, turned upright by their EXIF orientation (as every viewer shows them), then
  as a PIL image.
* numpy arrays, HWC or HW (grey), and torch tensors, CHW or HWC or HW (a leading 1, 3 or 4 is read as channels,
  torchvision's layout), with 1, 3 or 4 channels (4 = RGBA). ``uint8`` is taken as is, ``bool`` as 0/255,
  ``uint16`` as 16 bit, other integers must lie in 0..255, and floats must be finite and in 0..1 (the range
  Hugging Face image processors assume for float input).

Files and encoded bytes are read safely: only regular files are opened (a FIFO or a device would hang the reader),
and an image of more than ``max_pixels`` pixels (default ``MAX_IMAGE_PIXELS``, 40 million: a 24-megapixel camera
photo passes) is refused from its header, before it is decoded, so that a small PNG of 12000 x 12000 pixels cannot
cost half a gigabyte. Pass ``max_pixels=None`` to lift the limit.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .file_access import MAX_IMAGE_PIXELS, open_regular_file

ImageLike = Image.Image | str | Path | bytes | np.ndarray | torch.Tensor

_CHANNELS = (1, 3, 4)


class ImageTooLarge(ValueError):
    """An encoded image whose header declares more pixels than the limit allows."""


def is_image(x: Any) -> bool:
    """True for the in-memory and encoded image types (not ``str``, which is ambiguous with text)."""
    return isinstance(x, (Image.Image, Path, bytes, np.ndarray, torch.Tensor))


def load_image(image: ImageLike, *, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """Any accepted image -> an RGB PIL image; ValueError (naming the file or the problem) otherwise.

    max_pixels: files and bytes whose header declares more pixels are refused (:class:`ImageTooLarge`) before decoding.
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, layout="HWC")
    if isinstance(image, torch.Tensor):
        return _array_to_rgb(_tensor_to_numpy(image), layout="CHW")
    if not isinstance(image, (str, Path, bytes)):
        expected = "a PIL image, a file path, encoded bytes, a numpy array or a torch tensor"
        raise ValueError(f"Expected an image ({expected}); got {type(image).__name__}.")
    name = f"{len(image)} bytes" if isinstance(image, bytes) else str(image)
    try:
        source = io.BytesIO(image) if isinstance(image, bytes) else open_regular_file(image)
        # Pillow's own limits still apply: above ~89 M pixels it warns, above twice that it refuses. No
        # warnings.catch_warnings() here to hush it: that would reset every "once" warning of the process per image.
        with source, Image.open(source) as opened:
            if max_pixels is not None and opened.width * opened.height > max_pixels:
                raise ImageTooLarge(
                    f"Image {name} is {opened.width} x {opened.height} = {opened.width * opened.height:,} pixels, "
                    f"over the limit of {max_pixels:,} (max_pixels); it was not decoded."
                )
            return _pil_to_rgb(opened)
    # DecompressionBombError (an absurdly large or corrupt header) is not an OSError.
    except (FileNotFoundError, IsADirectoryError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"Cannot read image {name}: {error}") from error


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Image has size {image.size}; it must be at least 1x1.")
    # A phone JPEG stores pixels sideways plus an orientation tag; viewers (and the captions written for them) show
    # it upright. The transposed copy has its tag removed, so applying this twice is harmless.
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        return _array_to_rgb(np.asarray(image).astype(np.int64), layout="HWC", bits=16)
    if image.mode == "F":
        return _array_to_rgb(np.asarray(image), layout="HWC")
    if image.mode == "RGB":
        return image.copy()
    if image.mode == "P" and "transparency" in image.info:  # Pillow warns unless this goes through RGBA
        return image.convert("RGBA").convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:  # Pillow lacks some direct conversions ("La", "RGBa" premultiplied): go through RGBA.
        try:
            return image.convert("RGBA").convert("RGB")
        except ValueError as error:
            raise ValueError(f"Cannot convert a PIL image of mode {image.mode!r} to RGB: {error}") from error


def _tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.is_complex():
        raise ValueError(f"Image tensor has complex dtype {tensor.dtype}.")
    if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()  # numpy has no bfloat16
    return tensor.numpy()


def _array_to_rgb(array: np.ndarray, *, layout: str, bits: int = 8) -> Image.Image:
    """(H, W), (H, W, C) or, with layout "CHW", (C, H, W) -> RGB PIL image."""
    shape = tuple(array.shape)
    if array.ndim == 3 and layout == "CHW" and shape[0] in _CHANNELS:
        array = array.transpose(1, 2, 0)
    elif array.ndim == 3 and layout == "HWC" and shape[-1] not in _CHANNELS and shape[0] in _CHANNELS:
        raise ValueError(
            f"Image array has shape {shape}, which looks channels-first; numpy images must be (H, W, C) "
            f"(use array.transpose(1, 2, 0))."
        )
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in _CHANNELS:
        accepted = "(C, H, W), (H, W, C)" if layout == "CHW" else "(H, W, C)"
        raise ValueError(f"Image array has shape {shape}; expected (H, W) or {accepted} with C in {_CHANNELS}.")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"Image array has shape {shape}; it must be at least 1x1.")
    array = _to_uint8(array, bits=bits)
    if array.shape[-1] == 1:
        return Image.fromarray(np.ascontiguousarray(array[:, :, 0])).convert("RGB")
    if array.shape[-1] == 4:
        return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    return Image.fromarray(np.ascontiguousarray(array))


def _to_uint8(array: np.ndarray, *, bits: int) -> np.ndarray:
    kind = array.dtype.kind
    if kind == "b":
        return array.astype(np.uint8) * 255
    if kind == "f":
        if not np.isfinite(array).all():
            raise ValueError("Image array holds NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise ValueError(
                f"Float image values must lie in [0, 1]; got [{low:g}, {high:g}]. "
                f"Divide 8-bit data by 255, or pass it as uint8."
            )
        return np.rint(array.astype(np.float64) * 255).astype(np.uint8)
    if kind not in "iu":
        raise ValueError(f"Image array has unsupported dtype {array.dtype}.")
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        bits = 16
    top = 2**bits - 1
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > top:
        raise ValueError(f"{bits}-bit image values must lie in [0, {top}]; got [{low}, {high}] ({array.dtype}).")
    if bits == 8:
        return array.astype(np.uint8)
    return np.rint(array.astype(np.float64) * (255 / top)).astype(np.uint8)
