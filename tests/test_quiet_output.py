"""What the command lines print is for their users: our own progress and log lines, no other library's chatter.

The CLIs and the demo run in fresh processes, as their console scripts, with stderr captured: no third-party INFO
line (open_clip logs its model-building steps through the root logger, accelerate one line per checkpoint file), no
"Loading weights" bar that transformers draws on every load, while our own long-work bars and INFO lines stay.
Help and result tables read as written: line breaks kept, the command named as typed, no spread for one trial.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.utils import logging as transformers_logging

from flamingo.backbones import load_lang_model
from flamingo_eval.results import markdown_table, summarize
from flamingo_eval.testing import write_fixture_data
from flamingo_train.example import write_example
from train_loop_helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the console scripts of this venv
OWN = ("flamingo", "flamingo_eval", "flamingo_train")
# flamingo-train's log format, "%(asctime)s %(name)s: %(message)s"
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<name>[\w.]+): ")


def noise(stderr: str) -> list[str]:
    """The lines of ``stderr`` (bars redraw with carriage returns, so those split too) that are another library's:
    a weights bar, a log line of a logger that is not ours, a root-logger line."""
    bad = []
    for line in re.split(r"[\r\n]", stderr):
        logged = LOG_LINE.match(line)
        foreign = logged is not None and logged["name"].split(".")[0] not in OWN
        bar = "Loading weights" in line or "Writing model shards" in line
        if foreign or bar or "root:" in line or line.startswith(("INFO:", "[transformers]")):
            bad.append(line)
    return bad


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_flamingo_train_prints_only_its_own_log_lines_and_bars(tmp_path):
    config = write_example(tmp_path / "example", max_steps=1, save_every=1)  # one step, one checkpoint saved
    done = run([str(BIN / "flamingo-train"), "--config", str(config)], cwd=tmp_path)
    assert noise(done.stderr) == []
    assert "flamingo_train.train: trainable parameters:" in done.stderr  # our INFO lines still show
    assert "train: 100%" in done.stderr  # and the training bar


def test_flamingo_eval_prints_only_its_own_bars(tmp_path):
    data = write_fixture_data(tmp_path / "fx", tasks=["vqav2"])
    done = run([str(BIN / "flamingo-eval"), "run", "--model", "micro", "--tasks", "vqav2", "--shots", "0",
                "--data-dir", str(data), "--num-samples", "2", "--output", str(tmp_path / "r.json")], cwd=tmp_path)
    assert noise(done.stderr) == []
    assert "vqav2 0-shot seed 42: 100%" in done.stderr  # the evaluation's bar stays
    assert "| vqav2 (accuracy) |" in done.stdout


def test_the_demo_prints_only_its_own_bars(tmp_path):
    done = run([str(BIN / "flamingo-demo"), "--out", str(tmp_path / "demo"), "--queries", "1", "--support", "4",
                "--examples", "1"], cwd=tmp_path)
    assert noise(done.stderr) == []
    assert re.search(r"\d-shot seed \d+: 100%", done.stderr)  # the evaluation's bars stay


def test_the_example_scripts_print_only_what_they_wrote(tmp_path):
    """The random example model: no weights bars, no transformers notice of its resize, no open_clip warning that the
    tower is random (it is meant to be)."""
    done = run([sys.executable, "-m", "flamingo_train.example", "--out", str(tmp_path / "example")], cwd=tmp_path)
    assert noise(done.stderr) == [], done.stderr
    assert done.stdout.startswith(f"wrote {tmp_path / 'example' / 'model'}")


@pytest.mark.parametrize("module", ["flamingo_train.example", "flamingo_train.micro_example",
                                    "flamingo_train.recipes.micro", "flamingo_train.task_data", "bench.record_memory"])
def test_module_command_usage_names_the_command_as_typed(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {module} ")


@pytest.fixture
def progress_bars_on():
    """transformers' bars as a user's process has them (the suite's conftest turns them off)."""
    transformers_logging.enable_progress_bar()
    yield
    transformers_logging.disable_progress_bar()


def test_loading_a_language_model_draws_no_bar_and_leaves_later_bars_drawn(tiny_lm_dir, progress_bars_on, capfd):
    load_lang_model(str(tiny_lm_dir("llama")))
    list(transformers_logging.tqdm(range(2), desc="a later bar"))
    err = capfd.readouterr().err
    assert "Loading weights" not in err
    assert "a later bar" in err
    assert transformers_logging.is_progress_bar_enabled()


def _trial(value: float, seed: int) -> dict:
    return {"task": "vqav2", "shots": 0, "metric": "accuracy", "seed": seed, "value": value}


def test_one_trial_is_shown_without_a_spread_and_several_with_theirs():
    assert markdown_table(summarize([_trial(16.5, 42)])).splitlines()[-1] == "| vqav2 (accuracy) | 16.50 |"
    two = markdown_table(summarize([_trial(10.0, 42), _trial(20.0, 43)]))
    assert two.splitlines()[-1] == "| vqav2 (accuracy) | 15.00 ± 5.00 |"


def test_eval_help_keeps_the_line_breaks_of_its_examples():
    done = subprocess.run([sys.executable, "-m", "flamingo_eval", "--help"], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.startswith("usage: flamingo-eval ")
    # A command continued on the next line, as typed in a shell (a collapsed break left a run of spaces instead).
    assert "--shots 0 2 \\\n        --data-dir /tmp/fx --batch-size 2 --output /tmp/results.json\n" in done.stdout
    assert "(escapes decoded: ``'\\n'``)" in done.stdout


def test_bench_usage_names_the_command_as_typed_and_its_help_speaks_to_a_user():
    done = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    assert done.stdout.startswith("usage: python -m bench ")
    assert "issue" not in done.stdout
