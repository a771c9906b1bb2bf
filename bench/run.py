"""One benchmark suite: the bare frozen LM, the OpenFlamingo reference and this package, timed in one process.

Run (from the repository root)::

    .venv/bin/python -m bench                                   # small and micro configs, all cases (< 10 min, CPU)
    .venv/bin/python -m bench --config tiny --repeats 1         # seconds (the CI smoke run)
    .venv/bin/python -m bench --config small --cases decode train
    .venv/bin/python -m bench --config gpu                      # on a machine with a CUDA GPU

Within each repeat every contender runs once, in a rotating order, so that drift of the machine (thermal, other
load) hits them alike; the table reports the median over repeats, its ratio to the bare LM on the same tokens
(same case), and the FLOP ratio counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention),
the physical limit of the time ratio. The table is rewritten after every case, so an interrupted run keeps what it
measured. Results go to ``bench/RESULTS.md`` (``--out`` elsewhere); for the small and gpu configs a last table says
which of this package's speed and memory goals the run met (e.g. decoding a token costs at most 1.6x the bare LM's).

Configs (``bench.contenders.CONFIGS``): ``small`` (Llama-style LM, 8 layers, width 512, 32k vocab; open_clip
ViT-B-32 at 224 px; all random; 3 images a sample, batch 4, 96-token prompt, cross-attention before every layer),
``micro`` (the shipped model; the reference cannot take its perceiver, so it has no OpenFlamingo rows), ``gpu``
(1B Llama shape, ViT-L-14, bf16, CUDA), ``tiny`` (the test suite's tiny random backbones) and ``tiny-bf16`` (the
same in bf16: the gpu config's dtype handling, checked on CPU).
Cases: ``prefill`` (whole, and split into vision+perceiver / LM+cross-attention), ``decode`` (per token, with the KV
cache, via ``generate`` and via a hand-written loop passing ``cache`` and ``media_state`` back), ``train`` (forward
+ backward + AdamW, tokens/s; peak memory of each contender trained alone), ``generate`` (VQA-style, samples/s),
``classify`` (rank classification, 10 and 1000 classes, prefix cache against one forward per class) and ``reuse``
(an episode whose queries share demo images, through the evaluation's media cache).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import open_clip  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import logging as transformers_logging  # noqa: E402

from .contenders import CONFIGS, OURS, REFERENCE, ROOT, build, openflamingo_patched  # noqa: E402
from .eval_cases import case_classify, case_feature_reuse, case_generation  # noqa: E402
from .lm_cases import case_decode, case_prefill, case_train  # noqa: E402
from .measure import Row  # noqa: E402

# Training first: its large allocations are the most sensitive to what earlier cases left in the allocator (the
# same step measured 1.11x OpenFlamingo first and 0.92x after the decode case, in one process).
CASES = ("train", "prefill", "decode", "generate", "classify", "reuse")


def _fmt_time(s: float) -> str:
    if s != s:
        return "-"
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def table(rows: list[Row]) -> list[str]:
    lines = ["| case | contender | median time | ratio to bare LM | FLOP ratio | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        flop = "-" if r.flop_ratio is None else f"{r.flop_ratio:.2f}x"
        lines.append(f"| {r.case} | {r.contender} | {_fmt_time(r.seconds)} | {ratio} | {flop} | {r.note} |")
    return lines


def profile_table(rows: list[Row]) -> list[str]:
    """Where each contender's training step goes, from torch.profiler (rows that carry a profile)."""
    profiled = [r for r in rows if "profile" in r.extra]
    if not profiled:
        return []
    lines = ["Training step by kind of work (torch.profiler, CPU self time, one step):", "",
             "| contender | total | matrix multiplies | attention | optimizer step | other |", "|---|---|---|---|---|---|"]
    for r in profiled:
        p = r.extra["profile"]
        cell = lambda k: f"{p[k]:,.0f} ms ({p[k] / p['total']:.0%})"  # noqa: E731
        lines.append(f"| {r.contender} | {p['total']:,.0f} ms | {cell('matmul')} | {cell('attention')} | "
                     f"{cell('optimizer')} | {cell('other')} |")
    return [*lines, ""]


def _find(rows: list[Row], case_start: str, contender: str) -> Row | None:
    return next((r for r in rows if r.case.startswith(case_start) and r.contender == contender), None)


