"""Training checkpoints: ``accelerator.save_state`` (trainable weights, optimiser, scheduler, RNG of every process)
plus ``trainer_state.json`` (step counters and every rank's data positions), written atomically. Each checkpoint is
also a model directory (``save_pretrained`` + processor, see export.py), so ``flamingo-eval run --model
output_dir/checkpoints/step-00000100`` evaluates it as it is.

Layout::

    output_dir/checkpoints/step-00000100/   complete (has trainer_state.json, renamed into place last)
        config.json, model.safetensors, tokenizer/processor files   the model, as Flamingo.from_pretrained reads it
        state/                                                      accelerate's save_state, for resuming
        trainer_state.json
    output_dir/checkpoints/.tmp-step-00000200/   being written, or left by a killed run: ignored and cleared
    output_dir/checkpoints/.abandoned-step-00000300/   after a resume from an earlier step: kept, never resumed from

accelerate's own weights file cannot double as the model's: under DDP its keys carry the wrapper's ``module.``
prefix, and its file names are fixed, hence the ``state/`` folder. Checkpoints written before it existed (the
accelerate files at the top level) still resume.

Only the trainable weights go into a checkpoint (a save-state hook filters the model's state dict); the frozen
backbones come from the model definition on resume, so a checkpoint of a 7B-LM Flamingo stays small. (FSDP and
DeepSpeed save the whole model in their own formats; the hook cannot filter those.)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object

from flamingo.io import atomic_write_text
from flamingo_train.export import save_model_dir

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
ACCELERATE_STATE = "state"
_COMPLETE = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def keep_only_trainable_weights(accelerator: Accelerator) -> None:
    """Make ``save_state`` store only the parameters/buffers of ``model.trainable_modules()``."""

    def hook(models, weights, output_dir):
        # FSDP and DeepSpeed write the models in their own formats and pass no weights here (whole models, then).
        for i in range(len(weights)):
            prefixes = tuple(f"{p}." for p in accelerator.unwrap_model(models[i]).trainable_modules())
            weights[i] = {
                key: value
                for key, value in weights[i].items()
                if key.removeprefix("module.").removeprefix("_orig_mod.").startswith(prefixes)
            }

    accelerator.register_save_state_pre_hook(hook)


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first. Partial ``.tmp-*`` dirs from a killed run are never listed."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _COMPLETE.match(p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(_COMPLETE.match(p.name).group(1)))


def resolve_resume(resume: str | None, output_dir: str | Path) -> Path | None:
    """``"auto"``: the latest complete checkpoint, or None for a fresh run. A path: that (complete) checkpoint."""
    if resume in (None, "", "none", "no"):
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(f"run.resume={resume!r} is not a complete checkpoint (no {TRAINER_STATE} in it).")
    return path


def set_aside_later_checkpoints(output_dir: str | Path, step: int) -> list[Path]:
    """Rename the complete checkpoints after ``step`` to ``.abandoned-step-N`` (kept, but never resumed from).

    Resuming from an older checkpoint starts a new branch of the run; without this, ``keep_last`` would prune the new
    branch's checkpoints first and a later ``--resume auto`` would silently continue the abandoned one.
    """
    moved = []
    for path in complete_checkpoints(output_dir):
        if int(_COMPLETE.match(path.name).group(1)) > step:
            target = path.with_name(f".abandoned-{path.name}")
            if target.exists():
                shutil.rmtree(target)
            path.rename(target)
            moved.append(target)
    return moved


def save_checkpoint(
    accelerator: Accelerator,
    *,
    model,
    processor,
    output_dir: str | Path,
    step: int,
    state: dict,
    rank_state: dict,
    keep_last: int,
) -> Path:
    """Collective: every process must call it. ``state`` is shared (from the main process), ``rank_state`` is this
    process's own (data positions, skip counts); all ranks' go into ``trainer_state.json`` as ``ranks[i]``.
    ``model`` (as prepared by accelerate) and ``processor`` are also saved as a model directory (see the layout)."""
    root = Path(output_dir) / CHECKPOINTS
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    if accelerator.is_main_process:
        for stale in root.glob(".tmp-*"):  # left by a killed run
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / ACCELERATE_STATE))
    save_model_dir(accelerator, model, processor, tmp, save_backbones=False)
    ranks = gather_object([rank_state])
    accelerator.wait_for_everyone()  # every process has written its RNG state into tmp
    if accelerator.is_main_process:
        trainer_state = {**state, "step": step, "world_size": accelerator.num_processes, "ranks": ranks}
        atomic_write_text(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=1, sort_keys=True) + "\n")
        if final.exists():  # the same step saved again after a resume: replace it
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> tuple[dict, dict]:
    """Restore what :func:`save_checkpoint` saved; returns (shared state, this rank's state)."""
    path = Path(path)
    state = json.loads((path / TRAINER_STATE).read_text())
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(
            f"{path} was written by {state['world_size']} processes but this run has {accelerator.num_processes}; "
            "data positions are per process, so resume with the same number of processes."
        )
    # strict=False: the checkpoint holds only the trainable weights; the frozen backbones are already loaded.
    # DeepSpeed saved the whole model in its own format, and its load_checkpoint takes no `strict` argument.
    strict = {} if accelerator.distributed_type == DistributedType.DEEPSPEED else {"strict": False}
    saved = path / ACCELERATE_STATE if (path / ACCELERATE_STATE).is_dir() else path  # older checkpoints: top level
    accelerator.load_state(str(saved), **strict)
    return state, state["ranks"][accelerator.process_index]
