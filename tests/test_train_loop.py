"""The training recipe (flamingo_train): config, optimiser, schedule, the loop, checkpoints, resume, multi-process.

Slow parts run the real entry point on a tiny self-contained model and the synthetic shapes dataset written by
``flamingo_train.example``; multi-process and kill/resume runs are subprocesses, the rest run in this process.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from train_loop_helpers import one_thread_and_fresh_accelerate_state  # noqa: F401  (autouse)
from train_loop_helpers import (
    REPO,
    TINY_CPU,
    bitwise_equal,
    check,
    final_weights,
    frozen_parameters,
    read_metrics,
    run_training,
    tiny_config,
)

import flamingo
import flamingo_train.train as train_module
from flamingo_train.checkpoint import complete_checkpoints, keep_only_trainable_weights, load_checkpoint, resolve_resume
from flamingo_train.config import ScheduleConfig, OptimConfig, load_config
from flamingo_train.data.config import DataConfig
from flamingo_train.data.loader import build_dataloader
from flamingo_train.data.synthetic import write_synthetic_dataset
from flamingo_train.example import write_example
from flamingo_train.metrics_log import truncate_metrics
from flamingo_train.optim import build_scheduler, param_groups
from flamingo_train.train import train
from flamingo.testing import random_images
from models import build_tiny_model

CONFIGS = sorted((REPO / "training" / "configs").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((REPO / "training" / "configs" / "accelerate").glob("*.yaml"))


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """``python -m flamingo_train.example``'s files: model/ (self-contained), data/data.jsonl, config.yaml."""
    out = tmp_path_factory.mktemp("example")
    write_example(out, max_steps=6, save_every=2)
    return out


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_training_config_loads_and_validates(path):
    config = load_config(path)
    assert config.data and config.run.max_steps >= 1
    assert (config.model.pretrained is None) != (config.model.lang_model is None)


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.name for p in ACCELERATE_CONFIGS])
def test_every_shipped_accelerate_config_is_accepted_by_accelerate(path):
    cluster = load_config_from_file(str(path))
    assert cluster.num_machines == 1 and cluster.num_processes >= 1


def test_shipped_configs_cover_single_gpu_ddp_fsdp_and_deepspeed():
    kinds = {load_config_from_file(str(p)).distributed_type.value for p in ACCELERATE_CONFIGS}
    assert kinds == {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED"}


def test_an_unknown_field_is_an_error_naming_the_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TINY_CPU.read_text().replace("  log_every: 5", "  log_evry: 5"))
    with pytest.raises(ValueError, match=r"bad\.yaml: run\.log_evry: unknown field; did you mean log_every\?"):
        load_config(path)


def test_a_wrongly_typed_value_is_an_error_naming_the_field():
    with pytest.raises(ValueError, match=r"tiny_cpu\.yaml: run\.max_steps: expected int, got 'ten'"):
        load_config(TINY_CPU, overrides=["run.max_steps=ten"])


def test_an_unknown_perceiver_field_is_an_error_naming_it():
    path = REPO / "training" / "configs" / "finetune_custom_jsonl.yaml"
    with pytest.raises(ValueError, match=r"model\.perceiver\.latents: unknown field; did you mean num_latents\?"):
        load_config(path, overrides=["model.perceiver.latents=8"])


def test_overrides_address_data_entries_by_index_or_by_name():
    config = load_config(TINY_CPU, overrides=["data.0.batch_size=3", "data.shapes.loss_weight=0.5", "optim.lr=3e-4"])
    assert (config.data[0].batch_size, config.data[0].loss_weight, config.optim.lr) == (3, 0.5, 3e-4)
    with pytest.raises(ValueError, match="no data entry 'laion'"):
        load_config(TINY_CPU, overrides=["data.laion.batch_size=3"])



def test_an_override_that_is_not_yaml_such_as_a_leading_glob_is_taken_as_a_string():
    config = load_config(TINY_CPU, overrides=["data.0.path=*.jsonl", "run.output_dir=@runs"])
    assert (config.data[0].path, config.run.output_dir) == ("*.jsonl", "@runs")

def test_cli_flags_resume_and_strict_become_run_settings(monkeypatch, tmp_path):
    seen = {}

    def fake_train(config):
        seen["config"] = config
        return train_module.TrainResult(final_dir=Path("final"), model=None)

    monkeypatch.setattr(train_module, "train", fake_train)
    from flamingo_train import cli

    data = tmp_path / "data.jsonl"
    data.touch()  # the CLI checks that the data exists before it trains
    cli.main(["--config", str(TINY_CPU), f"data.0.path={data}", "run.max_steps=7", "--resume", "auto", "--strict"])
    run = seen["config"].run
    assert (run.max_steps, run.resume, run.strict) == (7, "auto", True)


def _cli_error(argv, capsys) -> str:
    """Run flamingo-train's CLI, expect exit code 2, return its one stderr line."""
    from flamingo_train import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("flamingo-train: error: "), lines
    return lines[0]


def test_the_cli_rejects_a_bad_data_path_before_loading_any_backbone(tmp_path, capsys, monkeypatch):
    # The backbones do not exist: had the CLI loaded the model first, the error would be about them (with real
    # backbones, a multi-GB download), not about the data path.
    config = tmp_path / "typo.yaml"
    config.write_text(
        "model:\n  vision_model: ViT-L-14\n  vision_pretrained: openai\n  lang_model: no-such-org/no-such-lm\n"
        f"data:\n  - name: docs\n    path: {tmp_path / 'dat' / '*.jsonl'}\n"
    )
    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    line = _cli_error(["--config", str(config)], capsys)
    assert "typo.yaml: data[0].path:" in line and "matches no file" in line and "dat/*.jsonl" in line


def test_train_checks_data_paths_and_kinds_before_loading_the_model(example, tmp_path, monkeypatch):
    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    notes = tmp_path / "notes.txt"
    notes.write_text("{}\n")
    config = load_config(TINY_CPU, overrides=[f"model.pretrained={example / 'model'}", f"data.0.path={notes}"])
    with pytest.raises(ValueError, match=r"data\[0\]\.path: .*cannot read .*notes\.txt"):
        train(config)


@pytest.mark.parametrize("override, field", [
    ("optim.lr=-1e-3", "optim.lr"), ("optim.lr=.nan", "optim.lr"), ("optim.betas=[0.9, 1.5]", "optim.betas"),
    ("optim.eps=0", "optim.eps"), ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("run.log_evry=5", "log_evry"), ("run.max_steps=ten", "run.max_steps"),
])
def test_a_config_error_is_one_line_naming_the_file_and_field_and_exit_code_2(tmp_path, capsys, override, field):
    data = tmp_path / "data.jsonl"
    data.touch()
    line = _cli_error(["--config", str(TINY_CPU), f"data.0.path={data}", override], capsys)
    assert "tiny_cpu.yaml" in line and field in line


# ---------------------------------------------------------------------------------------------- optimiser
def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor_per_optimizer_step():
    schedule = ScheduleConfig(kind="cosine", warmup_steps=4, min_lr_ratio=0.1)
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=2.0)
    scheduler = build_scheduler(optimizer, schedule, max_steps=20)
    seen = []
    for _ in range(20):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = [2.0 * (s + 1) / 4 for s in range(4)]
    decay = [2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16))) for s in range(4, 20)]
    assert seen == pytest.approx(warmup + decay)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * 0.1)  # after the last step: the floor


@pytest.mark.parametrize("kind", ["linear", "constant"])
def test_linear_and_constant_schedules_end_where_they_should(kind):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, ScheduleConfig(kind=kind, warmup_steps=0, min_lr_ratio=0.25), max_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1.0 - 0.75 * s / 8 for s in range(8)] if kind == "linear" else [1.0] * 8
    assert lrs == pytest.approx(expected)


