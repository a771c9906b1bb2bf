"""``flamingo-generate``: prompt a Flamingo model from a shell; the answer is printed on stdout.

Tiny CPU run (the shipped micro model, no downloads, a few seconds)::

    python -m flamingo.micro.samples runs/samples      # sample scenes and demo folders for micro
    flamingo-generate --model micro --image runs/samples/scene-1.png \\
        --prompt "Question:what colour is the star? Short answer:"
    flamingo-generate --model micro --demos runs/samples/demos/vqa --image runs/samples/scene-0.png \\
        --prompt "Question:how many shapes are there? Short answer:" --json

Images: one --image goes before the prompt. Several go where the prompt's <image> markers are, one marker per
image, in order: --image a.png --image b.png --prompt "<image>Output:a cat.<|endofchunk|><image>Output:"
--demos DIR puts the few-shot demos of DIR/demos.jsonl (flamingo.demos) first, each as its image then its text,
closed with <|endofchunk|>.

Decoding: greedy by default; --num-beams N for beam search; --do-sample draws each token, with --temperature,
--top-p, --top-k (0: no cut) and --seed to repeat a draw. Generation stops at <|endofchunk|> or after
--max-new-tokens. Other settings are the language model's own generation_config.json.

Output: the answer's text (special tokens skipped, whitespace stripped). --stream prints it token by token as it is
generated (the same text; not with beams). --json prints one JSON object instead:
  {"text": the answer, "prompt": the whole prompt the processor read (demos and <image> markers included),
   "images": the image files in prompt order, "model": --model, "demos": --demos or null,
   "new_tokens": tokens generated (the closing <|endofchunk|> included),
   "finished": true if the answer ended with <|endofchunk|>, false if --max-new-tokens cut it,
   "settings": {"max_new_tokens", "num_beams", "do_sample", "temperature", "top_p", "top_k", "seed"}}
(the sampling settings are null without --do-sample).

Errors (a missing or unreadable image, a bad demos folder, a bad number, a missing model folder) end with exit
code 2 and one line on stderr naming the file or flag; flags and files are checked before the model stack loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .decoding import Decoding
from .demos import Demo, read_demos
from .file_access import open_regular_file
from .micro.shipped import MICRO_MODEL_NAME
from .tokens import END_OF_CHUNK_TOKEN, MEDIA_TOKEN

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Every module above is light (no torch, transformers, open_clip or PIL): --help and every flag or file error answer
# at once. The model stack is imported in generate(), once the flags are known to be good.

PROG = "flamingo-generate"


@dataclass(frozen=True)
class GenerateConfig:
    """One ``flamingo-generate`` call: which model, what prompt, how to decode."""

    model: str  # "micro" or a saved model folder
    prompt: str
    images: tuple[Path, ...] = ()
    demos: Path | None = None
    decoding: Decoding = Decoding()
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Generation:
    """What :func:`generate` returns: the answer and the prompt it answered."""

    text: str  # special tokens skipped, whitespace stripped
    prompt: str  # the marked text the processor read, demos included
    images: tuple[Path, ...]  # one per <image> marker of prompt, in order
    new_tokens: int
    finished: bool  # ended with <|endofchunk|>, rather than cut at max_new_tokens


# ------------------------------------------------------------------------------------------------ flags
class _OneLineParser(argparse.ArgumentParser):
    """An argument error is one line on stderr, as every other error of this command (no usage block)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind: type, accept, expected: str):
    """An argparse type: ``kind(value)`` that ``accept`` holds for, else an error saying what was ``expected``."""

    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            number = None
        if number is None or not accept(number):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {value!r}")
        return number

    return parse


