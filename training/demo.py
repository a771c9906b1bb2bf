"""The micro model shipped in the package, few-shot, in under a minute on a laptop CPU; no download.

Run:  .venv/bin/flamingo-demo [--out flamingo-demo] [--queries 100] [--model micro|DIR] [--image PATH ...]
      (the same: python -m flamingo_train.demo ...)
      Tiny CPU run: flamingo-demo --queries 6 --support 8 --image my-photo.jpg

It prints three sections (four with ``--image``), and writes every image it shows under ``--out``; the prompt's
64 px images also as ``*_x4.png`` viewing copies (nearest-neighbour, 4x; the model reads the 64 px files):

1. a few-shot evaluation on held-out scenes of the micro world (:mod:`flamingo.micro.world`, split "test"): VQA
   exact match, in-context word binding and captioning (CIDEr), at 0 and 4 shots, with a few predictions; this is
   ``flamingo_eval``'s evaluator on the recipe's evaluation files (``flamingo_train.recipes.micro_data``), as
   ``flamingo-eval run --model micro --tasks custom --custom-kind vqa --data-dir DIR/data/vqa`` computes it;
2. one interleaved few-shot prompt, two captioned scenes then a new one, and what the model writes for it;
3. binding side by side: episodes that bind two made-up words to two object kinds (a shape in a colour) in their
   demos only, with the model's pick at 0 shots (chance, by construction) and at 4 shots; each episode is also one
   PNG strip with the right answer and the model's pick marked on it;
4. with ``--image PATH`` (repeatable): micro prompted on your own images with its templates (a caption, two
   questions), the image as the model sees it (resized and cropped by the processor), and what micro can and cannot
   see: it knows only its synthetic world.

The same steps with a real model read::

    model = flamingo.Flamingo.from_pretrained("my-flamingo")          # or flamingo.load_openflamingo(...)
    batch = processor([cat, "Output:a cat.", dog, "Output:a dog.", query, "Output:"])
    ids = model.generate(**batch, max_new_tokens=20)
"""

from __future__ import annotations

import argparse
import json
import os
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import flamingo
from flamingo.images import load_image
from flamingo.micro import MICRO_MODEL_NAME, resolve_model_path
from flamingo.micro.world import COLOURS, IMAGE_SIZE, SHAPES, SIZES, captions, make_scene, render, rng_for

# The demo is an entry point on top of all three packages, so it lives in the top one: it runs the evaluation code
# and the recipe's data writer as they are, so its numbers are the ones `flamingo-eval` reports.
from flamingo_eval.files import read_jsonl
from flamingo_eval.runner import Evaluator
from flamingo_train.recipes.micro_data import DataRecipe, eval_config, write_eval_data
from flamingo_train.recipes.texts import CAPTION_PROMPT, VQA_PROMPT

SHOTS = (0, 4)
TASKS = {  # kind: (name shown, metric shown)
    "vqa": ("VQA", "exact match %"),
    "binding": ("binding", "accuracy %"),
    "caption": ("captioning", "CIDEr"),
}
VIEW_SCALE = 4  # viewing copies: the world's 64 px images are too small to see


@dataclass
class DemoConfig:
    model: str = MICRO_MODEL_NAME
    out: Path = Path("flamingo-demo")
    queries: int = 100  # held-out scenes per task (and binding episodes); the standard error is about 5 points
    # Training scenes the VQA / caption demos are drawn from: the recipe's pool (DataRecipe.eval_support), so that the
    # scores are those of the recipe's results.json on its first `queries` held-out scenes.
    support: int = DataRecipe.eval_support
    examples: int = 3  # predictions printed per task, and binding episodes shown
    images: tuple[Path, ...] = ()  # your own images (--image), prompted in section 4

    def __post_init__(self):
        if self.queries < 1 or self.examples < 0 or self.support < max(SHOTS):
            raise ValueError(
                f"Need queries >= 1, examples >= 0 and support >= {max(SHOTS)}; got queries={self.queries}, "
                f"examples={self.examples}, support={self.support}."
            )
        self.images = tuple(Path(p) for p in self.images)


