"""Training throughput of the real loop (flamingo_train.train) against a plain forward + backward + AdamW step of
the same model on the same batches, on the tiny example model (CPU, no download).

Run::

    .venv/bin/python bench/train_throughput.py [--steps 60] [--warmup 10] [--threads 1] [--batch-size 8]

Prints tokens/s for: the plain step (batches prepared beforehand), the data loader alone, and the real loop (which
loads its own data in the main process here: num_workers 0), and the ratios loop/plain and loop/(plain+loading).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import flamingo  # noqa: E402
from flamingo_train.config import load_config  # noqa: E402
from flamingo_train.data.loader import build_dataloader  # noqa: E402
from flamingo_train.example import write_example  # noqa: E402
from flamingo_train.optim import build_optimizer  # noqa: E402
from flamingo_train.train import label_token_loss_sum, train  # noqa: E402


def plain_steps(model, optimizer, batches) -> None:
    for batch in batches:
        n = (batch["labels"][:, 1:] != -100).sum().clamp(min=1)
        (label_token_loss_sum(model, batch) / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def tokens(batches) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the timing (must divide --steps)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.steps % args.warmup:
        raise ValueError("--warmup must divide --steps (the loop logs every --warmup steps).")
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="flamingo-train-bench-"))
    config_path = write_example(out / "example", max_steps=args.steps, batch_size=args.batch_size)
    config = load_config(
        config_path,
        overrides=[f"run.output_dir={out / 'run'}", f"run.log_every={args.warmup}", "run.save_every=0"],
    )
    processor = flamingo.FlamingoProcessor.from_pretrained(config.model.pretrained)

    # The batches the loop will see (same config, seed and rank), timed as the data-loading cost.
    loader = iter(build_dataloader(config.data[0], processor, rank=0, world_size=1, seed=config.run.seed))
    start = time.perf_counter()
    batches = [next(loader) for _ in range(args.steps)]
    loading = tokens(batches) / (time.perf_counter() - start)

    model = flamingo.Flamingo.from_pretrained(config.model.pretrained).train()
    optimizer = build_optimizer(model, config.optim)
    plain_steps(model, optimizer, batches[: args.warmup])
    start = time.perf_counter()
    plain_steps(model, optimizer, batches[args.warmup :])
    plain = tokens(batches[args.warmup :]) / (time.perf_counter() - start)

    train(config)
    windows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    loop = sum(w["tokens_per_s"] for w in windows) / len(windows)  # equal-sized windows after the first

    both = 1 / (1 / plain + 1 / loading)  # what a loop would do that only loads and steps, nothing else
    print(f"threads={args.threads} batch={args.batch_size} steps={args.steps} (first {args.warmup} not timed)")
    print(f"plain forward+backward+step : {plain:10.0f} tokens/s")
    print(f"data loading alone          : {loading:10.0f} tokens/s")
    print(f"real loop (loads its data)  : {loop:10.0f} tokens/s")
    print(f"loop / plain                : {loop / plain:10.2f}")
    print(f"loop / (plain + loading)    : {loop / both:10.2f}")


if __name__ == "__main__":
    main()
