"""How an answer's tokens are chosen, shared by :class:`flamingo.ChatSession` and ``flamingo-generate``.

Light on purpose (no torch): a command line checks its settings before the model stack loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed")

__all__ = ["Decoding"]


@dataclass(frozen=True)
class Decoding:
    """Greedy unless ``do_sample``; then the logits are divided by ``temperature`` and cut to the ``top_k`` most likely
    tokens (0: all) and the smallest set with probability ``top_p`` (1.0: all), and ``seed`` (None: torch's global
    generator) makes the draw repeatable. ``num_beams`` > 1: beam search (``flamingo-generate`` and
    ``Flamingo.generate``; a chat session decodes one sequence). At most ``max_new_tokens`` tokens; the answer also
    stops at ``<|endofchunk|>``."""

    max_new_tokens: int = 32
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut (transformers' own default would be 50)
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer; got {self.max_new_tokens!r}.")
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 1:
            raise ValueError(f"num_beams must be a positive integer; got {self.num_beams!r}.")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be above 0; got {self.temperature!r}.")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0; got {self.top_k!r}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}.")

    def generate_kwargs(self) -> dict:
        """Keywords for ``Flamingo.generate`` (the seed is set apart, with ``torch.manual_seed``)."""
        kwargs = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams, "do_sample": self.do_sample}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs

    def as_json(self) -> dict:
        """The settings, the sampling ones None without ``do_sample``."""
        return {name: (None if name in SAMPLING_FIELDS and not self.do_sample else value)
                for name, value in asdict(self).items()}
