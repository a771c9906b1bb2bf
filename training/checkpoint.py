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

A checkpoint that does not load (a file truncated by a copy, a full disk, a hand edit) is named with the file and the
error. ``--resume auto`` then falls back to the one before it (:func:`load_latest_checkpoint`); a checkpoint named in
``run.resume`` fails. The output folder itself: one run at a time (:func:`hold_output_dir`), and a full disk says so.

Only the trainable weights go into a checkpoint (a save-state hook filters the model's state dict); the frozen
backbones come from the model definition on resume, so a checkpoint of a 7B-LM Flamingo stays small. (FSDP and
DeepSpeed save the whole model in their own formats; the hook cannot filter those.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, load

from flamingo.io import atomic_write_text, naming_a_full_disk, read_json
from flamingo_train.export import save_model_dir

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.json"
ACCELERATE_STATE = "state"
LOCK = ".lock"
_COMPLETE = re.compile(r"^step-(\d{8,})$")  # 8 digits, more past step 99,999,999


class BrokenCheckpoint(ValueError):
    """A checkpoint that does not load; the message names the file and the error."""


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
    with naming_a_full_disk(root, f"checkpoint {final.name}"):
        accelerator.save_state(str(tmp / ACCELERATE_STATE))
        save_model_dir(accelerator, model, processor, tmp, save_backbones=False)
    ranks = gather_object([rank_state])
    accelerator.wait_for_everyone()  # every process has written its RNG state into tmp
    if accelerator.is_main_process:
        trainer_state = {**state, "step": step, "world_size": accelerator.num_processes, "ranks": ranks}
        with naming_a_full_disk(root, f"checkpoint {final.name}"):
            atomic_write_text(tmp / TRAINER_STATE, json.dumps(trainer_state, indent=1, sort_keys=True) + "\n")
        if final.exists():  # the same step saved again after a resume: replace it
            shutil.rmtree(final)
        tmp.rename(final)
        for old in complete_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_latest_checkpoint(
    accelerator: Accelerator, resume: str | None, output_dir: str | Path, *, say: Callable[[str], None]
) -> tuple[Path, dict, dict] | None:
    """Load ``run.resume``'s checkpoint into the prepared objects; returns (its path, shared state, this rank's state),
    or None for a fresh run. ``auto``: the latest complete checkpoint that loads; each broken one after it is skipped
    and announced through ``say`` (file and error). A checkpoint named in ``run.resume`` that does not load is a
    ValueError naming the file.

    A checkpoint that fails may have loaded part of itself (accelerate loads the weights, then the optimiser, ...,
    straight into the live objects). The next one replaces each of them whole: the same trainable weights, the
    optimiser's and scheduler's state, every RNG. So nothing of a broken checkpoint survives the fallback, and if no
    checkpoint loads, the run stops.
    """
    if resume in (None, "", "none", "no"):
        return None
    if resume != "auto":
        path = resolve_resume(resume, output_dir)
        try:
            return path, *load_checkpoint(accelerator, path)
        except BrokenCheckpoint as error:
            raise ValueError(f"run.resume={resume}: {error}; resume from an earlier checkpoint, or with --resume auto "
                             "(the latest one that loads).") from None
    found = complete_checkpoints(output_dir)
    for path in reversed(found):
        try:
            return path, *load_checkpoint(accelerator, path)
        except BrokenCheckpoint as error:
            say(f"skipped checkpoint {path.name}: {error}; trying the one before it")
    if found:
        raise ValueError(f"run.resume=auto: none of the {len(found)} checkpoints in {Path(output_dir) / CHECKPOINTS} "
                         "loads (each is named above); to start afresh, set run.resume=none or another "
                         "run.output_dir.")
    return None


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> tuple[dict, dict]:
    """Restore what :func:`save_checkpoint` saved; returns (shared state, this rank's state). A file that does not load
    is a :class:`BrokenCheckpoint` naming it, raised on every process together."""
    path = Path(path)
    state = read_trainer_state(path)
    if state["world_size"] != accelerator.num_processes:
        raise ValueError(
            f"{path} was written by {state['world_size']} processes but this run has {accelerator.num_processes}; "
            "data positions are per process, so resume with the same number of processes."
        )
    # strict=False: the checkpoint holds only the trainable weights; the frozen backbones are already loaded.
    # DeepSpeed saved the whole model in its own format, and its load_checkpoint takes no `strict` argument.
    strict = {} if accelerator.distributed_type == DistributedType.DEEPSPEED else {"strict": False}
    saved = path / ACCELERATE_STATE if (path / ACCELERATE_STATE).is_dir() else path  # older checkpoints: top level
    error = None
    try:
        # accelerate only logs a random-state file it cannot read, and resumes with other random numbers.
        load(saved / f"random_states_{accelerator.process_index}.pkl")
        accelerator.load_state(str(saved), **strict)
    except Exception as caught:  # torch, safetensors and pickle each raise their own kinds, and seldom name the file
        error = name_the_broken_file(saved, caught)
    # Decided together: a process that resumed from another checkpoint than the rest would train apart from them.
    errors = [error] if accelerator.num_processes == 1 else gather_object([error])
    broken = next((e for e in errors if e is not None), None)
    if broken is not None:
        raise BrokenCheckpoint(broken)
    return state, state["ranks"][accelerator.process_index]


def read_trainer_state(path: Path) -> dict:
    """``path/trainer_state.json``, checked for what resuming reads; a :class:`BrokenCheckpoint` naming it if not."""
    file = path / TRAINER_STATE
    try:
        state = read_json(file)  # a syntax error names the file, line and column
    except ValueError as error:
        raise BrokenCheckpoint(str(error).rstrip(".")) from None
    except OSError as error:
        raise BrokenCheckpoint(f"{file}: {error.strerror}") from None
    shape = {"step": int, "skipped_steps": int, "world_size": int, "ranks": list}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in shape.items()):
        raise BrokenCheckpoint(f"{file}: needs {', '.join(shape)} (numbers, and a list of the processes' states)")
    ranks = state["ranks"]
    if len(ranks) != state["world_size"] or not all(
        isinstance(r, dict) and isinstance(r.get("positions"), dict) and isinstance(r.get("skipped"), dict)
        for r in ranks
    ):
        raise BrokenCheckpoint(f"{file}: ranks must hold world_size={state['world_size']} entries, each with the "
                               "process's data positions and skip counts")
    return state


def name_the_broken_file(folder: Path, error: Exception) -> str:
    """What failed to load from ``folder``: the first of its files that does not load alone (the errors of torch and
    accelerate rarely name the file they were reading), else the folder and ``error``."""
    from safetensors.torch import load_file

    for file in sorted(folder.iterdir()):
        if not file.is_file() or file.suffix not in (".safetensors", ".bin", ".pkl", ".pt"):
            continue
        try:
            load_file(str(file)) if file.suffix == ".safetensors" else load(file)
        except Exception as file_error:
            return f"{file} is truncated or corrupt ({_one_line(file_error)})"
    return f"{folder} does not load ({_one_line(error)})"


def _one_line(error: Exception) -> str:
    """The first sentence of an error message, on one line (torch's go on for a paragraph of advice)."""
    text = " ".join(str(error).split()) or type(error).__name__
    sentence = text.split(". ")[0]
    return sentence if len(sentence) <= 200 else sentence[:197] + "..."


# ---------------------------------------------------------------------------------------------- the output folder
@contextmanager
def hold_output_dir(output_dir: str | Path, *, main_process: bool) -> Iterator[None]:
    """One run at a time in ``output_dir``. The main process checks that it can write there, then holds an exclusive
    lock on ``output_dir/.lock`` (which names it) for as long as the block runs; the kernel drops the lock when the
    process ends, however it ends. A folder that cannot be written (a full disk included), or whose lock another run
    holds, is a ValueError naming it, before anything loads. Other processes share the main one's lock.
    """
    if not main_process:
        yield
        return
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
        handle = open(output_dir / LOCK, "a+")
    except OSError as error:
        raise ValueError(f"run.output_dir: cannot write into {output_dir} ({error.strerror}).") from None
    with handle:  # closing it drops the lock
        _lock(handle, output_dir)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
        except OSError as error:  # the first bytes the run writes: a full disk shows here
            raise ValueError(f"run.output_dir: cannot write into {output_dir} ({error.strerror}).") from None
        yield


def _lock(handle, output_dir: Path) -> None:
    """An exclusive lock on the open ``handle`` of ``output_dir/.lock``, or a ValueError naming its holder."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; the run goes on unguarded
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another run"
        raise ValueError(f"run.output_dir: {output_dir} is in use by {holder}, which holds {output_dir / LOCK}; wait "
                         "for it to end, or give this run another run.output_dir.") from None
    except OSError as error:  # a filesystem without locks (some network mounts): the run goes on unguarded
        logger.warning("cannot lock %s (%s); make sure that no other run writes into %s", output_dir / LOCK,
                       error.strerror, output_dir)
