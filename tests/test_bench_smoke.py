"""The benchmark suite (python -m bench) runs every case end to end on the tiny config, so that it does not rot.

Timings here mean nothing (one repeat, tiny models); what is checked is that every case produces its rows, with
finite positive times, ratios to the bare LM, FLOP ratios, the feature-reuse count and the peak-memory probe.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.contenders import BARE, OURS, REFERENCE  # noqa: E402
from bench.run import CASES, run  # noqa: E402


@pytest.mark.parametrize("config", ["tiny", "tiny-bf16"])  # tiny-bf16: the gpu config's dtype handling, on CPU
def test_tiny_suite_runs_every_case_and_writes_the_table(tmp_path, config):
    out = tmp_path / "RESULTS.md"
    rows, text = run([config], repeats=1, cases=CASES, out=out)
    assert out.read_text() == text
    timed = [r for r in rows if not r.note.startswith("not run")]
    assert {r.contender.split(",")[0] for r in timed} == {BARE, OURS, REFERENCE}
    for row in timed:
        assert math.isfinite(row.seconds) and row.seconds > 0, row
    assert all(r.ratio == 1.0 for r in timed if r.contender.startswith(BARE))
    cases = {r.case.split(" (")[0].split(",")[0] for r in rows}
    assert {"prefill", "prefill: vision + perceiver", "decode", "train step", "VQA-style generation",
            "rank classification", "feature reuse"} <= cases
    # FLOP ratios where the bare LM runs the same tokens; Flamingo adds work, so they exceed 1.
    for case in ("prefill: LM + cross-attn", "decode", "train step", "VQA-style generation"):
        ours = [r for r in rows if r.case.startswith(case) and r.contender.startswith(OURS)]
        assert ours and all(r.flop_ratio is not None and r.flop_ratio > 1 for r in ours), case
    train = {r.contender: r.note for r in rows if r.case.startswith("train")}
    assert all("peak RSS" in note and "tokens/s" in note for note in train.values())
    assert all(r.extra["peak_mb"] > 0 for r in rows if r.case.startswith("train"))
    reuse = next(r for r in rows if r.case.startswith("feature reuse") and "media cache" in r.contender)
    assert "5 of 9 images encoded" in reuse.note and "each encoded once" in reuse.note  # 2 demos + 3 queries
    assert reuse.extra == {"encoded": 5, "distinct": 5, "requested": 9}
    classify = next(r for r in rows if r.case.startswith("rank classification") and "prefix" in r.contender)
    assert classify.extra["score_difference"] < 1e-4 and "scores equal to" in classify.note
    assert len([line for line in text.splitlines() if line.startswith("| ")]) >= len(rows)


def test_chat_turn_bench_prints_a_ratio_row_for_every_turn(capsys):
    from bench.chat_turns import main as chat_turns

    chat_turns(["--configs", "micro", "--turns", "1", "3", "--repeats", "1", "--new-tokens", "2"])
    assert torch.is_grad_enabled()  # the bench leaves the process as it found it
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "3"]
    ratios = [[float(x) for x in row[1:]] for row in rows]
    assert ratios[0][0] == 1.0 and all(math.isfinite(x) and x > 0 for row in ratios for x in row)
