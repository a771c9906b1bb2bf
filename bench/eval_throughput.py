"""Few-shot evaluation throughput on CPU, and what the runner's two caches save, each against its baseline.

Run (CPU, a minute or two):  .venv/bin/python bench/eval_throughput.py
Options: --shots 4 --queries 16 --batch-size 4 --classes 32 --hidden 128 --layers 4 --vision-width 128
         --vision-layers 4 --image-size 64 --repeats 2

Reports, on a small random model built locally (no downloads) and fixture data in the official formats:
  * samples/s of a full trial (prompting, demo sampling, model, post-processing) per task kind:
    captioning (coco), VQA (vqav2), HatefulMemes and ImageNet-style rank classification;
  * demo-feature cache: trial time with the cache off / on (off re-encodes every demo image in every batch);
  * prefix cache: class scoring time as one forward per class over the full prompt (OpenFlamingo's uncached path)
    / one cached prompt + class-name continuations, at ``--classes`` class names.
The tiny vision tower is scaled by the --vision-* flags; with a real ViT-L/14 the feature cache saves more, since
its share of the compute is larger.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import open_clip
import torch

import flamingo
from flamingo.testing import TINY_VISION_CONFIG, save_tiny_lm, save_tiny_vision_weights
from flamingo_eval.classification import class_log_probs
from flamingo_eval.runner import EvalConfig, Evaluator, MediaCache
from flamingo_eval.testing import write_fixture_data

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import per_class_forward as class_scores_full_forward  # noqa: E402  (the suite's baseline)


def build_model(work: Path, args):
    config = json.loads(json.dumps(TINY_VISION_CONFIG))
    config["vision_cfg"].update(
        width=args.vision_width, layers=args.vision_layers, image_size=args.image_size, head_width=32
    )
    path = work / "bench-vit.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    weights = save_tiny_vision_weights("bench-vit", work / "vit.pt")
    lm_dir = save_tiny_lm(
        work / "lm", "llama", hidden=args.hidden, num_layers=args.layers, heads=max(1, args.hidden // 32)
    )
    torch.manual_seed(0)
    model, processor = flamingo.create_model_and_processor(
        vision_model="bench-vit",
        vision_pretrained=weights,
        lang_model=lm_dir,
        cross_attn_every_n_layers=2,
        perceiver=flamingo.PerceiverConfig(depth=2, num_latents=16, heads=2, dim_head=32),
        cross_attention=flamingo.CrossAttentionConfig(heads=2, dim_head=32),
    )
    return model.eval(), processor


def time_trial(model, processor, data_dir: Path, task: str, args, *, media_cache: bool = True) -> float:
    """Best-of-``repeats`` wall time of one full trial (fresh output, so nothing is resumed)."""
    best = float("inf")
    for repeat in range(args.repeats):
        out = Path(tempfile.mkdtemp(prefix="flamingo-bench-eval-")) / "results.json"
        config = EvalConfig(
            model=None,
            tasks=[task],
            shots=[args.shots],
            seeds=[0],
            data_dir=data_dir,
            batch_size=args.batch_size,
            output=out,
            media_cache=media_cache,
        )
        evaluator = Evaluator(config, model=model, processor=processor)
        start = time.perf_counter()
        evaluator.run()
        best = min(best, time.perf_counter() - start)
    return best


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--classes", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vision-width", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="flamingo-bench-"))
    model, processor = build_model(work, args)
    data_dir = write_fixture_data(
        work / "data",
        tasks=("coco", "vqav2", "hateful_memes", "imagenet"),
        num_support=max(16, args.shots + 1),
        num_query=args.queries,
    )
    print(
        f"model: {model.num_parameters():,} parameters; {args.queries} queries, {args.shots} shots, "
        f"batch {args.batch_size}, {torch.get_num_threads()} threads"
    )

    print("\n| task | kind | samples/s |\n|---|---|---|")
    for task, kind in (
        ("coco", "caption, 20 new tokens, 3 beams"),
        ("vqav2", "VQA, 5 new tokens, 3 beams"),
        ("hateful_memes", "rank classification, 2 classes"),
        ("imagenet", "rank classification, 3 classes"),
    ):
        seconds = time_trial(model, processor, data_dir, task, args)
        print(f"| {task} | {kind} | {args.queries / seconds:.2f} |")

    off = time_trial(model, processor, data_dir, "vqav2", args, media_cache=False)
    on = time_trial(model, processor, data_dir, "vqav2", args, media_cache=True)
    print(f"\ndemo-feature cache (vqav2 trial, {args.shots} shots): off {off:.2f}s / on {on:.2f}s = {off / on:.2f}x")

    # Prefix cache: the same prompts and class names, scored both ways (they agree to float precision).
    prompt = "".join(f"<image>Output:class {i}<|endofchunk|>" for i in range(args.shots)) + "<image>Output:"
    prompts = [prompt] * args.batch_size
    images = [[p] for p in sorted((data_dir / "imagenet" / "train").rglob("*.JPEG"))][: args.shots + 1]
    media = MediaCache(model, processor).media([[p for (p,) in images]] * args.batch_size)
    names = [f"class name number {i}" for i in range(args.classes)]
    cached = best_time(
        lambda: class_log_probs(model, processor.tokenizer, prompts=prompts, media=media, class_names=names),
        args.repeats,
    )
    full = best_time(
        lambda: class_scores_full_forward(model, processor.tokenizer, prompts=prompts, media=media, class_names=names),
        args.repeats,
    )
    a = class_log_probs(model, processor.tokenizer, prompts=prompts, media=media, class_names=names)
    b = class_scores_full_forward(model, processor.tokenizer, prompts=prompts, media=media, class_names=names)
    print(
        f"prefix cache ({args.classes} classes, batch {args.batch_size}, {args.shots} shots): per-class full forward "
        f"{full:.3f}s / cached {cached:.3f}s = {full / cached:.2f}x (max score difference {(a - b).abs().max():.1e})"
    )


if __name__ == "__main__":
    main()
