"""Careless and hostile inputs to a training run (issue 25): each fails early, in one line naming what is wrong, or
the run recovers, and none trains on in the wrong direction or exports a model that did not train.

- Config numbers: NaN, infinities and values of the wrong sign are refused when the config loads (a fuzz too).
- Steps: a run whose every step is skipped (non-finite loss or gradient), or too many in a row, stops with an error.
- Checkpoints: ``--resume auto`` skips a truncated checkpoint for the one before it, bitwise as if resumed there; a
  named one that does not load fails naming the file.
- The output folder: a full disk (a real one: a small tmpfs in a private mount namespace), a folder that cannot be
  written, and a second run on the same folder each end with one line.

Names added by this work are imported inside the tests, so that each test fails on its own on the code before it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

import hypothesis
import pytest
import torch
from accelerate.state import AcceleratorState
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from train_loop_helpers import one_thread_and_fresh_accelerate_state  # noqa: F401  (autouse)
from train_loop_helpers import bitwise_equal, final_weights, read_metrics, subprocess_env, tiny_config

import flamingo_train.train as train_module
from flamingo_train import config as train_config
from flamingo_train.checkpoint import complete_checkpoints
from flamingo_train.config import load_config
from flamingo_train.example import write_example
from flamingo_train.train import train

FUZZ = settings(
    max_examples=int(os.environ.get("FLAMINGO_FUZZ_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """``python -m flamingo_train.example``'s files: model/ (self-contained), data/data.jsonl, config.yaml."""
    out = tmp_path_factory.mktemp("example")
    write_example(out, max_steps=6, save_every=2)
    return out


def cli_fails(argv: list[str], capsys, *, code: int, alone: bool = False) -> tuple[str, str]:
    """Run flamingo-train's CLI in this process; expect exit ``code`` and no traceback. Returns its last stderr line
    (a run that started drew its progress bar there first; ``alone``: nothing else may be there) and its stdout."""
    from flamingo_train import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == code, err[-3000:]
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[-1].startswith("flamingo-train: error: "), err[-3000:]
    assert len(lines) == 1 or not alone, lines
    return lines[-1], out


def never_load_the_model(monkeypatch):
    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def nan_loss_from_call(n: int):
    """A forward_losses whose loss is NaN from its ``n``-th call on (one call per step in the tiny runs)."""
    real, calls = train_module.forward_losses, []

    def forward_losses(model, batch):
        calls.append(1)
        loss, aux, stats = real(model, batch)
        return (loss * float("nan") if len(calls) >= n else loss), aux, stats

    return forward_losses


# ---------------------------------------------------------------------------------------------- config numbers
@pytest.fixture
def base_config(tmp_path):
    """tiny_cpu.yaml with an eval section (so that its numbers are fuzzed too), as base.yaml."""
    (tmp_path / "eval-data").mkdir()
    text = (Path(train_config.__file__).parent / "configs" / "tiny_cpu.yaml").read_text()
    text += f"eval:\n  tasks: [custom]\n  custom_kind: vqa\n  data_dir: {tmp_path / 'eval-data'}\n"
    path = tmp_path / "base.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("value", ["-1", ".nan"])
def test_a_negative_or_nan_max_grad_norm_is_one_line_and_exit_2_before_any_model_loads(example, value, capsys,
                                                                                      monkeypatch):
    never_load_the_model(monkeypatch)
    line, _ = cli_fails(["--config", str(example / "config.yaml"), f"run.max_grad_norm={value}"], capsys, code=2,
                        alone=True)
    assert "config.yaml: run.max_grad_norm: must be a finite number > 0 (null: no clipping)" in line


