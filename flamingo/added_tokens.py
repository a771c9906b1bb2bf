"""Trainable rows for the tokens Flamingo adds (``<|endofchunk|>``, ``<image>``, ``<PAD>``), and the embedding
modules that put them into the language model.

The LM's own embedding table and output layer stay frozen. :class:`AddedTokenEmbeddings` holds the only copy of the
added rows (owned by the Flamingo model, trained with it). Two explicit modules, installed with the LM's
``set_input_embeddings`` / ``set_output_embeddings`` (as torchtune's ``FusionEmbedding`` and IDEFICS's
``DecoupledEmbedding``), read them:

* :class:`AddedTokenInputEmbedding` looks up the LM's table, then takes the rows of the added ids from the trainable
  table;
* :class:`AddedTokenOutputLayer` computes the LM's logits, then the logit columns of the added ids from the trainable
  rows (the input rows when the LM ties its input and output embeddings).

Both present one merged table under the LM's own key names: ``lang_model.state_dict()`` (and so
``lang_model.save_pretrained``) holds the trained rows in place, and loading a table into them sets the trainable
rows. The LM saves as a plain LM that ``AutoModelForCausalLM`` loads back.

Axes: b batch, l tokens, k added tokens, v vocabulary, d width.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


class AddedTokenEmbeddings(nn.Module):
    """input: (k, d) embedding rows of the k added token ids; output: (k, d) logit rows, None when tied to input.

    Float32 like the other trainable modules, whatever the frozen LM's dtype (the embedding modules cast).
    """

    def __init__(
        self, token_ids: list[int], vocab_size: int, input_rows: torch.Tensor, output_rows: torch.Tensor | None
    ):
        super().__init__()
        ids = torch.tensor(token_ids, dtype=torch.long)
        slot_of_token = torch.full((vocab_size,), -1, dtype=torch.long)
        slot_of_token[ids] = torch.arange(len(token_ids))
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("slot_of_token", slot_of_token, persistent=False)  # (v,) row of each id, -1 if none
        self.input = nn.Parameter(input_rows.detach().float().clone())
        self.output = None if output_rows is None else nn.Parameter(output_rows.detach().float().clone())
        self._last_merge: tuple[tuple, weakref.ref] | None = None

    @classmethod
    def from_lang_model(cls, lang_model: nn.Module, token_ids: list[int]) -> AddedTokenEmbeddings:
        """Rows initialised from the LM's current tables."""
        embedding, head = lang_model.get_input_embeddings(), lang_model.get_output_embeddings()
        vocab = embedding.weight.shape[0]
        if token_ids and max(token_ids) >= vocab:
            raise ValueError(f"Added token id {max(token_ids)} is outside the LM vocabulary ({vocab}).")
        tied = head is None or head.weight is embedding.weight
        output = None if tied else head.weight[token_ids]
        return cls(token_ids, vocab, embedding.weight[token_ids], output)

    @property
    def tied(self) -> bool:
        return self.output is None

    def output_rows(self) -> torch.Tensor:
        return self.input if self.tied else self.output

    def merged(self, table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(v, d) ``table`` with the rows of the added ids replaced by ``rows`` (k, d), as a new tensor.

        The last result is remembered while it is alive, so a tied input table and output layer, which reach the
        state dict as two views of one tensor, stay one tensor there (``save_pretrained`` then stores it once).
        """
        key = (table.data_ptr(), table._version, tuple(table.shape), table.dtype, rows.data_ptr(), rows._version)
        if self._last_merge is not None and self._last_merge[0] == key:
            cached = self._last_merge[1]()
            if cached is not None:
                return cached
        merged = table.detach().clone()
        merged[self.token_ids.to(table.device)] = rows.detach().to(device=table.device, dtype=table.dtype)
        self._last_merge = (key, weakref.ref(merged))
        return merged

    @torch.no_grad()
    def load_rows(self, table: torch.Tensor, *, output: bool) -> None:
        """Take the added rows from a (v, d) table being loaded into the LM's input (or untied output) layer."""
        target = self.output if output and not self.tied else self.input
        target.copy_(table[self.token_ids.to(table.device)].to(target.dtype))


class RowsOwnedElsewhere:
    """A reference to the :class:`AddedTokenEmbeddings` that the Flamingo model owns, registers and trains.

    Deliberately not a submodule: registered here too, its rows would enter the LM's state dict (and FSDP's flat
    parameters) twice. The Flamingo model moves, casts and saves them; the embedding modules only read them.
    """

    def __init__(self, module: AddedTokenEmbeddings):
        self.module = module


class _MergedTable(nn.Module):
    """Shared by the two embedding modules: wraps ``inner`` (the LM's own module, frozen) so that the state dict
    keeps the LM's key names (``<prefix>weight``, not ``<prefix>inner.weight``), with the trained rows merged in."""

    _INNER = "inner."

    def __init__(self, inner: nn.Module, added: AddedTokenEmbeddings, *, output: bool):
        super().__init__()
        self.inner = inner
        self.owner = RowsOwnedElsewhere(added)
        self._output = output
        self.register_state_dict_post_hook(_present_merged_table)
        self.register_load_state_dict_pre_hook(_load_merged_table)

    @property
    def added(self) -> AddedTokenEmbeddings:
        return self.owner.module

    def rows(self) -> torch.Tensor:
        return self.added.output_rows() if self._output else self.added.input

    def __getattr__(self, name: str):
        # HF and user code read attributes of the LM's embedding modules (weight, embedding_dim, padding_idx, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)


def _present_merged_table(module: _MergedTable, state_dict, prefix, local_metadata) -> None:
    inner = prefix + _MergedTable._INNER
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
    if prefix + "weight" in state_dict:
        state_dict[prefix + "weight"] = module.added.merged(state_dict[prefix + "weight"], module.rows())


def _load_merged_table(module: _MergedTable, state_dict, prefix, *unused) -> None:
    if prefix + "weight" in state_dict and not (module._output and module.added.tied):
        module.added.load_rows(state_dict[prefix + "weight"], output=module._output)
    inner = prefix + _MergedTable._INNER
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)


