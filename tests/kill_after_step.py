"""Run flamingo-train and kill it hard after step N, as a job killed by the cluster would be: no cleanup, no export.

    python tests/kill_after_step.py N --config X.yaml [overrides ...]       # exits with code 17 after step N

It patches the loop's checkpoint step, the last thing a step does, so step N's checkpoint (if it has one) is written
first. N must be below run.max_steps: after the last step the run exports and ends with code 0.
"""

import os
import sys
from pathlib import Path

EXIT_CODE = 17


def main(argv: list[str]) -> None:
    kill_after = int(argv[0])
    import flamingo_train.train as train_module
    from flamingo_train import cli

    checkpoint = train_module.checkpoint

    def checkpoint_then_die(run):
        checkpoint(run)
        if run.step >= kill_after:
            os._exit(EXIT_CODE)

    train_module.checkpoint = checkpoint_then_die
    cli.main(argv[1:])


if __name__ == "__main__":
    # Python put this file's folder first on sys.path; its test helpers (models.py, ...) must not shadow packages.
    if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path.pop(0)
    main(sys.argv[1:])
