"""Auxiliary losses and statistics in the training loop (flamingo_train.train): each reported loss joins the objective
with its ``optim.aux_loss_weights`` weight, as its mean over the step's forwards; ``aux/<name>`` and ``stats/<name>``
reach metrics.jsonl; an unweighted loss is an error; a model that reports nothing logs what it always did.

The losses come from the ``report`` fixture: every cross-attention block reports through its ``report`` argument
(flamingo.auxiliary), as a mixture-of-experts block would, and the model averages each loss over its blocks.
"""

import math
from collections import Counter

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from train_loop_helpers import one_thread_and_fresh_accelerate_state  # noqa: F401  (autouse)
from train_loop_helpers import bitwise_equal, final_weights, read_metrics, tiny_config

import flamingo
from flamingo.cross_attention import GatedCrossAttentionBlock
from flamingo_train.checkpoint import complete_checkpoints
from flamingo_train.data.config import DataConfig
from flamingo_train.data.synthetic import write_synthetic_dataset
from flamingo_train.example import write_example
from flamingo_train.train import train

SHORT = ["run.log_every=1", "run.save_every=0"]


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """``python -m flamingo_train.example``'s files (model/, data/data.jsonl), and a second dataset in pairs/."""
    out = tmp_path_factory.mktemp("example")
    write_example(out, max_steps=4, save_every=2)
    write_synthetic_dataset(out / "pairs", format="pairs", num_records=16, seed=1)
    return out


@pytest.fixture
def report(monkeypatch):
    """``report(aux={name: fn}, stats={name: fn})``: from now on every cross-attention block reports ``fn(block)``
    under each name, as a loss (``aux_losses[name]``: the mean over the blocks) or a statistic
    (``stats["cross_attn_blocks.<i>/<name>"]``)."""

    def install(aux=None, stats=None):
        forward = GatedCrossAttentionBlock.forward

        def reporting_forward(self, *args, report, **kwargs):
            for name, fn in (aux or {}).items():
                report.add_loss(name, fn(self))
            for name, fn in (stats or {}).items():
                report.add_stat(name, fn(self))
            return forward(self, *args, report=report, **kwargs)

        monkeypatch.setattr(GatedCrossAttentionBlock, "forward", reporting_forward)

    return install


def counting(scale=1.0):
    """A reported value that is ``scale * k`` at a block's k-th call: ``scale * k`` at the model's k-th forward."""
    calls = Counter()

    def value(block):
        calls[id(block)] += 1
        return torch.tensor(scale * calls[id(block)])

    return value


def gate_distance_from_one(block):
    """A differentiable loss that pulls the block's attention gate toward 1."""
    return ((block.attn_gate - 1) ** 2).sum()


def attn_gates(model) -> dict:
    return {name: block.attn_gate.detach().clone() for name, block in model.cross_attn_blocks.items()}


def mixture_config(example, output_dir, *overrides):
    """Two datasets and 2 micro-batches per step: 4 forwards per step."""
    config = tiny_config(example, output_dir, "data.0.batch_size=4", "run.grad_accum_steps=2", *overrides)
    config.data.append(DataConfig(name="pairs", path=str(example / "pairs" / "data.jsonl"), format="pairs",
                                  batch_size=2, loss_weight=0.3, max_tokens=32, max_images=1, num_workers=0))
    return config


