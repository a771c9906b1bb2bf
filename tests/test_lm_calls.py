"""Reading an LM forward: the past length comes from what the call carries, under any name, and never silently."""

import pytest
import torch
import transformers
from transformers import DynamicCache

from flamingo.lm_calls import cache_keyword, cache_length, output_cache, read_lm_call

IDS = torch.tensor([[5, 6, 7]])


def _cache_of(length: int) -> DynamicCache:
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, length, 4), torch.zeros(1, 2, length, 4), layer_idx=0)
    return cache


@pytest.mark.parametrize("name", ["cache", "past_key_values", "a_name_from_a_future_release"])
def test_a_cache_is_measured_whatever_its_keyword(name):
    assert read_lm_call((), {"input_ids": IDS, name: _cache_of(4)}) == (IDS, 4)


def test_a_legacy_tuple_cache_is_measured():
    legacy = ((torch.zeros(1, 2, 6, 4), torch.zeros(1, 2, 6, 4)),)
    assert read_lm_call((), {"input_ids": IDS, "past_key_values": legacy}).past_length == 6


def test_cache_position_and_attention_mask_give_the_past_length_without_a_cache():
    assert read_lm_call((), {"input_ids": IDS, "cache_position": torch.tensor([9, 10, 11])}).past_length == 9
    assert read_lm_call((), {"input_ids": IDS, "attention_mask": torch.ones(1, 10)}).past_length == 7
    assert read_lm_call((), {"input_ids": IDS, "attention_mask": torch.ones(1, 3)}).past_length == 0


def test_positional_input_ids_are_read():
    assert read_lm_call((IDS,), {"cache": _cache_of(2)}) == (IDS, 2)


def test_no_signal_means_a_fresh_sequence():
    assert read_lm_call((), {"input_ids": IDS, "use_cache": True, "attention_mask": None}).past_length == 0


def test_an_empty_cache_agrees_with_a_mask_as_long_as_the_input():
    call = read_lm_call((), {"input_ids": IDS, "cache": DynamicCache(), "attention_mask": torch.ones(1, 3)})
    assert call.past_length == 0


def test_signals_that_disagree_raise_naming_the_transformers_version():
    kwargs = {"input_ids": IDS, "cache": _cache_of(4), "attention_mask": torch.ones(1, 5)}
    version = transformers.__version__
    with pytest.raises(ValueError, match=rf"transformers {version}.*cache 'cache' says 4.*mask says 2"):
        read_lm_call((), kwargs)


def test_a_cache_that_cannot_be_measured_raises():
    class OpaqueCache:
        pass

    with pytest.raises(ValueError, match=rf"transformers {transformers.__version__}.*'kv_cache' is a OpaqueCache"):
        read_lm_call((), {"input_ids": IDS, "kv_cache": OpaqueCache()})
    with pytest.raises(ValueError, match="not a KV cache"):
        read_lm_call((), {"input_ids": IDS, "past_key_values": (1, 2)})


def test_a_call_without_input_ids_raises():
    with pytest.raises(ValueError, match="input_ids \\(not inputs_embeds\\)"):
        read_lm_call((), {"inputs_embeds": torch.zeros(1, 3, 8)})
    with pytest.raises(ValueError, match=rf"transformers {transformers.__version__}.*no input_ids"):
        read_lm_call((), {"attention_mask": torch.ones(1, 3)})


def test_cache_length_rejects_what_is_not_a_cache():
    assert cache_length(_cache_of(3)) == 3
    with pytest.raises(ValueError, match="must be a transformers Cache"):
        cache_length(torch.zeros(3))


def test_the_cache_keyword_is_read_from_the_forward_signature():
    class NewStyle(torch.nn.Module):
        def forward(self, input_ids, cache=None): ...

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None): ...

    class Neither(torch.nn.Module):
        def forward(self, input_ids, state=None): ...

    assert cache_keyword(NewStyle()) == "cache"
    assert cache_keyword(OldStyle()) == "past_key_values"
    with pytest.raises(ValueError, match="takes neither 'cache' nor 'past_key_values'"):
        cache_keyword(Neither())


def test_the_output_cache_is_found_under_either_name():
    cache = _cache_of(1)
    assert output_cache({"cache": cache}) is cache
    assert output_cache({"past_key_values": cache}) is cache
    assert output_cache({"logits": torch.zeros(1)}) is None
