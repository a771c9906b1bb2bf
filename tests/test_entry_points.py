"""The README's commands run as documented (the notebooks: tests/test_notebooks.py)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import flamingo

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_as_the_readme_starts_it(tmp_path):
    """The README's first command, ``flamingo-demo``, shrunk (tests/test_demo.py checks what it prints)."""
    first = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].splitlines()[0]
    assert first.split("#")[0].split() == ["bash", "scripts/setup.sh", "&&", ".venv/bin/flamingo-demo"]
    demo = Path(sys.executable).parent / "flamingo-demo"  # the console script of this venv, as .venv/bin/ holds it
    result = subprocess.run(
        [str(demo), "--out", str(tmp_path), "--queries", "4", "--support", "4"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(f"\n{n}. " in result.stdout for n in (1, 2, 3))
    assert (tmp_path / "prompt" / "query.png").is_file()


def readme_blocks_run_as_documented(heading: str) -> list[str]:
    """The README's bash blocks under ``heading`` that start with ``source .venv/bin/activate`` (the runnable ones)."""
    section = (ROOT / "README.md").read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```bash\n")[1:]]
    return [b for b in blocks if b.startswith("source .venv/bin/activate\n")]


def run_readme_block(block: str, cwd: Path) -> subprocess.CompletedProcess:
    # `source .venv/bin/activate` is the venv running this test: put its bin/ first on PATH instead.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = "set -euo pipefail\n" + block.split("\n", 1)[1]
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True)


def test_readme_fine_tuning_example_learns_the_task_from_the_images_as_stated(tmp_path):
    """custom VQA data -> fine-tune the micro model -> evaluate, as the README runs it (its figures: 0 -> 100% in the
    loop, 100 / 100 from flamingo-eval, 4.5 with shuffled images)."""
    (block,) = readme_blocks_run_as_documented("Training")
    result = run_readme_block(block, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "runs/what-is-this"
    lines = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    scores = [(m["step"], m["eval/custom_vqa/0shot"]) for m in lines if "eval/custom_vqa/0shot" in m]
    assert [step for step, _ in scores] == list(range(0, 401, 50))
    assert scores[0][1] < 10 and scores[-1][1] >= 85  # the micro model does not know the question; then it does
    assert (out / "run/metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trials = {t["shots"]: t for t in json.loads((out / "results.json").read_text())["trials"]}
    assert trials.keys() == {0, 4} and min(t["value"] for t in trials.values()) >= 85
    assert trials[0]["vqa_rule"] == "exact-match-any"  # one answer per question: exact match, not the 10-answer rule

    from flamingo_train.micro_example import question_only_accuracy, with_shuffled_images

    shuffled = with_shuffled_images(out / "task", tmp_path / "shuffled")
    evaluated = subprocess.run(
        [sys.executable, "-m", "flamingo_eval", "run", "--model", str(out / "run/best"), "--tasks", "custom",
         "--custom-kind", "vqa", "--data-dir", str(shuffled), "--shots", "0", "--output", str(tmp_path / "s.json")],
        capture_output=True, text=True, cwd=ROOT)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    (trial,) = json.loads((tmp_path / "s.json").read_text())["trials"]
    assert trial["value"] < 20 and question_only_accuracy(out / "task") < 20  # the gain needs the images


def test_random_model_example_runs_and_learns_from_its_images(tmp_path):
    """The tiny random-model example (the evaluation example's model): 100 steps cut the loss fivefold."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for command in (["python", "-m", "flamingo_train.example", "--out", "runs/example"],
                    ["flamingo-train", "--config", "runs/example/config.yaml"]):
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "runs/example/run/metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.2 * losses[0]
    assert (tmp_path / "runs/example/run/final/model.safetensors").is_file()
    # The captions name the shapes in the images, so the trained model must be reading them.
    right, swapped = example_losses_with_right_and_swapped_images(tmp_path / "runs/example")
    assert swapped > 3 * right


@torch.no_grad()
def example_losses_with_right_and_swapped_images(example: Path) -> tuple[float, float]:
    from flamingo_train.data import DataConfig, build_dataloader
    from flamingo_train.train import label_token_loss_sum

    model = flamingo.Flamingo.from_pretrained(example / "run/final").eval()
    processor = flamingo.FlamingoProcessor.from_pretrained(example / "run/final")
    data = DataConfig(name="shapes", path=str(example / "data/data.jsonl"), batch_size=32, num_workers=0)
    batch = next(iter(build_dataloader(data, processor, rank=0, world_size=1, seed=0)))
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    right = float(label_token_loss_sum(model, batch)) / tokens
    swapped = {**batch, "pixel_values": batch["pixel_values"].roll(1, dims=0)}  # each sample gets another's images
    return right, float(label_token_loss_sum(model, swapped)) / tokens


def test_readme_evaluation_example_runs_and_writes_results_and_predictions(tmp_path):
    (block,) = readme_blocks_run_as_documented("Evaluation")
    result = run_readme_block(block, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "runs/eval/results.json").read_text())
    assert {(t["task"], t["shots"]) for t in results["trials"]} == {
        (task, shots) for task in ("coco", "vqav2", "hateful_memes", "imagenet") for shots in (0, 2)
    }
    assert len(list((tmp_path / "runs/eval/predictions").glob("*.json"))) == 8
    assert "| coco" in result.stdout  # the markdown table


def test_every_path_the_readme_names_exists():
    """A reader opens the files the README names: each `folder/...` path in it must exist in the repository."""
    text = (ROOT / "README.md").read_text()
    top = ("flamingo/", "training/", "eval/", "scripts/", "tests/", "bench/", "notebooks/", ".ci/")
    top += ("flamingo_train/", "flamingo_eval/")  # import names, which a reader may take for folders
    paths = {p for p in re.findall(r"`([\w.-]+/[\w./-]*)`", text) if p.startswith(top)}
    assert len(paths) > 20  # the README really is read: it names many files
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README names paths that do not exist: {missing}"
