"""Property-based fuzzing of FlamingoProcessor: whatever goes in, the result is a documented conversion or a ValueError.

Random interleavings of text (unicode, control characters, lone surrogates, literal special tokens, very long strings)
and images (PIL modes 1 … CMYK, 16-bit and float data, numpy arrays and torch tensors of many dtypes and layouts,
encoded files, garbage bytes, None). The property:

* either the output has ``pixel_values`` of shape (B, T_max, 1, 3, H, W), finite, and ``input_ids`` with one
  ``<image>`` token per image of each sample;
* or a ValueError was raised; and a ValueError only where some part of the input was generated as invalid.

Never another exception type, never NaN, never a hang. More examples: ``FLAMINGO_FUZZ_EXAMPLES=500 pytest ...``.
"""

import io
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from models import build_tiny_model

IMAGE, EOC = "<image>", "<|endofchunk|>"
EXAMPLES = int(os.environ.get("FLAMINGO_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOWEST_CALL_S = 10.0  # a hang shows up as a call far slower than this


@dataclass
class Case:
    """One generated input and whether the documented conversion must accept it."""

    value: Any
    valid: bool


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def processor(request, tiny_vision, tiny_lm_dir):
    """llama's tokenizer prepends <s>; gpt2's adds nothing, so an empty text is zero tokens there."""
    return build_tiny_model(tiny_vision, tiny_lm_dir(request.param))[1]


# ------------------------------------------------------------------------------------------------ images

SIZES = st.tuples(st.integers(1, 300), st.integers(1, 50)) | st.tuples(st.integers(1, 50), st.integers(1, 300))


def _rng(seed):
    return np.random.default_rng(seed)


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]))
    w, h = draw(SIZES)
    rng = _rng(draw(st.integers(0, 2**32 - 1)))
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8))
    if mode == "I;16":
        return Case(Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)), True)
    if mode == "I":
        high = draw(st.sampled_from([65536, 2**31 - 1]))  # 16-bit range, or beyond it (rejected)
        return Case(Image.fromarray(rng.integers(0, high, (h, w), dtype=np.int32)), high == 65536)
    if mode == "F":
        scale = draw(st.sampled_from([1.0, 255.0]))  # 0..1 as documented, or 0..255 (rejected unless all tiny)
        data = (rng.random((h, w)) * scale).astype(np.float32)
        return Case(Image.fromarray(data), bool(data.max() <= 1))
    if mode == "1":
        return Case(Image.fromarray(rng.random((h, w)) > 0.5), True)
    return Case(rgba.convert(mode) if mode != "RGBA" else rgba, True)


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(["uint8", "uint16", "int64", "float16", "float32", "float64", "bool"]))
    w, h = draw(SIZES)
    channels = draw(st.sampled_from([None, 1, 2, 3, 4, 5]))
    rng = _rng(draw(st.integers(0, 2**32 - 1)))
    shape = (h, w) if channels is None else (h, w, channels)
    valid = channels in (None, 1, 3, 4)
    if dtype == "bool":
        data = rng.random(shape) > 0.5
    elif dtype.startswith("float"):
        data = rng.random(shape)
        spoil = draw(st.sampled_from([None, None, "scale", "nan", "inf", "negative"]))
        if spoil == "scale":
            data = data * 255
            valid = valid and bool(data.max() <= 1)
        elif spoil is not None:
            data.flat[0] = {"nan": np.nan, "inf": np.inf, "negative": -0.5}[spoil]
            valid = False
        data = data.astype(dtype)
    else:
        top = {"uint8": 255, "uint16": 65535, "int64": draw(st.sampled_from([255, 1000]))}[dtype]
        data = rng.integers(0, top + 1, shape).astype(dtype)
        valid = valid and bool(data.max() <= 255 or dtype == "uint16")
    if draw(st.booleans()):  # hand it over as a torch tensor, in torchvision's CHW layout where it has channels
        tensor = torch.from_numpy(np.ascontiguousarray(data))
        if tensor.ndim == 3 and draw(st.booleans()):
            tensor = tensor.permute(2, 0, 1)
            # A channels-first tensor is recognised by a leading 1, 3 or 4 (else it is read as HWC).
            valid = valid and channels in (1, 3, 4)
        elif tensor.ndim == 3 and h in (1, 3, 4):
            valid = False  # HWC with a leading 1, 3 or 4 reads as CHW: a documented ambiguity, may be rejected
        return Case(tensor, valid)
    if data.ndim == 3 and draw(st.booleans()):
        return Case(np.ascontiguousarray(data.transpose(2, 0, 1)), False)  # numpy CHW: rejected (or misread: invalid)
    return Case(data, valid)


@st.composite
def encoded(draw):
    case = draw(pil_images())
    image = case.value
    if image.mode == "F" or image.mode == "I" or image.mode == "CMYK":  # not all are writable as PNG
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    if draw(st.booleans()):
        return Case(data, True)
    return Case(data[: draw(st.integers(0, len(data) - 1))], False)  # truncated file


