"""Fuzzing the model's public boundary: any input gives a clear ValueError or finite logits of the right shape.

Random batch sizes, text lengths (up to past the LM's context), image counts, pixel dtypes and sizes, token ids
(in and out of the vocabulary), NaN/inf in one image, pixels or precomputed media, forward or generate, and both
``nonfinite_media`` settings. Never another exception type, never a NaN. More examples:
``FLAMINGO_FUZZ_EXAMPLES=500 pytest tests/test_fuzz_model.py``.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from models import build_tiny_model

FUZZ = settings(
    max_examples=int(os.environ.get("FLAMINGO_FUZZ_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
PIXEL_DTYPES = [torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8]


@pytest.fixture(scope="module")
def model(tiny_vision, tiny_llama_dir):
    return build_tiny_model(tiny_vision, tiny_llama_dir, immediate=False)[0]


@st.composite
def model_inputs(draw, media_token_id: int, vocab: int):
    b = draw(st.sampled_from([0, 1, 1, 2, 3]))
    length = draw(st.sampled_from([0, 1, 2, 5, 8, 12, 12, 12, 300]))
    t = draw(st.integers(0, 3))
    ids = torch.tensor(
        draw(st.lists(st.lists(st.integers(0, vocab - 1), min_size=length, max_size=length), min_size=b, max_size=b)),
        dtype=torch.long,
    ).view(b, length)
    # Up to t <image> tokens per sample; a sample whose draws land on the same position has fewer.
    for row in range(b):
        for position in draw(st.lists(st.integers(0, max(length - 1, 0)), max_size=t if length else 0)):
            ids[row, position] = media_token_id
    if b and length and draw(st.integers(0, 5)) == 0:  # sometimes, a token id outside the vocabulary
        ids[draw(st.integers(0, b - 1)), draw(st.integers(0, length - 1))] = draw(st.sampled_from([-1, vocab, 10**6]))
    pixels = None
    if t:
        dtype = draw(st.sampled_from(PIXEL_DTYPES))
        size = draw(st.sampled_from([32, 32, 32, 16]))
        frames = draw(st.sampled_from([None, 1, 2]))  # None: (b, t, c, h, w)
        shape = (b, t, 3, size, size) if frames is None else (b, t, frames, 3, size, size)
        if dtype == torch.uint8:
            pixels = torch.randint(0, 256, shape, dtype=dtype)
        else:
            pixels = (torch.randn(shape) * draw(st.sampled_from([1.0, 100.0]))).to(dtype)
            if b and draw(st.booleans()):
                value = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
                pixels[draw(st.integers(0, b - 1)), draw(st.integers(0, t - 1))].view(-1)[0] = value
    return {
        "ids": ids,
        "pixels": pixels,
        "as_media": draw(st.booleans()),
        "mode": draw(st.sampled_from(["raise", "mask"])),
        "generate": draw(st.booleans()),
    }


def _check(model, case):
    model.config.nonfinite_media = case["mode"]
    ids, pixels = case["ids"], case["pixels"]
    inputs = {"input_ids": ids}
    try:
        with torch.no_grad():
            if pixels is not None and case["as_media"] and pixels.is_floating_point() and pixels.shape[-1] == 32:
                inputs["media"] = model.encode_media(pixels)  # the tower itself may make NaN from inf: checked below
            elif pixels is not None:
                inputs["pixel_values"] = pixels
            if case["generate"]:
                out = model.generate(**inputs, max_new_tokens=2)
                assert out.shape[0] == ids.shape[0] and out.shape[1] in (ids.shape[1] + 1, ids.shape[1] + 2)
                return "ok"
            logits = model(**inputs).logits
    except ValueError:
        return "ValueError"
    assert logits.shape[:2] == ids.shape
    assert logits.isfinite().all(), "non-finite logits"
    return "ok"


@FUZZ
@given(data=st.data())
def test_any_input_gives_a_value_error_or_finite_logits_of_the_right_shape(model, data):
    vocab = model.lang_model.get_input_embeddings().weight.shape[0]
    case = data.draw(model_inputs(model.config.media_token_id, vocab))
    try:
        event(_check(model, case))  # outcome counts: pytest --hypothesis-show-statistics
    finally:
        model.config.nonfinite_media = "raise"


def test_a_masked_nan_image_always_gives_finite_logits(model):
    """The property's strongest case, fixed: under "mask", NaN in any one image never reaches the logits."""
    model.config.nonfinite_media = "mask"
    try:
        ids = torch.tensor([[1, model.config.media_token_id, 5, 6, model.config.media_token_id, 7]] * 2)
        for b in range(2):
            for t in range(2):
                pixels = torch.randn(2, 2, 3, 32, 32)
                pixels[b, t] = float("nan")
                assert model(input_ids=ids, pixel_values=pixels).logits.isfinite().all()
    finally:
        model.config.nonfinite_media = "raise"