def test_the_logged_aux_loss_and_statistic_are_their_means_over_each_windows_forwards(example, tmp_path, report):
    steps = ["run.max_steps=4", "run.log_every=2", "run.save_every=0"]
    train(mixture_config(example, tmp_path / "plain", *steps))
    AcceleratorState._reset_state(reset_partial_state=True)
    # At the model's k-th forward every block reports the loss k and the statistic 10 k; a window is 2 steps of 4
    # forwards: k = 1..8, then 9..16.
    report(aux={"balance": counting()}, stats={"usage": counting(scale=10.0)})
    model = train(mixture_config(example, tmp_path / "aux", *steps, "optim.aux_loss_weights.balance=0.5")).model

    plain, aux = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "aux")
    assert [m["aux/balance"] for m in aux] == [4.5, 12.5]
    usage = sorted(f"stats/cross_attn_blocks.{index}/usage" for index in model.cross_attn_blocks)  # one per block
    assert [[m[key] for key in usage] for m in aux] == [[45.0] * len(usage), [125.0] * len(usage)]
    assert [key for key in aux[0] if key.startswith("stats/")] == usage
    # A constant added to the objective changes no gradient, and ``loss`` stays the weighted LM loss.
    assert [m["loss"] for m in aux] == [m["loss"] for m in plain]
    assert bitwise_equal(final_weights(tmp_path / "aux"), final_weights(tmp_path / "plain"))


def test_the_weighted_aux_loss_trains_and_a_zero_weight_only_logs_it(example, tmp_path, report):
    before = attn_gates(flamingo.Flamingo.from_pretrained(example / "model"))
    assert all(float(g) == 0.0 for g in before.values())  # tanh gates start closed
    report(aux={"gate": gate_distance_from_one})
    no_lm_loss = ["data.0.loss_weight=0", "run.max_steps=4", *SHORT]

    trained = train(tiny_config(example, tmp_path / "one", *no_lm_loss, "optim.aux_loss_weights.gate=1")).model
    trained = attn_gates(trained)
    assert all(0.0 < float(trained[name]) < 1.0 for name in before), trained
    losses = [m["aux/gate"] for m in read_metrics(tmp_path / "one")]
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]

    AcceleratorState._reset_state(reset_partial_state=True)
    logged_only = train(tiny_config(example, tmp_path / "zero", *no_lm_loss, "optim.aux_loss_weights.gate=0")).model
    assert bitwise_equal(attn_gates(logged_only), before)
    assert [m["aux/gate"] for m in read_metrics(tmp_path / "zero")] == [1.0] * 4  # (0 - 1)^2 in every block


def test_an_aux_loss_without_a_weight_is_an_error_naming_it_and_how_to_set_it(example, tmp_path, report):
    report(aux={"balance": counting()})
    with pytest.raises(ValueError, match=r"'balance'.*optim\.aux_loss_weights\.balance=0\.01"):
        train(tiny_config(example, tmp_path / "run", "run.max_steps=2", *SHORT))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # at the first step, before any line


def test_a_nonfinite_aux_loss_skips_the_step_like_a_nonfinite_lm_loss(example, tmp_path, report):
    calls = counting()

    def nan_at_the_second_forward(block):
        return torch.tensor(float("nan") if float(calls(block)) == 2 else 0.5)

    report(aux={"balance": nan_at_the_second_forward})
    # Weight 0 too: a loss that is only logged still stops a step it has made non-finite.
    train(tiny_config(example, tmp_path / "run", "run.max_steps=3", "run.log_every=1", "run.save_every=1",
                      "run.keep_last=3", "optim.aux_loss_weights.balance=0"))
    metrics = read_metrics(tmp_path / "run")
    assert [m["skipped_steps"] for m in metrics] == [0, 1, 1]
    assert [math.isfinite(m["aux/balance"]) for m in metrics] == [True, False, True]
    assert [math.isfinite(m["loss"]) for m in metrics] == [True, False, True]
    weights = [load_file(str(p / "model.safetensors")) for p in complete_checkpoints(tmp_path / "run")]
    assert bitwise_equal(weights[0], weights[1]) and not bitwise_equal(weights[1], weights[2])


def test_a_model_that_reports_nothing_logs_exactly_the_keys_it_always_did(example, tmp_path):
    train(tiny_config(example, tmp_path / "run", "run.max_steps=2", *SHORT))
    keys = ["loss", "loss/shapes", "tokens_per_s", "images_per_s", "step", "lr", "skipped_steps", "grad_norm"]
    assert [list(m) for m in read_metrics(tmp_path / "run")] == [keys, keys]
