"""Shared pieces of the evaluation-runner tests (helper EB): a saved tiny model, fixture data, runs and file readers."""

from __future__ import annotations

import json
from pathlib import Path

from models import build_tiny_model

TASKS_WITH_FILES = ("coco", "flickr30k", "vqav2", "okvqa", "textvqa", "vizwiz", "hateful_memes", "imagenet")


def save_tiny_eval_model(vision, lm_dir, directory: Path) -> Path:
    """A tiny Flamingo (gates open, so images matter) saved self-contained, with its processor, as ``--model`` wants."""
    model, processor = build_tiny_model(vision, lm_dir)
    model.save_pretrained(directory, save_backbones=True)
    processor.save_pretrained(directory)
    return directory


def read_predictions(directory: Path) -> dict[str, list]:
    """Every predictions file of a run: file name -> records."""
    return {p.name: json.loads(p.read_text()) for p in sorted(Path(directory).glob("*.json"))}


def trial_values(results_path: Path) -> dict[tuple, float | None]:
    results = json.loads(Path(results_path).read_text())
    return {(t["task"], t["shots"], t["seed"], t["rices"]): t["value"] for t in results["trials"]}
