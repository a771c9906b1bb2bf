"""In-loop evaluation (flamingo_train.in_loop_eval): scores in metrics.jsonl at the configured steps, the best model
exported as a loadable directory, every checkpoint evaluable by flamingo-eval, and eval config errors before any model
loads.

One tiny run (4 steps, an evaluation every 2, a checkpoint every 2, keep_best) is shared by the tests that read it.
"""

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from train_loop_helpers import one_thread_and_fresh_accelerate_state  # noqa: F401  (autouse)
from train_loop_helpers import REPO, bitwise_equal, read_metrics

import flamingo
import flamingo_train.train as train_module
from flamingo.typed_config import field_default
from flamingo_eval import cli as eval_cli
from flamingo_eval.config import EvalConfig
from flamingo_eval.testing import write_fixture_data
from flamingo_train import cli as train_cli
from flamingo_train.checkpoint import complete_checkpoints
from flamingo_train.config import load_config
from flamingo_train.example import write_example
from flamingo_train.train import train

TINY_CPU = REPO / "training" / "configs" / "tiny_cpu.yaml"
KEY = "eval/custom_vqa/0shot"
# Greedy and short, so each evaluation of the 4 fixture queries takes well under a second.
DECODING = ["eval.num_beams=1", "eval.max_new_tokens=3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny example (model, shapes data) and flamingo-eval fixture data for ``--tasks custom``."""
    root = tmp_path_factory.mktemp("train_eval")
    write_example(root / "example", max_steps=4, save_every=2)
    write_fixture_data(root / "eval_data", tasks=["custom"], num_support=4, num_query=4)
    return root


def eval_overrides(files, *extra):
    return [
        "eval.tasks=[custom]", "eval.custom_kind=vqa", f"eval.data_dir={files / 'eval_data'}", "eval.shots=[0]",
        "eval.num_samples=4", "eval.batch_size=2", *DECODING, *extra,
    ]


def tiny_config(files, output_dir, *overrides):
    example = files / "example"
    return load_config(
        TINY_CPU,
        overrides=[
            f"model.pretrained={example / 'model'}", f"data.0.path={example / 'data' / 'data.jsonl'}",
            f"run.output_dir={output_dir}", "data.0.batch_size=4", *overrides,
        ],
    )


@pytest.fixture(scope="module")
def run(files):
    """4 steps, eval every 2 (and so at 2 and 4), checkpoints at 2 and 4, keep_best."""
    out = files / "run"
    config = tiny_config(files, out, "run.max_steps=4", "run.log_every=1", "run.save_every=2", "run.keep_last=2",
                         *eval_overrides(files, "eval.every=2", "eval.keep_best=true"))
    try:
        result = train(config)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return out, result


def evaluate_with_flamingo_eval(files, model_dir, output):
    """``flamingo-eval run`` on a saved directory, with the in-loop settings; returns the one trial's score."""
    code = eval_cli.main([
        "run", "--model", str(model_dir), "--tasks", "custom", "--custom-kind", "vqa", "--shots", "0",
        "--seeds", "42", "--data-dir", str(files / "eval_data"), "--num-samples", "4", "--batch-size", "2",
        "--num-beams", "1", "--max-new-tokens", "3", "--output", str(output),
    ])
    assert code == 0
    (trial,) = json.loads(Path(output).read_text())["trials"]
    return trial["value"]


def test_in_loop_eval_logs_its_score_before_training_at_every_eval_step_and_after_the_last(run):
    out, result = run
    evals = [m for m in read_metrics(out) if KEY in m]
    assert [m["step"] for m in evals] == [0, 2, 4]  # before the first step, every 2, after the last
    assert all(0.0 <= m[KEY] <= 100.0 and m["eval/seconds"] > 0 for m in evals)
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3, 4]  # the loss lines are unchanged
    assert (out / "eval" / "step-00000002.json").is_file() and (out / "eval" / "step-00000004.json").is_file()
    assert not list((out / "eval").glob("*.progress"))
    modes = {name: module.training for name, module in result.model.named_modules()}
    assert modes == {name: module.training for name, module in result.model.train().named_modules()}  # as in training
    assert (out / "metrics.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_keep_best_exports_a_model_that_flamingo_eval_loads_and_scores_as_logged(run, files, tmp_path):
    out, _ = run
    info = json.loads((out / "best" / "best.json").read_text())
    logged = {m["step"]: m[KEY] for m in read_metrics(out) if KEY in m}
    assert info["metric"] == KEY and info["score"] == max(logged.values())
    assert info["step"] == min(step for step, score in logged.items() if score == info["score"])  # the first best
    assert evaluate_with_flamingo_eval(files, out / "best", tmp_path / "best.json") == pytest.approx(info["score"])
    # The export holds the weights of that step: those of its checkpoint, or the starting model's at step 0.
    best = flamingo.Flamingo.from_pretrained(out / "best")
    step = info["step"]
    at_step = flamingo.Flamingo.from_pretrained(
        files / "example" / "model" if step == 0 else out / "checkpoints" / f"step-{step:08d}")
    assert bitwise_equal(best.trainable_state_dict(), at_step.trainable_state_dict())


def test_a_mid_run_checkpoint_is_a_model_directory_that_flamingo_eval_scores_as_the_loop_did(run, files, tmp_path):
    out, result = run
    middle = complete_checkpoints(out)[0]
    assert middle.name == "step-00000002" and (middle / "state").is_dir()  # accelerate's state, for resuming
    logged = next(m[KEY] for m in read_metrics(out) if KEY in m and m["step"] == 2)
    assert evaluate_with_flamingo_eval(files, middle, tmp_path / "mid.json") == pytest.approx(logged)
    last = flamingo.Flamingo.from_pretrained(complete_checkpoints(out)[-1])
    assert bitwise_equal(last.trainable_state_dict(), result.model.trainable_state_dict())


def test_a_run_resumes_from_a_checkpoint_with_its_accelerate_state_in_a_subfolder(run, files, tmp_path):
    out, result = run
    config = tiny_config(files, tmp_path / "resumed", "run.max_steps=4", "run.save_every=0",
                         f"run.resume={complete_checkpoints(out)[0]}")
    resumed = train(config)
    # The reference run evaluated at step 2 and the resumed one did not. Evaluation changes no weight, but with
    # several threads it can change the order of float reductions in the steps after it (cached tensors of other
    # strides), so the runs agree to float rounding; bitwise with one thread.
    ours, theirs = resumed.model.trainable_state_dict(), result.model.trainable_state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "override,field",
    [("eval.tasks=[cocoa]", "eval.tasks"), ("eval.custom_kind=poem", "eval.custom_kind"),
     ("eval.shots=[-1]", "eval.shots"), ("eval.every=-5", "eval.every"), ("eval.batch_size=0", "eval.batch_size"),
     ("eval.num_sample=4", "num_sample"), ("eval.best_metric=eval/coco/0shot", "eval.best_metric"),
     ("eval.seed=3", "eval.seed: unknown field; did you mean seeds?"), ("eval.model=micro", "eval.model"),
     ("eval.output=x.json", "eval.output"), ("eval.dtype=bfloat16", "eval.dtype"),
     ("eval.seeds=[1, 1]", "eval.seeds")],
)
def test_a_bad_eval_field_is_an_error_naming_it_before_any_model_loads(files, monkeypatch, capsys, override, field):
    def no_training(config):
        raise AssertionError("train() was reached; the config should have been refused")

    monkeypatch.setattr(train_module, "train", no_training)
    args = [f"model.pretrained={files / 'example' / 'model'}", *eval_overrides(files), override]
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--config", str(TINY_CPU), *args])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, naming the file and the field
    assert str(TINY_CPU) in line and field in line


