"""The training recipe: a Flamingo model, a weighted mixture of datasets, AdamW, and accelerate. Reads top to bottom.

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

Writes into ``run.output_dir``: ``metrics.jsonl`` (one line per logged step), ``checkpoints/step-N/`` every
``save_every`` steps (see checkpoint.py; ``--resume auto`` continues from the latest), and at the end ``final/``
(trainable weights + processor) and ``metrics.png`` (plot.py). ``final/`` refers to the same backbones as the input
model: a self-contained ``pretrained`` dir's backbones by absolute path into that dir; ``run.export_backbones: true``
copies them instead. ``final/``, ``best/`` and every checkpoint are model directories: ``flamingo-eval run --model
DIR`` takes each of them.

With an ``eval`` section (in_loop_eval.py), flamingo-eval's tasks score the model before the first step (a fresh run
with ``eval.every > 0``), every ``eval.every`` steps and after the last: one more ``metrics.jsonl`` line per evaluation, ``{"step": 200, "eval/custom_vqa/0shot": 71.3,
"eval/seconds": 9.1}``, the same values to the trackers and the progress bar, results in ``eval/step-N.json``, and with
``eval.keep_best`` the best model so far in ``best/`` (its ``best.json`` gives step, metric and score).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from tqdm.auto import tqdm

import flamingo
from flamingo.io import atomic_write_text
from flamingo_train.checkpoint import (
    keep_only_trainable_weights,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    set_aside_later_checkpoints,
)
from flamingo.configuration import torch_dtype
from flamingo.micro.shipped import resolve_model_path
from flamingo_train.config import ModelConfig, TrainConfig, check_data_paths, validate
from flamingo_train.data.loader import PositionTracker, build_dataloader
from flamingo_train.export import replace_model_dir
from flamingo_train.in_loop_eval import InLoopEval, check_eval_data, check_supported
from flamingo_train.optim import build_optimizer, build_scheduler
from flamingo_train.plot import plot_metrics

logger = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
PLOT = "metrics.png"
FINAL = "final"


def load_model(config: ModelConfig) -> tuple[flamingo.Flamingo, flamingo.FlamingoProcessor]:
    """A saved model (``pretrained``: a directory, or ``micro``, the shipped one) or a fresh one from backbones; the
    backbones stay frozen (see optim.py)."""
    dtype = torch_dtype(config.lang_model_dtype)
    if config.pretrained is not None:
        directory = resolve_model_path(config.pretrained)
        model = flamingo.Flamingo.from_pretrained(directory, dtype=dtype)
        # A self-contained dir names its backbones relative to itself; point at them absolutely, so the export in
        # output_dir/final refers to the same backbones instead of copying them (see run.export_backbones).
        for attr in ("lang_model", "vision_pretrained"):
            value = getattr(model.config, attr)
            if value is not None and (directory / value).exists():
                setattr(model.config, attr, str((directory / value).resolve()))
        return model, flamingo.FlamingoProcessor.from_pretrained(directory)
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


def label_token_loss_sum(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over the label tokens (labels != -100) of one batch."""
    inputs = {k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask")}
    out = model(**inputs)
    logits = out.logits[:, :-1].float()  # (b, l-1, vocab): token t predicts label t+1, as in HF's shifted loss
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def trackers(report_to: str | None) -> str | list[str] | None:
    return None if report_to in (None, "none", "") else report_to


@dataclass
class TrainResult:
    final_dir: Path  # the exported model + processor (``output_dir/final``)
    model: flamingo.Flamingo  # the trained model, unwrapped, in memory


def train(config: TrainConfig) -> TrainResult:
    """Train, checkpoint, and export to ``output_dir/final``."""
    # A config built in Python skipped load_config's checks; a typo must fail before the model downloads and loads.
    validate(config)
    check_data_paths(config)
    run = config.run
    output_dir = Path(run.output_dir)
    accelerator = Accelerator(
        # Without a GPU (or other accelerator), accelerate sets up multi-process gloo only when told it is a CPU run.
        cpu=not torch.accelerator.is_available(),
        mixed_precision=run.mixed_precision,
        log_with=trackers(run.report_to),
        project_dir=str(output_dir),
        # We step the scheduler once per optimiser step ourselves (accelerate would step it once per process).
        step_scheduler_with_optimizer=False,
    )
    set_seed(run.seed)  # identical fresh Flamingo weights on every process
    world, names = accelerator.num_processes, [d.name for d in config.data]
    in_loop_eval = None
    if config.eval is not None:  # its data is read before the model loads: a bad file fails in seconds
        check_supported(accelerator)
        check_eval_data(config.eval)
        in_loop_eval = InLoopEval(config.eval, output_dir=output_dir, save_backbones=run.export_backbones)

    # ---- model and optimiser
    model, processor = load_model(config.model)
    if run.gradient_checkpointing:
        # Recomputes the LM's decoder layers in backward (the cross-attention blocks sit outside the checkpointed
        # call). Non-reentrant: correct gradients although the frozen embeddings' outputs need no grad.
        model.lang_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.schedule, max_steps=run.max_steps)
    logger.info("trainable parameters: %d of %d", model.num_parameters(trainable_only=True), model.num_parameters())
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    keep_only_trainable_weights(accelerator)

    # ---- resume: weights, optimiser, scheduler, RNG, then counters and data positions
    step, skipped_steps, skipped = 0, 0, {name: Counter() for name in names}
    trackers_by_name = {name: PositionTracker() for name in names}
    resume_from = resolve_resume(run.resume, output_dir)
    if resume_from is not None:
        state, mine = load_checkpoint(accelerator, resume_from)
        step, skipped_steps = state["step"], state["skipped_steps"]
        if in_loop_eval is not None:
            in_loop_eval.load_state_dict(state.get("eval", {}))
        for name in names:
            if name not in mine["positions"]:  # a dataset added to the mixture since the checkpoint
                accelerator.print(f"data {name!r} is not in {resume_from}; it starts from its beginning")
                continue
            trackers_by_name[name].load_state_dict(mine["positions"][name])
            skipped[name].update(mine["skipped"].get(name, {}))
        accelerator.print(f"resumed from {resume_from} at step {step}")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(output_dir / METRICS, after_step=step)
        if resume_from is not None:
            for path in set_aside_later_checkpoints(output_dir, step):
                accelerator.print(f"set aside {path.name}: it continues the run from before this resume")
    loaders = {
        d.name: build_dataloader(
            d,
            processor,
            rank=accelerator.process_index,
            world_size=world,
            seed=run.seed,
            strict=run.strict,
            start=trackers_by_name[d.name].state_dict(),  # a fresh tracker's state starts from the beginning
        )
        for d in config.data
    }
    iterators = {name: iter(loader) for name, loader in loaders.items()}
    if accelerator.is_main_process:
        accelerator.init_trackers("flamingo", config={"max_steps": run.max_steps, "lr": config.optim.lr})

    # ---- the loop: one iteration = one optimiser step
    weights = torch.tensor([d.loss_weight for d in config.data], device=accelerator.device)
    window = _Window(len(names), accelerator.device)
    bar = tqdm(total=run.max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    postfix = {}  # the latest loss and eval scores, shown together
    reported_skipped = 0  # bad records already announced in the log (a resumed run re-announces its total once)
    no_sync_allowed = accelerator.distributed_type != DistributedType.DEEPSPEED  # ZeRO>=2 forbids no_sync
    if run.export_backbones and accelerator.distributed_type == DistributedType.FSDP:
        # The sharded backbones cannot be written by one process; they are unchanged, so refer to them instead.
        raise ValueError("run.export_backbones is not supported with FSDP; the export refers to the input backbones.")
    if not no_sync_allowed and run.grad_accum_steps > 1:
        # DeepSpeed steps inside accelerator.backward; our per-step token normalisation needs one backward per step.
        raise ValueError("run.grad_accum_steps > 1 is not supported with DeepSpeed; raise data batch_size instead.")

    def evaluate(at_step: int) -> None:
        scores = in_loop_eval.run(accelerator, model, processor, step=at_step)
        log_metrics(accelerator, output_dir, {"step": at_step, **scores})
        postfix.update({k: f"{v:.2f}" for k, v in scores.items() if k in in_loop_eval.keys})
        bar.set_postfix(postfix)

    if in_loop_eval is not None and step == 0 and config.eval.every > 0:
        evaluate(0)  # the starting point of the eval curve: the model before any step
    while step < run.max_steps:
        # Every micro-batch of this step, from every dataset, so the label-token counts are known before backward.
        micro_batches = []
        for _ in range(run.grad_accum_steps):
            batches = []
            for name in names:
                batch = next(iterators[name])
                trackers_by_name[name].update(batch["position"])
                skipped[name].update(batch["skipped"])
                batches.append({k: v.to(accelerator.device) for k, v in batch.items() if torch.is_tensor(v)})
            micro_batches.append(batches)
        counts = torch.tensor(
            [sum(int((b[i]["labels"][:, 1:] != -100).sum()) for b in micro_batches) for i in range(len(names))],
            device=accelerator.device,
            dtype=torch.float32,
        )
        global_counts = accelerator.reduce(counts, reduction="sum").clamp(min=1)

        nonfinite_step = False
        loss_sums = torch.zeros(len(names), device=accelerator.device)
        for k, batches in enumerate(micro_batches):
            last = k == len(micro_batches) - 1
            with accelerator.no_sync(model) if not last and no_sync_allowed else nullcontext():
                sums = torch.stack([label_token_loss_sum(model, batch) for batch in batches])  # (datasets,)
                loss = (weights * sums / global_counts).sum() * world
                # Decide together: one rank skipping backward alone would hang DDP's all-reduce.
                flag = torch.tensor(float(not torch.isfinite(loss)), device=accelerator.device)
                bad = accelerator.reduce(flag, reduction="sum")
                if bad > 0:
                    nonfinite_step = True
                    continue
                accelerator.backward(loss)
                loss_sums += sums.detach()
        if nonfinite_step:
            skipped_steps += 1
            grad_norm = None
        else:
            grad_norm = (
                accelerator.clip_grad_norm_(model.parameters(), run.max_grad_norm) if run.max_grad_norm else None
            )
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]  # the LR this step used
        # A skipped step still counts, so the LR stays a function of the step number.
        scheduler.step()
        step += 1
        # A skipped step's losses stay out of the logged mean, also those of its finite micro-batches (its tokens
        # still count for throughput).
        window.add(loss_sums * (not nonfinite_step), counts * (not nonfinite_step), micro_batches,
                   processor.media_token_id)

        if step % run.log_every == 0 or step == run.max_steps:
            metrics = window.flush(accelerator, names, weights)
            metrics.update(step=step, lr=lr, skipped_steps=skipped_steps)
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            per_rank = gather_object([{n: dict(skipped[n]) for n in names}])
            for name, counter in zip(names, _sum_counters(per_rank, names)):
                for reason, count in counter.items():
                    metrics[f"skipped/{name}/{reason}"] = count
            log_metrics(accelerator, output_dir, metrics)
            skipped_so_far = {k.removeprefix("skipped/"): v for k, v in metrics.items() if k.startswith("skipped/")}
            total_skipped = sum(skipped_so_far.values())
            if total_skipped > reported_skipped and accelerator.is_main_process:
                # Bad records are skipped, not fatal; say so where the run is watched, not only in metrics.jsonl.
                logger.warning("step %d: %d bad record(s) skipped so far: %s", step, total_skipped, skipped_so_far)
            reported_skipped = total_skipped
            postfix.update(
                loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                tok_s=f"{metrics['tokens_per_s']:.0f}", img_s=f"{metrics['images_per_s']:.1f}",
            )
            if total_skipped:
                postfix["skipped"] = total_skipped
            bar.set_postfix(postfix)
        bar.update(1)

        # Before the checkpoint, so that a checkpoint at this step includes this evaluation's best score.
        if in_loop_eval is not None and in_loop_eval.due(step, run.max_steps):
            evaluate(step)

        if run.save_every and (step % run.save_every == 0 or step == run.max_steps):
            save_checkpoint(
                accelerator,
                model=model,
                processor=processor,
                output_dir=output_dir,
                step=step,
                state={"skipped_steps": skipped_steps, "eval": in_loop_eval.state_dict() if in_loop_eval else {}},
                rank_state={
                    "positions": {n: t.state_dict() for n, t in trackers_by_name.items()},
                    "skipped": {n: dict(c) for n, c in skipped.items()},
                },
                keep_last=run.keep_last,
            )
        if run.kill_after_step is not None and step >= run.kill_after_step:
            os._exit(17)  # simulate a killed job: no cleanup, no export
    bar.close()

    # ---- export: trainable weights + references to the backbones (or copies), and the processor
    final = output_dir / FINAL
    replace_model_dir(accelerator, model, processor, final, save_backbones=run.export_backbones)
    if accelerator.is_main_process:
        atomic_write_text(output_dir / "train_config.json", json.dumps(config.to_dict(), indent=2) + "\n")
        plot_run(output_dir)
    accelerator.end_training()
    return TrainResult(final_dir=final, model=accelerator.unwrap_model(model))