@pytest.mark.parametrize("override, field", [
    ("run.max_grad_norm=.inf", "run.max_grad_norm"), ("run.max_grad_norm=0", "run.max_grad_norm"),
    ("run.seed=-1", "run.seed"), ("run.seed=4294967296", "run.seed"),
    ("run.max_consecutive_skipped_steps=0", "run.max_consecutive_skipped_steps"),
    ("model.cross_attn_every_n_layers=0", "model.cross_attn_every_n_layers"),
    ("model.vision_feature_stage=0", "model.vision_feature_stage"),
    ("eval.seeds=[1, -2]", "eval.seeds[1]"), ("eval.query_set_size=0", "eval.query_set_size"),
    ("eval.zero_shot_text_demos=-1", "eval.zero_shot_text_demos"),
])
def test_a_number_out_of_its_field_range_is_refused_at_load_naming_the_field(base_config, override, field):
    with pytest.raises(ValueError, match=rf"base\.yaml: {re.escape(field)}: must be "):
        load_config(base_config, overrides=[override])


def numeric_fields() -> dict[str, typing.Any]:
    """Every field of the training sections whose type holds a number (int or float, maybe in a list or mapping),
    by dotted path, with its type."""
    sections = {"model": train_config.ModelConfig, "optim": train_config.OptimConfig,
                "schedule": train_config.ScheduleConfig, "run": train_config.RunConfig,
                "eval": train_config.InLoopEvalConfig}
    found = {}
    for section, cls in sections.items():
        for name, hint in typing.get_type_hints(cls).items():
            if name in {f.name for f in dataclasses.fields(cls)} and _holds_a_number(hint):
                found[f"{section}.{name}"] = hint
    return found


def _holds_a_number(hint) -> bool:
    if hint in (int, float):
        return True
    return any(_holds_a_number(arg) for arg in typing.get_args(hint) if arg is not str)


def test_every_numeric_field_of_the_training_sections_has_a_range():
    from flamingo_train.config import NUMBER_RANGES

    assert set(numeric_fields()) == set(NUMBER_RANGES)


NUMERIC = sorted(numeric_fields())
YAML_VALUES = [".nan", ".inf", "-.inf", "nan", "-inf", "-1", "0", "1", "2", "0.5", "-0.5", "1e400", "1e-400", "true",
               "false", "null", "abc", "''", "[]", "{}", "[0.9, .nan]", "[1, -2]", "[0.5, 0.5]", "[true]", "{a: 1}",
               "99999999999999999999999999", "-99999999999999999999999999"]
values = (st.sampled_from(YAML_VALUES) | st.integers(-10**30, 10**30).map(str)
          | st.floats(allow_nan=True, allow_infinity=True).map(repr))


def numbers_in(value):
    """Every number in a config value (a scalar, a list, a mapping)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for item in value for n in numbers_in(item)]
    if isinstance(value, dict):
        return [n for item in value.values() for n in numbers_in(item)]
    return []


@FUZZ
@given(field=st.sampled_from(NUMERIC), text=values, sub_key=st.booleans())
@hypothesis.example(field="run.max_grad_norm", text=".nan", sub_key=False)
@hypothesis.example(field="run.max_grad_norm", text="-1", sub_key=False)
@hypothesis.example(field="optim.aux_loss_weights", text=".inf", sub_key=True)
def test_fuzzed_numbers_give_a_clean_config_or_one_error_naming_the_field(base_config, field, text, sub_key):
    """Any value on any numeric field, set through a dotted override: the config loads holding only finite,
    non-negative numbers (no numeric setting of a run means anything negative), or the error is one ValueError line
    that names the file and the field, never another exception."""
    target = f"{field}.w" if sub_key and field == "optim.aux_loss_weights" else field
    try:
        config = load_config(base_config, overrides=[f"{target}={text}"])
    except ValueError as error:
        message = str(error)
        assert "\n" not in message and message.startswith(f"{base_config}: "), message
        assert field in message, message
        return
    section, name = field.split(".")
    for number in numbers_in(getattr(getattr(config, section), name)):
        assert math.isfinite(number) and number >= 0, (target, text, number)


# ---------------------------------------------------------------------------------------------- skipped steps
def test_a_run_whose_every_step_is_skipped_fails_with_exit_1_and_exports_nothing(example, tmp_path, capsys,
                                                                                 monkeypatch):
    monkeypatch.setattr(train_module, "forward_losses", nan_loss_from_call(1))
    out = tmp_path / "run"
    line, _ = cli_fails(["--config", str(example / "config.yaml"), f"run.output_dir={out}", "run.max_steps=3",
                      "run.save_every=0"], capsys, code=1)
    assert "all 3 steps were skipped (the loss was not finite (NaN or inf) at 3 steps)" in line
    assert "final was not written" in line
    assert not (out / "final").exists()
    from flamingo_train.checkpoint import hold_output_dir

    with hold_output_dir(out, main_process=True):  # the failed run let go of the folder
        pass


def test_a_run_that_skips_k_steps_in_a_row_stops_there_with_an_error(example, tmp_path, monkeypatch):
    from flamingo_train.train import TrainingStopped

    monkeypatch.setattr(train_module, "forward_losses", nan_loss_from_call(3))  # steps 1 and 2 train
    config = tiny_config(example, tmp_path / "run", "run.max_steps=50", "run.log_every=1", "run.save_every=0",
                         "run.max_consecutive_skipped_steps=4")
    with pytest.raises(TrainingStopped, match=r"stopped at step 6: the last 4 steps were all skipped .*"
                                              r"at or before step 2"):
        train(config)
    assert [m["skipped_steps"] for m in read_metrics(tmp_path / "run")] == [0, 0, 1, 2, 3, 4]
    assert not (tmp_path / "run" / "final").exists()


class NanGradient(torch.autograd.Function):
    """The identity, whose gradient is NaN: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("max_grad_norm", ["1.0", "null"])
