"""The training recipe: a Flamingo model, a weighted mixture of datasets, AdamW, and accelerate. Reads top to bottom:
``train()`` is the loop, and each of its steps is a function below it, in the order it runs.

Run (tiny CPU example; ``python -m flamingo_train.example`` writes the model, data and config first)::

    flamingo-train --config runs/example/config.yaml
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        -m flamingo_train --config runs/example/config.yaml data.0.batch_size=4     # 2 CPU processes (gloo)

(On a machine without GPUs ``--multi_gpu`` still starts the processes (torchrun) and the loop asks accelerate for a
CPU run; ``accelerate launch --cpu --num_processes 2`` starts only one process unless MPI is installed.)

Real runs: ``accelerate launch --config_file training/configs/accelerate/multi_gpu.yaml -m flamingo_train
--config training/configs/pretrain_mixture.yaml``.

The objective is Flamingo's weighted sum of per-dataset losses: every optimiser step takes ``grad_accum_steps``
batches from EVERY dataset. A dataset's loss is the sum of next-token cross-entropy over its label tokens divided by
the number of label tokens in that dataset's whole step across all processes (all-reduced), times the world size,
so that DDP's gradient mean is exactly the global token mean: a 2-process run equals a 1-process run with the same
global batch, and grad accumulation equals a bigger batch.

A model may also report auxiliary losses (``FlamingoOutput.aux_losses``, e.g. a mixture-of-experts balance loss):
each joins the objective as its mean over the step's forwards (one per dataset per micro-batch; a forward that does
not report it adds 0) times its weight in ``optim.aux_loss_weights`` (0: logged, not trained on). No world-size
factor: DDP's gradient mean over processes already makes it the mean over all of them. A reported loss without a
weight is an error at the first step. A non-finite loss of either kind, or a non-finite gradient norm, skips the
step on every process. A run that skips ``run.max_consecutive_skipped_steps`` steps in a row has diverged: it stops
with an error (:class:`TrainingStopped`), as does a run none of whose steps trained; neither exports a model.

The main process holds ``output_dir/.lock`` for the whole run, so a second run on the same folder stops at once
(checkpoint.py). ``--resume auto`` skips a checkpoint that does not load (naming the file) for the one before it.

Writes into ``run.output_dir``: ``metrics.jsonl`` (one line per logged step, see metrics_log.py; ``aux/<name>`` and
``stats/<name>`` when the model reports them), ``checkpoints/step-N/`` every ``save_every`` steps (see checkpoint.py;
``--resume auto`` continues from the latest), and at the end ``final/`` (trainable weights + processor) and
``metrics.png`` (plot.py). ``final/`` refers to the same backbones as the input model: a self-contained ``pretrained``
dir's backbones by absolute path into that dir; ``run.export_backbones: true`` copies them instead. ``final/``,
``best/`` and every checkpoint are model directories: ``flamingo-eval run --model DIR`` takes each of them.

With an ``eval`` section (in_loop_eval.py), flamingo-eval's tasks score the model before the first step (a fresh run
with ``eval.every > 0``), every ``eval.every`` steps and after the last: one more ``metrics.jsonl`` line per
evaluation, ``{"step": 200, "eval/custom_vqa/0shot": 71.3, "eval/seconds": 9.1}``, the same values to the trackers
and the progress bar, results in ``eval/step-N.json``, and with ``eval.keep_best`` the best model so far in ``best/``
(its ``best.json`` gives step, metric and score).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm

import flamingo
from flamingo.configuration import torch_dtype
from flamingo.io import atomic_write_text, naming_a_full_disk
from flamingo_train.checkpoint import (
    hold_output_dir,
    keep_only_trainable_weights,
    load_latest_checkpoint,
    save_checkpoint,
    set_aside_later_checkpoints,
)
from flamingo_train.config import ModelConfig, TrainConfig, check_data_paths, validate
from flamingo_train.data.loader import PositionTracker, build_dataloader
from flamingo_train.export import replace_model_dir
from flamingo_train.in_loop_eval import InLoopEval, check_eval_data, check_supported
from flamingo_train.metrics_log import (
    METRICS,
    StepStats,
    Window,
    accumulate,
    log_metrics,
    plot_run,
    sum_counters,
    truncate_metrics,
)
from flamingo_train.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

FINAL = "final"
NONFINITE_LOSS = "the loss was not finite (NaN or inf)"
NONFINITE_GRADIENT = "the gradient norm was not finite (NaN or inf)"


class TrainingStopped(RuntimeError):
    """The run stopped before its last step because it was not training: every step, or too many in a row, skipped.
    ``flamingo-train`` prints the message as one line and exits with code 1."""


@dataclass
class Run:
    """What the loop carries from step to step: built by :func:`set_up`, advanced by the step functions."""

    config: TrainConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared by accelerate (DDP/FSDP/DeepSpeed wrap it); unwrap_model gives the Flamingo
    processor: flamingo.FlamingoProcessor
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler  # also wrapped by accelerate, as is the optimiser
    in_loop_eval: InLoopEval | None
    weights: torch.Tensor  # (datasets,) each dataset's loss_weight
    positions: dict[str, PositionTracker]  # per dataset: where this process's data continues after a resume
    skipped: dict[str, Counter]  # per dataset: bad records this process skipped, by reason
    step: int = 0  # optimiser steps done, skipped ones included
    skipped_steps: int = 0  # steps whose update was skipped (a non-finite loss or gradient norm)
    skipped_in_a_row: int = 0  # the latest steps, all skipped (since this process started)
    skip_reasons: Counter = field(default_factory=Counter)  # why this process's steps were skipped, with counts
    iterators: dict[str, Iterator[dict]] = field(default_factory=dict)  # per dataset: its endless batches
    window: Window | None = None  # the sums since the last metrics line
    bar: tqdm | None = None
    postfix: dict = field(default_factory=dict)  # the latest loss and eval scores, shown together on the bar
    reported_skipped: int = 0  # bad records already announced in the log (a resumed run re-announces its total once)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.config.data]

    @property
    def output_dir(self) -> Path:
        return Path(self.config.run.output_dir)


@dataclass
class TrainResult:
    final_dir: Path  # the exported model + processor (``output_dir/final``)
    model: flamingo.Flamingo  # the trained model, unwrapped, in memory


def train(config: TrainConfig) -> TrainResult:
    """Train, checkpoint, and export to ``output_dir/final``."""
    accelerator = make_accelerator(config)
    with hold_output_dir(config.run.output_dir, main_process=accelerator.is_main_process):  # one run per folder
        run = set_up(config, accelerator)
        resume(run)
        start(run)
        with run.bar:  # closed however the loop ends, so that an error's message starts a line of its own
            if run.in_loop_eval is not None and run.step == 0 and config.eval.every > 0:
                evaluate(run)  # the starting point of the eval curve: the model before any step
            while run.step < config.run.max_steps:
                micro_batches = draw_batch(run)
                step_stats = optimizer_step(run, micro_batches)
                log_step(run, step_stats, micro_batches)
                stop_if_not_training(run)
                # Before the checkpoint, so that a checkpoint at this step includes this evaluation's best score.
                if run.in_loop_eval is not None and run.in_loop_eval.due(run.step, config.run.max_steps):
                    evaluate(run)
                checkpoint(run)
        return export(run)


# ---------------------------------------------------------------------------------------------- set-up
def make_accelerator(config: TrainConfig) -> Accelerator:
    """The config checked (again: one built in Python skipped load_config's checks, and a typo must fail before the
    model downloads and loads), then the accelerator."""
    validate(config)
    check_data_paths(config)
    settings = config.run
    accelerator = Accelerator(
        # Without a GPU (or other accelerator), accelerate sets up multi-process gloo only when told it is a CPU run.
        cpu=not torch.accelerator.is_available(),
        mixed_precision=settings.mixed_precision,
        log_with=None if settings.report_to in (None, "none", "") else settings.report_to,
        project_dir=str(Path(settings.output_dir)),
        # We step the scheduler once per optimiser step ourselves (accelerate would step it once per process).
        step_scheduler_with_optimizer=False,
    )
    if settings.export_backbones and accelerator.distributed_type == DistributedType.FSDP:
        # The sharded backbones cannot be written by one process; they are unchanged, so refer to them instead.
        raise ValueError("run.export_backbones is not supported with FSDP; the export refers to the input backbones.")
    if accelerator.distributed_type == DistributedType.DEEPSPEED and settings.grad_accum_steps > 1:
        # DeepSpeed steps inside accelerator.backward; our per-step token normalisation needs one backward per step.
        raise ValueError("run.grad_accum_steps > 1 is not supported with DeepSpeed; raise data batch_size instead.")
    return accelerator


def set_up(config: TrainConfig, accelerator: Accelerator) -> Run:
    """The seed, the in-loop eval, the model, AdamW and its schedule, prepared by accelerate."""
    settings = config.run
    set_seed(settings.seed)  # identical fresh Flamingo weights on every process
    in_loop_eval = None
    if config.eval is not None:  # its data is read before the model loads: a bad file fails in seconds
        check_supported(accelerator)
        check_eval_data(config.eval)
        in_loop_eval = InLoopEval(config.eval, output_dir=Path(settings.output_dir),
                                  save_backbones=settings.export_backbones)

    model, processor = load_model(config.model)
    if settings.gradient_checkpointing:
        # Recomputes the LM's decoder layers in backward (the cross-attention blocks sit outside the checkpointed
        # call). Non-reentrant: correct gradients although the frozen embeddings' outputs need no grad.
        model.lang_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.schedule, max_steps=settings.max_steps)
    logger.info("trainable parameters: %d of %d", model.num_parameters(trainable_only=True), model.num_parameters())
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    keep_only_trainable_weights(accelerator)
    names = [d.name for d in config.data]
    return Run(
        config=config, accelerator=accelerator, model=model, processor=processor, optimizer=optimizer,
        scheduler=scheduler, in_loop_eval=in_loop_eval,
        weights=torch.tensor([d.loss_weight for d in config.data], device=accelerator.device),
        positions={name: PositionTracker() for name in names}, skipped={name: Counter() for name in names},
    )


def load_model(config: ModelConfig) -> tuple[flamingo.Flamingo, flamingo.FlamingoProcessor]:
    """A saved model (``pretrained``: a directory, or ``micro``, the shipped one) or a fresh one from backbones; the
    backbones stay frozen (see optim.py)."""
    dtype = torch_dtype(config.lang_model_dtype)
    if config.pretrained is not None:
        # A self-contained dir's backbones are then named by absolute path (flamingo.backbones), so the export in
        # output_dir/final refers to the same backbones instead of copying them (see run.export_backbones).
        trust = config.trust_remote_code  # the config's setting, never the saved model's
        model = flamingo.Flamingo.from_pretrained(config.pretrained, dtype=dtype, trust_remote_code=trust)
        return model, flamingo.FlamingoProcessor.from_pretrained(config.pretrained, trust_remote_code=trust)
    return flamingo.create_model_and_processor(
        vision_model=config.vision_model,
        vision_pretrained=config.vision_pretrained,
        lang_model=config.lang_model,
        tokenizer=config.tokenizer,
        vision_feature_stage=config.vision_feature_stage,
        cross_attn_every_n_layers=config.cross_attn_every_n_layers,
        perceiver=flamingo.PerceiverConfig(**config.perceiver),
        cross_attention=flamingo.CrossAttentionConfig(**config.cross_attention),
        trust_remote_code=config.trust_remote_code,
        dtype=dtype,
    )


def resume(run: Run) -> None:
    """From ``run.resume`` (``auto``: the latest complete checkpoint, if any): weights, optimiser, scheduler, RNG,
    then counters and data positions. metrics.jsonl then forgets the steps after it, and the checkpoints after it
    (they continue the run from before this resume) are set aside."""
    accelerator, output_dir = run.accelerator, run.output_dir
    loaded = load_latest_checkpoint(accelerator, run.config.run.resume, output_dir, say=accelerator.print)
    resume_from = None
    if loaded is not None:
        resume_from, state, mine = loaded
        run.step, run.skipped_steps = state["step"], state["skipped_steps"]
        if run.in_loop_eval is not None:
            run.in_loop_eval.load_state_dict(state.get("eval", {}))
        for name in run.names:
            if name not in mine["positions"]:  # a dataset added to the mixture since the checkpoint
                accelerator.print(f"data {name!r} is not in {resume_from}; it starts from its beginning")
                continue
            run.positions[name].load_state_dict(mine["positions"][name])
            run.skipped[name].update(mine["skipped"].get(name, {}))
        accelerator.print(f"resumed from {resume_from} at step {run.step}")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(output_dir / METRICS, after_step=run.step)
        if resume_from is not None:
            for path in set_aside_later_checkpoints(output_dir, run.step):
                accelerator.print(f"set aside {path.name}: it continues the run from before this resume")


def start(run: Run) -> None:
    """Each dataset's loader from its position (a fresh tracker's: the beginning), the trackers, the metrics window
    and the progress bar."""
    accelerator, settings = run.accelerator, run.config.run
    loaders = {
        d.name: build_dataloader(
            d, run.processor, rank=accelerator.process_index, world_size=accelerator.num_processes,
            seed=settings.seed, strict=settings.strict, start=run.positions[d.name].state_dict(),
        )
        for d in run.config.data
    }
    run.iterators = {name: iter(loader) for name, loader in loaders.items()}
    if accelerator.is_main_process:
        accelerator.init_trackers("flamingo", config={"max_steps": settings.max_steps, "lr": run.config.optim.lr})
    run.window = Window(run.names, accelerator.device)
    run.bar = tqdm(total=settings.max_steps, initial=run.step, disable=not accelerator.is_local_main_process,
                   desc="train")


# ---------------------------------------------------------------------------------------------- one step
def draw_batch(run: Run) -> list[list[dict]]:
    """Every micro-batch of this step from every dataset, on the device: ``micro_batches[k][i]`` is micro-batch k of
    dataset i. All of them first, so that the label-token counts are known before the first backward."""
    micro_batches = []
    for _ in range(run.config.run.grad_accum_steps):
        batches = []
        for name in run.names:
            batch = next(run.iterators[name])
            run.positions[name].update(batch["position"])
            run.skipped[name].update(batch["skipped"])
            batches.append({k: v.to(run.accelerator.device) for k, v in batch.items() if torch.is_tensor(v)})
        micro_batches.append(batches)
    return micro_batches


def optimizer_step(run: Run, micro_batches: list[list[dict]]) -> StepStats:
    """Forward and backward every micro-batch, then one AdamW step; a non-finite loss on any process, or a non-finite
    gradient norm, skips the update on every process. The LR schedule advances either way, so the LR stays a function
    of the step number."""
    accelerator, model, world = run.accelerator, run.model, run.accelerator.num_processes
    no_sync_allowed = accelerator.distributed_type != DistributedType.DEEPSPEED  # ZeRO>=2 forbids no_sync
    counts = torch.tensor(
        [sum(int((b[i]["labels"][:, 1:] != -100).sum()) for b in micro_batches) for i in range(len(run.names))],
        device=accelerator.device,
        dtype=torch.float32,
    )
    global_counts = accelerator.reduce(counts, reduction="sum").clamp(min=1)
    forwards = len(micro_batches) * len(run.names)

    nonfinite_step = False
    loss_sums = torch.zeros(len(run.names), device=accelerator.device)
    aux_sums, stat_sums = {}, {}  # name -> summed over this step's forwards
    for k, batches in enumerate(micro_batches):
        last = k == len(micro_batches) - 1
        with accelerator.no_sync(model) if not last and no_sync_allowed else nullcontext():
            sums, aux = [], {}
            for batch in batches:
                loss_sum, aux_losses, stats = forward_losses(model, batch)
                sums.append(loss_sum)
                accumulate(aux, aux_losses)
                accumulate(stat_sums, stats)
            sums = torch.stack(sums)  # (datasets,)
            loss = (run.weights * sums / global_counts).sum() * world
            if aux:  # a dense model reports none: its objective is the LM loss alone, bit for bit
                loss = loss + aux_objective(aux, run.config.optim.aux_loss_weights, forwards=forwards)
                accumulate(aux_sums, {name: value.detach() for name, value in aux.items()})
            # Decide together: one rank skipping backward alone would hang DDP's all-reduce.
            flag = torch.tensor(float(not torch.isfinite(loss)), device=accelerator.device)
            bad = accelerator.reduce(flag, reduction="sum")
            if bad > 0:
                nonfinite_step = True
                continue
            accelerator.backward(loss)
            loss_sums += sums.detach()
    grad_norm, skip_reason = None, NONFINITE_LOSS if nonfinite_step else None
    if skip_reason is None:
        # Measured even without clipping (max norm inf: every gradient times exactly 1): a finite loss can still have
        # a NaN gradient, and one AdamW step on it fills the weights with NaN. The norm of the whole model's gradient,
        # the same on every process. Not ours to skip under fp16, whose grad scaler skips such steps itself (and
        # must see them to lower its scale), nor under DeepSpeed, which stepped inside backward.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), run.config.run.max_grad_norm or math.inf)
        ours = accelerator.scaler is None and accelerator.distributed_type != DistributedType.DEEPSPEED
        if ours and grad_norm is not None and not torch.isfinite(grad_norm):
            skip_reason, grad_norm = NONFINITE_GRADIENT, None
    if skip_reason is None:
        run.optimizer.step()
        run.skipped_in_a_row = 0
    else:
        run.skipped_steps += 1
        run.skipped_in_a_row += 1
        run.skip_reasons[skip_reason] += 1
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]  # the LR this step used
    run.scheduler.step()
    run.step += 1
    return StepStats(
        loss_sums=loss_sums, counts=counts, trained=skip_reason is None, grad_norm=grad_norm, lr=lr,
        aux={name: total / forwards for name, total in aux_sums.items()},
        stats={name: total / forwards for name, total in stat_sums.items()},
    )


def forward_losses(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict, dict]:
    """One forward of one batch: the sum (not mean) of next-token cross-entropy over its label tokens (labels !=
    -100), and the auxiliary losses and statistics the model reports (name -> scalar; empty for a dense model)."""
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask")}
    out = model(**inputs)
    logits = out.logits[:, :-1].float()  # (b, l-1, vocab): token t predicts label t+1, as in HF's shifted loss
    labels = batch["labels"][:, 1:]
    loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss_sum, out.aux_losses or {}, out.stats or {}


def label_token_loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the label tokens (labels != -100) of one batch."""
    return forward_losses(model, batch)[0]


