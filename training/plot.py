"""The curves of a run, from its ``metrics.jsonl``: the training loss (one line per dataset when there are several) and,
in a second panel, the in-loop eval scores (``eval/<task>/<shots>shot``).

    flamingo-train plot runs/tiny_cpu/metrics.jsonl [-o curves.png]     # default: metrics.png next to the file

``flamingo-train`` draws ``output_dir/metrics.png`` itself at the end of a run (and skips it with a warning when
matplotlib is missing). Needs matplotlib (in the ``test`` extra; ``pip install matplotlib``), imported only here and
drawn on the non-interactive Agg canvas.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

EVAL_PREFIX = "eval/"
NOT_SCORES = ("eval/seconds",)  # eval/ keys that are not scores


def read_metrics(path: str | Path) -> list[dict]:
    """Every complete line of a metrics.jsonl; a line cut short by a killed job is skipped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: metrics file not found.")
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def curves(records: list[dict]) -> tuple[dict[str, list], dict[str, list]]:
    """``(loss curves, eval curves)``, each ``{label: [(step, value), ...]}``. The losses are ``loss/<dataset>`` when a
    run mixes several datasets (``loss`` is then their weighted sum, also drawn), else the one ``loss``."""
    datasets = sorted({k for r in records for k in r if k.startswith("loss/")})
    loss_keys = ["loss", *datasets] if len(datasets) > 1 else ["loss"]
    score_keys = sorted({k for r in records for k in r if k.startswith(EVAL_PREFIX) and k not in NOT_SCORES})

    def series(key):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [(s, v) for s, v in points if math.isfinite(v)]  # a window of skipped steps logs NaN

    losses = {key: series(key) for key in loss_keys}
    return {k: v for k, v in losses.items() if v}, {key: series(key) for key in score_keys}


def plot_metrics(metrics_path: str | Path, output: str | Path | None = None) -> Path:
    """Draw the curves of ``metrics_path`` into a PNG (default: ``metrics.png`` beside it); returns its path."""
    metrics_path = Path(metrics_path)
    output = Path(output) if output is not None else metrics_path.with_name("metrics.png")
    losses, scores = curves(read_metrics(metrics_path))
    if not losses and not scores:
        raise ValueError(f"{metrics_path}: no 'loss' or 'eval/...' values to plot.")
    panels = 2 if scores else 1
    figure = _agg_figure(figsize=(7, 3 * panels + 0.5))
    axes = figure.subplots(panels, 1, sharex=True, squeeze=False)
    loss_axis = axes[0][0]
    for label, points in losses.items():
        loss_axis.plot(*zip(*points), label="loss (weighted sum)" if label == "loss" and len(losses) > 1 else label)
    loss_axis.set_ylabel("training loss")
    if scores:
        score_axis = axes[1][0]
        for label, points in scores.items():
            score_axis.plot(*zip(*points), marker="o", label=label.removeprefix(EVAL_PREFIX))
        score_axis.set_ylabel("eval score")
    for (axis,) in axes:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
        axis.grid(alpha=0.3)
    axes[-1][0].set_xlabel("optimiser step")
    figure.suptitle(metrics_path.parent.name or str(metrics_path))
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    return output


def _agg_figure(**kwargs):
    """A Figure on the non-interactive Agg canvas. pyplot is not used: it would switch the backend of a caller's
    session (a notebook) and keep the figure alive in its global registry."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ValueError(
            "Plotting the metrics needs matplotlib, which is not installed: pip install matplotlib "
            "(it is in the package's test extra, flamingo[test])."
        ) from error
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure
