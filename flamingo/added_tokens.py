"""Trainable embeddings for the tokens Flamingo adds (``<|endofchunk|>``, ``<image>``, ``<PAD>``).

The language model's embedding table and output layer stay frozen. This module holds small trainable tables for the
added ids only and swaps them in with forward hooks on the LM's input embedding (rows) and output layer (logit
columns), so "what trains" is a property of the structure (as torchtune's ``FusionEmbedding``) and no gradient
masking or weight-decay exclusion is needed. When input and output embeddings are tied, one table serves both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AddedTokenEmbeddings(nn.Module):
    """input: (k, d) rows for the k added token ids; output: (k, d) logit rows, or None when tied to input."""

    def __init__(self, lang_model: nn.Module, token_ids: list[int]):
        super().__init__()
        embedding = lang_model.get_input_embeddings()
        head = lang_model.get_output_embeddings()
        ids = torch.tensor(token_ids, dtype=torch.long)
        if len(token_ids) and int(ids.max()) >= embedding.weight.shape[0]:
            raise ValueError(f"Added token id {int(ids.max())} is outside the LM vocabulary ({embedding.weight.shape[0]}).")
        slot_of_token = torch.full((embedding.weight.shape[0],), -1, dtype=torch.long)
        slot_of_token[ids] = torch.arange(len(token_ids))
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("slot_of_token", slot_of_token, persistent=False)
        self.tied = head is None or head.weight is embedding.weight
        # Float32 like the other trainable modules, whatever the frozen LM's dtype (the hooks cast on the way in).
        self.input = nn.Parameter(embedding.weight.detach()[ids].float())
        self.output = None if self.tied else nn.Parameter(head.weight.detach()[ids].float())
        embedding.register_forward_hook(self._swap_input_rows)
        if head is not None:
            head.register_forward_hook(self._swap_output_columns)

    def _swap_input_rows(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        slots = self.slot_of_token.to(args[0].device)[args[0]]  # (b, l), -1 for ordinary tokens
        rows = self.input.to(output.dtype)[slots.clamp(min=0)] * getattr(module, "embed_scale", 1.0)
        return torch.where((slots >= 0)[..., None], rows, output)

    def _swap_output_columns(self, module: nn.Module, args, logits: torch.Tensor) -> torch.Tensor:
        hidden = args[0]
        weight = self.input if self.tied else self.output
        added = F.linear(hidden, weight.to(hidden.dtype))
        if getattr(module, "bias", None) is not None:
            added = added + module.bias[self.token_ids]
        return logits.index_copy(-1, self.token_ids.to(logits.device), added.to(logits.dtype))

    @torch.no_grad()
    def reset_from_lang_model(self, lang_model: nn.Module) -> None:
        """Take the added rows from the LM's current tables (after loading weights into the LM)."""
        self.input.copy_(lang_model.get_input_embeddings().weight[self.token_ids])
        if self.output is not None:
            self.output.copy_(lang_model.get_output_embeddings().weight[self.token_ids])

    @torch.no_grad()
    def merge_into_lang_model(self, lang_model: nn.Module) -> None:
        """Write the trained rows into the LM's own tables, so the LM saved on its own is complete."""
        lang_model.get_input_embeddings().weight[self.token_ids] = self.input.to(lang_model.dtype)
        if self.output is not None:
            lang_model.get_output_embeddings().weight[self.token_ids] = self.output.to(lang_model.dtype)
