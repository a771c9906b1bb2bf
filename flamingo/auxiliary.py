"""The auxiliary channel: named losses and statistics that Flamingo's modules report during one call.

A module with something to report besides its hidden states (a mixture-of-experts block: its load-balancing or
entropy loss, its expert usage) receives a :class:`AuxiliaryReport` as an explicit ``report=`` argument and calls
:meth:`~AuxiliaryReport.add_loss` / :meth:`~AuxiliaryReport.add_stat` on it. Dense modules take the argument and
ignore it, so a dense model reports nothing and does no extra work. What was reported reaches
``FlamingoOutput.aux_losses`` and ``FlamingoOutput.stats``, and from there the training objective (each loss times
its ``optim.aux_loss_weights`` entry), the progress bar, the trackers and ``metrics.jsonl``.

Example (a block's forward)::

    def forward(self, x, keys_values, mask, *, attributes=None, report=None):
        out, balance, usage = self.moe(x)
        if report is not None:
            report.add_loss("balance", balance)          # -> aux_losses["balance"]: mean over the blocks
            report.add_stat("expert0_share", usage[0])   # -> stats["cross_attn_blocks.3/expert0_share"]
        return out

Losses are keyed by name and averaged over the modules (and LM forwards) that reported them, so one weight serves
a loss that every block reports, as Switch and LIMoE weight theirs. Statistics are keyed ``"<source>/<name>"``,
since a per-block figure (which experts one layer uses) means little averaged over layers.
"""

from __future__ import annotations

from collections import defaultdict

import torch


class _Reports:
    """The values reported so far in one call, shared by every scoped view of its report."""

    def __init__(self):
        self.losses: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.stats: dict[str, list[torch.Tensor]] = defaultdict(list)


class AuxiliaryReport:
    """Collects one call's auxiliary losses and statistics. ``source`` names the reporting module in the keys of
    :meth:`stats`; :meth:`scoped` gives the view a module reports through."""

    def __init__(self, source: str = "", *, _reports: _Reports | None = None):
        self.source = source
        self._reports = _reports if _reports is not None else _Reports()

    def scoped(self, source: str) -> AuxiliaryReport:
        """A view of this report for the module ``source`` (e.g. ``"cross_attn_blocks.3"``)."""
        return AuxiliaryReport(source, _reports=self._reports)

    def add_loss(self, name: str, value: torch.Tensor) -> None:
        """A differentiable scalar loss; the training objective adds it times its configured weight."""
        self._reports.losses[name].append(_scalar(value, f"auxiliary loss {name!r} from {self.source or 'the model'}"))

    def add_stat(self, name: str, value: torch.Tensor | float) -> None:
        """A scalar statistic for logging (detached; never part of the objective)."""
        value = torch.as_tensor(value)
        self._reports.stats[f"{self.source}/{name}"].append(_scalar(value, f"statistic {name!r}").detach())

    def losses(self) -> dict[str, torch.Tensor]:
        """``{name: mean of its reports}`` (empty when nothing was reported)."""
        return {name: _mean(values) for name, values in self._reports.losses.items()}

    def stats(self) -> dict[str, torch.Tensor]:
        """``{"source/name": mean of its reports}``."""
        return {name: _mean(values) for name, values in self._reports.stats.items()}


def _scalar(value: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"The {what} must be a scalar tensor; got {shape}.")
    return value.reshape(())


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    if len(values) == 1:
        return values[0]
    return torch.stack([v.float().to(values[0].device) for v in values]).mean()