def heading(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def shown(path: Path) -> str:
    """A path as a reader types it: relative to the working directory when it is below it."""
    path = Path(os.path.normpath(path))
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def viewing_copy(image: Image.Image, path: Path) -> Path:
    """``path`` with ``_x4`` added: ``image`` upscaled ``VIEW_SCALE`` times, nearest-neighbour, so that each pixel the
    model reads is a sharp block (a smoothing filter would show detail the model never gets)."""
    view = path.with_name(f"{path.stem}_x{VIEW_SCALE}.png")
    image.resize((image.width * VIEW_SCALE, image.height * VIEW_SCALE), Image.Resampling.NEAREST).save(view)
    return view


@torch.no_grad()
def generate(model, processor, prompt: list) -> str:
    """Greedy continuation of one interleaved prompt, up to its ``<|endofchunk|>``."""
    batch = processor(prompt).to(model.device)
    ids = model.generate(**batch, max_new_tokens=20, num_beams=1)
    return processor.decode(ids[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip()


# ------------------------------------------------------------------------------------------------ 1. evaluation
def evaluate(model, processor, model_dir: Path, data_dirs: dict[str, Path], out: Path) -> dict[str, dict]:
    """Each custom task at ``SHOTS``: ``{kind: {"scores": {shots: value}, "predictions": {shots: [record]}}}``.

    Each run is the recipe's (:func:`flamingo_train.recipes.micro_data.eval_config`).
    """
    results = {}
    for kind, directory in data_dirs.items():
        config = eval_config(model_dir, kind, directory, shots=list(SHOTS), output=out / f"{kind}.json",
                             predictions_dir=out / f"{kind}-predictions")
        trials = Evaluator(config, model=model, processor=processor).run()["trials"]
        results[kind] = {
            "scores": {t["shots"]: t["value"] for t in trials},
            "predictions": {t["shots"]: json.loads(Path(t["predictions"]).read_text()) for t in trials},
        }
    return results


def print_evaluation(results: dict[str, dict], data_dirs: dict[str, Path], config: DemoConfig) -> None:
    print(f"\n{'task':<12}{'metric':<16}" + "".join(f"{f'{k}-shot':>9}" for k in SHOTS))
    for kind, (name, metric) in TASKS.items():
        scores = results[kind]["scores"]
        print(f"{name:<12}{metric:<16}" + "".join(f"{scores[k]:9.1f}" for k in SHOTS))
    print("(binding at 0 shots is chance, 50%, by construction: only the demos say which word names which kind)")
    if not config.examples:
        return
    last = max(SHOTS)
    print(f"\nVQA at {last} shots, the first {config.examples} held-out questions:")
    questions = read_jsonl(data_dirs["vqa"] / "test.jsonl")[: config.examples]
    for q, p in zip(questions, results["vqa"]["predictions"][last]):
        print(f"  {shown(data_dirs['vqa'] / q['image'])}  {q['question']:<40} answer {q['answers'][0]:<9} "
              f"model {p['answer']}")
    print(f"\nCaptioning at {last} shots:")
    scenes = read_jsonl(data_dirs["caption"] / "test.jsonl")[: config.examples]
    for s, p in zip(scenes, results["caption"]["predictions"][last]):
        print(f"  {shown(data_dirs['caption'] / s['image'])}  reference: {s['captions'][0]}\n"
              f"  {' ' * len(shown(data_dirs['caption'] / s['image']))}  model:     {p['caption']}")


# ------------------------------------------------------------------------------------------------ 2. one prompt
def few_shot_caption(model, processor, out: Path) -> dict:
    """Two captioned held-out scenes and a third to caption, as one interleaved prompt; greedy generation."""
    out.mkdir(parents=True, exist_ok=True)
    scenes = [make_scene(rng_for("test", "demo-prompt", i)) for i in range(3)]
    paths, views = [], []
    for name, scene in zip(("demo1", "demo2", "query"), scenes):
        image = render(scene)
        paths.append(out / f"{name}.png")
        image.save(paths[-1])
        views.append(viewing_copy(image, paths[-1]))
    demo_captions = [captions(scene)[0] for scene in scenes[:2]]
    # The interleaved style: the processor turns each image into <image> and closes each text with <|endofchunk|>.
    prompt = [paths[0], CAPTION_PROMPT.format(caption=demo_captions[0]),
              paths[1], CAPTION_PROMPT.format(caption=demo_captions[1]),
              paths[2], CAPTION_PROMPT.format(caption="")]
    return {
        "images": paths,
        "views": views,
        "prompt": processor.decode(processor(prompt)["input_ids"][0]),
        "generated": generate(model, processor, prompt),
        "reference": captions(scenes[2])[0],
    }


# ------------------------------------------------------------------------------------------------ 3. binding
RIGHT, WRONG = (20, 150, 50), (235, 110, 0)  # frame colours: green, orange
PAD, GAP, LINE = 5, 6, 16  # a frame is drawn in the pad around a tile, so it never covers the image; LINE: text rows


def strip_cell(index: int, tile: int) -> tuple[int, int]:
    """Top-left corner of tile ``index`` (demos first, then the query) in a strip of ``tile`` px tiles."""
    return PAD + index * (tile + 2 * PAD + GAP), PAD


def episode_strip(demos: list[tuple[Path, str]], query: Path, answer: str, picks: dict[int, str], path: Path, *,
                  scale: int = 2) -> Path:
    """The episode as one PNG: the demos with their words, then the query, with the answer and the picks marked.

    The demos whose word is the right answer (they show the query's kind) are framed green. Where the model's pick at
    the most shots (``max(picks)``) is wrong, the demos of the word it picked and the query are framed orange;
    otherwise the query is framed green. Under the query: the answer and the pick at each shot count; at the bottom,
    a legend.
    """
    tiles = [Image.open(p).convert("RGB") for p, _ in demos] + [Image.open(query).convert("RGB")]
    tile = tiles[0].width * scale
    font = ImageFont.load_default(size=12)
    last = max(picks)
    verdict = {k: RIGHT if pick == answer else WRONG for k, pick in picks.items()}
    under_query = [("query", "black"), (f"answer: {answer}", "black")]
    under_query += [(f"{k}-shot pick: {picks[k]} ({'right' if picks[k] == answer else 'wrong'})", verdict[k])
                    for k in sorted(picks)]
    legend = [
        (f"green: the demos of the right answer (the query's kind); the query, if the {last}-shot pick is right",
         RIGHT),
        (f"orange: the demos of the word picked at {last} shots; the query, if that pick is wrong", WRONG),
    ]
    framed = {picks[last]: WRONG, answer: RIGHT}  # the answer last: a right pick stays green
    query_x = strip_cell(len(demos), tile)[0]
    top = tile + 2 * PAD + 4  # the first text row, under the tiles
    legend_top = top + LINE * len(under_query) + 8
    width = max(strip_cell(len(tiles), tile)[0] - GAP,
                query_x + PAD + max(int(font.getlength(text)) for text, _ in under_query),
                2 * PAD + max(int(font.getlength(text)) for text, _ in legend))
    strip = Image.new("RGB", (width, legend_top + LINE * len(legend) + 4), "white")
    draw = ImageDraw.Draw(strip)
    for i, image in enumerate(tiles):
        x, y = strip_cell(i, tile)
        strip.paste(image.resize((tile, tile), Image.Resampling.NEAREST), (x, y))
        is_query = i == len(demos)
        colour = verdict[last] if is_query else framed.get(demos[i][1])
        if colour:
            draw.rectangle([x - PAD, y - PAD, x + tile + PAD - 1, y + tile + PAD - 1], outline=colour, width=PAD - 1)
        else:  # the world's background is almost white: a thin edge shows where the image ends
            draw.rectangle([x - 1, y - 1, x + tile, y + tile], outline=(190, 190, 190), width=1)
        rows = under_query if is_query else [(demos[i][1], colour or "black")]
        for j, (text, fill) in enumerate(rows):
            draw.text((x, top + j * LINE), text, fill=fill, font=font)
    for j, (text, fill) in enumerate(legend):
        draw.text((PAD, legend_top + j * LINE), text, fill=fill, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path


def print_binding(results: dict[str, dict], data_dir: Path, out: Path, config: DemoConfig) -> None:
    episodes = read_jsonl(data_dir / "test.jsonl")[: config.examples]
    picks = {k: {str(p["id"]): p["prediction"] for p in results["binding"]["predictions"][k]} for k in SHOTS}
    for episode in episodes:
        demos = episode["demos"][: max(SHOTS)]  # a k-shot prompt uses the episode's first k demos
        chosen = {k: picks[k][str(episode["id"])] for k in SHOTS}
        strip = episode_strip([(data_dir / d["image"], d["word"]) for d in demos], data_dir / episode["image"],
                              episode["answer"], chosen, out / f"{episode['id']}.png")
        print(f"\nepisode {episode['id']}: words {' / '.join(episode['choices'])}   (in one picture, the answer and "
              f"the model's pick marked: {shown(strip)})")
        for j, demo in enumerate(demos, 1):
            print(f"  demo {j}  {shown(data_dir / demo['image'])}  <image>This is a {demo['word']}.")
        print(f"  query   {shown(data_dir / episode['image'])}  <image>This is a ...   answer: {episode['answer']}")
        verdicts = [f"{k}-shot {pick} ({'right' if pick == episode['answer'] else 'wrong'})"
                    for k, pick in chosen.items()]
        print("  model's pick:  " + "   ".join(verdicts))


# ------------------------------------------------------------------------------------------------ 4. your images
# What micro is asked about an image of yours: its own templates, with questions that every scene of its world
# answers. Each entry is (what is asked, the prompt's text after the image).
OWN_IMAGE_PROMPTS = (
    ("caption", CAPTION_PROMPT.format(caption="")),
    ("count", VQA_PROMPT.format(question="how many shapes are there?", answer="")),
    ("yes/no", VQA_PROMPT.format(question="is there a red circle?", answer="")),
)


def what_micro_knows() -> str:
    return (
        f"micro knows only its synthetic world (flamingo/micro/world.py): {IMAGE_SIZE} x {IMAGE_SIZE} px scenes of one "
        f"to three flat shapes ({', '.join(SHAPES)}) in {len(COLOURS)} colours ({', '.join(COLOURS)}), "
        f"{' or '.join(SIZES)}, on a plain light background, left of, right of, above or below one another. It has "
        "no words for anything else (a photo, a texture, a person, text, a shape or colour outside those lists), and "
        "it answers in its world's words whatever it is shown: on your images, read its answers as the nearest scene "
        "of its world, not as recognition."
    )


def as_seen(processor, image: Image.Image) -> Image.Image:
    """``image`` as the model reads it: the processor's resize and crop, its normalisation undone."""
    pixels = processor.image_transform(image)  # (C, H, W), normalised
    mean = torch.tensor(processor.preprocess_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(processor.preprocess_cfg["std"]).view(3, 1, 1)
    rgb = (pixels * std + mean).clamp(0, 1).mul(255).round().byte()
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def own_images(model, processor, paths: tuple[Path, ...], out: Path) -> list[dict]:
    """Each image prompted alone (0 shots) with each of ``OWN_IMAGE_PROMPTS``: ``[{"image", "size", "seen",
    "answers": {what: answer}}]``; ``seen`` is a viewing copy of the model's input."""
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for index, path in enumerate(paths):
        image = load_image(path)
        seen = viewing_copy(as_seen(processor, image), out / f"{index}-{path.stem}.png")
        answers = {what: generate(model, processor, [image, text]) for what, text in OWN_IMAGE_PROMPTS}
        results.append({"image": path, "size": image.size, "seen": seen, "answers": answers})
    return results


def print_own_images(results: list[dict], processor) -> None:
    cfg = processor.preprocess_cfg
    print(textwrap.fill(what_micro_knows(), width=100))
    print(textwrap.fill(f"Each image is read as the processor reads any image: {cfg['interpolation']} resize of its "
                        f"{cfg['resize_mode']} side to {cfg['size']} px, centre crop to {cfg['size']} x {cfg['size']}.",
                        width=100))
    for result in results:
        width, height = result["size"]
        print(f"\n{shown(result['image'])} ({width} x {height})   as micro sees it ({VIEW_SCALE}x): "
              f"{shown(result['seen'])}")
        for (what, text), answer in zip(OWN_IMAGE_PROMPTS, result["answers"].values()):
            print(f"  {what:<8} <image>{text:<50} model: {answer}")


# ------------------------------------------------------------------------------------------------ the run
def run(config: DemoConfig) -> dict:
    started = time.perf_counter()
    model_dir = resolve_model_path(config.model)
    model = flamingo.Flamingo.from_pretrained(model_dir).eval()
    processor = flamingo.FlamingoProcessor.from_pretrained(model_dir)
    print(f"model: {config.model} ({shown(model_dir)}), {model.num_parameters():,} parameters, of which "
          f"{model.num_parameters(trainable_only=True):,} trained by Flamingo "
          f"(perceiver, gated cross-attention, added tokens); the vision tower and the LM are frozen")

    heading(f"1. Few-shot evaluation on {config.queries} held-out scenes and binding episodes")
    data = write_eval_data(config.out / "data", DataRecipe(eval_support=config.support, eval_queries=config.queries))
    print(f"data: {shown(config.out / 'data')} (flamingo-eval custom tasks: caption, vqa, binding; demos of VQA and "
          f"captioning from {config.support} training scenes, binding demos from each episode)")
    results = evaluate(model, processor, model_dir, data, config.out / "results")
    print_evaluation(results, data, config)

    heading("2. One interleaved few-shot prompt: two captioned scenes, then a new scene to caption")
    prompt = few_shot_caption(model, processor, config.out / "prompt")
    print("images:  " + "  ".join(shown(p) for p in prompt["images"]))
    print("to view: " + "  ".join(shown(p) for p in prompt["views"]) + f"  ({VIEW_SCALE}x)")
    print(f"prompt:  {prompt['prompt']}")
    print(f"model:   {prompt['generated']}")
    print(f"correct: {prompt['reference']}")

    heading("3. In-context binding: made-up words bound to two kinds of object by the demos only (words never seen in "
            "training)")
    print_binding(results, data["binding"], config.out / "binding", config)

    own = []
    if config.images:
        heading("4. Your images, prompted with micro's templates (0 shots)")
        own = own_images(model, processor, config.images, config.out / "your-images")
        print_own_images(own, processor)

    seconds = time.perf_counter() - started
    print(f"\ndone in {seconds:.0f} s; everything shown is in {shown(config.out)}")
    return {"results": results, "prompt": prompt, "own_images": own, "seconds": seconds}


def parse_config(argv: list[str] | None = None) -> DemoConfig:
    parser = argparse.ArgumentParser(prog="flamingo-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MICRO_MODEL_NAME, help="'micro' (shipped) or a saved model's directory")
    parser.add_argument("--out", type=Path, default=DemoConfig.out, help="where the images and results are written")
    parser.add_argument("--queries", type=int, default=DemoConfig.queries, help="held-out queries per task")
    parser.add_argument("--support", type=int, default=DemoConfig.support, help="demo pool size (VQA, captions)")
    parser.add_argument("--examples", type=int, default=DemoConfig.examples, help="examples printed per section")
    parser.add_argument("--image", type=Path, action="append", default=[], dest="images", metavar="PATH",
                        help="an image of yours to prompt micro with (any size; repeatable)")
    args = parser.parse_args(argv)
    for path in args.images:
        try:
            load_image(path)
        except ValueError as error:  # one line, not a traceback: the path is the user's, and so is the fix
            parser.exit(2, f"{parser.prog}: error: --image: {error}\n")
    return DemoConfig(**{**vars(args), "images": tuple(args.images)})


def main(argv: list[str] | None = None) -> int:
    run(parse_config(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
