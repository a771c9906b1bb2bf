"""In-loop evaluation: flamingo-eval's few-shot tasks, run on the model being trained, every ``eval.every`` steps.

Configured by the ``eval`` section (:class:`flamingo_train.config.InLoopEvalConfig`: flamingo-eval's
:class:`flamingo_eval.config.EvalConfig` plus when to evaluate and what to keep)::

    eval: {every: 200, tasks: [custom], custom_kind: vqa, data_dir: data/my-vqa, shots: [0], num_samples: 64,
           keep_best: true}

Each evaluation is ``flamingo_eval.runner.Evaluator`` on the unwrapped model in memory (eval mode, no grad; the
train/eval mode of every module is restored afterwards), so its scores are those ``flamingo-eval run`` gives for the
same settings on an exported model. Every process takes part: the Evaluator splits the query batches across processes
and gathers them on the main process (a main-process-only run would hang in its collectives). It writes
``output_dir/eval/step-N.json`` (flamingo-eval's results file) and returns ``{"eval/custom_vqa/0shot": 71.3, ...}``
(keys: :func:`flamingo_train.config.eval_metric_key`). With ``keep_best``, ``output_dir/best/`` holds the model at the
best score of ``best_metric`` so far (higher is better, as for every flamingo-eval metric), with ``best.json``:
``{"step": 400, "metric": "eval/custom_vqa/0shot", "score": 71.3}``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list

from flamingo_train.checkpoint import checkpoint_name
from flamingo_train.config import InLoopEvalConfig, eval_metric_key, eval_metric_keys
from flamingo_train.export import replace_model_dir

EVAL_DIR = "eval"
BEST = "best"
BEST_INFO = "best.json"


def check_eval_data(config: InLoopEvalConfig) -> None:
    """Read every task's files once, before the model loads, so a bad file fails now rather than at the first eval."""
    from flamingo_eval.data import load_task_data

    for task in config.tasks:
        try:
            load_task_data(task, data_dir=Path(config.data_dir), paths=config.paths.get(task),
                           custom_kind=config.custom_kind, allow_outside_paths=config.allow_outside_paths)
        except ValueError as error:
            raise ValueError(f"eval.data_dir {config.data_dir}: task {task!r}: {error}") from error


def check_supported(accelerator: Accelerator) -> None:
    """The Evaluator runs the unwrapped module, which must hold whole weights on every process."""
    sharded = accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3
    )
    if sharded:
        raise ValueError(
            "eval: in-loop evaluation needs the whole model on every process, which FSDP and DeepSpeed ZeRO-3 shard; "
            "remove the eval section and evaluate the checkpoints with `flamingo-eval run --model CHECKPOINT`."
        )


class InLoopEval:
    """When to evaluate, how, and the best score so far (saved in checkpoints, so a resumed run keeps it)."""

    def __init__(self, config: InLoopEvalConfig, *, output_dir: str | Path, save_backbones: bool):
        self.config = config
        self.output_dir = Path(output_dir)
        self.save_backbones = save_backbones
        self.keys = eval_metric_keys(config)
        self.best_metric = config.best_metric or self.keys[0]
        self.best: dict | None = None  # {"step", "metric", "score"}

    def due(self, step: int, max_steps: int) -> bool:
        every = self.config.every
        return step == max_steps or (every > 0 and step % every == 0)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")

    def run(self, accelerator: Accelerator, model, processor, *, step: int) -> dict[str, float]:
        """Collective. Evaluate ``model`` (as prepared by accelerate), export ``best/`` if it improved, and return
        the scores (on every process) plus ``eval/seconds``."""
        start = time.perf_counter()
        scores = self._evaluate(accelerator, accelerator.unwrap_model(model), processor, step=step)
        score = scores.get(self.best_metric)
        if self.config.keep_best and score is not None and (self.best is None or score > self.best["score"]):
            self.best = {"step": step, "metric": self.best_metric, "score": score}
            replace_model_dir(
                accelerator, model, processor, self.output_dir / BEST,
                save_backbones=self.save_backbones, json_files={BEST_INFO: self.best},
            )
        return {**scores, "eval/seconds": time.perf_counter() - start}

    def _evaluate(self, accelerator: Accelerator, model, processor, *, step: int) -> dict[str, float]:
        from flamingo_eval.runner import Evaluator

        cfg = self.config
        output = self.output_dir / EVAL_DIR / f"{checkpoint_name(step)}.json"
        # flamingo-eval resumes from <output>.progress/, whose settings hash cannot tell in-memory weights apart: a
        # rerun of this step after a resume must compute afresh.
        progress = Path(f"{output}.progress")
        if accelerator.is_main_process and progress.exists():
            shutil.rmtree(progress)
        accelerator.wait_for_everyone()
        eval_config = cfg.run_config(output=output)  # the model: in memory
        modes = {module: module.training for module in model.modules()}
        try:
            with torch.no_grad():
                results = Evaluator(eval_config, model=model, processor=processor).run()  # sets eval mode
        finally:
            for module, training in modes.items():
                module.train(training)
        scores = {}
        if results is not None:  # the main process
            for row in results["summary"]:
                scores[eval_metric_key(row["task"], row["shots"], custom_kind=cfg.custom_kind)] = row["mean"]
            shutil.rmtree(progress, ignore_errors=True)
        (scores,) = broadcast_object_list([scores])  # every process decides the same about best/
        return scores
