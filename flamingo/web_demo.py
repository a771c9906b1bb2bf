"""flamingo-demo-web: chat with a Flamingo model in a browser, one page served from Python's standard library.

Run:  flamingo-demo-web --model micro [--host 127.0.0.1] [--port 7860] [--demos DIR ...] [--max-new-tokens 32]
                        [--trust-remote-code]
      Tiny CPU run: flamingo-demo-web --model micro --port 0      (prints the URL it serves; Ctrl-C stops it)

The page (``web_demo.html``, next to this file) uploads images, sends a message, and shows the answer as the model
writes it; a select box puts few-shot demos at the start of the conversation. This file is the HTTP side only:
what each request does (sessions, uploads, demo sets, the model lock) is :class:`~flamingo.chat_service.ChatService`.

**Why no web framework.** Gradio is the field's convention for model demos, but it brings hundreds of MB
(FastAPI, pandas, ...) into the environment. This demo needs one page, a small JSON API and a streamed response,
which ``http.server.ThreadingHTTPServer`` serves: images come as base64 in JSON (the page reads them with
FileReader), so there is no multipart parsing, and an answer streams as newline-delimited JSON over a response that
ends when the connection closes (HTTP/1.0), which the page reads with ``fetch`` and ``response.body.getReader()``.

**The HTTP API** (all JSON; an error is ``{"error": message}`` with HTTP 400, plus ``"image": index`` when it is
about one uploaded image):

* ``GET /api/info``: the model's name, the demo sets, the prompt templates to show as hints, the limits.
* ``POST /api/turn`` ``{"session": id, "images": [base64, ...], "names": [file name, ...], "text": "...",
  "continuing": bool}``: adds the images, then the text, as one turn, then streams the answer, one JSON object a
  line: ``{"text": piece}`` ..., then ``{"done": true}`` (or ``{"error": message}`` if generation failed midway; the
  turn is then taken back). A turn refused with HTTP 400 leaves the conversation as it was. A client that goes away
  mid-answer cuts it short: generation stops at the next token, and the conversation keeps the answer so far.
* ``POST /api/demos`` ``{"session": id, "demos": name}``: starts the conversation again with that demo set as its
  first turn (``"none"``: empty); returns the demos' thumbnails and texts for the page to show.
* ``POST /api/clear`` ``{"session": id}``: forgets the conversation.

The page, ``/api/info`` and ``/api/clear`` never wait for the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Iterator

from .chat_service import ChatService, ChatServiceConfig, ClientError, load_demo_sets

PROG = "flamingo-demo-web"
PAGE = "web_demo.html"
# Room left for JSON and base64 (4 bytes per 3) on top of the images themselves.
BODY_OVERHEAD = 1 << 20

logger = logging.getLogger(__name__)

__all__ = ["WebDemoConfig", "DemoServer", "make_server", "serve", "main"]


@dataclass(frozen=True)
class WebDemoConfig(ChatServiceConfig):
    """What ``flamingo-demo-web`` serves (the chat service's model, demos and limits) and where."""

    host: str = "127.0.0.1"
    port: int = 7860  # 0: any free port (DemoServer.url has the real one)
    trust_remote_code: bool = False

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535; got {self.port}.")
        super().__post_init__()


def max_body_bytes(config: ChatServiceConfig) -> int:
    """The largest request body a turn within ``config``'s limits can need."""
    return config.max_images_per_turn * config.max_image_bytes * 4 // 3 + config.max_text_chars * 4 + BODY_OVERHEAD


class BodyError(ClientError):
    """A request body refused before it is read, with its own HTTP status (411: no length, 413: too large)."""

    def __init__(self, message: str, status: HTTPStatus):
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------------ HTTP
class DemoHandler(BaseHTTPRequestHandler):
    """The page and the JSON API (module docstring). One log line per request, never a traceback for a bad one."""

    server: DemoServer
    server_version = "flamingo-demo-web"
    disable_nagle_algorithm = True  # each streamed piece leaves at once
    timeout = 60  # seconds a silent client may hold its thread

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self._send_json(HTTPStatus.OK, self.server.service.info())
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"No page {path}."})

    def do_POST(self) -> None:
        service = self.server.service
        routes = {"/api/turn": None, "/api/demos": service.choose_demos, "/api/clear": service.clear}
        path = self.path.split("?", 1)[0]
        if path not in routes:
            return self._send_json(HTTPStatus.NOT_FOUND, {"error": f"No endpoint {path}."})
        try:
            request = self._read_json()
            if path == "/api/turn":
                return self._turn(request)
            self._send_json(HTTPStatus.OK, routes[path](request))
        except ClientError as error:
            about = {} if error.image is None else {"image": error.image}
            status = error.status if isinstance(error, BodyError) else HTTPStatus.BAD_REQUEST
            self._send_json(status, {"error": str(error), **about})
        except Exception as error:  # a bug, not the client's doing: its traceback goes to the log
            logger.exception("%s %s failed", self.command, self.path)
            self._send_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"The server failed: {error}"})

    def _turn(self, request: dict) -> None:
        started = time.perf_counter()
        # The service's block ends the answer when left: a client gone before it began gets no answer (the turn is
        # taken back), one gone midway cuts it short at the next token; either way the session is whole after it.
        with self.server.service.turn(request) as pieces:
            count, outcome = self._relay(pieces) if self._start_stream() else (0, "; the client went away")
        self._log(HTTPStatus.OK, f"{count} pieces in {time.perf_counter() - started:.2f} s{outcome}")

    def _start_stream(self) -> bool:
        """Send the streamed answer's headers; False if the client is gone."""
        try:
            self.send_response_only(HTTPStatus.OK)
            self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            return True
        except OSError:
            return False

    def _relay(self, pieces: Iterator[str]) -> tuple[int, str]:
        """Write each piece as a line as it comes, then the end line; (pieces written, what went wrong, if
        anything). Reading stops at the first line the client does not take: nobody is left to read the rest."""
        count, outcome = 0, ""
        try:
            for piece in pieces:
                if not piece:
                    continue
                if not self._write_line({"text": piece}):
                    return count, "; the client went away"
                count += 1
            end = {"done": True}
        except Exception as error:  # generation failed after the answer began: the page shows the message
            message = f"Generation failed: {error}. The turn was taken back: the conversation is as it was before it."
            end, outcome = {"error": message}, f"; failed: {error}"
        if not self._write_line(end):
            outcome += "; the client went away"
        return count, outcome

    def _write_line(self, message: dict) -> bool:
        try:
            self.wfile.write(json.dumps(message).encode() + b"\n")
            return True
        except OSError:  # BrokenPipeError, ConnectionResetError: the page was closed or reloaded
            return False

    def _read_json(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BodyError("The request has no Content-Length.", HTTPStatus.LENGTH_REQUIRED) from None
        limit = self.server.max_body_bytes
        if length > limit:
            raise BodyError(f"The request is {length / 2**20:.1f} MB; the limit is {limit / 2**20:.0f} MB.",
                            HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        try:
            request = json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ClientError("The request body is not JSON.") from None
        if not isinstance(request, dict):
            raise ClientError("The request body must be a JSON object.")
        return request

    def _send_json(self, status: HTTPStatus, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json; charset=utf-8", detail=body.get("error", ""))

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, *, detail: str = "") -> None:
        self.send_response_only(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            detail += " (the client went away)"
        self._log(status, detail)

    def _log(self, status: HTTPStatus, detail: str) -> None:
        line = f'"{self.command} {self.path}" {int(status)}'
        self.log_message("%s", f"{line} {detail}" if detail else line)

    def log_message(self, format: str, *args) -> None:
        logger.info("%s %s", self.address_string(), format % args)


class DemoServer(ThreadingHTTPServer):
    """The demo's HTTP server: one thread per request, all sharing one :class:`ChatService`."""

    daemon_threads = True  # a streaming answer does not hold up Ctrl-C

    def __init__(self, address: tuple[str, int], service: ChatService):
        self.service = service
        self.page = resources.files(__package__).joinpath(PAGE).read_bytes()
        self.max_body_bytes = max_body_bytes(service.config)
        super().__init__(address, DemoHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"

    def handle_error(self, request, client_address) -> None:
        """One line, not the default traceback: a client that hangs up mid-request is no server bug."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            logger.info("%s: connection ended: %s", client_address[0], error)
        else:
            logger.exception("%s: request failed", client_address[0])


def make_server(config: WebDemoConfig, model, processor) -> DemoServer:
    """A server for ``model`` bound to ``config.host``/``config.port`` (0: a free port), not yet serving: call
    ``serve_forever()`` (in a thread, for a test) and ``shutdown()``, then ``server_close()``."""
    return DemoServer((config.host, config.port), ChatService(config, model, processor))


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None) -> WebDemoConfig:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="'micro' (the shipped model) or a folder save_pretrained wrote")
    parser.add_argument("--host", default=WebDemoConfig.host, help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=WebDemoConfig.port, help="port (default %(default)s; 0: any free)")
    parser.add_argument("--demos", type=Path, nargs="+", action="extend", default=[], metavar="DIR",
                        help="few-shot demo folders (demos.jsonl and images), offered by their folder names")
    parser.add_argument("--max-new-tokens", type=int, default=WebDemoConfig.max_new_tokens,
                        help="longest answer, in tokens (default %(default)s)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the language model's own Python code from its folder (only if you trust it)")
    args = parser.parse_args(argv)
    for folder in args.demos:
        if not folder.is_dir():
            parser.error(f"--demos {folder}: directory not found.")
    try:
        return WebDemoConfig(model=args.model, host=args.host, port=args.port, demos=tuple(args.demos),
                             max_new_tokens=args.max_new_tokens, trust_remote_code=args.trust_remote_code)
    except ValueError as error:
        parser.error(str(error))


def main(argv: list[str] | None = None) -> int:
    return serve(parse_args(argv))


def serve(config: WebDemoConfig) -> int:
    """Load the model, serve the page until Ctrl-C (or SIGTERM); the exit code (1: a bad model, demos or port)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    try:
        import flamingo

        demo_sets = load_demo_sets(config)  # before the model, so that a bad folder fails at once
        model = flamingo.Flamingo.from_pretrained(config.model, trust_remote_code=config.trust_remote_code).eval()
        processor = flamingo.FlamingoProcessor.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as error:  # a bad model or demos folder
        return _fail(str(error))
    try:
        server = DemoServer((config.host, config.port), ChatService(config, model, processor, demo_sets))
    except OSError as error:  # a port in use, an address not of this machine
        return _fail(f"cannot listen on {config.host}:{config.port}: {error.strerror or error}.")
    print(f"{PROG}: {config.model} at {server.url} (Ctrl-C stops it)", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`, a container or a service manager stops it as Ctrl-C does
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"{PROG}: stopped", flush=True)
    finally:
        server.server_close()
    return 0


def _fail(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