def log_metrics(accelerator: Accelerator, output_dir: Path, metrics: dict) -> None:
    """One line of metrics.jsonl, and the same values to the trackers (main process only)."""
    if accelerator.is_main_process:
        accelerator.log(metrics, step=metrics["step"])
        with open(output_dir / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")


def plot_run(output_dir: Path) -> None:
    """``output_dir/metrics.png``; a run that trained must not fail over its picture, so a problem is a warning."""
    try:
        plot_metrics(output_dir / METRICS, output_dir / PLOT)
    except ValueError as error:  # matplotlib missing, or nothing logged (a resume at max_steps)
        logger.warning("no %s: %s", PLOT, error)


class _Window:
    """Per-process sums since the last log line; reduced across processes only when logging."""

    def __init__(self, n: int, device: torch.device):
        self.loss_sums, self.counts = torch.zeros(n, device=device), torch.zeros(n, device=device)
        self.tokens = self.images = 0
        self.start = time.perf_counter()

    def add(self, loss_sums, counts, micro_batches, media_token_id) -> None:
        self.loss_sums += loss_sums
        self.counts += counts
        for batches in micro_batches:
            for batch in batches:
                self.tokens += int(batch["attention_mask"].sum())
                self.images += int((batch["input_ids"] == media_token_id).sum())

    def flush(self, accelerator: Accelerator, names: list[str], weights: torch.Tensor) -> dict:
        throughput = torch.tensor([self.tokens, self.images], device=self.counts.device, dtype=torch.float32)
        totals = torch.cat([self.loss_sums, self.counts, throughput])
        totals = accelerator.reduce(totals, reduction="sum")
        n = len(names)
        sums, counts = totals[:n], totals[n : 2 * n]
        per_dataset = torch.where(counts > 0, sums / counts.clamp(min=1), torch.nan)  # exact global token means
        elapsed = time.perf_counter() - self.start
        # NaN when no step of the window was trained (all skipped as non-finite).
        metrics = {"loss": float((weights * per_dataset)[counts > 0].sum()) if (counts > 0).any() else float("nan")}
        metrics.update({f"loss/{name}": float(v) for name, v in zip(names, per_dataset)})
        metrics["tokens_per_s"] = float(totals[2 * n]) / elapsed
        metrics["images_per_s"] = float(totals[2 * n + 1]) / elapsed
        self.__init__(n, self.counts.device)
        return metrics


def _sum_counters(per_rank: list[dict], names: list[str]) -> list[Counter]:
    out = [Counter() for _ in names]
    for rank_counts in per_rank:
        for i, name in enumerate(names):
            out[i].update(rank_counts.get(name, {}))
    return out


def _truncate_metrics(path: Path, *, after_step: int) -> None:
    """On resume, drop lines logged after the checkpoint (they will be logged again), so each step appears once."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if _logged_step(line) <= after_step]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _logged_step(line: str) -> float:
    """The step of a metrics line; a blank or partial line (the job was killed while writing it) is dropped."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