def test_weight_decay_groups_partition_exactly_the_trainable_parameters(tiny_vision, tiny_llama_dir):
    model, _ = build_tiny_model(tiny_vision, tiny_llama_dir)
    decay, no_decay = param_groups(model, OptimConfig())
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | undecayed == trainable and not decayed & undecayed
    assert not any(n.startswith(("lang_model.", "vision_encoder.")) for n in trainable)
    assert {"perceiver.latents", "added_tokens.input"} <= undecayed
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert any("gate" in n for n in undecayed) and not any("gate" in n or "norm" in n for n in decayed)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (OptimConfig().weight_decay, 0.0)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_vision, tiny_llama_dir):
    model, processor = build_tiny_model(tiny_vision, tiny_llama_dir)
    model.train()
    images = random_images(2, seed=1)
    batch = processor([images[0], "a red circle.", images[1], "a blue square."])
    batch["labels"] = batch["input_ids"].clone()

    def grads():
        model.zero_grad()
        train_module.label_token_loss_sum(model, batch).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.lang_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert model.lang_model.is_activation_checkpointing
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


# ---------------------------------------------------------------------------------------------- the loop
def test_finetuning_the_tiny_example_cuts_the_loss_by_80_percent_and_leaves_the_backbones_untouched(
    example, tmp_path
):
    config = tiny_config(example, tmp_path / "run", "run.max_steps=100", "run.log_every=1", "run.save_every=25")
    result = train(config)

    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 100
    assert sum(losses[-5:]) / 5 <= 0.2 * losses[0], (losses[0], losses[-5:])

    before = flamingo.Flamingo.from_pretrained(example / "model")
    for part in ("lang_model", "vision_encoder"):  # their own parameters; the added-token rows are not among them
        trained, original = frozen_parameters(getattr(result.model, part)), frozen_parameters(getattr(before, part))
        assert bitwise_equal(trained, original), f"{part} changed during training"
    assert not bitwise_equal(result.model.trainable_state_dict(), before.trainable_state_dict())

    # The export refers to the input model's backbones and reloads to the trained weights.
    exported = flamingo.Flamingo.from_pretrained(result.final_dir)
    assert bitwise_equal(exported.trainable_state_dict(), result.model.trainable_state_dict())
    assert exported.config.lang_model == str((example / "model" / "language_model").resolve())
    assert flamingo.FlamingoProcessor.from_pretrained(result.final_dir).media_token_id == before.config.media_token_id

    # Checkpoints: the last two, holding the trainable weights only.
    kept = complete_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["step-00000075", "step-00000100"]
    from safetensors.torch import load_file

    assert set(load_file(str(kept[-1] / "model.safetensors"))) == set(result.model.trainable_state_dict())


def test_gradient_accumulation_matches_one_bigger_batch(example, tmp_path):
    steps = ["run.max_steps=3", "run.log_every=1", "run.save_every=0"]
    one = train(tiny_config(example, tmp_path / "one", *steps, "data.0.batch_size=8"))
    AcceleratorState._reset_state(reset_partial_state=True)
    accumulated = train(
        tiny_config(example, tmp_path / "acc", *steps, "data.0.batch_size=4", "run.grad_accum_steps=2")
    )
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "acc")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["tokens_per_s"] > 0 and a["images_per_s"] > 0
    for name, value in one.model.trainable_state_dict().items():
        torch.testing.assert_close(accumulated.model.trainable_state_dict()[name], value, rtol=1e-4, atol=1e-6)


