"""The micro model shipped in the package, few-shot, in under a minute on a laptop CPU; no download.

Run:  .venv/bin/flamingo-demo [--out flamingo-demo] [--queries 100] [--model micro|DIR]
      (the same: python -m flamingo_train.demo ...)

It prints three sections, and writes every image it shows under ``--out``:

1. a few-shot evaluation on held-out scenes of the micro world (:mod:`flamingo.micro.world`, split "test"): VQA
   exact match, in-context word binding and captioning (CIDEr), at 0 and 4 shots, with a few predictions; this is
   ``flamingo_eval``'s evaluator on the recipe's evaluation files (``flamingo_train.recipes.micro_data``), as
   ``flamingo-eval run --model micro --tasks custom --custom-kind vqa --data-dir DIR/data/vqa`` computes it;
2. one interleaved few-shot prompt, two captioned scenes then a new one, and what the model writes for it;
3. binding side by side: episodes that bind two made-up words to two object kinds (a shape in a colour) in their
   demos only, with the model's pick at 0 shots (chance, by construction) and at 4 shots.

The same steps with a real model read::

    model = flamingo.Flamingo.from_pretrained("my-flamingo")          # or flamingo.load_openflamingo(...)
    batch = processor([cat, "Output:a cat.", dog, "Output:a dog.", query, "Output:"])
    ids = model.generate(**batch, max_new_tokens=20)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import flamingo
from flamingo.micro import MICRO_MODEL_NAME, resolve_model_path
from flamingo.micro.world import captions, make_scene, render, rng_for

# The demo is an entry point on top of all three packages, so it lives in the top one: it runs the evaluation code
# and the recipe's data writer as they are, so its numbers are the ones `flamingo-eval` reports.
from flamingo_eval.files import read_jsonl
from flamingo_eval.runner import Evaluator
from flamingo_train.recipes.micro_data import DataRecipe, eval_config, write_eval_data
from flamingo_train.recipes.texts import CAPTION_PROMPT

SHOTS = (0, 4)
TASKS = {  # kind: (name shown, metric shown)
    "vqa": ("VQA", "exact match %"),
    "binding": ("binding", "accuracy %"),
    "caption": ("captioning", "CIDEr"),
}


@dataclass
class DemoConfig:
    model: str = MICRO_MODEL_NAME
    out: Path = Path("flamingo-demo")
    queries: int = 100  # held-out scenes per task (and binding episodes); the standard error is about 5 points
    # Training scenes the VQA / caption demos are drawn from: the recipe's pool (DataRecipe.eval_support), so that the
    # scores are those of the recipe's results.json on its first `queries` held-out scenes.
    support: int = DataRecipe.eval_support
    examples: int = 3  # predictions printed per task, and binding episodes shown

    def __post_init__(self):
        if self.queries < 1 or self.examples < 0 or self.support < max(SHOTS):
            raise ValueError(
                f"Need queries >= 1, examples >= 0 and support >= {max(SHOTS)}; got queries={self.queries}, "
                f"examples={self.examples}, support={self.support}."
            )


def heading(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def shown(path: Path) -> str:
    """A path as a reader types it: relative to the working directory when it is below it."""
    path = Path(os.path.normpath(path))
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


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
@torch.no_grad()
def few_shot_caption(model, processor, out: Path) -> dict:
    """Two captioned held-out scenes and a third to caption, as one interleaved prompt; greedy generation."""
    out.mkdir(parents=True, exist_ok=True)
    scenes = [make_scene(rng_for("test", "demo-prompt", i)) for i in range(3)]
    paths = []
    for name, scene in zip(("demo1", "demo2", "query"), scenes):
        paths.append(out / f"{name}.png")
        render(scene).save(paths[-1])
    demo_captions = [captions(scene)[0] for scene in scenes[:2]]
    # The interleaved style: the processor turns each image into <image> and closes each text with <|endofchunk|>.
    prompt = [paths[0], CAPTION_PROMPT.format(caption=demo_captions[0]),
              paths[1], CAPTION_PROMPT.format(caption=demo_captions[1]),
              paths[2], CAPTION_PROMPT.format(caption="")]
    batch = processor(prompt).to(model.device)
    ids = model.generate(**batch, max_new_tokens=20, num_beams=1)
    return {
        "images": paths,
        "prompt": processor.decode(batch["input_ids"][0]),
        "generated": processor.decode(ids[0, batch["input_ids"].shape[1] :], skip_special_tokens=True).strip(),
        "reference": captions(scenes[2])[0],
    }


# ------------------------------------------------------------------------------------------------ 3. binding
def episode_strip(images: list[Path], labels: list[str], path: Path, *, scale: int = 2) -> Path:
    """The episode's images in a row, each with its label underneath, as one PNG."""
    tiles = [Image.open(p).convert("RGB") for p in images]
    w, h = tiles[0].width * scale, tiles[0].height * scale
    strip = Image.new("RGB", (len(tiles) * (w + 8), h + 24), "white")
    draw = ImageDraw.Draw(strip)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        strip.paste(tile.resize((w, h), Image.Resampling.NEAREST), (i * (w + 8), 0))
        draw.text((i * (w + 8) + 4, h + 6), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path


def print_binding(results: dict[str, dict], data_dir: Path, out: Path, config: DemoConfig) -> None:
    episodes = read_jsonl(data_dir / "test.jsonl")[: config.examples]
    picks = {k: {str(p["id"]): p["prediction"] for p in results["binding"]["predictions"][k]} for k in SHOTS}
    for episode in episodes:
        demos = episode["demos"][: max(SHOTS)]  # a k-shot prompt uses the episode's first k demos
        images = [data_dir / d["image"] for d in demos] + [data_dir / episode["image"]]
        strip = episode_strip(images, [d["word"] for d in demos] + ["query: ?"], out / f"{episode['id']}.png")
        print(f"\nepisode {episode['id']}: words {' / '.join(episode['choices'])}   (all images in one file: "
              f"{shown(strip)})")
        for j, demo in enumerate(demos, 1):
            print(f"  demo {j}  {shown(data_dir / demo['image'])}  <image>This is a {demo['word']}.")
        print(f"  query   {shown(data_dir / episode['image'])}  <image>This is a ...   answer: {episode['answer']}")
        verdicts = []
        for k in SHOTS:
            pick = picks[k][str(episode["id"])]
            verdicts.append(f"{k}-shot {pick} ({'right' if pick == episode['answer'] else 'wrong'})")
        print("  model's pick:  " + "   ".join(verdicts))


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
    print(f"prompt:  {prompt['prompt']}")
    print(f"model:   {prompt['generated']}")
    print(f"correct: {prompt['reference']}")

    heading("3. In-context binding: made-up words bound to two kinds of object by the demos only (words never seen in "
            "training)")
    print_binding(results, data["binding"], config.out / "binding", config)

    seconds = time.perf_counter() - started
    print(f"\ndone in {seconds:.0f} s; everything shown is in {shown(config.out)}")
    return {"results": results, "prompt": prompt, "seconds": seconds}


def parse_config(argv: list[str] | None = None) -> DemoConfig:
    parser = argparse.ArgumentParser(prog="flamingo-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MICRO_MODEL_NAME, help="'micro' (shipped) or a saved model's directory")
    parser.add_argument("--out", type=Path, default=DemoConfig.out, help="where the images and results are written")
    parser.add_argument("--queries", type=int, default=DemoConfig.queries, help="held-out queries per task")
    parser.add_argument("--support", type=int, default=DemoConfig.support, help="demo pool size (VQA, captions)")
    parser.add_argument("--examples", type=int, default=DemoConfig.examples, help="examples printed per section")
    return DemoConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    run(parse_config(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
