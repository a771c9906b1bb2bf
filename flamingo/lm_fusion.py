"""Fusing gated cross-attention into a Hugging Face causal LM without changing its class, and undoing it.

The language model keeps its own class, forward, cache and ``generate``. :class:`LanguageModelFusion` makes every
change to it, keeps what it replaced, and :meth:`~LanguageModelFusion.unfuse` puts it back:

* decoder layer ``i`` becomes :class:`FusedDecoderLayer`, which runs gated cross-attention block ``i`` on the hidden
  states and then the original layer (the approach of torchtune's ``FusionLayer``; state-dict hooks keep the LM's
  parameter names);
* the input embedding and output layer become the modules of :mod:`flamingo.added_tokens`;
* one forward pre-hook on the LM observes each of its forwards (its input ids and the length of the KV cache it
  continues, read by :func:`flamingo.lm_calls.read_lm_call`) and tells the call's
  :class:`~flamingo.media_state.MediaContext`.

Per-call visual state lives in one explicit :class:`~flamingo.media_state.MediaContext` (see
:mod:`flamingo.media_state`), bound to the model's :class:`~flamingo.media_state.MediaSlot` for the duration of a
Flamingo call. Outside a Flamingo call the slot is empty and the LM computes exactly what it did before (plus the
trained rows of the added tokens).
"""

from __future__ import annotations

from torch import nn

from .added_tokens import AddedTokenEmbeddings, AddedTokenInputEmbedding, AddedTokenOutputLayer
from .lm_calls import read_lm_call
from .media_state import MediaSlot


class FusedDecoderLayer(nn.Module):
    """A decoder layer preceded by gated cross-attention: ``layer(xattn_index(hidden_states), ...)``.

    The block itself is owned by the Flamingo model (``Flamingo.cross_attn_blocks``) and reached through the call's
    :class:`~flamingo.media_state.MediaContext`, so the language model's parameters and state dict stay exactly its own.
    """

    def __init__(self, decoder_layer: nn.Module, index: int, slot: MediaSlot):
        super().__init__()
        self.decoder_layer = decoder_layer
        self.index = index
        self.slot = slot
        self.register_state_dict_post_hook(_drop_wrapper_prefix)
        self.register_load_state_dict_pre_hook(_add_wrapper_prefix)

    def forward(self, *args, **kwargs):
        context = self.slot.context
        if context is not None:
            if args:
                args = (context.cross_attend(self.index, args[0]), *args[1:])
            else:
                kwargs["hidden_states"] = context.cross_attend(self.index, kwargs["hidden_states"])
        return self.decoder_layer(*args, **kwargs)

    def __getattr__(self, name: str):
        # Some LMs read attributes off their layers (e.g. ``layer.attention_type``); forward them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "decoder_layer":
                raise
            return getattr(self.decoder_layer, name)


_WRAPPED = "decoder_layer."


def _drop_wrapper_prefix(module, state_dict, prefix, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _WRAPPED)]:
        state_dict[prefix + key[len(prefix + _WRAPPED) :]] = state_dict.pop(key)


def _add_wrapper_prefix(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _WRAPPED)]:
        state_dict[prefix + _WRAPPED + key[len(prefix) :]] = state_dict.pop(key)


def num_decoder_layers(lang_model: nn.Module) -> int | None:
    config = lang_model.config.get_text_config() if hasattr(lang_model, "config") else None
    for name in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def find_decoder_layers(lang_model: nn.Module, attr: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(dotted_path, layers)`` for the LM's list of decoder layers.

    Found from the model's structure: the ``nn.ModuleList`` of identical blocks whose length is the configured
    number of layers (the one with most parameters if several qualify). ``attr`` overrides the search.
    """
    if attr is not None:
        try:
            layers = lang_model.get_submodule(attr)
        except AttributeError as error:
            raise ValueError(f"decoder_layers_attr={attr!r} does not exist in {type(lang_model).__name__}.") from error
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise ValueError(f"decoder_layers_attr={attr!r} is a {type(layers).__name__}, not a non-empty nn.ModuleList.")
        return attr, layers

    expected = num_decoder_layers(lang_model)
    candidates = []
    for name, module in lang_model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(layer) for layer in module}) != 1 or isinstance(module[0], FusedDecoderLayer):
            continue
        if expected is not None and len(module) != expected:
            continue
        size = sum(p.numel() for p in module.parameters())
        candidates.append((size, name, module))
    if not candidates:
        raise ValueError(
            f"No decoder layers found in {type(lang_model).__name__}: no nn.ModuleList of "
            f"{expected if expected is not None else 'N'} identical blocks. Pass decoder_layers_attr='<path>' "
            "(the dotted path of the layer list, e.g. 'model.layers' or 'transformer.h')."
        )
    _, name, module = max(candidates, key=lambda c: c[0])
    return name, module


class LanguageModelFusion:
    """Every change Flamingo makes to a language model, with what it replaced, so that :meth:`unfuse` undoes it.

    layers: the LM's decoder layer list. block_indices: the layers that get cross-attention before them.
    """

    def __init__(
        self,
        lang_model: nn.Module,
        layers: nn.ModuleList,
        block_indices: list[int],
        added_tokens: AddedTokenEmbeddings,
        slot: MediaSlot,
    ):
        self.lang_model = lang_model
        self.slot = slot
        self._layers = layers
        self._replaced_layers = {}
        for index in block_indices:
            if isinstance(layers[index], FusedDecoderLayer):
                raise ValueError(f"Decoder layer {index} already has cross-attention fused into it.")
            self._replaced_layers[index] = layers[index]
            layers[index] = FusedDecoderLayer(layers[index], index, slot)

        self._input_embedding = lang_model.get_input_embeddings()
        self._output_layer = lang_model.get_output_embeddings()
        lang_model.set_input_embeddings(AddedTokenInputEmbedding(self._input_embedding, added_tokens))
        _check_installed(lang_model.get_input_embeddings(), AddedTokenInputEmbedding, lang_model)
        if self._output_layer is not None:
            lang_model.set_output_embeddings(AddedTokenOutputLayer(self._output_layer, added_tokens))
            _check_installed(lang_model.get_output_embeddings(), AddedTokenOutputLayer, lang_model)
        self._hook = lang_model.register_forward_pre_hook(self._observe_forward, with_kwargs=True)

    def _observe_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = self.slot.context
        if context is not None:
            context.start_lm_forward(read_lm_call(args, kwargs))

    def unfuse(self) -> nn.Module:
        """Put back the original layers, embeddings and output layer, remove the hook; return the plain LM."""
        self._hook.remove()
        for index, layer in self._replaced_layers.items():
            self._layers[index] = layer
        self.lang_model.set_input_embeddings(self._input_embedding)
        if self._output_layer is not None:
            self.lang_model.set_output_embeddings(self._output_layer)
        return self.lang_model


def _check_installed(found: nn.Module | None, expected: type, lang_model: nn.Module) -> None:
    if not isinstance(found, expected):
        raise ValueError(
            f"{type(lang_model).__name__} did not take Flamingo's {expected.__name__} through its "
            "set_input_embeddings / set_output_embeddings; this language model is not supported."
        )