class AddedTokenInputEmbedding(_MergedTable):
    """The LM's input embedding with the added ids' rows from :class:`AddedTokenEmbeddings`: (b, l) -> (b, l, d)."""

    def __init__(self, embedding: nn.Module, added: AddedTokenEmbeddings):
        super().__init__(embedding, added, output=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = self.inner(input_ids)
        slots = self.added.slot_of_token.to(input_ids.device)[input_ids]  # (b, l), -1 for the LM's own tokens
        # The LM's module may scale its output (Gemma's embed_scale); the added rows get the same scale.
        rows = self.added.input.to(embedded.dtype)[slots.clamp(min=0)] * getattr(self.inner, "embed_scale", 1.0)
        return torch.where((slots >= 0)[..., None], rows, embedded)


class AddedTokenOutputLayer(_MergedTable):
    """The LM's output layer with the added ids' logit columns from :class:`AddedTokenEmbeddings`:
    (b, l, d) -> (b, l, v)."""

    def __init__(self, head: nn.Module, added: AddedTokenEmbeddings):
        super().__init__(head, added, output=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.inner(hidden_states)
        added = F.linear(hidden_states, self.rows().to(hidden_states.dtype))  # (b, l, k)
        bias = getattr(self.inner, "bias", None)
        if bias is not None:
            added = added + bias[self.added.token_ids.to(bias.device)]
        # In place: an out-of-place copy of the whole (b, l, v) logits cost more than the rest of this module, and
        # the LM's output is a fresh tensor that its backward does not keep.
        return logits.index_copy_(-1, self.added.token_ids.to(logits.device), added.to(logits.dtype))
