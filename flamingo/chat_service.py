"""The web demo's chat service: what the page asks for, apart from HTTP.

:class:`ChatService` takes each request as a dict (the JSON the page sent) and returns a dict, or, for a turn, the
answer's text in pieces as the model writes it; a request it refuses raises :class:`ClientError`, whose message the
page shows. :mod:`flamingo.web_demo` serves it over HTTP; a test or another front end can call it directly::

    service = ChatService(ChatServiceConfig(model="micro"), model, processor)
    with service.turn({"session": "a", "images": [base64_png], "text": "Output:"}) as pieces:
        answer = "".join(pieces)

**A turn.** Each session id is one :class:`~flamingo.chat.ChatSession`, so a turn reads only its own new tokens and
images. The images are decoded and checked (:func:`flamingo.images.load_image`, a byte cap, the pixel cap) before the
model lock is taken, and ``ChatSession.add(..., room_for_answer=max_new_tokens)`` refuses a turn that leaves no room
for its answer: a refused turn leaves the conversation as it was. An accepted turn ends in one of three ways:

* answered: the reader read the pieces to the end;
* cut short: the reader stopped early (the page went away), so the answer ends at its next token
  (``ChatSession.stream``), and the session is whole when the ``turn`` block exits;
* taken back (``ChatSession.undo``): generation failed, or never began, so the conversation is as it was before.

**Demo sets.** A select box puts few-shot demos at the start of the conversation: micro's built-in ``caption`` and
``vqa`` sets (:func:`flamingo.micro.samples.demo_set`) and each ``demos`` folder (:mod:`flamingo.demos`) by its name.

**Sessions and the model.** The page makes a random session id when it loads. The service keeps at most
``max_sessions`` (64) conversations and drops the least recently used; a page whose conversation was dropped is told
so and asked to press Clear, rather than silently continuing a fresh one. The model is shared by all sessions and
its calls are serialised by one lock (on a small CPU two generations at once only slow each other down);
:meth:`ChatService.info` and :meth:`ChatService.clear` never wait for it, and image decoding happens before it is
taken. Nothing here imports torch until a model is used, so that a command-line ``--help`` stays light.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:
    from PIL import Image

    from .chat import ChatSession

MICRO = "micro"  # flamingo.micro.MICRO_MODEL_NAME, not imported here so that --help stays light
NO_DEMOS = "none"
SESSION_ID = re.compile(r"[A-Za-z0-9-]{1,64}")

logger = logging.getLogger(__name__)

__all__ = ["ChatServiceConfig", "ClientError", "DemoSet", "SessionStore", "ChatService", "load_demo_sets",
           "decode_upload", "hints"]


@dataclass(frozen=True)
class ChatServiceConfig:
    """The model the service chats with, its demo sets and the limits on what a page may send."""

    model: str = MICRO  # "micro" or a folder save_pretrained wrote (micro also gets its built-in demo sets)
    demos: tuple[Path, ...] = ()  # few-shot demo folders (flamingo.demos), offered by their folder names
    max_new_tokens: int = 32
    max_sessions: int = 64  # conversations kept; the least recently used is dropped first
    max_image_bytes: int = 10 * 2**20  # per uploaded image, encoded
    max_images_per_turn: int = 16
    max_text_chars: int = 20_000

    def __post_init__(self):
        for name in ("max_new_tokens", "max_sessions", "max_image_bytes", "max_images_per_turn", "max_text_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}.")


class ClientError(ValueError):
    """A request the service refuses; its message is shown on the page. ``image``: the upload it is about, if one."""

    def __init__(self, message: str, *, image: int | None = None):
        super().__init__(message)
        self.image = image


# ------------------------------------------------------------------------------------------------ demos
@dataclass(frozen=True)
class DemoSet:
    """Few-shot demos as one turn: ``items`` for ``ChatSession.add`` (images and texts interleaved) and ``shown``,
    what the page draws (``{"image": data URL of a thumbnail, "text": ...}`` per demo)."""

    items: tuple
    shown: tuple[dict, ...]


def load_demo_sets(config: ChatServiceConfig) -> dict[str, DemoSet]:
    """``{name: DemoSet}``: ``"none"``, micro's built-in sets (for ``--model micro``), then each ``--demos`` folder by
    its name (by its path where the name is taken). A ValueError names a bad folder."""
    from .demos import read_demos
    from .images import load_image

    sets = {NO_DEMOS: DemoSet((), ())}
    if config.model == MICRO:
        from .micro.samples import DEMO_SETS, demo_set

        for kind in DEMO_SETS:
            sets[kind] = _demo_set([(load_image(image), text) for image, text in demo_set(kind)])
    for folder in config.demos:
        name = folder.name if folder.name and folder.name not in sets else str(folder)
        sets[name] = _demo_set([(load_image(demo.image), demo.text) for demo in read_demos(folder)])
    return sets


def _demo_set(pairs: list[tuple[Image.Image, str]]) -> DemoSet:
    items = tuple(x for pair in pairs for x in pair)
    return DemoSet(items, tuple({"image": thumbnail_url(image), "text": text} for image, text in pairs))


def thumbnail_url(image: Image.Image, size: int = 160) -> str:
    """A PNG data URL of ``image`` shrunk to at most ``size`` px a side (small ones are left as they are)."""
    import io

    copy = image.copy()
    copy.thumbnail((size, size))
    buffer = io.BytesIO()
    copy.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def hints(model: str) -> list[str]:
    """Prompt templates the page offers as hints: micro's two (a caption, a question)."""
    if model != MICRO:
        return []
    from .micro.samples import CAPTION_TEMPLATE, VQA_TEMPLATE

    return [CAPTION_TEMPLATE, VQA_TEMPLATE.format(question="how many shapes are there?")]


