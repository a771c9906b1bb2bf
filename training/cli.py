"""``flamingo-train``: read a YAML config, apply command-line overrides, train.

Usage::

    flamingo-train --config training/configs/tiny_cpu.yaml [section.field=value ...] [--resume auto] [--strict]
    accelerate launch --config_file training/configs/accelerate/multi_gpu.yaml -m flamingo_train --config X.yaml

Overrides are parsed as YAML values: ``run.max_steps=200 optim.lr=3e-4 data.0.batch_size=4 data.laion.loss_weight=0.2``.
"""

from __future__ import annotations

import argparse
import logging

from flamingo_train.config import load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flamingo-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML file with model, data, optim, schedule, run sections")
    parser.add_argument("overrides", nargs="*", help="section.field=value (YAML value), applied after the file")
    parser.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint), a checkpoint, or 'none'")
    parser.add_argument("--strict", action="store_true", help="raise on the first bad record instead of skipping it")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"run.resume={args.resume}")
    if args.strict:
        overrides.append("run.strict=true")
    config = load_config(args.config, overrides=overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # Imported here so that `--help` and config errors come back without loading torch/accelerate.
    from flamingo_train.train import train

    result = train(config)
    print(f"final model: {result.final_dir}")


if __name__ == "__main__":
    main()
