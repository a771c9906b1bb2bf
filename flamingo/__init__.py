"""flamingo: few-shot vision-language models in the style of DeepMind's Flamingo.

A frozen open_clip vision tower, a Perceiver Resampler, and tanh-gated cross-attention fused into any Hugging Face
causal language model.

The names below are imported on first use (PEP 562), not with the package: ``import flamingo.configuration`` (which a
command line needs to check a config) must not import torch and transformers, which take seconds.
"""

import importlib as _importlib
from typing import TYPE_CHECKING

# Public name -> the submodule that defines it.
_EXPORTS = {
    "ChatSession": "chat",
    "CrossAttentionConfig": "configuration",
    "FlamingoConfig": "configuration",
    "PerceiverConfig": "configuration",
    "create_model_and_processor": "factory",
    "MediaState": "media_state",
    "Flamingo": "modeling",
    "FlamingoOutput": "modeling",
    "load_openflamingo": "openflamingo",
    "FlamingoProcessor": "processing",
    "add_flamingo_tokens": "tokens",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time __getattr__ imports each name on first use
    from .chat import ChatSession
    from .configuration import CrossAttentionConfig, FlamingoConfig, PerceiverConfig
    from .factory import create_model_and_processor
    from .media_state import MediaState
    from .modeling import Flamingo, FlamingoOutput
    from .openflamingo import load_openflamingo
    from .processing import FlamingoProcessor
    from .tokens import add_flamingo_tokens


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'flamingo' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    # The public names (imported or not yet), the submodules already imported, and the module's own dunders.
    return sorted(set(__all__) | {name for name in globals() if not name.startswith("_") and name != "TYPE_CHECKING"}
                  | {name for name in globals() if name.startswith("__")})
