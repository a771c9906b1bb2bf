"""Loadable model directories written during training: ``final/``, ``best/`` and every checkpoint's top level.

Each is ``Flamingo.save_pretrained`` + the processor, so ``flamingo-eval run --model DIR`` and
``Flamingo.from_pretrained(DIR)`` take any of them. The backbones are referenced (the input model's, by absolute path
or hub id), or copied with ``run.export_backbones: true``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator

from flamingo.io import atomic_write_text, naming_a_full_disk


def save_model_dir(accelerator: Accelerator, model, processor, directory: str | Path, *, save_backbones: bool) -> None:
    """Collective: every process must call it (under FSDP or ZeRO-3 the weights are gathered from the shards); the main
    process writes ``config.json``, ``model.safetensors`` (trainable weights) and the processor into ``directory``."""
    gathered = None if save_backbones else accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(directory, save_backbones=save_backbones, state_dict=gathered)
        processor.save_pretrained(directory)


def replace_model_dir(
    accelerator: Accelerator,
    model,
    processor,
    directory: str | Path,
    *,
    save_backbones: bool,
    json_files: dict[str, dict] | None = None,
) -> Path:
    """Collective. Write the model (and ``json_files``, name -> content, e.g. ``best.json``) to a temporary sibling,
    then swap it in, so that ``directory`` is never half old, half new."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    if accelerator.is_main_process and tmp.exists():  # left by a killed run
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with naming_a_full_disk(directory.parent, f"the model {directory.name}/"):
        save_model_dir(accelerator, model, processor, tmp, save_backbones=save_backbones)
        if accelerator.is_main_process:
            for name, content in (json_files or {}).items():
                atomic_write_text(tmp / name, json.dumps(content, indent=1, sort_keys=True) + "\n")
    if accelerator.is_main_process:
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    accelerator.wait_for_everyone()
    return directory
