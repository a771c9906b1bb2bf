"""The web demo (flamingo/web_demo.py over flamingo/chat_service.py) in a real browser: headless Chromium, driven by
Selenium, shows the answers a ChatSession gives in Python for the same turns, streamed in pieces, one conversation per
page.

The server runs in a thread of this process with the micro model, and one browser serves the module. Chromium and
chromedriver are the system's (``bash scripts/install_browser.sh``); Selenium is given both paths, so that it never
downloads a browser. The answers compared are chosen so that a mistake shows: where a test says a turn continues (or
does not continue) a conversation, it first checks that micro's answer there depends on the earlier turns.
"""

import base64
import http.client
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from flamingo.chat_service import SessionStore, decode_upload
from flamingo.web_demo import WebDemoConfig, make_server

REPO = Path(__file__).resolve().parents[1]
INSTALL = "bash scripts/install_browser.sh"
MAX_NEW_TOKENS = 32
HOW_MANY = "Question:how many shapes are there? Short answer:"
STAR = "Question:what colour is the star? Short answer:"
TRIANGLE = "Question:what colour is the triangle? Short answer:"
CAPTION = "Output:"
WAIT_S = 30  # for an answer; micro takes well under a second


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def micro():
    import flamingo

    return flamingo.Flamingo.from_pretrained("micro").eval(), flamingo.FlamingoProcessor.from_pretrained("micro")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[Path]:
    from flamingo.micro.samples import write_samples

    folder = write_samples(tmp_path_factory.mktemp("samples"))
    return sorted(folder.glob("scene-*.png"))


@pytest.fixture(scope="module")
def server(micro):
    server = make_server(WebDemoConfig(model="micro", port=0, max_new_tokens=MAX_NEW_TOKENS), *micro)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def start_chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        missing = " and ".join(name for name, path in (("chromium", binary), ("chromedriver", driver)) if not path)
        pytest.fail(f"{missing} not found on PATH: the web demo's test needs a headless browser. Run `{INSTALL}` "
                    "(as root; it installs Debian's chromium and chromium-driver).", pytrace=False)
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,1100"):
        options.add_argument(argument)
    options.binary_location = binary
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    yield driver
    driver.quit()


# ------------------------------------------------------------------------------------------------ helpers
class ChatPage:
    """The demo's page in one browser: a fresh page load is a fresh session."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.wait = WebDriverWait(driver, WAIT_S)
        driver.get(url)
        self.wait.until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
        self.session_id = driver.find_element("tag name", "body").get_attribute("data-session")

    def find(self, selector: str):
        return self.driver.find_element("css selector", selector)

    def find_all(self, selector: str) -> list:
        return self.driver.find_elements("css selector", selector)

    def attach(self, *images: Path) -> None:
        before = len(self.find_all("#pending .pending-image"))
        for image in images:
            self.find("#image-input").send_keys(str(image))
        self.wait.until(lambda d: len(self.find_all("#pending .pending-image")) == before + len(images))

    def submit(self, text: str, *images: Path) -> None:
        """Attach ``images``, type ``text`` and press Send, without waiting for the answer."""
        self.attach(*images)
        message = self.find("#message")
        message.clear()
        message.send_keys(text)
        self.find("#send").click()

    def answers(self, count: int) -> list:
        """The first ``count`` answer elements, once each has finished streaming."""
        self.wait.until(lambda d: len(self.find_all(".answer[data-done]")) >= count)
        return self.find_all(".answer")[:count]

    def ask(self, text: str, *images: Path) -> str:
        """One turn; the answer as the page shows it."""
        done = len(self.find_all(".answer[data-done]"))
        self.submit(text, *images)
        answer = self.answers(done + 1)[-1]
        assert answer.get_attribute("data-done") == "done", self.find("#error").text
        return answer.get_attribute("textContent")

    def error(self) -> str:
        self.wait.until(lambda d: self.find("#error").is_displayed())
        return self.find("#error").text


def python_session(micro, *turns, demos: list | None = None):
    """A ChatSession given ``turns`` ((images, text) pairs), each answered: (answers, the session)."""
    from flamingo.chat import ChatSession
    from flamingo.images import load_image

    session = ChatSession(*micro)
    if demos:
        session.add(*demos)
    answers = []
    for images, text in turns:
        session.add(*(load_image(image) for image in images), text)
        answers.append(session.generate(max_new_tokens=MAX_NEW_TOKENS))
    return answers, session


def transcript(server, session_id: str) -> str:
    session = server.service.sessions.get(session_id, create=False)
    assert session is not None, f"the server holds no session {session_id}"
    return session.text()


def post(server, path: str, body: dict) -> tuple[int, list[dict]]:
    """(HTTP status, the JSON objects of the response: one, or one a line for a streamed answer)."""
    request = urllib.request.Request(server.url + path.lstrip("/"), json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return response.status, [json.loads(line) for line in response.read().splitlines() if line.strip()]
    except urllib.error.HTTPError as error:
        return error.code, [json.loads(error.read())]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


# ------------------------------------------------------------------------------------------------ in the browser
def test_an_answer_equals_the_chat_sessions_and_arrives_in_pieces(browser, server, micro, scenes):
    page = ChatPage(browser, server.url)
    shown = page.ask(HOW_MANY, scenes[0])
    (expected,), session = python_session(micro, ([scenes[0]], HOW_MANY))
    assert shown == expected
    # Streamed: the page appended each piece the server sent, as many as ChatSession.stream yields.
    from flamingo.images import load_image

    python = python_session(micro)[1]
    python.add(load_image(scenes[0]), HOW_MANY)
    pieces = [piece for piece in python.stream(max_new_tokens=MAX_NEW_TOKENS) if piece]
    assert int(page.find(".answer").get_attribute("data-pieces")) == len(pieces) > 1
    assert transcript(server, page.session_id) == session.text()
    assert len(page.find_all(".turn.user .thumbs img")) == 1


def test_a_second_turn_continues_the_pages_own_session(browser, server, micro, scenes):
    turns = ([scenes[0]], HOW_MANY), ([scenes[2]], CAPTION)
    (_, second), session = python_session(micro, *turns)
    assert second != python_session(micro, turns[1])[0][0], "micro's caption here must depend on the first turn"
    page = ChatPage(browser, server.url)
    page.ask(HOW_MANY, scenes[0])
    assert page.ask(CAPTION, scenes[2]) == second
    assert transcript(server, page.session_id) == session.text()


def test_a_bad_upload_shows_its_message_and_leaves_the_session_working(browser, server, micro, scenes, tmp_path,
                                                                      caplog):
    caplog.set_level(logging.INFO, logger="flamingo.web_demo")
    bad = tmp_path / "bad.png"
    bad.write_text("this is not a picture\n")
    page = ChatPage(browser, server.url)
    page.submit(STAR, bad)
    error = page.error()
    assert "bad.png" in error and "not an image" in error and "Traceback" not in error
    assert page.find_all(".turn") == [] and page.find_all("#pending .pending-image") == []
    refused = [r for r in caplog.records if "/api/turn" in r.getMessage()]
    assert len(refused) == 1 and " 400 " in refused[0].getMessage() and refused[0].exc_info is None
    # The refused turn changed nothing: the next one is a first turn.
    (expected,), session = python_session(micro, ([scenes[1]], STAR))
    assert page.ask(STAR, scenes[1]) == expected
    assert not page.find("#error").is_displayed()
    assert transcript(server, page.session_id) == session.text()


def test_two_browsers_at_once_each_get_their_own_conversation(browser, server, micro, scenes):
    other_browser = start_chromium()
    try:
        first, second = ChatPage(browser, server.url), ChatPage(other_browser, server.url)
        assert first.session_id != second.session_id
        first.submit(STAR, scenes[1])
        second.submit(CAPTION, scenes[2])
        for page, turn in ((first, ([scenes[1]], STAR)), (second, ([scenes[2]], CAPTION))):
            (expected,), session = python_session(micro, turn)
            assert page.answers(1)[0].get_attribute("textContent") == expected
            assert transcript(server, page.session_id) == session.text()
    finally:
        other_browser.quit()


def test_clear_starts_a_new_conversation(browser, server, micro, scenes):
    (expected,), session = python_session(micro, ([scenes[2]], CAPTION))
    continued = python_session(micro, ([scenes[0]], HOW_MANY), ([scenes[2]], CAPTION))[0][1]
    assert continued != expected, "micro's caption here must depend on the first turn"
    page = ChatPage(browser, server.url)
    page.ask(HOW_MANY, scenes[0])
    page.find("#clear").click()
    page.wait.until(lambda d: page.find_all(".turn") == [])
    assert page.ask(CAPTION, scenes[2]) == expected
    assert transcript(server, page.session_id) == session.text()


def test_chosen_demos_start_the_conversation(browser, server, micro, scenes, tmp_path):
    from selenium.webdriver.support.ui import Select

    from flamingo.micro.samples import demo_set

    demos = [x for pair in demo_set("vqa") for x in pair]
    (expected,), session = python_session(micro, ([scenes[2]], TRIANGLE), demos=demos)
    page = ChatPage(browser, server.url)
    assert [o.get_attribute("value") for o in Select(page.find("#demos")).options] == ["none", "caption", "vqa"]
    assert "Short answer:" in page.find("#hints").text
    Select(page.find("#demos")).select_by_value("vqa")
    page.wait.until(lambda d: len(page.find_all(".turn.demos .demo")) == len(demos) // 2)
    assert page.ask(TRIANGLE, scenes[2]) == expected
    assert transcript(server, page.session_id) == session.text()  # the demos, then the turn
    # A screenshot of the conversation: the demos, the question with its image, the answer.
    assert all(image.get_property("naturalWidth") == 64 for image in page.find_all(".turn img"))
    screenshot = tmp_path / "web_demo.png"
    assert page.driver.save_screenshot(str(screenshot))
    with Image.open(screenshot) as shot:
        assert shot.size[0] >= 800 and shot.size[1] >= 600
    if os.environ.get("FLAMINGO_ARTIFACTS"):
        artifacts = Path(os.environ["FLAMINGO_ARTIFACTS"])
        artifacts.mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, artifacts / screenshot.name)


# ------------------------------------------------------------------------------------------------ the API alone
def test_uploads_over_the_byte_or_pixel_limit_are_refused_before_the_session_changes(server, scenes, tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("1", (8000, 6000)).save(huge)  # 48 M pixels in a few kB: refused from its header, never decoded
    status, (reply,) = post(server, "/api/turn", {"session": "pixels", "images": [b64(huge)], "names": ["huge.png"],
                                                 "text": CAPTION})
    assert status == 400 and reply["image"] == 0
    assert reply["error"].startswith("huge.png: ") and "48,000,000 pixels" in reply["error"]
    with pytest.raises(ValueError, match=r"scene-0\.png is .* MB; the limit is"):
        decode_upload(b64(scenes[0]), "scene-0.png", index=0, max_bytes=100)
    assert "pixels" not in server.service.sessions


def test_a_turn_too_long_for_the_context_is_refused_and_the_conversation_goes_on(server, micro, scenes):
    first = {"session": "long-text", "images": [b64(scenes[0])], "text": HOW_MANY}
    assert post(server, "/api/turn", first)[0] == 200
    status, (reply,) = post(server, "/api/turn", {"session": "long-text", "text": "word " * 600, "continuing": True})
    assert status == 400 and "does not fit the model's context" in reply["error"]
    status, lines = post(server, "/api/turn", {"session": "long-text", "images": [b64(scenes[2])], "text": CAPTION,
                                               "continuing": True})
    answers, session = python_session(micro, ([scenes[0]], HOW_MANY), ([scenes[2]], CAPTION))
    assert status == 200 and lines[-1] == {"done": True}
    assert "".join(line["text"] for line in lines[:-1]) == answers[1]
    assert transcript(server, "long-text") == session.text()


def test_a_client_that_leaves_mid_answer_cuts_it_short_and_the_conversation_goes_on(server, micro, scenes):
    from flamingo.chat import ChatSession
    from flamingo.images import load_image

    model, _ = micro
    full, python = ChatSession(*micro), ChatSession(*micro)
    for session in full, python:
        session.add(load_image(scenes[1]), CAPTION)
    prompt = len(python)
    full.generate(max_new_tokens=MAX_NEW_TOKENS)
    # Each forward slowed to 0.1 s, so that the server learns the client is gone long before the answer's end.
    slow = model.register_forward_pre_hook(lambda module, args: time.sleep(0.1))
    try:
        connection = http.client.HTTPConnection(*server.server_address[:2], timeout=WAIT_S)
        connection.request("POST", "/api/turn", json.dumps({"session": "gone", "images": [b64(scenes[1])],
                                                            "text": CAPTION}), {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert "text" in json.loads(response.readline())
        response.close()
        connection.close()
        with server.service.model_lock:  # held by the turn until its answer has ended
            kept = server.service.sessions.get("gone", create=False)
    finally:
        slow.remove()
    # Cut short: the answer so far, closed by <|endofchunk|>, as a ChatSession given that many new tokens ends.
    answered = len(kept) - prompt - 1
    assert 1 <= answered < len(full) - prompt - 1
    python.generate(max_new_tokens=answered)
    assert kept.text() == python.text()
    # The session is whole: the next turn reads on from it as the Python session does.
    turn = ([scenes[2]], CAPTION)
    python.add(load_image(scenes[2]), CAPTION)
    expected = python.generate(max_new_tokens=MAX_NEW_TOKENS)
    assert expected != python_session(micro, turn)[0][0], "micro's caption here must depend on the first turn"
    status, lines = post(server, "/api/turn", {"session": "gone", "images": [b64(scenes[2])], "text": CAPTION,
                                               "continuing": True})
    assert status == 200 and lines[-1] == {"done": True}
    assert "".join(line["text"] for line in lines[:-1]) == expected
    assert transcript(server, "gone") == python.text()


def test_a_generation_that_fails_midway_takes_the_turn_back(server, micro, scenes):
    model, _ = micro
    first, second = ([scenes[0]], HOW_MANY), ([scenes[2]], CAPTION)
    assert post(server, "/api/turn", {"session": "failing", "images": [b64(scenes[0])], "text": HOW_MANY})[0] == 200
    calls = itertools.count()

    def fail_once(module, args):  # the turn's own forward, one answer token's, then this one fails
        if next(calls) == 2:
            raise RuntimeError("out of memory (a test's)")

    hook = model.register_forward_pre_hook(fail_once)
    try:
        status, lines = post(server, "/api/turn", {"session": "failing", "images": [b64(scenes[2])], "text": CAPTION,
                                                   "continuing": True})
    finally:
        hook.remove()
    assert status == 200 and len(lines) > 1 and all("text" in line for line in lines[:-1])
    assert lines[-1]["error"].startswith("Generation failed: out of memory (a test's). The turn was taken back")
    assert transcript(server, "failing") == python_session(micro, first)[1].text()
    # Sent again, the turn is answered as if the failed one had never been.
    answers, session = python_session(micro, first, second)
    status, lines = post(server, "/api/turn", {"session": "failing", "images": [b64(scenes[2])], "text": CAPTION,
                                               "continuing": True})
    assert status == 200 and "".join(line["text"] for line in lines[:-1]) == answers[1]
    assert transcript(server, "failing") == session.text()


def test_a_dropped_conversation_is_reported_not_silently_restarted(server):
    status, (reply,) = post(server, "/api/turn", {"session": "never-seen", "text": CAPTION, "continuing": True})
    assert status == 400 and "no longer holds this conversation" in reply["error"]


def test_the_session_store_keeps_the_most_recently_used():
    made = iter(range(100))
    store = SessionStore(lambda: next(made), capacity=2)
    assert (store.get("a", create=True), store.get("b", create=True)) == (0, 1)
    store.get("a", create=False)  # now "b" is the least recently used
    store.get("c", create=True)
    assert ("a" in store, "b" in store, "c" in store, len(store)) == (True, False, True, 2)
    assert store.get("b", create=False) is None


# ------------------------------------------------------------------------------------------------ the command
def test_help_answers_without_importing_torch():
    probe = ("import sys\nfrom flamingo.web_demo import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
             "    pass\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.startswith("usage: flamingo-demo-web") and done.stdout.split()[-1] == "False", done.stderr


def test_the_command_prints_its_url_serves_the_page_and_stops_cleanly_on_ctrl_c(tmp_path):
    command = shutil.which("flamingo-demo-web", path=str(Path(sys.executable).parent))
    assert command, f"no flamingo-demo-web next to {sys.executable}; run: .venv/bin/python -m pip install -e ."
    # The child must get Ctrl-C's default, also when this process was started with SIGINT ignored (a background job).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen([command, "--model", "micro", "--port", "0"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        line = process.stdout.readline()
        assert line.startswith("flamingo-demo-web: micro at http://127.0.0.1:"), line + process.stderr.read()
        url = line.split(" at ")[1].split()[0]
        with urllib.request.urlopen(url, timeout=WAIT_S) as response:
            assert 'id="image-input"' in response.read().decode()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0 and "stopped" in out
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1  # the one request's log line