def test_one_mixture_step_is_adamw_on_the_weighted_sum_of_per_dataset_token_means(example, tmp_path):
    pairs = write_synthetic_dataset(tmp_path / "pairs", format="pairs", num_records=16, seed=1)
    config = tiny_config(example, tmp_path / "run", "run.max_steps=1", "run.save_every=0", "run.max_grad_norm=null",
                         "schedule.warmup_steps=0")
    config.data.append(DataConfig(name="pairs", path=str(pairs), format="pairs", batch_size=4, loss_weight=0.3,
                                  max_tokens=32, max_images=1, num_workers=0))
    result = train(config)

    # Reference: HF's own mean label loss per dataset, weighted, summed, one plain AdamW step.
    model = flamingo.Flamingo.from_pretrained(example / "model").train()
    processor = flamingo.FlamingoProcessor.from_pretrained(example / "model")
    loss = 0
    for data in config.data:
        batch = next(iter(build_dataloader(data, processor, rank=0, world_size=1, seed=config.run.seed)))
        batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
        loss = loss + data.loss_weight * model(**batch).loss
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    torch.optim.AdamW(trainable, lr=config.optim.lr, weight_decay=0.0, betas=config.optim.betas).step()

    metrics = read_metrics(tmp_path / "run")[0]
    assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert metrics["loss"] == pytest.approx(metrics["loss/shapes"] + 0.3 * metrics["loss/pairs"], rel=1e-6)
    for name, value in model.trainable_state_dict().items():
        torch.testing.assert_close(result.model.trainable_state_dict()[name], value, rtol=1e-4, atol=1e-6)


def test_a_nonfinite_loss_skips_the_update_and_is_counted(example, tmp_path, monkeypatch):
    real, calls = train_module.forward_losses, []

    def nan_on_third_call(model, batch):
        calls.append(1)
        loss, aux, stats = real(model, batch)
        return (loss * float("nan") if len(calls) == 3 else loss), aux, stats

    monkeypatch.setattr(train_module, "forward_losses", nan_on_third_call)
    train(tiny_config(example, tmp_path / "run", "run.max_steps=4", "run.log_every=1", "run.save_every=1",
                      "run.keep_last=4"))
    metrics = read_metrics(tmp_path / "run")
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 1, 1]
    assert [math.isfinite(m["loss"]) for m in metrics] == [True, True, False, True]
    from safetensors.torch import load_file

    weights = [load_file(str(p / "model.safetensors")) for p in complete_checkpoints(tmp_path / "run")]
    assert bitwise_equal(weights[1], weights[2])  # step 3 changed nothing
    assert not bitwise_equal(weights[2], weights[3])  # step 4 trained again



def test_a_nonfinite_micro_batch_keeps_the_whole_step_out_of_the_logged_loss(example, tmp_path, monkeypatch):
    accumulate = ["run.grad_accum_steps=2", "data.0.batch_size=4", "run.save_every=0"]
    train(tiny_config(example, tmp_path / "one", *accumulate, "run.max_steps=1", "run.log_every=1"))
    AcceleratorState._reset_state(reset_partial_state=True)
    real, calls = train_module.forward_losses, []

    def nan_on_fourth_call(model, batch):  # step 2's second micro-batch; its first one was finite
        calls.append(1)
        loss, aux, stats = real(model, batch)
        return (loss * float("nan") if len(calls) == 4 else loss), aux, stats

    monkeypatch.setattr(train_module, "forward_losses", nan_on_fourth_call)
    train(tiny_config(example, tmp_path / "two", *accumulate, "run.max_steps=2", "run.log_every=2"))
    (logged,) = read_metrics(tmp_path / "two")
    assert logged["skipped_steps"] == 1
    assert logged["loss"] == pytest.approx(read_metrics(tmp_path / "one")[0]["loss"], rel=1e-6)  # step 1 alone