def aux_objective(aux_sums: dict[str, torch.Tensor], weights: dict[str, float], *, forwards: int) -> torch.Tensor:
    """One micro-batch's share of the auxiliary losses' term: each loss summed over the micro-batch's forwards, over
    the step's ``forwards``, times its weight; over the step's micro-batches, each loss's mean over its forwards."""
    unweighted = [name for name in aux_sums if name not in weights]
    if unweighted:
        raise ValueError(
            f"The model reports the auxiliary loss {', '.join(map(repr, unweighted))} but optim.aux_loss_weights has "
            f"no weight for it; set one, e.g. optim.aux_loss_weights.{unweighted[0]}=0.01 (0 logs it without "
            "training on it)."
        )
    return sum(weights[name] * total / forwards for name, total in aux_sums.items())


# ---------------------------------------------------------------------------------------------- after a step
def log_step(run: Run, step_stats: StepStats, micro_batches: list[list[dict]]) -> None:
    """Add the step to the metrics window; every ``log_every`` steps and after the last, write its line (to
    metrics.jsonl and the trackers), announce newly skipped bad records, and update the progress bar."""
    accelerator, settings = run.accelerator, run.config.run
    run.window.add(step_stats, micro_batches, run.processor.media_token_id)
    if run.step % settings.log_every == 0 or run.step == settings.max_steps:
        metrics = run.window.flush(accelerator, run.weights)
        metrics.update(step=run.step, lr=step_stats.lr, skipped_steps=run.skipped_steps)
        if step_stats.grad_norm is not None:
            metrics["grad_norm"] = float(step_stats.grad_norm)
        per_rank = gather_object([{n: dict(run.skipped[n]) for n in run.names}])
        for name, counter in zip(run.names, sum_counters(per_rank, run.names)):
            for reason, count in counter.items():
                metrics[f"skipped/{name}/{reason}"] = count
        log_metrics(accelerator, run.output_dir, metrics)
        skipped_so_far = {k.removeprefix("skipped/"): v for k, v in metrics.items() if k.startswith("skipped/")}
        total_skipped = sum(skipped_so_far.values())
        if total_skipped > run.reported_skipped and accelerator.is_main_process:
            # Bad records are skipped, not fatal; say so where the run is watched, not only in metrics.jsonl.
            logger.warning("step %d: %d bad record(s) skipped so far: %s", run.step, total_skipped, skipped_so_far)
        run.reported_skipped = total_skipped
        run.postfix.update(
            loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
            tok_s=f"{metrics['tokens_per_s']:.0f}", img_s=f"{metrics['images_per_s']:.1f}",
        )
        run.postfix.update({k: f"{v:.4f}" for k, v in metrics.items() if k.startswith("aux/")})
        if total_skipped:
            run.postfix["skipped"] = total_skipped
        run.bar.set_postfix(run.postfix)
    run.bar.update(1)


