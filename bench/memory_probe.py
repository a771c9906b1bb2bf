"""``python -m bench.memory_probe CONFIG WORK CONTENDER STEPS``: the peak RSS of training one contender, alone.

Builds the contender from the backbones that :func:`bench.contenders.build` wrote to WORK, runs STEPS training steps
(forward, backward, AdamW, as in the suite's train case) and prints one JSON line: ``loaded_mb`` (RSS with the model
built), ``peak_mb`` (the highest RSS during the steps) and ``rise_mb`` (their difference). A process of its own,
because within one process the allocator keeps memory an earlier contender freed, which hides a later one's peak.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from flamingo import FlamingoProcessor

from .contenders import CONFIGS, build_one, openflamingo_patched, _prompt_batch, BARE, OURS, REFERENCE
from .lm_cases import training_loss
from .measure import peak_rss_mb, reset_peak_rss, rss_mb


def main(argv: list[str]) -> None:
    config_name, work, which, steps = argv[0], Path(argv[1]), argv[2], int(argv[3])
    config = CONFIGS[config_name]
    if which not in (BARE, OURS, REFERENCE):
        raise SystemExit(f"unknown contender {which!r}")
    torch.manual_seed(0)
    with openflamingo_patched():
        model, _ = build_one(config, work, which)
        batch = _prompt_batch(FlamingoProcessor.from_pretrained(work / "processor"), config)
        loss, params = training_loss(which, model, batch)
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        model.train()
        loaded = rss_mb()
        reset_peak_rss()
        for _ in range(steps):
            loss().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    peak = peak_rss_mb()
    print(json.dumps({"loaded_mb": loaded, "peak_mb": peak, "rise_mb": peak - loaded}))


if __name__ == "__main__":
    main(sys.argv[1:])