def test_a_nan_gradient_of_a_finite_loss_skips_the_step_instead_of_filling_the_weights_with_nan(
    example, tmp_path, monkeypatch, max_grad_norm
):
    real, calls = train_module.forward_losses, []

    def nan_gradient_at_step_2(model, batch):
        calls.append(1)
        loss, aux, stats = real(model, batch)
        return (NanGradient.apply(loss) if len(calls) == 2 else loss), aux, stats

    monkeypatch.setattr(train_module, "forward_losses", nan_gradient_at_step_2)
    result = train(tiny_config(example, tmp_path / "run", "run.max_steps=3", "run.log_every=1", "run.save_every=1",
                               "run.keep_last=3", f"run.max_grad_norm={max_grad_norm}"))
    assert [m["skipped_steps"] for m in read_metrics(tmp_path / "run")] == [0, 1, 1]
    assert all(bool(v.isfinite().all()) for v in result.model.trainable_state_dict().values())
    weights = [load_file(str(p / "model.safetensors")) for p in complete_checkpoints(tmp_path / "run")]
    assert bitwise_equal(weights[0], weights[1]) and not bitwise_equal(weights[1], weights[2])


# ---------------------------------------------------------------------------------------------- checkpoints
class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted(example, tmp_path_factory):
    """``whole``: 6 steps, a checkpoint every 2. ``cut``: the same run, crashed after step 4's checkpoint."""
    root = tmp_path_factory.mktemp("interrupted")
    common = ["run.max_steps=6", "run.save_every=2", "run.log_every=1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the resumed runs (the autouse fixture): bitwise equality needs the same reductions
    try:
        train(tiny_config(example, root / "whole", *common))
        AcceleratorState._reset_state(reset_partial_state=True)
        checkpoint = train_module.checkpoint

        def checkpoint_then_crash(run):
            checkpoint(run)
            if run.step == 4:
                raise Crash

        with pytest.MonkeyPatch.context() as patch, pytest.raises(Crash):
            patch.setattr(train_module, "checkpoint", checkpoint_then_crash)
            train(tiny_config(example, root / "cut", *common))
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
    assert [p.name for p in complete_checkpoints(root / "cut")] == ["step-00000002", "step-00000004"]
    return root


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def cut_copy(interrupted, tmp_path) -> Path:
    out = tmp_path / "cut"
    shutil.copytree(interrupted / "cut", out)
    return out


BROKEN_FILES = ["state/optimizer.bin", "state/model.safetensors", "state/random_states_0.pkl", "trainer_state.json"]


@pytest.mark.parametrize("broken", BROKEN_FILES)
def test_auto_resume_skips_a_truncated_latest_checkpoint_for_the_one_before_bitwise(
    example, interrupted, tmp_path, capsys, broken
):
    """The weights load before the optimiser: a broken optimizer.bin leaves step 4's weights in the model, which
    the fallback to step 2 must replace, or the run would not end bitwise equal to the uninterrupted one."""
    out = cut_copy(interrupted, tmp_path)
    truncate(out / "checkpoints" / "step-00000004" / broken)
    capsys.readouterr()
    train(tiny_config(example, out, "run.max_steps=6", "run.save_every=2", "run.log_every=1", "run.resume=auto"))
    said = capsys.readouterr().out
    assert f"skipped checkpoint step-00000004: {out / 'checkpoints' / 'step-00000004' / broken}" in said
    assert f"resumed from {out / 'checkpoints' / 'step-00000002'} at step 2" in said
    assert bitwise_equal(final_weights(out), final_weights(interrupted / "whole"))
    assert [m["loss"] for m in read_metrics(out)] == [m["loss"] for m in read_metrics(interrupted / "whole")]


@pytest.mark.parametrize("broken, says", [("state/optimizer.bin", "is truncated or corrupt (PytorchStreamReader"),
                                          ("trainer_state.json", "is not valid JSON")])
def test_a_broken_checkpoint_named_in_resume_is_one_line_naming_the_file(example, interrupted, tmp_path, capsys,
                                                                         broken, says):
    out = cut_copy(interrupted, tmp_path)
    step_4 = out / "checkpoints" / "step-00000004"
    truncate(step_4 / broken)
    line, _ = cli_fails(["--config", str(example / "config.yaml"), f"run.output_dir={out}", "run.max_steps=6",
                      "--resume", str(step_4)], capsys, code=2)
    assert f"run.resume={step_4}: {step_4 / broken} {says}" in line


def test_auto_resume_when_no_checkpoint_loads_fails_naming_each(example, interrupted, tmp_path, capsys):
    out = cut_copy(interrupted, tmp_path)
    for step in ("step-00000002", "step-00000004"):
        truncate(out / "checkpoints" / step / "state" / "optimizer.bin")
    line, said = cli_fails(["--config", str(example / "config.yaml"), f"run.output_dir={out}", "run.max_steps=6",
                            "--resume", "auto"], capsys, code=2)
    assert "run.resume=auto: none of the 2 checkpoints" in line
    assert "skipped checkpoint step-00000004" in said and "skipped checkpoint step-00000002" in said


# ---------------------------------------------------------------------------------------------- the output folder
def mount_commands() -> list[list[str]]:
    """Ways to get a private mount namespace: as root, or as a user through a user namespace."""
    return [["unshare", "-m"], ["unshare", "-Urm"]] if os.geteuid() == 0 else [["unshare", "-Urm"]]


def run_on_a_small_tmpfs(out: Path, size: int, command: list[str], *, fill_after_start: bool) -> tuple[int, str, str]:
    """Run ``command`` with a tmpfs of ``size`` bytes mounted on ``out``, in a mount namespace of its own (nothing
    outside sees it, and it goes with the process). ``fill_after_start``: once the run has logged its first step,
    fill the tmpfs, so that a later write of the run meets the full disk. Returns the exit code, the output, and the
    tmpfs's files (``ls -Ra``) after the run."""
    fill = ('(while [ ! -s "$0/metrics.jsonl" ]; do sleep 0.05; done; cat /dev/zero > "$0/filler" 2>/dev/null) &\n'
            if fill_after_start else ":&\n")
    script = (f'mount -t tmpfs -o size={size} tmpfs "$0" || exit 99\n{fill}filler=$!\n'
              '"$@"; code=$?; kill $filler 2>/dev/null; echo "files:"; ls -Ra "$0"; exit $code')
    tries = []
    for unshare in mount_commands():
        result = subprocess.run([*unshare, "sh", "-c", script, str(out), *command], env=subprocess_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
        if result.returncode != 99 and "unshare failed" not in result.stdout:
            output, _, listing = result.stdout.rpartition("files:")
            return result.returncode, output, listing
        tries.append(f"{' '.join(unshare)}: {result.stdout[-300:]}")
    pytest.fail("this test needs a small tmpfs in a mount namespace of its own (as root, or through a user "
                "namespace): " + " | ".join(tries))


@pytest.mark.parametrize("writer", ["torch.save", "metrics.jsonl"])
def test_a_full_disk_says_no_space_left_naming_the_folder(example, tmp_path, writer):
    """A real full filesystem. ``torch.save``: a tmpfs that holds the first checkpoint's weights but not its optimiser
    state, so torch's writer (which says only "unexpected pos") meets the full disk, not safetensors or our own code.
    ``metrics.jsonl``: the tmpfs fills up while the run trains without checkpoints, so our own append fails."""
    out = tmp_path / "full"
    out.mkdir()
    command = [sys.executable, "-m", "flamingo_train", "--config", str(example / "config.yaml"),
               f"run.output_dir={out}", "run.log_every=1"]
    if writer == "torch.save":
        size = (example / "model" / "model.safetensors").stat().st_size + 128 * 1024  # optimizer.bin: twice that
        code, output, listing = run_on_a_small_tmpfs(out, size, [*command, "run.max_steps=2", "run.save_every=1"],
                                                     fill_after_start=False)
        failed = f"writing checkpoint step-00000001 into {out / 'checkpoints'} failed"
        assert "optimizer.bin" in listing and "model.safetensors" in listing  # torch.save was writing when it filled
    else:
        # A line is about 250 bytes: the next page metrics.jsonl needs, some 20 steps on, is refused.
        code, output, _ = run_on_a_small_tmpfs(out, 2**20, [*command, "run.max_steps=300", "run.save_every=0"],
                                               fill_after_start=True)
        failed = f"writing metrics.jsonl into {out} failed"
    assert code == 1, output[-3000:]
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1] == f"flamingo-train: error: [Errno 28] No space left on device: {failed}"


def test_an_output_dir_below_a_regular_file_fails_at_start_in_one_line(example, tmp_path, capsys, monkeypatch):
    never_load_the_model(monkeypatch)
    (tmp_path / "file").write_text("not a folder")
    out = tmp_path / "file" / "run"
    line, _ = cli_fails(["--config", str(example / "config.yaml"), f"run.output_dir={out}"], capsys, code=2)
    assert line == f"flamingo-train: error: run.output_dir: cannot write into {out} (Not a directory)."


def test_a_read_only_output_dir_fails_at_start_naming_it():
    """Permission bits do not stop root, so the check runs in a child process that is not root (user nobody)."""
    from flamingo_train.checkpoint import hold_output_dir

    out = Path(tempfile.mkdtemp(prefix="flamingo-read-only-"))  # pytest's tmp_path is closed to other users
    os.chmod(out, 0o555)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, try the folder, report the message
        try:
            os.close(read)
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            with hold_output_dir(out, main_process=True):
                message = "no error"
        except BaseException as error:  # noqa: BLE001 (everything is reported to the parent)
            message = f"{type(error).__name__}: {error}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        message = pipe.read()
    os.waitpid(pid, 0)
    out.rmdir()
    assert message == f"ValueError: run.output_dir: cannot write into {out} (Permission denied).", message


def test_a_second_run_on_the_same_output_dir_is_refused_at_start_naming_the_lock(example, tmp_path, capsys,
                                                                                monkeypatch):
    from flamingo_train.checkpoint import hold_output_dir

    out = tmp_path / "run"
    out.mkdir()
    # The first run: another process holding an exclusive flock on the lock file, as a running flamingo-train does.
    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
            "f.write('process 4242 on node-7'); f.flush(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        never_load_the_model(monkeypatch)
        line, _ = cli_fails(["--config", str(example / "config.yaml"), f"run.output_dir={out}"], capsys, code=2)
        assert line == (f"flamingo-train: error: run.output_dir: {out} is in use by process 4242 on node-7, which "
                        f"holds {out / '.lock'}; wait for it to end, or give this run another run.output_dir.")
    finally:
        holder.kill()
        holder.wait()
    with hold_output_dir(out, main_process=True):  # the lock went with the process that held it
        assert f"process {os.getpid()} on " in (out / ".lock").read_text()
