"""Reading a language-model forward call: its input ids, and how many tokens its KV cache already holds.

The fused cross-attention must know, for every forward of the LM, which ``<image>`` tokens came before its tokens.
That depends on how far the call continues a KV cache. transformers has renamed that argument before
(``past_key_values`` became ``cache`` in 5.24, and ``cache_position`` was dropped), so nothing here depends on one
keyword's name. The past length is measured from every signal the call carries:

* the cache object itself, found by what it is (anything with ``get_seq_length()``, or a legacy tuple of key/value
  tensors), under whatever name it is passed;
* ``cache_position`` (transformers < 5.24): the position of the call's first token;
* a 2-D attention mask covering the cached tokens too: its length minus the input length.

The signals must agree. A call that carries a cache we cannot measure, signals that disagree, or no input ids at all
raise a ``ValueError`` naming the installed transformers version, instead of computing with a wrong image mask.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import torch
import transformers


class LMCall(NamedTuple):
    """input_ids: (b, l) token ids of this forward. past_length: tokens the KV cache holds before them."""

    input_ids: torch.Tensor
    past_length: int


def _unsupported(problem: str) -> ValueError:
    return ValueError(
        f"Flamingo cannot interpret this language-model forward under transformers {transformers.__version__}: "
        f"{problem}. Please report it with your transformers version; the supported range is in the README."
    )


def _looks_like_cache_argument(name: str) -> bool:
    return name != "use_cache" and ("cache" in name or name.startswith("past"))


def _cache_length(name: str, value: Any) -> int | None:
    """Tokens held by a KV cache passed as ``name``; None when ``value`` is no cache."""
    if hasattr(value, "get_seq_length"):
        return int(value.get_seq_length())
    if isinstance(value, (tuple, list)) and _looks_like_cache_argument(name):
        # The legacy format: per layer (key, value), each (b, h, s, e).
        if len(value) == 0:
            return 0
        try:
            return int(value[0][0].shape[-2])
        except (TypeError, IndexError, AttributeError):
            raise _unsupported(f"the argument {name!r} holds a {type(value).__name__} that is not a KV cache") from None
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str, tuple, list, dict)):
        return None
    if _looks_like_cache_argument(name):
        raise _unsupported(f"its cache argument {name!r} is a {type(value).__name__}, whose length cannot be measured")
    return None


def read_lm_call(args: tuple, kwargs: dict[str, Any]) -> LMCall:
    """The input ids and past length of a causal-LM forward called as ``lm(*args, **kwargs)``."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], torch.Tensor):
        input_ids = args[0]
    if input_ids is None:
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError(
                "Flamingo needs input_ids (not inputs_embeds) to locate the <image> tokens of every language-model "
                "forward."
            )
        raise _unsupported("it carries no input_ids")
    if input_ids.ndim != 2:
        raise _unsupported(f"its input_ids have shape {tuple(input_ids.shape)}, not (batch, length)")
    length = input_ids.shape[1]

    measured: dict[str, int] = {}
    for name, value in kwargs.items():
        cached = _cache_length(name, value)
        if cached is not None:
            measured[f"the cache {name!r}"] = cached
    for position, value in enumerate(args[1:], start=1):
        if hasattr(value, "get_seq_length"):
            measured[f"the cache given as positional argument {position}"] = int(value.get_seq_length())
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() > 0:
        measured["cache_position"] = int(cache_position.reshape(-1)[0])
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1] != length:
        # A 2-D mask covers the cached tokens and the new ones. (4-D masks of static caches span the whole
        # allocated cache, so their length says nothing about the past.)
        measured["the attention mask"] = mask.shape[1] - length

    lengths = set(measured.values())
    if len(lengths) > 1:
        found = ", ".join(f"{source} says {value}" for source, value in measured.items())
        raise _unsupported(f"its signals disagree on how many tokens are already cached ({found})")
    past = lengths.pop() if lengths else 0
    if past < 0:
        raise _unsupported(f"it continues a cache of {past} tokens")
    return LMCall(input_ids, past)


def cache_length(cache: Any) -> int:
    """Tokens held by a KV cache given to Flamingo (a ``transformers.Cache`` or the legacy tuple format)."""
    length = _cache_length("cache", cache)
    if length is None:
        raise ValueError(
            f"cache must be a transformers Cache (e.g. the previous output's cache); got {type(cache).__name__}."
        )
    return length


def cache_keyword(lang_model: torch.nn.Module) -> str:
    """The name under which this LM's forward takes its KV cache: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (earlier), read from the forward's own signature."""
    parameters = inspect.signature(lang_model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise _unsupported(
        f"{type(lang_model).__name__}.forward takes neither 'cache' nor 'past_key_values' "
        f"(its parameters: {list(parameters)})"
    )


def output_cache(output: Any) -> Any:
    """The KV cache in an LM's output, under the name its output class declares (``cache`` from transformers 5.24,
    ``past_key_values`` before); None if it returned none.

    Only the declared field is read: asking a 5.24 output for ``past_key_values`` logs a deprecation warning.
    """
    declared = getattr(output, "__dataclass_fields__", None)
    for name in ("cache", "past_key_values"):
        if declared is not None and name not in declared:
            continue
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None