def stop_if_not_training(run: Run) -> None:
    """Stop the run with :class:`TrainingStopped` when ``run.max_consecutive_skipped_steps`` steps in a row were
    skipped (it has diverged, and every further step would be skipped too), or at the last step when no step of the
    run trained: a model that never changed must not be exported as a trained one. Every process decides the same:
    the skips were decided together."""
    settings = run.config.run
    reasons = "; ".join(f"{reason} at {n} step{'s' if n > 1 else ''}" for reason, n in run.skip_reasons.items())
    if run.step == settings.max_steps and run.skipped_steps == run.step:
        raise TrainingStopped(
            f"all {run.step} steps were skipped ({reasons}), so the model did not train and {run.output_dir / FINAL} "
            "was not written. Check the data and the settings that scale the update (optim.lr, run.max_grad_norm, "
            "run.mixed_precision)."
        )
    if run.skipped_in_a_row >= settings.max_consecutive_skipped_steps:
        last_trained = run.step - run.skipped_in_a_row
        raise TrainingStopped(
            f"stopped at step {run.step}: the last {run.skipped_in_a_row} steps were all skipped "
            f"(run.max_consecutive_skipped_steps={settings.max_consecutive_skipped_steps}; since this start, "
            f"{reasons}). The run has diverged, so it was not exported: resume from a checkpoint at or before step "
            f"{last_trained} with a lower optim.lr, or check the data."
        )


