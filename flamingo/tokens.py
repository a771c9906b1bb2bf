"""The tokens Flamingo adds to a language model's vocabulary, and the one function that adds them.

``<image>`` marks where an image sits in the text; ``<|endofchunk|>`` closes the text that belongs to an image;
``<PAD>`` is added only when the tokenizer has no pad token. The strings and their order are OpenFlamingo's, so token
ids match their released checkpoints. This module imports nothing heavy: prompt builders and data readers use it.
"""

from __future__ import annotations

MEDIA_TOKEN = "<image>"
END_OF_CHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"


def add_flamingo_tokens(tokenizer) -> list[int]:
    """Add ``<|endofchunk|>``, ``<image>`` and (if the tokenizer has none) ``<PAD>`` to a Hugging Face tokenizer;
    return the ids that are new to it."""
    before = len(tokenizer)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [END_OF_CHUNK_TOKEN, MEDIA_TOKEN]}, replace_extra_special_tokens=False
    )
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    added = [tokenizer.convert_tokens_to_ids(t) for t in (END_OF_CHUNK_TOKEN, MEDIA_TOKEN, PAD_TOKEN)]
    return [i for i in added if i is not None and i >= before]