def test_bad_records_are_counted_in_the_metrics_the_progress_bar_and_the_log_and_strict_mode_raises(
    tiny_vision, tmp_path, example, monkeypatch, caplog
):
    data = write_synthetic_dataset(tmp_path / "data", format="simple", num_records=16, seed=0)
    first_image = json.loads(data.read_text().splitlines()[0])["images"][0]
    (data.parent / first_image).unlink()
    overrides = [f"data.0.path={data}", "run.max_steps=2", "run.log_every=1", "run.save_every=0"]
    postfixes = []

    class RecordingBar(train_module.tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            postfixes.append(dict(ordered_dict or {}, **kwargs))
            super().set_postfix(ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(train_module, "tqdm", RecordingBar)
    with caplog.at_level("WARNING", logger=train_module.__name__):
        train(tiny_config(example, tmp_path / "run", *overrides))
    skipped = {k: v for k, v in read_metrics(tmp_path / "run")[-1].items() if k.startswith("skipped/shapes/")}
    assert sum(skipped.values()) == 1, skipped
    assert postfixes[-1]["skipped"] == 1  # the README's "skip counts in the progress log"
    announced = [r.getMessage() for r in caplog.records if "bad record" in r.getMessage()]
    assert len(announced) == 1 and "shapes/missing_image" in announced[0], announced  # once, not every log line

    AcceleratorState._reset_state(reset_partial_state=True)
    with pytest.raises(ValueError, match="data.jsonl"):
        train(tiny_config(example, tmp_path / "strict", *overrides, "run.strict=true"))



def test_a_dataset_added_to_the_mixture_starts_from_its_beginning_on_resume(example, tmp_path):
    steps = ["run.save_every=2", "run.log_every=1"]
    train(tiny_config(example, tmp_path / "run", "run.max_steps=2", *steps))
    AcceleratorState._reset_state(reset_partial_state=True)
    pairs = write_synthetic_dataset(tmp_path / "pairs", format="pairs", num_records=8, seed=1)
    config = tiny_config(example, tmp_path / "run", "run.max_steps=3", "run.resume=auto", *steps)
    config.data.append(DataConfig(name="pairs", path=str(pairs), format="pairs", batch_size=2, max_tokens=32,
                                  max_images=1, num_workers=0))
    train(config)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3] and math.isfinite(metrics[-1]["loss/pairs"])


def test_a_partial_last_metrics_line_left_by_a_killed_job_does_not_stop_the_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    truncate_metrics(path, after_step=2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


class StubAccelerator:
    """What checkpoint.py asks of an Accelerator, under a given distributed type."""

    def __init__(self, distributed_type):
        self.distributed_type, self.num_processes, self.process_index = distributed_type, 1, 0
        self.hooks, self.load_kwargs = [], None

    def register_save_state_pre_hook(self, hook):
        self.hooks.append(hook)

    def unwrap_model(self, model):
        return model

    def load_state(self, path, **kwargs):
        self.load_kwargs = kwargs


class StubFlamingo:
    def trainable_modules(self):
        return {"perceiver": None}


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_the_trainable_weights_filter_leaves_fsdp_and_deepspeed_checkpoints_alone(kind):
    accelerator = StubAccelerator(DistributedType[kind])
    keep_only_trainable_weights(accelerator)
    weights = []  # FSDP and DeepSpeed save their models themselves and hand the hook no weights
    accelerator.hooks[0]([StubFlamingo()], weights, "checkpoint-dir")
    assert weights == []


def test_the_trainable_weights_filter_keeps_only_the_trainable_modules():
    accelerator = StubAccelerator(DistributedType.MULTI_GPU)
    keep_only_trainable_weights(accelerator)
    weights = [{"module.perceiver.latents": 1, "module.lang_model.embed.weight": 2}]
    accelerator.hooks[0]([StubFlamingo()], weights, "checkpoint-dir")
    assert weights == [{"module.perceiver.latents": 1}]


@pytest.mark.parametrize("kind,kwargs", [("DEEPSPEED", {}), ("MULTI_GPU", {"strict": False}), ("NO", {"strict": False})])
def test_resume_passes_strict_false_except_to_deepspeed_whose_loader_has_no_such_argument(tmp_path, kind, kwargs):
    rank = {"positions": {"shapes": {}}, "skipped": {}}
    (tmp_path / "trainer_state.json").write_text(
        json.dumps({"step": 4, "skipped_steps": 0, "world_size": 1, "ranks": [rank]}))
    torch.save({"step": 0}, tmp_path / "random_states_0.pkl")  # load_checkpoint checks that it loads
    accelerator = StubAccelerator(DistributedType[kind])
    state, mine = load_checkpoint(accelerator, tmp_path)
    assert (state["step"], mine, accelerator.load_kwargs) == (4, rank, kwargs)

# ---------------------------------------------------------------------------------------------- processes
def train_here(config, *overrides):
    """The run ``run_training(config, *overrides)`` makes in a subprocess, made in this process (one thread, as there)."""
    try:
        return train(load_config(config, overrides=list(overrides)))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_two_processes_match_one_process_with_the_same_global_batch(example, tmp_path):
    common = ["run.max_steps=5", "run.log_every=1", "run.save_every=0"]
    config = example / "config.yaml"
    train_here(config, f"run.output_dir={tmp_path / 'one'}", "data.0.batch_size=8", *common)
    check(run_training(config, f"run.output_dir={tmp_path / 'two'}", "data.0.batch_size=4", *common, processes=2))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in two] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in two] == pytest.approx([m["loss"] for m in one], rel=1e-5)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