POSITIVE_INT = _number(int, lambda n: n >= 1, "an integer >= 1")
COUNT = _number(int, lambda n: n >= 0, "an integer >= 0")
ABOVE_ZERO = _number(float, lambda x: 0 < x < float("inf"), "a number above 0")
PROBABILITY = _number(float, lambda x: 0 < x <= 1, "a number in (0, 1]")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help=f"'{MICRO_MODEL_NAME}' (the model shipped in the package) or a folder written by "
                             "Flamingo.save_pretrained and FlamingoProcessor.save_pretrained")
    parser.add_argument("--prompt", required=True, help="the text to continue, with <image> markers for several images")
    parser.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                        help="an image file; repeat for several, in the order of the prompt's <image> markers")
    parser.add_argument("--demos", type=Path, metavar="DIR", help="a few-shot demos folder: DIR/demos.jsonl and images")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code a model folder ships for its language model (only a model you trust)")
    decoding = parser.add_argument_group("decoding")
    defaults = Decoding()
    decoding.add_argument("--max-new-tokens", type=POSITIVE_INT, default=defaults.max_new_tokens, metavar="N",
                          help=f"most tokens to generate (default {defaults.max_new_tokens})")
    decoding.add_argument("--num-beams", type=POSITIVE_INT, default=defaults.num_beams, metavar="N",
                          help="beam search with N beams (default 1: greedy, or one draw with --do-sample)")
    decoding.add_argument("--do-sample", action="store_true", help="sample each token instead of taking the likeliest")
    # Sampling flags default to None, so that one given without --do-sample is caught.
    decoding.add_argument("--temperature", type=ABOVE_ZERO, metavar="T",
                          help=f"divide the logits by T (default {defaults.temperature})")
    decoding.add_argument("--top-p", type=PROBABILITY, metavar="P",
                          help=f"sample from the likeliest tokens that make up P (default {defaults.top_p}: all)")
    decoding.add_argument("--top-k", type=COUNT, metavar="K",
                          help=f"sample from the K likeliest tokens (default {defaults.top_k}: all)")
    decoding.add_argument("--seed", type=COUNT, metavar="S", help="seed of the draw, to repeat it (default: random)")
    output = parser.add_argument_group("output").add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print one JSON object (fields above) instead of the text")
    output.add_argument("--stream", action="store_true", help="print the text token by token as it is generated")
    return parser


# ------------------------------------------------------------------------------------------------ checks
def _check_readable(path: Path, what: str) -> None:
    """ValueError naming ``what`` and ``path`` unless it is a regular file this process can open."""
    if not path.exists():
        raise ValueError(f"{what} {path}: file not found.")
    try:
        open_regular_file(path).close()
    except OSError as error:
        raise ValueError(f"{what} {path}: cannot be read ({error.strerror or error}).") from None
    except ValueError as error:  # a directory, a FIFO, a device
        raise ValueError(f"{what} {error}") from None


def _read_demos(folder: Path) -> list[Demo]:
    if not folder.is_dir():
        raise ValueError(f"--demos {folder}: directory not found.")
    try:
        demos = read_demos(folder)
    except ValueError as error:  # names the file, line and field
        raise ValueError(f"--demos {error}") from None
    for demo in demos:
        _check_readable(demo.image, "--demos image")
    return demos


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    """The flags as a :class:`GenerateConfig`, with the files they name checked; ValueError naming the flag or file."""
    sampling = {"--temperature": args.temperature, "--top-p": args.top_p, "--top-k": args.top_k, "--seed": args.seed}
    given = [flag for flag, value in sampling.items() if value is not None]
    if given and not args.do_sample:
        raise ValueError(f"{', '.join(given)} applies only with --do-sample (decoding is greedy without it).")
    if args.stream and args.num_beams > 1:
        raise ValueError(f"--stream prints one sequence as it grows, so it works only without beams; got --num-beams "
                         f"{args.num_beams}.")
    markers = args.prompt.count(MEDIA_TOKEN)
    if markers and markers != len(args.image):
        raise ValueError(f"--prompt has {markers} {MEDIA_TOKEN} marker(s) but {len(args.image)} --image file(s) were "
                         f"given; give one --image per marker, in order.")
    if not markers and len(args.image) > 1:
        raise ValueError(f"--prompt has 0 {MEDIA_TOKEN} markers but {len(args.image)} --image files were given; with "
                         f"several images, mark where each goes with {MEDIA_TOKEN}, in order.")
    for image in args.image:
        _check_readable(image, "--image")
    if args.demos is not None:
        _read_demos(args.demos)
    if args.model != MICRO_MODEL_NAME and not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model}: directory not found (give '{MICRO_MODEL_NAME}' or a saved model "
                         "folder).")
    defaults = Decoding()
    decoding = Decoding(
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        do_sample=args.do_sample,
        temperature=defaults.temperature if args.temperature is None else args.temperature,
        top_p=defaults.top_p if args.top_p is None else args.top_p,
        top_k=defaults.top_k if args.top_k is None else args.top_k,
        seed=args.seed,
    )
    return GenerateConfig(model=args.model, prompt=args.prompt, images=tuple(args.image), demos=args.demos,
                          decoding=decoding, trust_remote_code=args.trust_remote_code)


# ------------------------------------------------------------------------------------------------ the prompt
def build_prompt(prompt: str, images: tuple[Path, ...], demos: list[Demo]) -> tuple[str, tuple[Path, ...]]:
    """The marked text and its images (one per ``<image>``, in order) for ``processor(text=, images=)``.

    Each demo is its image, then its text closed with ``<|endofchunk|>``: what the processor makes of
    ``interleave(demos)`` followed by an image. A prompt without markers and one image is that image, then the prompt
    (what the processor makes of ``[Path(image), prompt]``).
    """
    if images and MEDIA_TOKEN not in prompt:
        prompt = MEDIA_TOKEN + prompt
    prefix = "".join(
        MEDIA_TOKEN + demo.text + ("" if demo.text.rstrip().endswith(END_OF_CHUNK_TOKEN) else END_OF_CHUNK_TOKEN)
        for demo in demos
    )
    return prefix + prompt, tuple(demo.image for demo in demos) + tuple(images)


def stripped_text_streamer(tokenizer: PreTrainedTokenizerBase, out: TextIO):
    """transformers' ``TextStreamer`` (prompt and special tokens skipped), writing to ``out`` what :func:`generate`
    returns: the answer without its leading and trailing whitespace, then a newline."""
    from transformers import TextStreamer  # here: transformers takes seconds to import

    class StrippedTextStreamer(TextStreamer):
        started = False  # whether text has been written: until then, leading whitespace is dropped
        held = ""  # trailing whitespace, written only once more text follows it

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            text = self.held + text
            body = text.rstrip()
            self.held = text[len(body):]
            out.write(body + ("\n" if stream_end else ""))
            out.flush()

    return StrippedTextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------ the run
def generate(config: GenerateConfig, *, stream_to: TextIO | None = None) -> Generation:
    """Load the model, build the prompt and generate the answer. ``stream_to``: write the answer there as it grows
    (as :attr:`Generation.text`, then a newline). ValueError for an image that cannot be decoded (naming the file),
    a model folder that does not load, or a prompt too long for the model."""
    import torch

    from . import Flamingo, FlamingoProcessor

    demos = [] if config.demos is None else read_demos(config.demos)
    text, images = build_prompt(config.prompt, config.images, demos)
    processor = FlamingoProcessor.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)
    batch = processor(text=text, images=list(images))  # before the model loads: a bad image fails fast
    model = Flamingo.from_pretrained(config.model, trust_remote_code=config.trust_remote_code).eval()
    settings = config.decoding
    kwargs = settings.generate_kwargs()
    if stream_to is not None:
        kwargs["streamer"] = stripped_text_streamer(processor.tokenizer, stream_to)
    if settings.do_sample and settings.seed is not None:
        torch.manual_seed(settings.seed)
    output = model.generate(**batch, **kwargs)
    new = output[0, batch["input_ids"].shape[1]:].tolist()
    end = model.config.end_of_chunk_token_id
    if end in new:  # anything after the end (padding, in beam search) is not part of the answer
        new = new[: new.index(end) + 1]
    return Generation(
        text=processor.decode(new, skip_special_tokens=True).strip(),
        prompt=text,
        images=images,
        new_tokens=len(new),
        finished=bool(new) and new[-1] == end,
    )


def generation_json(config: GenerateConfig, generation: Generation) -> str:
    """The ``--json`` line (fields: the module docstring)."""
    return json.dumps({
        "text": generation.text,
        "prompt": generation.prompt,
        "images": [str(image) for image in generation.images],
        "model": config.model,
        "demos": None if config.demos is None else str(config.demos),
        "new_tokens": generation.new_tokens,
        "finished": generation.finished,
        "settings": config.decoding.as_json(),
    }, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)  # flags and files first: generate() imports torch and transformers
        generation = generate(config, stream_to=sys.stdout if args.stream else None)
    except (ValueError, OSError) as error:
        # Bad input (an image PIL cannot decode, a model folder that does not load): one line naming it, no traceback.
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(generation_json(config, generation))
    elif not args.stream:
        print(generation.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
