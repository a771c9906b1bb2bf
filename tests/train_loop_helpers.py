"""Helpers for tests/test_train_loop.py: run the training entry point in a subprocess, read what a run wrote."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from flamingo_train.config import load_config

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
KILL_AFTER_STEP = Path(__file__).resolve().with_name("kill_after_step.py")
TINY_CPU = REPO / "training" / "configs" / "tiny_cpu.yaml"


def subprocess_env():
    """Offline, one thread per process (the test machine's cores are shared), quiet tokenizers."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_training(config, *args, processes=1, kill_after_step=None, timeout=300):
    """Run ``flamingo_train`` on ``processes`` CPU processes; returns the CompletedProcess (stdout+stderr merged).

    Two processes go through ``accelerate launch --multi_gpu`` (torchrun underneath): accelerate's ``--cpu`` flag
    starts a single process unless MPI is installed; on a machine without GPUs the loop asks accelerate for a CPU
    (gloo) run itself. ``kill_after_step=N`` (one process) kills the run hard after step N (tests/kill_after_step.py).
    """
    if kill_after_step is not None:
        assert processes == 1, "kill_after_step runs one process"
        command = [sys.executable, str(KILL_AFTER_STEP), str(kill_after_step)]
    elif processes == 1:
        command = [sys.executable, "-m", "flamingo_train"]
    else:
        command = [
            ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "flamingo_train",
        ]
    command += ["--config", str(config), *args]
    return subprocess.run(
        command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=timeout,
    )


def tiny_config(example, output_dir, *overrides):
    """The shipped tiny CPU config, pointed at the model and data ``flamingo_train.example`` wrote into ``example``."""
    return load_config(
        TINY_CPU,
        overrides=[
            f"model.pretrained={example / 'model'}",
            f"data.0.path={example / 'data' / 'data.jsonl'}",
            f"run.output_dir={output_dir}",
            *overrides,
        ],
    )


def check(result):
    assert result.returncode == 0, result.stdout[-4000:]
    return result


def read_metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(output_dir):
    return load_file(str(Path(output_dir) / "final" / "model.safetensors"))


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def frozen_parameters(module: torch.nn.Module) -> dict:
    """A backbone's own parameters, each of which must be frozen."""
    parameters = dict(module.named_parameters())
    assert not any(p.requires_grad for p in parameters.values())
    return parameters


@pytest.fixture(autouse=True)
def one_thread_and_fresh_accelerate_state():
    """Each in-process run gets its own Accelerator state (accelerate keeps it in process-wide singletons) and one
    thread: these tiny models run faster on one core than contending for shared ones. Autouse in the modules that
    import it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    AcceleratorState._reset_state(reset_partial_state=True)
