"""The cost of turn k of a conversation: a :class:`flamingo.ChatSession` turn against re-reading the whole history.

Run (from the repository root)::

    .venv/bin/python -m bench.chat_turns                     # small and micro configs, k = 1, 4, 16 (about 2 CPU min)
    .venv/bin/python -m bench.chat_turns --configs micro --turns 1 4 --repeats 3

A turn is one new image and a question, then a greedy answer of up to ``--new-tokens`` tokens. Before turn k the
conversation holds k - 1 such turns (their images, questions and answers). The session reads only turn k's tokens
and encodes only its image, continuing its KV cache; the re-run is what chat demos without a cache do, one
``generate`` over the whole transcript with all k images. Both give the same answer (tests/test_chat.py). Times are
medians over ``--repeats``, measured in one process in a rotating order; the table gives ratios only:

* ``session k / session 1``: the target is at most 1.2x, up to the attention over the longer history;
* ``re-run k / session 1``: grows about linearly with k;
* ``re-run k / session k``: what the session saves.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

import flamingo
from flamingo.chat import ChatSession
from flamingo.micro.world import make_scene, pick_question, render, rng_for

from .contenders import CONFIGS, _random_backbones
from .measure import interleaved

QUESTION = "Question:{question} Short answer:"


def build(config_name: str, work: Path):
    """The model and processor of a bench config: ``micro`` (shipped) or ``small`` (random Llama + ViT-B-32)."""
    if config_name == "micro":
        return flamingo.Flamingo.from_pretrained("micro").eval(), flamingo.FlamingoProcessor.from_pretrained("micro")
    vision, lm_dir = _random_backbones(CONFIGS[config_name], work)
    torch.manual_seed(0)
    model, processor = flamingo.create_model_and_processor(
        vision_model=vision["name"], vision_pretrained=vision["weights"], lang_model=lm_dir,
        cross_attn_every_n_layers=CONFIGS[config_name].every,
    )
    with torch.no_grad():  # open gates, as after training, so the blocks' work is the real work
        for block in model.cross_attn_blocks.values():
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)
    return model.eval(), processor


def turns(count: int) -> list[tuple]:
    """``count`` (image, question) turns of micro-world scenes."""
    out = []
    for index in range(count):
        rng = rng_for("test", "bench-chat", index)
        scene = make_scene(rng)
        out.append((render(scene), QUESTION.format(question=pick_question(scene, rng).question)))
    return out


def measure(model, processor, k: int, new_tokens: int, repeats: int) -> tuple[dict[str, float], int]:
    """Median seconds of turn k, the session continuing k - 1 turns and one generate over the whole history, and the
    length of turn k's answer in tokens. Turn k is the same image and question for every k (only the history before
    it differs), so that the turns compared do the same work where their answers are as long."""
    (image, question), *earlier = turns(k)
    session = ChatSession(model, processor)
    transcript: list = []
    for earlier_image, earlier_question in earlier:
        session.add(earlier_image, earlier_question)
        answer = session.generate(max_new_tokens=new_tokens)
        transcript += [earlier_image, earlier_question + answer]
    history = transcript + [image, question]
    probe = copy.deepcopy(session, memo={id(model): model, id(processor): processor})
    probe.add(image, question)
    start = len(probe)
    probe.generate(max_new_tokens=new_tokens)
    answer_tokens = len(probe) - start - 1  # the closing <|endofchunk|> is not generated when the answer is cut

    def session_turn():
        # A copy of the session as it stood before turn k (its cache grows in place); the copy is not timed.
        fresh = copy.deepcopy(session, memo={id(model): model, id(processor): processor})
        begin = time.perf_counter()
        fresh.add(image, question)
        fresh.generate(max_new_tokens=new_tokens)
        return time.perf_counter() - begin

    def rerun():
        batch = processor(history)
        model.generate(**batch, max_new_tokens=new_tokens)

    with torch.no_grad():
        return interleaved({"session": session_turn, "re-run": rerun}, repeats), answer_tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chat_turns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["small", "micro"], choices=["small", "micro"])
    parser.add_argument("--turns", nargs="+", type=int, default=[1, 4, 16], help="the turns k to time")
    parser.add_argument("--new-tokens", type=int, default=8, help="most tokens of an answer")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    for name in args.configs:
        with tempfile.TemporaryDirectory() as work:
            model, processor = build(name, Path(work))
            with torch.no_grad():
                measured = {k: measure(model, processor, k, args.new_tokens, args.repeats) for k in args.turns}
        base = measured[min(args.turns)][0]["session"]
        print(f"\nconfig {name}: turn k = one new image + a question + up to {args.new_tokens} answer tokens; "
              f"medians of {args.repeats}; session turn 1 = {base * 1e3:.1f} ms")
        print(f"{'k':>4} {'session k / session 1':>22} {'re-run k / session 1':>21} {'re-run k / session k':>21} "
              f"{'answer tokens':>14}")
        for k in args.turns:
            (seconds, answer_tokens) = measured[k]
            session, rerun = seconds["session"], seconds["re-run"]
            print(f"{k:>4} {session / base:>22.2f} {rerun / base:>21.2f} {rerun / session:>21.2f} {answer_tokens:>14}")


if __name__ == "__main__":
    main()
