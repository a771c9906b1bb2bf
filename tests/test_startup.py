"""Start-up is part of the interface: ``--help``, a bad flag and a bad config answer before torch is imported.

Each case runs a command line's ``main`` in a fresh interpreter, as its console script does, and then reads that
interpreter's ``sys.modules``: none of the heavy packages may have been imported. (How long that takes is measured
by hand, not here: timings on a shared machine make flaky tests.)
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CPU = REPO / "training" / "configs" / "tiny_cpu.yaml"
# The packages that take seconds to import (torch alone about three on two cores), and those they bring.
HEAVY = ("torch", "transformers", "accelerate", "datasets", "open_clip", "numpy", "PIL")

# Runs main(argv) of a CLI module as its console script would, then writes its exit code and the heavy modules it
# imported to a report file; the command's own stdout and stderr stay as they are.
PROBE = """
import json, sys
module, report, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = [module, *argv]
main = __import__(module, fromlist=["main"]).main
try:
    code = main(argv)
except SystemExit as stop:
    code = stop.code
code = 0 if code is None else code
heavy = sorted(name for name in {heavy!r} if name in sys.modules)
with open(report, "w") as f:
    json.dump({{"code": code, "heavy": heavy}}, f)
""".format(heavy=HEAVY)


def run_cli(module: str, *argv: str, tmp_path: Path) -> tuple[int, list[str], str, str]:
    """(exit code, heavy modules imported, stdout, stderr) of ``module.main(argv)`` in a fresh interpreter."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, module, str(report), *argv],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert report.is_file(), done.stderr  # the probe itself failed
    result = json.loads(report.read_text())
    return result["code"], result["heavy"], done.stdout, done.stderr


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert lines, "no error message"
    return lines[-1]


@pytest.mark.parametrize(
    "module, argv, usage",
    [
        ("flamingo_train.cli", ["--help"], "usage: flamingo-train"),
        ("flamingo_train.cli", ["plot", "--help"], "usage: flamingo-train plot"),
        ("flamingo_eval.cli", ["--help"], "usage: flamingo-eval"),
        ("flamingo_eval.cli", ["run", "--help"], "usage: flamingo-eval run"),
        ("flamingo_eval.cli", ["score", "--help"], "usage: flamingo-eval score"),
    ],
)
def test_help_answers_without_importing_torch(module, argv, usage, tmp_path):
    code, heavy, out, _ = run_cli(module, *argv, tmp_path=tmp_path)
    assert (code, heavy) == (0, [])
    assert out.startswith(usage)


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("flamingo_train.cli", ["--config", str(TINY_CPU), "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        ("flamingo_train.cli", [], "the following arguments are required: --config"),
        ("flamingo_eval.cli", ["run", "--model", "m", "--tasks", "cocoa"], "invalid choice: 'cocoa'"),
        ("flamingo_eval.cli", ["run", "--model", "m", "--tasks", "coco", "--shots", "four"], "invalid int value"),
        ("flamingo_eval.cli", ["run", "--model", "micro", "--tasks", "custom"], "needs --custom-kind"),
        ("flamingo_eval.cli", ["run", "--model", "micro", "--tasks", "coco", "--shots", "-1"], "--shots: must be >= 0"),
    ],
)
def test_a_bad_flag_is_refused_in_one_line_without_importing_torch(module, argv, message, tmp_path):
    code, heavy, _, err = run_cli(module, *argv, tmp_path=tmp_path)
    assert (code, heavy) == (2, [])
    assert message in one_error_line(err)


def test_a_missing_eval_folder_or_model_is_refused_without_importing_torch(tmp_path):
    argv = ["run", "--model", "micro", "--tasks", "coco", "--data-dir", str(tmp_path / "nowhere")]
    code, heavy, _, err = run_cli("flamingo_eval.cli", *argv, tmp_path=tmp_path)
    assert (code, heavy) == (2, [])
    assert one_error_line(err) == f"flamingo-eval: error: --data-dir {tmp_path / 'nowhere'}: directory not found."
    code, heavy, _, err = run_cli("flamingo_eval.cli", "run", "--model", str(tmp_path / "no-model"), "--tasks", "coco",
                                  tmp_path=tmp_path)
    assert (code, heavy) == (2, [])
    assert one_error_line(err) == f"flamingo-eval: error: --model {tmp_path / 'no-model'}: directory not found."


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "yaml_text, overrides, message",
    [
        ("optim: {lr: 1.0e-4, lrr: 2}\n", [], "config.yaml: optim.lrr: unknown field; did you mean lr?"),
        ("", ["run.max_steps=ten"], "config.yaml: run.max_steps: expected int, got 'ten' (str)"),
        ("eval: {tasks: [custom], custom_kind: vqa, data_dir: DATA, seed: 1}\n", [],
         "config.yaml: eval.seed: unknown field; did you mean seeds?"),
        ("", ["data.0.path=MISSING/*.jsonl"], "config.yaml: data[0].path: DataConfig 'docs': path"),
    ],
    ids=["bad-yaml-key", "bad-value", "renamed-eval-key", "missing-data-file"],
)
def test_a_config_error_is_refused_in_one_line_without_importing_torch(yaml_text, overrides, message, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("")
    base = f"model: {{vision_model: ViT-L-14, lang_model: no-such-lm}}\ndata: [{{name: docs, path: {data}}}]\n"
    config = _config(tmp_path, base + yaml_text.replace("DATA", str(tmp_path)))
    argv = ["--config", str(config), *(o.replace("MISSING", str(tmp_path / "missing")) for o in overrides)]
    code, heavy, _, err = run_cli("flamingo_train.cli", *argv, tmp_path=tmp_path)
    assert (code, heavy) == (2, [])
    line = one_error_line(err)
    assert len(err.strip().splitlines()) == 1 and line.startswith("flamingo-train: error: ")
    assert message in line


def imported_by(statement: str) -> set[str]:
    """The top-level packages (and the torch subpackages named below) in sys.modules after ``statement``, run in a
    fresh interpreter."""
    probe = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_import_flamingo_imports_nothing_heavy_until_a_name_is_used():
    modules = imported_by("import flamingo\nfrom flamingo import FlamingoConfig, PerceiverConfig")
    assert not {name for name in HEAVY if name in modules}


def test_the_model_class_imports_neither_open_clip_nor_transformers_model_loading():
    """Building a model needs torch and a little of transformers; open_clip, transformers' model-loading stack (and
    through it torch.distributed.tensor and torch._dynamo) load only when a backbone or processor is loaded."""
    modules = imported_by("from flamingo import Flamingo, FlamingoOutput, MediaState")
    unneeded = {"open_clip", "transformers.modeling_utils", "torch.distributed.tensor", "torch._dynamo"}
    assert "torch" in modules and not unneeded & modules