def evaluate(run: Run) -> None:
    """Score the model on the in-loop eval tasks: a metrics line, and the scores on the progress bar."""
    scores = run.in_loop_eval.run(run.accelerator, run.model, run.processor, step=run.step)
    log_metrics(run.accelerator, run.output_dir, {"step": run.step, **scores})
    run.postfix.update({k: f"{v:.2f}" for k, v in scores.items() if k in run.in_loop_eval.keys})
    run.bar.set_postfix(run.postfix)


def checkpoint(run: Run) -> None:
    """Every ``save_every`` steps and after the last: ``checkpoints/step-N`` (see checkpoint.py), with the shared
    counters and each process's data positions and skip counts. Collective: every process calls it."""
    settings = run.config.run
    if not settings.save_every or (run.step % settings.save_every != 0 and run.step != settings.max_steps):
        return
    save_checkpoint(
        run.accelerator,
        model=run.model,
        processor=run.processor,
        output_dir=run.output_dir,
        step=run.step,
        state={"skipped_steps": run.skipped_steps, "eval": run.in_loop_eval.state_dict() if run.in_loop_eval else {}},
        rank_state={
            "positions": {n: t.state_dict() for n, t in run.positions.items()},
            "skipped": {n: dict(c) for n, c in run.skipped.items()},
        },
        keep_last=settings.keep_last,
    )


def export(run: Run) -> TrainResult:
    """``final/``: the trainable weights with references to the backbones (or copies), and the processor; then
    ``train_config.json`` and ``metrics.png``."""
    accelerator, output_dir = run.accelerator, run.output_dir
    final = output_dir / FINAL
    replace_model_dir(accelerator, run.model, run.processor, final, save_backbones=run.config.run.export_backbones)
    if accelerator.is_main_process:
        with naming_a_full_disk(output_dir, "train_config.json"):
            atomic_write_text(output_dir / "train_config.json", json.dumps(run.config.to_dict(), indent=2) + "\n")
        plot_run(output_dir)
    accelerator.end_training()
    return TrainResult(final_dir=final, model=accelerator.unwrap_model(run.model))