def test_the_eval_section_is_a_flamingo_eval_config_with_in_loop_defaults(tmp_path):
    overrides = ["eval.tasks=[custom]", "eval.custom_kind=vqa", f"eval.data_dir={tmp_path}"]
    section = load_config(TINY_CPU, overrides=overrides).eval
    assert isinstance(section, EvalConfig)
    # One source per default: only the in-loop ones differ from flamingo-eval's.
    configured = {"model", "tasks", "custom_kind", "data_dir"}  # model and tasks have no flamingo-eval default
    differ = {name for name in EvalConfig.__dataclass_fields__
              if name not in configured and getattr(section, name) != field_default(EvalConfig, name)}
    assert differ == {"output", "shots", "num_samples"} and (section.shots, section.num_samples) == ([0], 64)
    assert section.model is None and section.output is None  # the trainer's to set
    # Every flamingo-eval setting is there, and reaches the run as configured.
    extra = ["eval.seeds=[1, 2]", "eval.zero_shot_text_demos=0", "eval.demo_separator=''", "eval.rices=true"]
    section = load_config(TINY_CPU, overrides=[*overrides, *extra]).eval
    run = section.run_config(output=tmp_path / "step.json")
    assert type(run) is EvalConfig and run.model is None and run.output == tmp_path / "step.json"
    assert (run.seeds, run.zero_shot_text_demos, run.demo_separator, run.rices) == ([1, 2], 0, "", True)
    assert run.data_dir == tmp_path and run.shots == [0]


def test_unreadable_eval_data_fails_before_the_model_loads(files, tmp_path, monkeypatch):
    def no_model(config):
        raise AssertionError("the model was loaded before the eval data was checked")

    monkeypatch.setattr(train_module, "load_model", no_model)
    (tmp_path / "empty").mkdir()
    config = tiny_config(files, tmp_path / "run", *eval_overrides(files, f"eval.data_dir={tmp_path / 'empty'}"))
    with pytest.raises(ValueError, match=r"eval\.data_dir"):
        train(config)