# ------------------------------------------------------------------------------------------------ uploads
def decode_upload(data: Any, name: str, *, index: int, max_bytes: int) -> Image.Image:
    """One uploaded image (base64 text) -> an RGB PIL image, or a :class:`ClientError` that names the file and what
    is wrong with it: not base64, over ``max_bytes``, over the pixel cap, or not an image Pillow reads."""
    from PIL import UnidentifiedImageError

    from .images import load_image

    if not isinstance(data, str):
        raise ClientError(f"{name}: an image is sent as base64 text; got {type(data).__name__}.", image=index)
    limit = f"the limit is {max_bytes / 2**20:g} MB"
    if len(data) > (max_bytes + 2) // 3 * 4:  # refused before decoding
        raise ClientError(f"{name} is larger than {max_bytes / 2**20:g} MB; {limit}.", image=index)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(f"{name}: the upload is not valid base64.", image=index) from None
    if len(raw) > max_bytes:
        raise ClientError(f"{name} is {len(raw) / 2**20:.1f} MB; {limit}.", image=index)
    try:
        return load_image(raw)
    except ValueError as error:
        if isinstance(error.__cause__, UnidentifiedImageError):
            message = f"{name} is not an image file that can be read (PNG, JPEG, GIF, WebP, BMP, ...)."
        else:
            message = f"{name}: {error}"
        raise ClientError(message, image=index) from None


def _upload_name(names: list, index: int) -> str:
    name = names[index] if index < len(names) and isinstance(names[index], str) and names[index] else ""
    name = " ".join(name.split())[:100]
    return name or f"Image {index + 1}"


# ------------------------------------------------------------------------------------------------ sessions
class SessionStore:
    """The live conversations by session id, at most ``capacity``; the least recently used is dropped first."""

    def __init__(self, make: Callable[[], ChatSession], capacity: int):
        self._make = make
        self._capacity = capacity
        self._sessions: OrderedDict[str, ChatSession] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, session_id: str, *, create: bool) -> ChatSession | None:
        """The session of ``session_id`` (now the most recently used); a new one if there is none and ``create``,
        else None."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                if not create:
                    return None
                session = self._sessions[session_id] = self._make()
                self._trim()
            self._sessions.move_to_end(session_id)
            return session

    def put(self, session_id: str, session: ChatSession) -> None:
        with self._lock:
            self._sessions[session_id] = session
            self._sessions.move_to_end(session_id)
            self._trim()

    def discard(self, session_id: str, session: ChatSession | None = None) -> None:
        """Forget ``session_id``'s conversation (only if it is still ``session``, when one is given)."""
        with self._lock:
            if session is None or self._sessions.get(session_id) is session:
                self._sessions.pop(session_id, None)

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _trim(self) -> None:
        while len(self._sessions) > self._capacity:
            self._sessions.popitem(last=False)


