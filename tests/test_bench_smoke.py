"""The benchmark suite (bench/run.py) runs end to end on the tiny config and writes a table of finite positive times."""

import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import BARE, OURS, REFERENCE, run  # noqa: E402


def test_tiny_suite_writes_rows_with_finite_positive_times_and_ratios_to_the_bare_lm(tmp_path):
    out = tmp_path / "RESULTS.md"
    rows, text = run("tiny", repeats=1, cases=("prefill", "decode"), out=out)
    assert out.read_text() == text
    timed = [r for r in rows if not r.note.startswith("not run")]
    assert {r.contender.split(",")[0] for r in timed} == {BARE, OURS, REFERENCE}
    for row in timed:
        assert math.isfinite(row.seconds) and row.seconds > 0, row
    assert all(r.ratio == 1.0 for r in timed if r.contender.startswith(BARE))
    table = [line for line in text.splitlines() if line.startswith("| prefill") or line.startswith("| decode")]
    assert len(table) == len(rows)
