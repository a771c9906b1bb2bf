"""Peak memory and time to the first batch of the training data loader: normal records vs one huge record.

    python bench/record_memory.py                      # a 50 MB record, max_tokens 256 (about a minute on CPU)
    python bench/record_memory.py --record-mb 5 --max-tokens 64

Writes two JSON Lines datasets of the same normal records (text + one image each), the second with one record of
``--record-mb`` MB of text in front, and reads the first batch of each with ``build_dataloader`` (``num_workers=0``,
no shuffle, so the first batch holds the huge record) in a fresh process of its own: within one process the
allocator keeps what an earlier run freed. Reports each run's peak RSS (``ru_maxrss``), the RSS after the imports
(torch, the processor), the rise between them (what the data cost), and the seconds to the first batch (files
read and converted, the batch built), then the ratio of the huge run to the normal one (the baseline, measured in the
same invocation). The loader should keep the ratio within 2x: text beyond what ``max_tokens`` can reach is never
tokenized (flamingo_train.data.samples, "Bounded work").

The processor is the shipped micro model's (its tokenizer has 459 tokens). ``HF_DATASETS_CACHE`` points into the
temporary folder, so each run converts its file afresh.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "a cat dog red photo of the image two on sofa park bus sits next to green blue small large".split()


def write_datasets(folder: Path, *, records: int, record_mb: float) -> tuple[Path, Path]:
    """``normal.jsonl`` (``records`` short records) and ``huge.jsonl`` (one record of ``record_mb`` MB, then the
    same records), with their image in ``folder``."""
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "img0.png")
    rng = random.Random(0)
    normal = [json.dumps({"text": "<image>" + " ".join(rng.choices(WORDS, k=40)), "images": ["img0.png"]})
              for _ in range(records)]
    words = int(record_mb * 1e6 / 5)  # about 5 characters per word with its space
    huge = json.dumps({"text": "<image>" + " ".join(rng.choices(WORDS, k=words)), "images": ["img0.png"]})
    (folder / "normal.jsonl").write_text("\n".join(normal) + "\n")
    (folder / "huge.jsonl").write_text("\n".join([huge, *normal]) + "\n")
    return folder / "normal.jsonl", folder / "huge.jsonl"


def child(path: str, max_tokens: int, batch_size: int) -> None:
    """In a fresh process: the first batch of ``path``; prints one JSON line."""
    from flamingo import FlamingoProcessor
    from flamingo_train.data import DataConfig, build_dataloader

    processor = FlamingoProcessor.from_pretrained("micro")
    config = DataConfig(name="bench", path=path, batch_size=batch_size, max_tokens=max_tokens, shuffle=False,
                        num_workers=0)
    imported_mb = _rss_mb()
    start = time.perf_counter()
    batch = next(iter(build_dataloader(config, processor, rank=0, world_size=1, seed=0)))
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({"imported_mb": imported_mb, "peak_mb": peak_mb, "first_batch_s": seconds,
                      "rows": int(batch["input_ids"].shape[0]), "tokens": int(batch["attention_mask"][0].sum()),
                      "skipped": batch["skipped"]}))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def measure(path: Path, args, env: dict) -> dict:
    command = [sys.executable, __file__, "--child", str(path), "--max-tokens", str(args.max_tokens),
               "--batch-size", str(args.batch_size)]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no first batch within {args.timeout} s"}
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.record_memory", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--record-mb", type=float, default=50.0, help="size of the huge record's text")
    parser.add_argument("--records", type=int, default=64, help="normal records in each dataset")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600, help="seconds a run may take to its first batch")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.max_tokens, args.batch_size)
        return
    with tempfile.TemporaryDirectory(prefix="record-memory-") as tmp:
        folder = Path(tmp)
        normal, huge = write_datasets(folder, records=args.records, record_mb=args.record_mb)
        env = {**os.environ, "HF_DATASETS_CACHE": str(folder / "hf-cache"), "TOKENIZERS_PARALLELISM": "false"}
        results = {"normal records": measure(normal, args, env),
                   f"+ one {args.record_mb:g} MB record": measure(huge, args, env)}
    print(f"first batch of {args.batch_size}, max_tokens {args.max_tokens}, {args.records} normal records")
    print(f"{'dataset':<28} {'RSS after imports':>18} {'peak RSS':>10} {'rise':>9} {'first batch':>12}  skipped")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<28} {r['error']}")
        else:
            rise = r["peak_mb"] - r["imported_mb"]
            print(f"{name:<28} {r['imported_mb']:>15,.0f} MB {r['peak_mb']:>7,.0f} MB {rise:>6,.0f} MB "
                  f"{r['first_batch_s']:>10.2f} s  {r['skipped']}")
    base, big = results.values()
    if "error" not in base and "error" not in big:
        ratio = big["peak_mb"] / base["peak_mb"]
        print(f"peak RSS ratio (huge / normal): {ratio:.2f}x  (goal: <= 2x); "
              f"first batch {big['first_batch_s'] / base['first_batch_s']:.1f}x as long")


if __name__ == "__main__":
    main()
