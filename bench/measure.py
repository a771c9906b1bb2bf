"""Timing, FLOP counting and peak memory for the benchmark cases, and the rows of the results table.

Timing: :func:`interleaved` runs every contender once per repeat, in a rotating order, so that drift of a shared
machine hits them alike, and reports medians. FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
attention), the physical limit of a time ratio. Peak memory on CPU is the peak RSS of a separate process that builds
one contender and trains it (:mod:`bench.memory_probe`), since within one process the allocator keeps what an earlier
contender freed; on an accelerator it is ``max_memory_allocated`` in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .contenders import BARE, ROOT


@dataclass
class Row:
    case: str
    contender: str
    seconds: float
    ratio: float | None = None
    flop_ratio: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def interleaved(contenders: dict, repeats: int, sync=lambda: None, warmup: bool = True) -> dict[str, float]:
    """Median seconds per contender. Each is warmed up once (unless ``warmup`` is False: long runs, after a short
    case has warmed the same code); then each repeat runs all, in a rotating order.

    A contender may return its own measured seconds (to leave out a part it must run, e.g. the prefill before the
    decode steps); otherwise its wall time counts. ``sync`` waits for the accelerator before a timer is read.
    """
    names = list(contenders)
    if warmup:
        for name in names:
            contenders[name]()
        sync()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            measured = contenders[name]()
            sync()
            elapsed = time.perf_counter() - start
            times[name].append(measured if isinstance(measured, float) else elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def _no_param_grads(models):
    # FlopCounterMode's module tracker asserts on tensors that require grad without a grad_fn, which views of
    # parameters taken under no_grad are; without grad mode nothing needs requires_grad, so drop it meanwhile.
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def count_flops(fn, models=()) -> int:
    """Matmul and attention FLOPs of one call of ``fn``; ``models``: the modules it runs (see _no_param_grads)."""
    with _no_param_grads(models) if not torch.is_grad_enabled() else contextlib.nullcontext():
        with FlopCounterMode(display=False) as counter:
            fn()
    return counter.get_total_flops()


def rows_for(case: str, seconds: dict[str, float], flops: dict[str, int] | None = None, notes=None) -> list[Row]:
    """Rows with the ratio to the bare-LM entry (the first key starting with BARE) and to its FLOPs."""
    base = next((k for k in seconds if k.startswith(BARE)), None)
    rows = []
    for name, s in seconds.items():
        flop_ratio = None
        if flops and base in flops and name in flops and flops[base]:
            flop_ratio = flops[name] / flops[base]
        rows.append(Row(case, name, s, s / seconds[base] if base else None, flop_ratio, (notes or {}).get(name, "")))
    return rows


def peak_memory_of_training(config_name: str, work: Path, which: str, steps: int = 2) -> dict:
    """Peak RSS (MB) of a fresh process that builds contender ``which`` and runs ``steps`` training steps, and the
    rise of its RSS over the loaded model; see :mod:`bench.memory_probe`."""
    command = [sys.executable, "-m", "bench.memory_probe", config_name, str(work), which, str(steps)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {which} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def reset_peak_rss() -> None:
    """Start the peak-RSS record (VmHWM) afresh at the current RSS (Linux: ``clear_refs`` 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    return _status_kb("VmHWM") / 1024


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_weight_int8pack_mm"}


def profile_breakdown(fn) -> dict[str, float]:
    """Milliseconds of one call of ``fn`` by kind of work, from ``torch.profiler`` (CPU self times): matrix
    multiplies, attention kernels, the optimizer step (its whole time) and everything else (element-wise, norms,
    copies, Python overhead of the ops)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / 1e3
    attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key) / 1e3
    optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step")) / 1e3
    return {"total": total, "matmul": matmul, "attention": attention, "optimizer": optimizer,
            "other": total - matmul - attention - optimizer}