_broken = st.just(Case(None, False)) | st.binary(max_size=64).map(lambda b: Case(b, False))
# one_of picks branches uniformly: repeat the valid kinds so most examples get as far as the conversion.
images = st.one_of(pil_images(), pil_images(), arrays(), arrays(), encoded(), _broken)

# ------------------------------------------------------------------------------------------------ text

_valid_characters = st.characters(codec="utf-8")  # every encodable code point, control characters included
_characters = st.characters(codec=None, categories=None)  # surrogates too
_odd = st.text(st.sampled_from(list("ab \n\t\x00\x1b\u202e\ufeff🐱é")), max_size=40)
_short = st.text(_valid_characters, max_size=40) | _odd | st.text(_characters, max_size=10)
_long = st.builds(lambda s, n: s * n, st.text(_valid_characters, min_size=1, max_size=8), st.integers(500, 3000))
_tokens = st.sampled_from([EOC, "<PAD>", "<s>", "</s>", "<|endoftext|>", "<imag e>"])


def _text_case(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return Case(text, False)
    return Case(text, True)


texts = st.one_of(_short, _short, _long, _tokens).map(_text_case)


def _ok(case, *, allow_image_token=False):
    if isinstance(case.value, str) and IMAGE in case.value and not allow_image_token:
        return False
    return case.valid


# ------------------------------------------------------------------------------------------------ the property


def _check(processor, call, image_lists, valid):
    start = time.perf_counter()
    try:
        out = call()
    except ValueError as error:
        event(f"ValueError: {str(error).split(':')[0][:40]}")
        assert not valid, f"a documented, valid input was rejected: {error}"
        return
    finally:
        assert time.perf_counter() - start < SLOWEST_CALL_S
    event("converted")
    pixels, ids, mask = out["pixel_values"], out["input_ids"], out["attention_mask"]
    batch, most = len(image_lists), max(len(x) for x in image_lists)
    assert pixels.shape == (batch, max(most, 1), 1, 3, 32, 32)
    assert torch.isfinite(pixels).all()
    assert ids.shape == mask.shape and ids.shape[0] == batch
    assert (mask.sum(dim=1) > 0).all()
    assert (ids == processor.media_token_id).sum(dim=1).tolist() == [len(x) for x in image_lists]
    for b, sample in enumerate(image_lists):
        assert (pixels[b, len(sample) :] == 0).all()  # padded slots stay zero


_sample = st.lists(texts | images, min_size=1, max_size=5)
_sample_or_empty = st.integers(0, 7).flatmap(lambda k: st.just([]) if k == 7 else _sample)  # empty: rejected


@FUZZ
@given(data=st.data())
def test_interleaved_input_converts_or_raises_value_error(processor, data):
    samples = data.draw(st.lists(_sample_or_empty, min_size=1, max_size=3))
    batched = len(samples) > 1 or data.draw(st.booleans())
    inputs = [[c.value for c in s] for s in samples]
    inputs = inputs if batched else inputs[0]
    valid = all(s for s in samples) and all(_ok(c) for s in samples for c in s)
    image_lists = [[c.value for c in s if not isinstance(c.value, str)] for s in samples]
    _check(processor, lambda: processor(inputs), image_lists, valid=valid and _nonempty(processor, samples))


@FUZZ
@given(data=st.data())
def test_marked_text_input_converts_or_raises_value_error(processor, data):
    n = data.draw(st.integers(1, 3))
    samples = []
    for _ in range(n):
        pieces = data.draw(st.lists(texts, min_size=1, max_size=3))
        image_cases = data.draw(st.lists(images, max_size=3))
        # Put one <image> marker per image between the text pieces; sometimes one too few or too many.
        markers = len(image_cases) + data.draw(st.sampled_from([0] * 8 + [-1, 1]))
        markers = max(markers, 0)
        text = "".join(IMAGE + p.value if i < markers else p.value for i, p in enumerate(pieces))
        text = IMAGE * max(markers - len(pieces), 0) + text
        ok = markers == len(image_cases) and all(_ok(p) for p in pieces) and all(c.valid for c in image_cases)
        samples.append((text, [c.value for c in image_cases], ok))
    as_batch = n > 1 or data.draw(st.booleans())
    if as_batch:
        call = lambda: processor(text=[t for t, _, _ in samples], images=[i for _, i, _ in samples])  # noqa: E731
    else:
        call = lambda: processor(text=samples[0][0], images=samples[0][1])  # noqa: E731
    valid = all(ok for _, _, ok in samples) and all(_encodes_to_tokens(processor, t) for t, _, _ in samples)
    _check(processor, call, [i for _, i, _ in samples], valid=valid)


def _encodes_to_tokens(processor, text):
    return len(processor.tokenizer(text)["input_ids"]) > 0


def _nonempty(processor, samples):
    """A sample of empty strings only is zero tokens with a tokenizer that adds no BOS: rejected, documented."""
    return all(any(not isinstance(c.value, str) or _encodes_to_tokens(processor, c.value) for c in s) for s in samples)
