"""Shared pytest fixtures: tiny random backbones saved to disk (built by ``flamingo.testing``).

There is no ``tests/__init__.py``: with pytest's default ``prepend`` import mode the ``tests/`` directory is put on
``sys.path``, so test modules import their helpers as ``from models import ...``.
"""

import logging
import os
import tempfile

# Nothing in the test suite may touch the network or the Hugging Face hub; set this before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# `datasets` caches what it reads; keep the tests' small files out of the user's ~/.cache (subprocesses inherit it).
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="flamingo-tests-datasets-"))

import pytest  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from flamingo.testing import FAMILIES, register_tiny_vision_config, save_tiny_lm, save_tiny_vision_weights  # noqa: E402

# transformers' "Loading weights" bars would fill every captured failure report with thousands of characters.
transformers_logging.disable_progress_bar()


class _LoggedDeprecations(logging.Handler):
    """What transformers logs (rather than warns) about deprecations, e.g. "Passing `generation_config` together
    with generation-related arguments ... is deprecated": a bug report addressed to us, like a FutureWarning."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "deprecat" in record.getMessage().lower():
            self.messages.append(record.getMessage())


_DEPRECATIONS = _LoggedDeprecations()
logging.getLogger("transformers").addHandler(_DEPRECATIONS)


@pytest.fixture(autouse=True)
def no_deprecation_logged_by_transformers():
    """Fails a test during which transformers logged a deprecation (it logs each message once per process)."""
    seen = len(_DEPRECATIONS.messages)
    yield
    assert _DEPRECATIONS.messages[seen:] == [], "transformers logged a deprecation (see the captured log)"


@pytest.fixture(scope="session")
def tiny_vision(tmp_path_factory):
    """``{"name": <open_clip config name>, "weights": <path of a state-dict file>}`` for the tiny ViT.

    Use as ``open_clip.create_model(tiny_vision["name"], pretrained=tiny_vision["weights"])``.
    """
    name = register_tiny_vision_config()
    weights = save_tiny_vision_weights(name, tmp_path_factory.mktemp("tiny_vision") / "tiny_vit.pt", seed=0)
    return {"name": name, "weights": weights}


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A function ``family -> directory`` holding a tiny saved causal LM and its tokenizer.

    Each family is built the first time it is asked for and reused for the rest of the session.
    """
    built = {}

    def get(family):
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
        if family not in built:
            built[family] = save_tiny_lm(tmp_path_factory.mktemp(f"tiny_{family}"), family, seed=0)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_lm_dirs(tiny_lm_dir):
    """``{family: directory}`` for every family in ``FAMILIES`` (builds all of them, well under a second)."""
    return {family: tiny_lm_dir(family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_lm_dir):
    """Directory of the tiny Llama model and tokenizer (no pad token, prepends ``<s>``, untied head)."""
    return tiny_lm_dir("llama")
