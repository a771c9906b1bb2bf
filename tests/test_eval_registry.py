"""The task registry is the only list of tasks: a task registered there is loaded, run, scored, written as a
fixture and offered by the CLI without touching any other module."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from models import build_tiny_model

import flamingo_eval
from flamingo_eval.cli import build_parser, config_from_args, parse_escapes
from flamingo_eval.data import load_task_data
from flamingo_eval.files import Example, TaskData, field_of, read_jsonl
from flamingo_eval.fixtures import FixtureImages
from flamingo_eval.kinds import Vqa
from flamingo_eval.prompts import vqa_spec
from flamingo_eval.runner import EvalConfig, Evaluator
from flamingo_eval.score import prediction_record, score_files, score_records
from flamingo_eval.tasks import REGISTRY, Task, get_task, register, task_names
from flamingo_eval.testing import write_fixture_data


def _read_toy(layout) -> TaskData:
    def split(key):
        path = layout[key]
        return [
            Example(id=r["qid"], image=path.parent / field_of(r, "img", str(path), str), question=r["q"], answers=(r["a"],) * 10)
            for r in read_jsonl(path, key)
        ]

    return TaskData(task="toy", support=split("train"), query=split("test"))


def _write_toy(root: Path, rng, images: FixtureImages, n_support, n_query) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for key, count in (("train", n_support), ("test", n_query)):
        lines = []
        for i in range(count):
            images.save(root / f"{key}{i}.png")
            lines.append(json.dumps({"qid": f"{key}{i}", "img": f"{key}{i}.png", "q": "What?", "a": rng.choice("ab")}))
        (root / f"{key}.jsonl").write_text("\n".join(lines) + "\n")


TOY = Task(
    name="toy",
    kind=Vqa(),
    spec=vqa_spec("toy", max_new_tokens=2),
    layout={"train": "train.jsonl", "test": "test.jsonl"},
    read=_read_toy,
    write_fixture=_write_toy,
)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(REGISTRY, ("toy", None), TOY)
    return TOY


def test_a_registered_task_is_loaded_scored_written_and_offered_by_generic_code(toy, tmp_path):
    root = write_fixture_data(tmp_path, tasks=("toy",), num_support=3, num_query=4)
    assert sorted(p.name for p in root.iterdir()) == ["toy"]
    data = load_task_data("toy", data_dir=root)
    assert (len(data.support), len(data.query)) == (3, 4) and data.files["test"] == root / "toy" / "test.jsonl"
    records = [prediction_record("toy", e, e.answers[0] if i % 2 else "zzz") for i, e in enumerate(data.query)]
    assert records[0] == {"question_id": "test0", "answer": "zzz"}
    assert score_records("toy", records, data.query)["accuracy"] == pytest.approx(50.0)
    # CLI: a --tasks choice, a per-key path flag, and a score --task choice (its kind scores VQA files).
    args = build_parser().parse_args(["run", "--model", "m", "--tasks", "toy", "--toy-test", "other.jsonl"])
    assert config_from_args(args).paths == {"toy": {"test": "other.jsonl"}}
    assert build_parser().parse_args(["score", "--task", "toy", "--predictions", "p", "--annotations", "a"]).task == "toy"
    assert "toy" in task_names() and get_task("toy") is toy


def test_a_registered_task_runs_end_to_end_in_the_runner(toy, tiny_vision, tiny_llama_dir, tmp_path):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    root = write_fixture_data(tmp_path / "data", tasks=("toy",), num_support=3, num_query=3)
    config = EvalConfig(model=None, tasks=["toy"], shots=[0, 1], data_dir=root, batch_size=3, output=tmp_path / "r.json")
    results = Evaluator(config, model=model, processor=processor).run()
    assert [(t["task"], t["shots"], t["metric"]) for t in results["trials"]] == [("toy", 0, "accuracy"), ("toy", 1, "accuracy")]
    assert all(0 <= t["value"] <= 100 for t in results["trials"])


def test_registering_a_name_twice_or_a_spec_that_contradicts_its_kind_is_refused(toy):
    with pytest.raises(ValueError, match="already registered"):
        register(TOY)
    with pytest.raises(ValueError, match="spec says kind 'vqa' / metric 'accuracy', but its kind object is 'caption'"):
        from flamingo_eval.kinds import Captioning

        Task(name="bad", kind=Captioning(), spec=vqa_spec("bad"), layout={}, read=_read_toy, write_fixture=_write_toy)


def test_score_files_refuses_tasks_without_an_annotation_format_and_custom_without_a_kind():
    with pytest.raises(ValueError, match="task must be one of coco, flickr30k, vqav2, okvqa, textvqa, vizwiz, hateful_memes,"):
        score_files("imagenet", "p.json", "a.json")
    with pytest.raises(ValueError, match=r"needs custom_kind \(--custom-kind\)"):
        score_files("custom", "p.json", "a.json")
    # custom caption / VQA score their own test.jsonl; the CLI offers exactly those kinds.
    assert build_parser().parse_args(["score", "--task", "custom", "--custom-kind", "vqa", "--predictions", "p",
                                      "--annotations", "test.jsonl"]).custom_kind == "vqa"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "--task", "custom", "--custom-kind", "binding", "--predictions", "p",
                                   "--annotations", "a"])


def _literals(path: Path) -> set[str]:
    """Every string constant in a module that is not a docstring."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}


