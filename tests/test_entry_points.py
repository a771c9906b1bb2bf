"""The README's commands run as documented (the notebooks: tests/test_notebooks.py; which test runs which block of
the README and docs/: tests/test_docs.py)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

import flamingo
from test_docs import PAGES, doc_block, run_bash_block

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_as_the_readme_starts_it(tmp_path):
    """The README's first command, ``flamingo-demo``, shrunk (tests/test_demo.py checks what it prints); its second,
    the tests, is the command CI runs."""
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block == doc_block("setup-commands")  # the set-up commands come first
    first, second = (line.split("#")[0].strip() for line in first_block.splitlines())
    assert first.split() == ["bash", "scripts/setup.sh", "&&", ".venv/bin/flamingo-demo"]
    assert second in (ROOT / ".ci/run").read_text().splitlines(), "the README's test command is not the one CI runs"
    demo = Path(sys.executable).parent / "flamingo-demo"  # the console script of this venv, as .venv/bin/ holds it
    result = subprocess.run(
        [str(demo), "--out", str(tmp_path), "--queries", "4", "--support", "4"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(f"\n{n}. " in result.stdout for n in (1, 2, 3))
    assert (tmp_path / "prompt" / "query.png").is_file()


def test_readme_fine_tuning_example_learns_the_task_from_the_images_as_stated(tmp_path):
    """custom VQA data -> fine-tune the micro model -> evaluate, as the README runs it (its figures: 0% in the loop
    until step 30, a climb over steps 40 to 90, then 100%; the loss flattening at the frozen LM's floor, 0.32; about
    99 / 98 from flamingo-eval, 4.5 with shuffled images)."""
    result = run_bash_block(doc_block("fine-tuning"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "runs/what-is-this"
    lines = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    scores = [(m["step"], m["eval/custom_vqa/0shot"]) for m in lines if "eval/custom_vqa/0shot" in m]
    assert [step for step, _ in scores] == list(range(0, 151, 10))
    assert scores[0][1] < 10 and scores[-1][1] >= 85  # the micro model does not know the question; then it does
    # ... and learns it over several evaluations, not between two: a curve, not a step
    assert sum(10 <= score <= 90 for _, score in scores) >= 2
    assert next(step for step, score in scores if score >= 85) >= 50
    assert (out / "run/metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from flamingo_train.micro_example import loss_floor, question_only_accuracy, with_shuffled_images

    # The loss stops at the floor the frozen LM sets (its output layer cannot be surer of one colour), not at 0.
    answers = [record["answer"] for record in map(json.loads, (out / "task/test.jsonl").read_text().splitlines())]
    floor = loss_floor(flamingo.Flamingo.from_pretrained("micro"), flamingo.FlamingoProcessor.from_pretrained("micro"),
                       answers)
    losses = [m["loss"] for m in lines if "loss" in m]
    assert 0.25 < floor and abs(losses[-1] - floor) < 0.05 and losses[0] > 10 * floor
    trials = {t["shots"]: t for t in json.loads((out / "results.json").read_text())["trials"]}
    assert trials.keys() == {0, 4} and min(t["value"] for t in trials.values()) >= 85
    assert trials[0]["vqa_rule"] == "exact-match-any"  # one answer per question: exact match, not the 10-answer rule

    shuffled = with_shuffled_images(out / "task", tmp_path / "shuffled")
    evaluated = subprocess.run(
        [sys.executable, "-m", "flamingo_eval", "run", "--model", str(out / "run/best"), "--tasks", "custom",
         "--custom-kind", "vqa", "--data-dir", str(shuffled), "--shots", "0", "--output", str(tmp_path / "s.json")],
        capture_output=True, text=True, cwd=ROOT)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    (trial,) = json.loads((tmp_path / "s.json").read_text())["trials"]
    assert trial["value"] < 20 and question_only_accuracy(out / "task") < 20  # the gain needs the images


def test_random_model_example_runs_and_learns_from_its_images(tmp_path):
    """The tiny random-model example (the evaluation example's model), as docs/training.md runs it: 100 steps cut
    the loss fivefold."""
    result = run_bash_block(doc_block("random-model-example"), tmp_path)
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
    result = run_bash_block(doc_block("evaluation"), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "runs/eval/results.json").read_text())
    assert {(t["task"], t["shots"]) for t in results["trials"]} == {
        (task, shots) for task in ("coco", "vqav2", "hateful_memes", "imagenet") for shots in (0, 2)
    }
    assert len(list((tmp_path / "runs/eval/predictions").glob("*.json"))) == 8
    assert "| coco" in result.stdout  # the markdown table


def test_every_path_the_readme_and_docs_name_exists():
    """A reader opens the files the README and docs/ name: each `folder/...` path in them must exist in the
    repository (their links: tests/test_docs.py)."""
    top = ("flamingo/", "training/", "eval/", "scripts/", "tests/", "bench/", "notebooks/", ".ci/", "docs/")
    top += ("flamingo_train/", "flamingo_eval/")  # import names, which a reader may take for folders
    named = {(page.name, p) for page in PAGES for p in re.findall(r"`([\w.-]+/[\w./-]*)`", page.read_text())}
    paths = {(page, p) for page, p in named if p.startswith(top)}
    assert len(paths) > 40  # the pages really are read: they name many files
    missing = sorted((page, p) for page, p in paths if not (ROOT / p).exists())
    assert not missing, f"(page, path) pairs naming paths that do not exist: {missing}"
