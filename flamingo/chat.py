"""ChatSession: a conversation with a Flamingo model on one live KV cache.

Each turn adds text and images to the transcript, or generates the model's answer. A turn runs the language model on
its own new tokens only, continuing the session's KV cache, and encodes only its own new images: the earlier images'
perceiver latents and every cross-attention block's keys/values over them are carried in the session's
:class:`~flamingo.media_state.MediaState`. Masking across turns is exactly that of one forward over the whole
transcript (a text token sees the latest image before it, or every earlier one, as the model is configured)::

    session = ChatSession(model, processor)
    session.add(image, "Question:what colour is the star? Short answer:")
    session.generate(max_new_tokens=8)          # 'red'
    session.add(other_image, "Question:how many shapes are there? Short answer:")
    session.generate(max_new_tokens=8)          # reads only the new turn; the first image is not encoded again

**The transcript convention.** It is what the processor makes of the turns' items concatenated into one interleaved
list, plus the answers: the first turn starts with the tokenizer's special tokens (BOS), later turns do not; an image
that follows text (or another image) is preceded by ``<|endofchunk|>``, as the processor closes a chunk; a generated
answer ends with ``<|endofchunk|>`` (the model's own when it stops there, else one the session appends), so the next
turn starts a new chunk, as the training documents do. :attr:`ChatSession.input_ids` is the whole transcript; one
forward of the model over it, with all the session's images, gives the logits the session's next turn gets.

**The context limit.** ``on_overflow="error"`` (the default): a turn that would take the transcript past the LM's
context raises :class:`ContextLimitError`, and the session is unchanged. ``"drop_oldest_turns"``: the oldest turns
(each ``add`` and each ``generate`` is a turn) are dropped, with their images, until the new turn fits; the kept
transcript is read again in one forward (its images are not encoded again), and a kept text whose image was dropped
no longer sees it. A single turn longer than the context raises in both modes.

**Saving.** :meth:`save` writes the transcript's token ids and the images' encoded latents in one safetensors file
(no pickle); :meth:`load` reads it and rebuilds the cache with one forward over the transcript.

Decoding is greedy by default, or sampling (``temperature``, ``top_k``, ``top_p``, ``seed``); ``streamer`` takes any
transformers streamer (``TextStreamer``, ``TextIteratorStreamer``): as in ``generate``, it first receives the turn's
prompt tokens (``skip_prompt=True`` skips them), then each new token. :meth:`stream` yields the answer's text as it
is generated. One session holds one conversation (batch size 1); sessions of one model may run in separate threads.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch

from .decoding import Decoding
from .io import atomic_save_safetensors, load_safetensors
from .modeling import context_length
from .tokens import MEDIA_TOKEN

if TYPE_CHECKING:
    from .media_state import MediaState
    from .modeling import Flamingo
    from .processing import FlamingoProcessor

OVERFLOW_RULES = ("error", "drop_oldest_turns")
SESSION_FORMAT = "flamingo-chat-session/1"

__all__ = ["ChatSession", "ContextLimitError", "Decoding"]


class ContextLimitError(ValueError):
    """The transcript plus the next turn would not fit the language model's context: ``transcript`` tokens are in it,
    ``needed`` more were asked for (the turn, and the answer's room), and the LM takes ``limit``."""

    def __init__(self, message: str, *, transcript: int, needed: int, limit: int):
        super().__init__(message)
        self.transcript, self.needed, self.limit = transcript, needed, limit


class ChatSession:
    """One conversation with ``model`` on a live KV cache (module docstring).

    on_overflow: what a turn past the LM's context does, ``"error"`` or ``"drop_oldest_turns"``.
    """

    def __init__(self, model: Flamingo, processor: FlamingoProcessor, *, on_overflow: str = "error"):
        if on_overflow not in OVERFLOW_RULES:
            raise ValueError(f"on_overflow must be one of {OVERFLOW_RULES}; got {on_overflow!r}.")
        self.model = model
        self.processor = processor
        self.on_overflow = on_overflow
        self.media_token_id = model.config.media_token_id
        self.end_of_chunk_token_id = model.config.end_of_chunk_token_id
        limit = context_length(model.lang_model)
        self.context_limit: int | None = None if limit is None else limit[1]
        self.reset()

    # ------------------------------------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the conversation: an empty transcript, no cache, no images."""
        device = self.model.device
        self._ids = torch.zeros(1, 0, dtype=torch.long, device=device)  # (1, L) tokens the cache holds
        self._pending: list[int] = []  # tokens of the transcript not yet read into the cache
        self._turn_starts: list[int] = []  # where each turn begins in the transcript
        self._cache = None
        self._state: MediaState | None = None
        self._logits: torch.Tensor | None = None  # (1, V) after the last token read

    @property
    def input_ids(self) -> torch.Tensor:
        """(1, L) the whole transcript, as one forward of the model would read it."""
        pending = torch.tensor([self._pending], dtype=torch.long, device=self._ids.device).view(1, -1)
        return torch.cat([self._ids, pending], dim=1)

    @property
    def media(self) -> torch.Tensor | None:
        """(1, t, n, d) the encoded images of the transcript (perceiver latents), in order; None before any turn."""
        return None if self._state is None else self._state.media[:, : self.num_images]

    @property
    def num_images(self) -> int:
        return int((self.input_ids == self.media_token_id).sum())

    @property
    def num_turns(self) -> int:
        return len(self._turn_starts)

    def __len__(self) -> int:
        """Tokens in the transcript."""
        return self._ids.shape[1] + len(self._pending)

    def next_token_logits(self) -> torch.Tensor:
        """(1, V) the logits of the token after the transcript (what the next ``generate`` starts from)."""
        if len(self) == 0:
            raise ValueError("The session is empty; add() a turn first.")
        if self._pending:
            self._read(self._take_pending(), None)
        return self._logits

    def text(self, *, skip_special_tokens: bool = False) -> str:
        """The transcript decoded."""
        return self.processor.tokenizer.decode(self.input_ids[0], skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------------------------------------ turns
    def add(self, *items: Any, room_for_answer: int = 0) -> None:
        """A turn of text (``str``) and images (PIL image, ``Path``, bytes, array, tensor), in order, read into the cache
        now: the new tokens only, the new images encoded once. Bad input raises a ValueError and leaves the session as
        it was.

        room_for_answer: the ``max_new_tokens`` of the answer to come; room for it (and its ``<|endofchunk|>``) is made
        now, so that a turn without room for its answer is refused (or makes room) before it is added."""
        if not items:
            raise ValueError("add() needs at least one text or image.")
        batch = self.processor(list(items), add_special_tokens=len(self) == 0)
        new_ids = batch["input_ids"].to(self._ids.device)
        if new_ids[0, 0] == self.media_token_id and len(self) and self.input_ids[0, -1] != self.end_of_chunk_token_id:
            # An image after text (or after an image) starts a new chunk, as the processor closes one in a list.
            new_ids = torch.cat([new_ids.new_tensor([[self.end_of_chunk_token_id]]), new_ids], dim=1)
        images = int((new_ids == self.media_token_id).sum())
        pixels = batch["pixel_values"][:, :images] if images else None
        answer = room_for_answer + 1 if room_for_answer else 0
        what = f"This turn ({new_ids.shape[1]} tokens)" + (f" and an answer of {room_for_answer}" if answer else "")
        self._make_room(len(self._pending) + new_ids.shape[1] + answer, what=what)
        start = len(self)
        self._read(torch.cat([self._take_pending(), new_ids], dim=1), pixels)
        self._turn_starts.append(start)

    @torch.no_grad()
    def generate(self, max_new_tokens: int | None = None, *, streamer=None, decoding: Decoding | None = None,
                 stop: threading.Event | None = None, **settings) -> str:
        """The model's answer to the transcript so far, which becomes its next turn; returns its text (special tokens
        skipped). Settings are :class:`Decoding`'s fields (``do_sample=True, temperature=0.7, seed=0``), or give a
        ``decoding``. Stops at ``<|endofchunk|>``, after ``max_new_tokens``, or once ``stop`` is set (the answer so
        far is kept, closed with ``<|endofchunk|>``)."""
        if decoding is None:
            decoding = Decoding(**settings, **({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}))
        elif settings or max_new_tokens is not None:
            raise ValueError("Give either decoding= or its settings as keywords, not both.")
        if decoding.num_beams != 1:
            raise ValueError("A chat session decodes one answer; for beam search use Flamingo.generate (num_beams=).")
        if len(self) == 0:
            raise ValueError("The session is empty; add() a turn before generate().")
        # Room for the answer and the <|endofchunk|> after it; the pending tokens are read first.
        self._make_room(len(self._pending) + decoding.max_new_tokens + 1,
                        what=f"An answer of up to {decoding.max_new_tokens} tokens")
        start = len(self)
        if streamer is not None:
            streamer.put(self.input_ids[0, self._turn_starts[-1]:].cpu())  # the prompt, as generate() puts it first
        tokens = []
        for token in self._decode(decoding, stop):
            tokens.append(token)
            if streamer is not None:
                streamer.put(torch.tensor([token]))
        if streamer is not None:
            streamer.end()
        # The answer's tokens but the last are in the cache; the last, and the <|endofchunk|> that closes the answer
        # when the model did not, wait for the next turn's forward.
        last = tokens[-1]
        self._pending = [last] if last == self.end_of_chunk_token_id else [last, self.end_of_chunk_token_id]
        self._turn_starts.append(start)
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True)

    def stream(self, max_new_tokens: int | None = None, **settings) -> Iterator[str]:
        """:meth:`generate`, yielding the answer's text in pieces as it is generated (through transformers'
        ``TextIteratorStreamer``); the pieces joined equal what ``generate`` returns. If the reader stops early
        (``break``, or the iterator is closed), the answer ends at the next token, and the session is whole when the
        iterator is closed."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []
        stop = threading.Event()

        def run():
            try:
                self.generate(max_new_tokens, streamer=streamer, stop=stop, **settings)
            except BaseException as error:  # handed to the reader below
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            stop.set()
            worker.join()
        if failure:
            raise failure[0]

    def undo(self) -> None:
        """Take back the last turn (an ``add`` or a ``generate``): the transcript before it is read again in one
        forward (its images are not encoded again)."""
        if not self._turn_starts:
            raise ValueError("The session has no turn to take back.")
        cut = self._turn_starts.pop()
        ids, media = self.input_ids, self.media
        kept_images = int((ids[:, :cut] == self.media_token_id).sum())
        read = min(cut, self._ids.shape[1])
        self._rebuild(ids[:, :read], None if media is None or not kept_images else media[:, :kept_images])
        self._pending = ids[0, read:cut].tolist()

    # ------------------------------------------------------------------------------------------------ saving
    def save(self, path: str | Path) -> Path:
        """Write the conversation to ``path`` (safetensors: the transcript's token ids, turn starts and encoded
        images; no pickle). :meth:`load` resumes it with the same model."""
        path = Path(path)
        tensors = {
            "input_ids": self.input_ids[0].cpu(),
            "read": torch.tensor([self._ids.shape[1]]),
            "turn_starts": torch.tensor(self._turn_starts, dtype=torch.long),
        }
        if self.media is not None and self.num_images:
            tensors["media"] = self.media[0].cpu().contiguous()
        metadata = {"format": SESSION_FORMAT, "model": self._model_fingerprint(), "on_overflow": self.on_overflow}
        atomic_save_safetensors(path, tensors, metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, model: Flamingo, processor: FlamingoProcessor, **kwargs) -> ChatSession:
        """The conversation :meth:`save` wrote, resumed with ``model`` (the one it was saved with): the transcript is
        read in one forward, its images are not encoded again."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception as error:  # safetensors raises its own error types for a file that is not one of its own
            raise ValueError(f"{path}: not a saved chat session (safetensors could not read it: {error}).") from error
        if metadata.get("format") != SESSION_FORMAT:
            raise ValueError(f"{path}: not a saved chat session (format {metadata.get('format')!r}, expected "
                             f"{SESSION_FORMAT!r}).")
        kwargs.setdefault("on_overflow", metadata.get("on_overflow", "error"))
        session = cls(model, processor, **kwargs)
        if metadata.get("model") != session._model_fingerprint():
            raise ValueError(f"{path}: the session was saved with another model (its configuration differs); load it "
                             "with the model it was saved with.")
        tensors = load_safetensors(path)
        ids, read = tensors["input_ids"].to(model.device)[None], int(tensors["read"][0])
        media = tensors.get("media")
        if media is not None:
            media = media[None].to(model.device, model.dtype)
        if int((ids == session.media_token_id).sum()) != (0 if media is None else media.shape[1]):
            raise ValueError(f"{path}: the transcript's {MEDIA_TOKEN} tokens do not match its saved images.")
        session._rebuild(ids[:, :read], media)
        session._pending = ids[0, read:].tolist()
        session._turn_starts = tensors["turn_starts"].tolist()
        return session

    # ------------------------------------------------------------------------------------------------ internals
    def _model_fingerprint(self) -> str:
        config = self.model.config.to_dict() if hasattr(self.model.config, "to_dict") else vars(self.model.config)
        return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _take_pending(self) -> torch.Tensor:
        ids = torch.tensor([self._pending], dtype=torch.long, device=self._ids.device).view(1, -1)
        self._pending = []
        return ids

    def _decode(self, decoding: Decoding, stop: threading.Event | None = None) -> Iterator[int]:
        """The answer's tokens, one at a time; each but the last is read into the cache before the next is chosen
        (the last, ``<|endofchunk|>`` or the ``max_new_tokens``-th, is left for :meth:`generate` to make pending)."""
        warpers = _warpers(decoding)
        generator = None
        if decoding.do_sample and decoding.seed is not None:
            generator = torch.Generator(device=self._ids.device).manual_seed(decoding.seed)
        for step in range(decoding.max_new_tokens):
            scores = self.next_token_logits().clone()
            scores[:, self.media_token_id] = float("-inf")  # a generated <image> would have no image
            if decoding.do_sample:
                for warp in warpers:
                    scores = warp(self._ids, scores)
                token = int(torch.multinomial(scores.softmax(dim=-1), 1, generator=generator))
            else:
                token = int(scores.argmax(dim=-1))
            yield token
            if token == self.end_of_chunk_token_id or step == decoding.max_new_tokens - 1:
                return
            if stop is not None and stop.is_set():
                return
            self._read(torch.tensor([[token]], device=self._ids.device), None)

    def _read(self, ids: torch.Tensor, pixel_values: torch.Tensor | None) -> None:
        """Run the model on ``ids`` (1, l) continuing the cache, with the pixels of their new ``<image>`` tokens."""
        past = self._ids.shape[1]
        with torch.no_grad():
            if self._cache is None:
                out = self.model(ids, pixel_values=pixel_values, use_cache=True)
            else:
                mask = torch.ones(1, past + ids.shape[1], dtype=torch.long, device=ids.device)
                out = self.model(ids, pixel_values=pixel_values, attention_mask=mask, cache=self._cache,
                                 media_state=self._state, use_cache=True)
        self._cache, self._state = out.cache, out.media_state
        self._logits = out.logits[:, -1].float()
        self._ids = torch.cat([self._ids, ids], dim=1)

    def _rebuild(self, ids: torch.Tensor, media: torch.Tensor | None) -> None:
        """A fresh cache over ``ids`` (1, L) with the encoded images ``media`` (1, t, n, d), in one forward."""
        self._ids = ids[:, :0]
        self._cache = self._state = self._logits = None
        if ids.shape[1] == 0:
            return
        with torch.no_grad():
            out = self.model(ids, media=media, use_cache=True)
        self._cache, self._state = out.cache, out.media_state
        self._logits = out.logits[:, -1].float()
        self._ids = ids

    def _make_room(self, new_tokens: int, *, what: str) -> None:
        """Make sure ``new_tokens`` more fit the context: by the session's overflow rule, or raise."""
        if self.context_limit is None or len(self) + new_tokens <= self.context_limit:
            return
        limit = self.context_limit
        if new_tokens > limit or self.on_overflow == "error" or self.num_turns == 0:
            raise ContextLimitError(
                f"{what} does not fit: the transcript has {len(self)} tokens and the language model takes at most "
                f"{limit}. Start a new conversation (reset()), ask for fewer new tokens, or create the session with "
                "on_overflow='drop_oldest_turns'." + (" The turn alone is longer than the context." if new_tokens > limit else ""),
                transcript=len(self), needed=new_tokens, limit=limit,
            )
        ids, starts = self.input_ids, self._turn_starts
        keep = next((i for i, start in enumerate(starts) if len(self) - start + new_tokens <= limit), None)
        if keep is None:  # even the newest turn alone leaves no room
            keep = len(starts)
        cut = starts[keep] if keep < len(starts) else ids.shape[1]
        media = self.media
        first_image = int((ids[:, :cut] == self.media_token_id).sum())
        kept_media = None if media is None or first_image >= media.shape[1] else media[:, first_image:]
        read = self._ids.shape[1]
        self._rebuild(ids[:, cut:read] if cut < read else ids[:, :0], kept_media)
        self._pending = ids[0, max(cut, read):].tolist()
        self._turn_starts = [start - cut for start in starts[keep:]]
        if len(self) + new_tokens > limit:
            raise ContextLimitError(f"{what} does not fit the language model's {limit} positions even alone.",
                                    transcript=len(self), needed=new_tokens, limit=limit)


def _warpers(decoding: Decoding) -> list:
    """transformers' own logits warpers for the sampling settings (public classes of ``transformers.generation``)."""
    if not decoding.do_sample:
        return []
    from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = []
    if decoding.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(decoding.temperature))
    if decoding.top_k:
        warpers.append(TopKLogitsWarper(decoding.top_k))
    if decoding.top_p < 1.0:
        warpers.append(TopPLogitsWarper(decoding.top_p))
    return warpers