def targets(rows: list[Row]) -> list[str]:
    """This package's speed and memory goals, each checked on the rows measured (goals whose rows are absent are
    left out)."""
    checks = []

    def check(name, ok, figures):
        checks.append(f"| {name} | {'met' if ok else 'MISSED'} | {figures} |")

    for path in ("manual loop", "generate"):
        row, ref = _find(rows, "decode", f"{OURS}, {path}"), _find(rows, "decode", f"{REFERENCE}, manual loop")
        if row is not None:
            vs_ref = "" if ref is None else f"; {ref.seconds / row.seconds:.2f}x faster than OpenFlamingo's loop"
            ok = row.ratio <= 1.6 and (ref is None or ref.seconds / row.seconds >= 2)
            check(f"decode per token, {path}: <= 1.6x the bare LM, >= 2x faster than OpenFlamingo", ok,
                  f"{row.ratio:.2f}x the bare LM (FLOP ratio {row.flop_ratio or float('nan'):.2f}){vs_ref}")
    row = _find(rows, "prefill: LM + cross-attn", OURS)
    if row is not None and row.flop_ratio:
        gap = row.ratio / row.flop_ratio - 1
        check("LM + cross-attn prefill within 15% of its FLOP ratio", abs(gap) <= 0.15,
              f"{row.ratio:.2f}x against FLOP ratio {row.flop_ratio:.2f} ({gap:+.0%})")
    ours, ref = _find(rows, "train", OURS), _find(rows, "train", REFERENCE)
    if ours is not None and ref is not None:
        speed, memory = ref.seconds / ours.seconds, (ours.extra["peak_mb"], ref.extra["peak_mb"])
        check("training step >= 1.3x OpenFlamingo's throughput at no more peak memory",
              speed >= 1.3 and memory[0] <= memory[1], f"{speed:.2f}x; peak memory {memory[0]:,.0f} vs {memory[1]:,.0f} MB")
    row = _find(rows, "rank classification, 1000", f"{OURS}, prefix cache (eval)")
    base = _find(rows, "rank classification, 1000", f"{OURS}, one forward per class")
    if row is not None and base is not None:
        check("rank classification, 1000 classes: >= 10x faster than one forward per class, equal scores",
              base.seconds / row.seconds >= 10, row.note)
    row = next((r for r in rows if r.case.startswith("feature reuse") and "media cache" in r.contender), None)
    if row is not None:
        check("demo images seen again in an episode are never re-encoded",
              row.extra["encoded"] == row.extra["distinct"], row.note)
    if not checks:
        return []
    return ["| target | status | measured |", "|---|---|---|", *checks]


def header() -> list[str]:
    return [
        "# Benchmark results", "",
        f"`python -m bench` on {platform.machine()} {platform.processor() or ''} with {torch.get_num_threads()} "
        f"threads; torch {torch.__version__}, transformers {transformers.__version__}, open_clip "
        f"{open_clip.__version__}.", "",
        "Median of the interleaved repeats in one process. Ratio: time / the bare LM's time in the same case (same "
        "tokens). FLOP ratio: FlopCounterMode's count / the bare LM's, the limit of the time ratio.", "",
    ]


def run(configs=("small", "micro"), repeats: int = 3, cases=CASES, out: Path | None = None,
        max_class_forwards: int = 10):
    """Build each config's contenders, time the cases and write the markdown after each; returns (rows, text)."""
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    unknown = set(cases) - set(CASES)
    if unknown:
        raise ValueError(f"unknown case(s) {sorted(unknown)}; expected some of {CASES}")
    out = Path(out) if out is not None else ROOT / "bench" / "RESULTS.md"
    runners = {
        "prefill": case_prefill, "decode": case_decode, "train": case_train, "generate": case_generation,
        "classify": functools.partial(case_classify, max_forwards=max_class_forwards), "reuse": case_feature_reuse,
    }
    sections, all_rows = [], []
    text = ""
    for name in configs:
        config = CONFIGS[name]
        # The work folder holds the random backbones and the reference's checkpoint (1.6 GB for small): removed after.
        with openflamingo_patched(), tempfile.TemporaryDirectory(prefix=f"flamingo-bench-{name}-") as work:
            setup = build(config, Path(work))
            print(setup.description, flush=True)
            rows: list[Row] = []
            section_start = len(sections)
            for case in (c for c in CASES if c in cases):
                start = time.perf_counter()
                rows += runners[case](setup, repeats)
                print(f"{name} {case}: {time.perf_counter() - start:.1f}s", flush=True)
                checked = targets(rows)
                section = [f"## {name}", "", setup.description, "", *table(rows), "", *profile_table(rows)]
                if checked and name in ("small", "gpu"):  # the configs the targets are set for
                    section += [f"Targets ({name} config):", "", *checked, ""]
                sections[section_start:] = ["\n".join(section)]
                text = "\n".join(header()) + "\n" + "\n".join(sections)
                out.write_text(text)  # after every case: an interrupted run keeps what it measured
        all_rows += rows
    return all_rows, text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=["small", "micro"],
                        help="model sizes to time, described under Configs above (default: small micro)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each case; the table shows the median")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES),
                        help="what to time, described under Cases above (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="markdown file (default bench/RESULTS.md)")
    parser.add_argument("--max-class-forwards", type=int, default=10,
                        help="the one-forward-per-class baseline runs this many classes; its time is scaled up to all")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    _, text = run(args.config, args.repeats, args.cases, args.out, args.max_class_forwards)
    print(text)
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