def test_a_killed_run_resumed_with_auto_ends_with_bitwise_the_same_weights(example, tmp_path, capsys):
    """Killed hard (``os._exit`` in a subprocess) after step 5, with a half-written checkpoint left behind; the
    uninterrupted run and the resumed one run in this process, on one thread like the subprocess."""
    config = example / "config.yaml"
    common = ["run.max_steps=6", "run.save_every=2", "run.log_every=1"]
    train_here(config, f"run.output_dir={tmp_path / 'whole'}", *common)

    killed = run_training(config, f"run.output_dir={tmp_path / 'cut'}", *common, kill_after_step=5)
    assert killed.returncode == 17, killed.stdout[-2000:]
    assert [p.name for p in complete_checkpoints(tmp_path / "cut")] == ["step-00000002", "step-00000004"]
    partial = tmp_path / "cut" / "checkpoints" / ".tmp-step-00000006"  # as if killed while saving
    partial.mkdir()
    capsys.readouterr()
    train_here(config, f"run.output_dir={tmp_path / 'cut'}", *common, "run.resume=auto")
    resumed = capsys.readouterr().out
    assert "resumed from" in resumed and "step-00000004" in resumed

    assert bitwise_equal(final_weights(tmp_path / "cut"), final_weights(tmp_path / "whole"))
    whole, cut = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut")
    assert [m["step"] for m in cut] == [1, 2, 3, 4, 5, 6]  # step 5 logged once although it ran twice
    assert [m["loss"] for m in cut] == [m["loss"] for m in whole]
    assert not partial.exists()


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside_so_auto_resume_follows_the_new_branch(
    example, tmp_path
):
    out = tmp_path / "run"
    train(tiny_config(example, out, "run.max_steps=4", "run.save_every=1", "run.keep_last=3", "run.log_every=1"))
    AcceleratorState._reset_state(reset_partial_state=True)
    branch = out / "checkpoints" / "step-00000002"
    train(tiny_config(example, out, "run.max_steps=3", "run.save_every=1", "run.keep_last=3", "run.log_every=1",
                      f"run.resume={branch}"))
    # The old steps 3 and 4 continued the abandoned run: they are set aside, not pruned in place of the new ones.
    assert [p.name for p in complete_checkpoints(out)] == ["step-00000002", "step-00000003"]
    assert resolve_resume("auto", out) == out / "checkpoints" / "step-00000003"
    assert (out / "checkpoints" / ".abandoned-step-00000004").is_dir()
    steps = [m["step"] for m in read_metrics(out)]
    assert steps == [1, 2, 3]  # the metrics log follows the new branch


def test_a_bfloat16_language_model_trains_float32_flamingo_modules_and_stays_frozen(example, tmp_path):
    config = tiny_config(example, tmp_path / "run", "model.lang_model_dtype=bfloat16", "run.mixed_precision=bf16",
                         "run.max_steps=30", "run.log_every=5", "run.save_every=0")
    result = train(config)
    model = result.model
    assert {p.dtype for p in model.lang_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    before = flamingo.Flamingo.from_pretrained(example / "model", dtype=torch.bfloat16)
    assert bitwise_equal(frozen_parameters(before.lang_model), frozen_parameters(model.lang_model))
    losses = [m["loss"] for m in read_metrics(tmp_path / "run")]
    assert losses[-1] < 0.5 * losses[0]