# ------------------------------------------------------------------------------------------------ the service
class ChatService:
    """What the page asks for (module docstring): the model, the sessions, the demo sets and the one model lock."""

    def __init__(self, config: ChatServiceConfig, model, processor, demo_sets: dict[str, DemoSet] | None = None):
        self.config = config
        self.model = model
        self.processor = processor
        self.demo_sets = load_demo_sets(config) if demo_sets is None else demo_sets
        self.sessions = SessionStore(self.new_session, config.max_sessions)
        self.model_lock = threading.Lock()

    def new_session(self) -> ChatSession:
        from .chat import ChatSession

        return ChatSession(self.model, self.processor)

    def info(self) -> dict:
        return {
            "model": self.config.model,
            "demo_sets": list(self.demo_sets),
            "hints": hints(self.config.model),
            "max_new_tokens": self.config.max_new_tokens,
            "max_image_bytes": self.config.max_image_bytes,
            "max_images_per_turn": self.config.max_images_per_turn,
            "max_sessions": self.config.max_sessions,
        }

    @contextmanager
    def turn(self, request: dict) -> Iterator[Iterator[str]]:
        """Add the request's images and text to its session as one turn and yield the answer's pieces as they are
        generated (``ChatSession.stream``), holding the model lock until the block exits. Every check runs before the
        session changes: a :class:`ClientError` leaves it as it was. A reader that stops early cuts the answer short
        at its next token; a turn not answered at all (generation failed, or was never read) is taken back."""
        session_id = self._session_id(request)
        items = self._turn_items(request)
        max_new_tokens = self.config.max_new_tokens
        with self.model_lock:
            session = self.sessions.get(session_id, create=not request.get("continuing", False))
            if session is None:
                raise ClientError(
                    f"The server no longer holds this conversation (it keeps the {self.config.max_sessions} most "
                    "recently used, and forgets all when restarted). Press Clear to start a new one."
                )
            turns = session.num_turns
            self._add(session, items)
            answer = session.stream(max_new_tokens=max_new_tokens)
            try:
                yield answer
            finally:
                answer.close()  # if the reader stopped early: the answer ends now, and the session is whole
                if session.num_turns == turns + 1:  # the turn has no answer
                    self._take_back(session_id, session, turns)

    def choose_demos(self, request: dict) -> dict:
        """Start the session again with the chosen demo set as its first turn."""
        session_id = self._session_id(request)
        name = request.get("demos")
        if name not in self.demo_sets:
            raise ClientError(f"No demo set {name!r}; the sets are {', '.join(self.demo_sets)}.")
        demo_set = self.demo_sets[name]
        session = self.new_session()
        if demo_set.items:
            with self.model_lock:
                self._add(session, list(demo_set.items), prefix=f"Demo set {name!r}: ")
        self.sessions.put(session_id, session)  # only once complete, so a turn never sees half the demos
        return {"demos": name, "shown": list(demo_set.shown)}

    def clear(self, request: dict) -> dict:
        # A turn still streaming keeps its own reference to the old session and finishes on it.
        self.sessions.discard(self._session_id(request))
        return {"cleared": True}

    # ------------------------------------------------------------------------------------------------ internals
    def _turn_items(self, request: dict) -> list:
        """The turn's decoded images, then its text: what ``ChatSession.add`` takes; a ClientError if any is bad."""
        text, images = request.get("text", ""), request.get("images", [])
        names = request.get("names")
        names = names if isinstance(names, list) else []
        if not isinstance(text, str):
            raise ClientError(f"'text' must be a string; got {type(text).__name__}.")
        if not isinstance(images, list):
            raise ClientError(f"'images' must be a list of base64 strings; got {type(images).__name__}.")
        if not text.strip() and not images:
            raise ClientError("Type a message or add an image.")
        if len(text) > self.config.max_text_chars:
            raise ClientError(f"The message is {len(text):,} characters; the limit is {self.config.max_text_chars:,}.")
        if len(images) > self.config.max_images_per_turn:
            raise ClientError(f"{len(images)} images in one turn; the limit is {self.config.max_images_per_turn}.")
        decoded = [decode_upload(data, _upload_name(names, i), index=i, max_bytes=self.config.max_image_bytes)
                   for i, data in enumerate(images)]
        return [*decoded, text] if text else decoded

    def _add(self, session: ChatSession, items: list, *, prefix: str = "") -> None:
        """``session.add(*items)`` with room for the answer, or a ClientError (its message after ``prefix``) and the
        session unchanged."""
        from .chat import ContextLimitError

        max_new_tokens = self.config.max_new_tokens
        try:
            session.add(*items, room_for_answer=max_new_tokens)
        except ContextLimitError:
            # ChatSession's own message tells a Python caller what to do (reset(), on_overflow); the page's user
            # can send a shorter message or press Clear.
            raise ClientError(
                f"{prefix}This turn does not fit the model's context: the conversation holds {len(session)} tokens, "
                f"and the turn with an answer of up to {max_new_tokens} would take it past the "
                f"{session.context_limit} the language model reads. Send a shorter message, or press Clear to start "
                "a new conversation."
            ) from None
        except ValueError as error:  # an input the processor refuses; the session is unchanged
            raise ClientError(f"{prefix}{error}") from None

    def _take_back(self, session_id: str, session: ChatSession, turns: int) -> None:
        """Undo the session's turns after the first ``turns``; a session that cannot be mended is forgotten, so that
        its page is told to start again rather than continue a broken conversation."""
        try:
            while session.num_turns > turns:
                session.undo()
        except Exception:
            logger.exception("session %s: could not take back a failed turn; the conversation is dropped", session_id)
            self.sessions.discard(session_id, session)

    @staticmethod
    def _session_id(request: dict) -> str:
        session_id = request.get("session")
        if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
            raise ClientError("'session' must be the page's session id (1 to 64 letters, digits and '-').")
        return session_id
