"""``flamingo-train plot`` (flamingo_train.plot): a PNG of the loss and eval curves from a run's metrics.jsonl."""

import json

import pytest

from flamingo_train import cli
from flamingo_train.plot import curves, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(path, *, datasets=("coco", "laion")):
    """Loss lines of a two-dataset mixture, eval lines every 2 steps, and a last line cut short by a kill."""
    lines = []
    for step in range(1, 7):
        losses = {f"loss/{name}": 5.0 / step + i for i, name in enumerate(datasets)}
        lines.append({"step": step, "loss": sum(losses.values()), **losses, "lr": 1e-4})
        if step % 2 == 0:
            lines.append({"step": step, "eval/custom_vqa/0shot": 10.0 * step, "eval/seconds": 1.5})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"step": 7, "lo')
    return path


def test_the_plot_command_writes_a_png_of_a_metrics_file(tmp_path, capsys):
    metrics = write_metrics(tmp_path / "metrics.jsonl")
    cli.main(["plot", str(metrics), "-o", str(tmp_path / "out" / "curves.png")])
    png = (tmp_path / "out" / "curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / "curves.png")


def test_the_plot_goes_beside_the_metrics_file_by_default(tmp_path):
    cli.main(["plot", str(write_metrics(tmp_path / "metrics.jsonl", datasets=("shapes",)))])
    assert (tmp_path / "metrics.png").read_bytes().startswith(PNG_SIGNATURE)


def test_the_curves_are_the_per_dataset_losses_and_the_eval_scores_without_timings(tmp_path):
    losses, scores = curves(read_metrics(write_metrics(tmp_path / "metrics.jsonl")))
    assert sorted(losses) == ["loss", "loss/coco", "loss/laion"]
    assert [s for s, _ in losses["loss/coco"]] == [1, 2, 3, 4, 5, 6]  # the partial last line is skipped
    assert scores == {"eval/custom_vqa/0shot": [(2, 20.0), (4, 40.0), (6, 60.0)]}
    one_dataset, _ = curves(read_metrics(write_metrics(tmp_path / "one.jsonl", datasets=("shapes",))))
    assert sorted(one_dataset) == ["loss"]


def test_plotting_a_missing_file_exits_with_an_error_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plot", str(tmp_path / "nope.jsonl")])
    assert exit_info.value.code == 2
    assert "nope.jsonl" in capsys.readouterr().err
