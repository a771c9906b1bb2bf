"""ChatSession: a conversation on one live KV cache equals one plain forward over its whole transcript.

After every turn (text only, new images, generated answers) the session's next-token logits equal one forward of the
model over ``session.input_ids`` with all the session's images, in every LM family and both masking modes; each
image is encoded once, and each LM forward reads only the turn's new tokens. Greedy answers equal ``generate`` on
the same prompt; streamed text equals returned text; a saved session resumes with the same logits; the context limit
raises or drops the oldest turns, as chosen.
"""

import json
import struct

import pytest
import torch
from transformers import TextIteratorStreamer

from flamingo.chat import ChatSession, ContextLimitError, Decoding
from flamingo.testing import FAMILIES, random_images
from models import build_tiny_model

ATOL = 1e-4


def full_forward_logits(model, processor, session, images) -> torch.Tensor:
    """(1, V) the last position's logits of one forward over the whole transcript with all its images."""
    ids = session.input_ids
    pixels = processor.preprocess_images([images]) if images else None
    with torch.no_grad():
        return model(ids, pixel_values=pixels).logits[:, -1]


class Counts:
    """How many images the vision tower encodes, and how many tokens each LM forward reads (not while ``paused``)."""

    def __init__(self, model):
        self.images, self.lengths, self.paused = 0, [], False
        model.vision_encoder.register_forward_hook(lambda m, args, out: self._image(args[0]))
        model.lang_model.register_forward_pre_hook(self._tokens, with_kwargs=True)

    def _image(self, pixels):
        if not self.paused:
            self.images += pixels.shape[0]

    def _tokens(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not self.paused:
            self.lengths.append(ids.shape[1])


@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "all-earlier-images"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_turn_equals_one_forward_over_the_whole_transcript(family, immediate, tiny_vision, tiny_lm_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_lm_dir(family), immediate=immediate)
    counts = Counts(model)
    images = random_images(4, seed=1)
    session = ChatSession(model, processor)
    shown = []
    turns = [
        ("add", ["A few words before any image."]),
        ("add", [images[0], "An image of two cats."]),
        ("generate", 3),
        ("add", [images[1], images[2], "Two more, and"]),
        ("add", ["a turn of text only"]),
        ("generate", 4),
        ("add", [images[3], "The last one:"]),
    ]
    for kind, turn in turns:
        before = len(session)
        if kind == "add":
            session.add(*turn)
            shown += [item for item in turn if not isinstance(item, str)]
        else:
            session.generate(max_new_tokens=turn)
        logits = session.next_token_logits()
        counts.paused = True
        expected = full_forward_logits(model, processor, session, shown)
        counts.paused = False
        torch.testing.assert_close(logits, expected.float(), atol=ATOL, rtol=1e-4, msg=f"after {kind} {turn!r}")
        assert len(session) > before
    assert counts.images == len(images)  # every image encoded once, in its own turn
    assert sum(counts.lengths) == len(session)  # each token of the transcript went through the LM once


def test_no_token_is_read_twice(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    images = random_images(2, seed=2)
    session = ChatSession(model, processor)
    counts = Counts(model)
    session.add(images[0], "An image of")
    session.generate(max_new_tokens=5)
    session.add(images[1], "And this one is")
    session.next_token_logits()
    assert sum(counts.lengths) == len(session)  # each token of the transcript went through the LM exactly once
    assert counts.lengths[0] == len(processor([images[0], "An image of"])["input_ids"][0])


def test_the_transcript_follows_the_documented_convention(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    images = random_images(2, seed=3)
    session = ChatSession(model, processor)
    session.add(images[0], "An image of")
    session.generate(max_new_tokens=2)
    session.add(images[1], "Then")
    session.add("more text")
    text = session.text()
    tokenizer = processor.tokenizer
    assert text.count(tokenizer.bos_token or "\0") == (1 if tokenizer.bos_token else 0)  # BOS once, at the start
    # The answer ends its chunk; the next image starts a new one.
    ids = session.input_ids[0].tolist()
    second_image = [i for i, t in enumerate(ids) if t == model.config.media_token_id][1]
    assert ids[second_image - 1] == model.config.end_of_chunk_token_id
    assert ids.count(model.config.end_of_chunk_token_id) == 1  # no doubled <|endofchunk|> before the image
    assert text.endswith("Thenmore text") or text.endswith("Then more text")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_answer_equals_generate_on_the_same_prompt(family, tiny_vision, tiny_lm_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_lm_dir(family))
    image = random_images(1, seed=4)[0]
    session = ChatSession(model, processor)
    session.add(image, "An image of")
    answer = session.generate(max_new_tokens=6)
    batch = processor([image, "An image of"])
    ids = model.generate(**batch, max_new_tokens=6)
    assert answer == processor.tokenizer.decode(ids[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_sampling_is_repeatable_with_a_seed_and_follows_its_settings(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    image = random_images(1, seed=5)[0]

    def answer(**settings):
        session = ChatSession(model, processor)
        session.add(image, "An image of")
        return session.generate(max_new_tokens=8, do_sample=True, **settings)

    assert answer(seed=3, temperature=1.5) == answer(seed=3, temperature=1.5)
    assert len({answer(seed=s, temperature=2.0) for s in range(6)}) > 1  # it does sample
    greedy = ChatSession(model, processor)
    greedy.add(image, "An image of")
    assert answer(seed=0, top_k=1) == greedy.generate(max_new_tokens=8)  # top-1 sampling is greedy
    with pytest.raises(ValueError, match="temperature must be above 0"):
        Decoding(temperature=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        greedy.generate(top_p=1.5)


def test_streamed_text_equals_the_returned_text(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    image = random_images(1, seed=6)[0]
    sessions = [ChatSession(model, processor) for _ in range(3)]
    for session in sessions:
        session.add(image, "An image of")
    returned = sessions[0].generate(max_new_tokens=12)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    via_streamer = sessions[1].generate(max_new_tokens=12, streamer=streamer)
    assert "".join(streamer) == via_streamer == returned
    pieces = list(sessions[2].stream(max_new_tokens=12))
    assert "".join(pieces) == returned
    assert sessions[2].text() == sessions[0].text()  # streaming leaves the same transcript


def test_a_saved_session_resumes_with_the_same_logits(tiny_vision, tiny_llama_dir, tmp_path):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    images = random_images(3, seed=7)
    session = ChatSession(model, processor)
    session.add(images[0], "An image of")
    session.generate(max_new_tokens=3)  # ends with tokens not yet read: they must be saved too
    session.add(images[1], images[2], "Two more:")
    session.generate(max_new_tokens=2)
    path = session.save(tmp_path / "chat.safetensors")
    header = json.loads(path.read_bytes()[8 : 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert header["__metadata__"]["format"] == "flamingo-chat-session/1"  # a safetensors file: no pickle
    resumed = ChatSession.load(path, model, processor)
    assert torch.equal(resumed.input_ids, session.input_ids) and resumed.num_turns == session.num_turns
    counts = Counts(model)
    torch.testing.assert_close(resumed.next_token_logits(), session.next_token_logits(), atol=1e-5, rtol=1e-5)
    assert counts.images == 0  # resuming encodes no image again
    for s in (session, resumed):
        s.add(images[0], "Again:")
    assert resumed.generate(max_new_tokens=5) == session.generate(max_new_tokens=5)


def test_loading_refuses_other_files_and_other_models(tiny_vision, tiny_llama_dir, tiny_lm_dir, tmp_path):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    session = ChatSession(model, processor)
    session.add(random_images(1)[0], "An image of")
    path = session.save(tmp_path / "chat.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a saved chat session"):
        ChatSession.load(tmp_path / "junk.safetensors", model, processor)
    other, other_processor = build_tiny_model(tiny_vision, tiny_lm_dir("gpt2"))
    with pytest.raises(ValueError, match="saved with another model"):
        ChatSession.load(path, other, other_processor)


def test_past_the_context_the_default_is_an_error_that_leaves_the_session_as_it_was(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    image = random_images(1, seed=8)[0]
    session = ChatSession(model, processor)
    long_text = " ".join(["word"] * 60)
    session.add(image, long_text)
    while True:
        ids, logits = session.input_ids.clone(), session.next_token_logits().clone()
        try:
            session.add(long_text)
        except ContextLimitError as error:
            assert "does not fit" in str(error) and str(session.context_limit) in str(error)
            assert error.limit == session.context_limit and error.transcript == len(session)
            assert error.transcript + error.needed > error.limit
            break
    assert torch.equal(session.input_ids, ids) and torch.equal(session.next_token_logits(), logits)
    with pytest.raises(ContextLimitError, match="does not fit"):
        session.generate(max_new_tokens=session.context_limit)


def test_drop_oldest_turns_keeps_the_newest_turns_and_stays_exact(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    images = random_images(6, seed=9)
    session = ChatSession(model, processor, on_overflow="drop_oldest_turns")
    long_text = " ".join(["word"] * 40)
    for image in images:
        session.add(image, long_text)
        session.generate(max_new_tokens=4)
        assert len(session) <= session.context_limit
    assert session.num_images < len(images)  # the oldest turns went, with their images
    kept = images[len(images) - session.num_images :]
    torch.testing.assert_close(session.next_token_logits(), full_forward_logits(model, processor, session, kept).float(),
                               atol=ATOL, rtol=1e-4)
    with pytest.raises(ContextLimitError, match="longer than the context"):
        session.add(" ".join(["word"] * 2 * session.context_limit))


def test_reset_and_bad_turns(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    session = ChatSession(model, processor)
    with pytest.raises(ValueError, match="add\\(\\) a turn before generate"):
        session.generate()
    with pytest.raises(ValueError, match="at least one"):
        session.add()
    session.add(random_images(1)[0], "An image of")
    with pytest.raises(ValueError, match="Sample 0, item 0"):
        session.add(None, "text")
    session.reset()
    assert len(session) == 0 and session.num_images == 0
    with pytest.raises(ValueError, match="on_overflow must be one of"):
        ChatSession(model, processor, on_overflow="truncate")


def test_undo_takes_back_the_last_turn_exactly(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    images = random_images(2, seed=10)
    session = ChatSession(model, processor)
    session.add(images[0], "An image of")
    session.generate(max_new_tokens=3)
    ids, logits, turns = session.input_ids.clone(), session.next_token_logits().clone(), session.num_turns
    session.add(images[1], "And")
    session.undo()
    assert torch.equal(session.input_ids, ids) and session.num_turns == turns and session.num_images == 1
    torch.testing.assert_close(session.next_token_logits(), logits, atol=1e-5, rtol=1e-5)
    session.undo()  # the answer
    session.undo()  # the first turn
    assert len(session) == 0
    with pytest.raises(ValueError, match="no turn to take back"):
        session.undo()


def test_room_for_the_answer_is_made_before_the_turn_is_added(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    image = random_images(1, seed=11)[0]
    session = ChatSession(model, processor)
    text = " ".join(["word"] * 40)
    session.add(image, text)
    turn = len(processor([text], add_special_tokens=False)["input_ids"][0])
    room = session.context_limit - len(session) - turn  # the turn fits, with this many tokens to spare
    before = session.input_ids.clone()
    with pytest.raises(ContextLimitError, match="and an answer of"):
        session.add(text, room_for_answer=room)  # no room left for the answer's <|endofchunk|>
    assert torch.equal(session.input_ids, before)  # refused before it was added
    session.add(text, room_for_answer=room - 1)
    session.generate(max_new_tokens=room - 1)  # and the answer then fits


def test_a_stop_event_ends_the_answer_at_the_next_token(tiny_vision, tiny_llama_dir):
    import threading

    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    image = random_images(1, seed=12)[0]
    session = ChatSession(model, processor)
    session.add(image, "An image of")
    stop = threading.Event()

    class StopAfterFirstToken:
        def __init__(self):
            self.puts = 0

        def put(self, ids):  # the prompt first, then each token
            self.puts += 1
            if self.puts == 2:
                stop.set()

        def end(self):
            pass

    session.generate(max_new_tokens=50, streamer=StopAfterFirstToken(), stop=stop)
    answer = session.input_ids[0, session._turn_starts[-1]:]
    assert len(answer) == 2 and answer[-1] == model.config.end_of_chunk_token_id  # one token, closed


def test_a_stream_closed_early_leaves_the_session_whole(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    image = random_images(1, seed=12)[0]
    session = ChatSession(model, processor)
    session.add(image, "An image of")
    pieces = session.stream(max_new_tokens=50)
    next(pieces)
    pieces.close()  # the reader stops after the first piece; the generation thread is done when close returns
    assert session.num_turns == 2 and session.input_ids[0, -1] == model.config.end_of_chunk_token_id
    session.add("More:")
    expected = full_forward_logits(model, processor, session, [image])
    torch.testing.assert_close(session.next_token_logits(), expected.float(), atol=ATOL, rtol=1e-4)