@pytest.mark.parametrize("module", ["runner", "cli", "score", "data", "testing", "kinds", "generation", "classification"])
def test_generic_modules_name_no_task(module):
    # Task names live in the registry (tasks.py); generic code asks a Task object instead of comparing names.
    path = Path(flamingo_eval.__file__).parent / f"{module}.py"
    assert _literals(path) & set(task_names()) == set()


@pytest.mark.parametrize(
    "typed, separator",
    [(None, None), ("", ""), ("\\n", "\n"), ("\\n\\n", "\n\n"), ("\\t|", "\t|"), (" ", " "), ("é\\n", "é\n")],
)
def test_demo_separator_flag_decodes_escapes_and_defaults_to_the_tasks_own(typed, separator):
    argv = ["run", "--model", "m", "--tasks", "coco"] + ([] if typed is None else ["--demo-separator", typed])
    assert config_from_args(build_parser().parse_args(argv)).demo_separator == separator


def test_a_dangling_backslash_in_the_demo_separator_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--model", "m", "--tasks", "coco", "--demo-separator", "ab\\"])
    assert "bad escape sequence" in capsys.readouterr().err
    assert parse_escapes("\\\\n") == "\\n"  # an escaped backslash stays a backslash


def test_demo_separator_override_replaces_the_tasks_separator_and_nothing_else(tiny_vision, tiny_llama_dir, tmp_path, monkeypatch):
    # Training lays chunks out with no separator; OpenFlamingo's captioning prompts put "\n" after each demo.
    from flamingo_eval.kinds import Captioning

    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    root = write_fixture_data(tmp_path / "data", tasks=("coco",), num_support=3, num_query=2)
    prompts = []
    predict = Captioning.predict
    monkeypatch.setattr(Captioning, "predict", lambda self, *a, **kw: prompts.extend(kw["prompts"]) or predict(self, *a, **kw))
    for separator in (None, ""):
        config = EvalConfig(model=None, tasks=["coco"], shots=[2], data_dir=root, max_new_tokens=1,
                            demo_separator=separator, output=tmp_path / f"{separator!r}.json")
        Evaluator(config, model=model, processor=processor).run()
    default, joined = prompts[:2], prompts[2:]
    assert all(p.count("<|endofchunk|>\n<image>") == 2 for p in default)
    assert joined == [p.replace("<|endofchunk|>\n", "<|endofchunk|>") for p in default]
