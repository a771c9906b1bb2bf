"""flamingo: few-shot vision-language models in the style of DeepMind's Flamingo.

A frozen open_clip vision tower, a Perceiver Resampler, and tanh-gated cross-attention fused into any Hugging Face
causal language model.
"""

from .configuration import CrossAttentionConfig, FlamingoConfig, PerceiverConfig
from .factory import create_model_and_processor
from .media_state import MediaState
from .modeling import Flamingo, FlamingoOutput
from .openflamingo import load_openflamingo
from .processing import FlamingoProcessor
from .tokens import add_flamingo_tokens

__all__ = [
    "CrossAttentionConfig",
    "Flamingo",
    "FlamingoConfig",
    "FlamingoOutput",
    "FlamingoProcessor",
    "MediaState",
    "PerceiverConfig",
    "add_flamingo_tokens",
    "create_model_and_processor",
    "load_openflamingo",
]
