"""``flamingo-train``: read a YAML config, apply command-line overrides, train; or plot a run's metrics.

Usage::

    flamingo-train --config training/configs/tiny_cpu.yaml [section.field=value ...] [--resume auto] [--strict]
    accelerate launch --config_file training/configs/accelerate/multi_gpu.yaml -m flamingo_train --config X.yaml
    flamingo-train plot runs/tiny_cpu/metrics.jsonl [-o curves.png]     # loss and eval curves (default metrics.png)
    flamingo-train convert-task --task custom --custom-kind vqa --data-dir DIR --shots 0,4 --output train.jsonl

Overrides are parsed as YAML values: ``run.max_steps=200 optim.lr=3e-4 data.0.batch_size=4 data.laion.loss_weight=0.2``.
The whole config, data paths included, is checked before anything loads; a bad one ends with one line naming the file
and field, and exit code 2, as do an output folder that cannot be written or that another run holds, and a
checkpoint named in --resume that does not load. A run that stops because it does not train (every step, or
run.max_consecutive_skipped_steps in a row, skipped) or because the disk is full ends with one line and exit code 1.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from pathlib import Path

from flamingo_train.config import load_config

PLOT = "plot"
CONVERT_TASK = "convert-task"
OWN_LOGGERS = ("flamingo", "flamingo_eval", "flamingo_train")  # the import names of this repository's packages


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flamingo-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, help="YAML file with model, data, optim, schedule, run (and eval) sections"
    )
    parser.add_argument("overrides", nargs="*", help="section.field=value (YAML value), applied after the file")
    parser.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint), a checkpoint, or 'none'")
    parser.add_argument("--strict", action="store_true", help="raise on the first bad record instead of skipping it")
    return parser.parse_intermixed_args(argv)


def plot_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flamingo-train plot", description="Draw a run's training loss and in-loop eval scores into a PNG."
    )
    parser.add_argument("metrics", type=Path, help="a run's metrics.jsonl")
    parser.add_argument("-o", "--output", type=Path, default=None, help="PNG to write (default: metrics.png beside it)")
    return parser


def plot_main(argv: list[str]) -> None:
    parser = plot_parser()
    args = parser.parse_args(argv)
    from flamingo_train.plot import plot_metrics

    try:
        print(plot_metrics(args.metrics, args.output))
    except ValueError as error:  # no such file, nothing to plot, matplotlib missing: one line, exit code 2
        parser.error(str(error))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [PLOT]:  # a subcommand beside the flag-driven training run, which keeps its usage
        return plot_main(argv[1:])
    if argv[:1] == [CONVERT_TASK]:  # task data -> training records laid out as the evaluation's prompts
        from flamingo_train.task_data import main as convert_task

        sys.exit(convert_task(argv[1:], prog="flamingo-train convert-task"))
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"run.resume={args.resume}")
    if args.strict:
        overrides.append("run.strict=true")
    try:
        config = load_config(args.config, overrides=overrides, check_paths=True)
    except ValueError as error:
        fail(error, code=2)
    configure_logging()
    # Imported here, once the config is known to be good: the loop imports torch, transformers and accelerate
    # (seconds), and `--help` or a config error answers before any of them (tests/test_startup.py).
    from flamingo_train import train as loop

    try:
        result = loop.train(config)
    except ValueError as error:
        # Bad inputs (a config typo, a missing data file, a bad record with --strict, a broken checkpoint, a locked
        # output folder) end with one readable line naming the file and field, and exit code 2, as flamingo-eval's do.
        fail(error, code=2)
    except loop.TrainingStopped as error:
        fail(error, code=1)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        fail(error, code=1)
    print(f"final model: {result.final_dir}")


def configure_logging() -> None:
    """Our own packages log at INFO (the trainable parameter count); every other library stays at WARNING. A root
    logger at INFO would show open_clip's model-building steps (it logs through the root logger: the ``root:``
    lines) and accelerate's line for each file of a checkpoint it saves."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)


def fail(error: Exception, *, code: int) -> None:
    """End with one line on stderr (the error's message, whitespace joined) and exit code ``code``."""
    print(f"flamingo-train: error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
