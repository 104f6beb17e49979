"""Numerical faults and memory: stop with a message naming the step, keep every good file."""

import hashlib
import re
from dataclasses import replace

import mlx.core as mx
import pytest

from mlx_lora.config import TrainConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import load_adapter
from mlx_lora.formats.native import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mlx_lora.model.base import load_base
from mlx_lora.model.lora import lora_layers
from mlx_lora.training import memory
from mlx_lora.training.checkpoint import checkpoint_dir
from mlx_lora.training.feed import Feed
from mlx_lora.training.loop import train


def _config(llama, tiny_data, out, **kw) -> TrainConfig:
    base = dict(
        model=str(llama),
        data=str(tiny_data),
        adapter_path=str(out),
        iters=6,
        batch_size=2,
        rank=4,
        num_layers=2,
        val_every=0,
        report_every=1,
        save_every=1,
    )
    return TrainConfig(**{**base, **kw})


def _snapshot(directory):
    """The adapter's files (metrics.jsonl and loss.png describe each run, the failed one too)."""
    return {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
    }


def test_nan_loss_stops_naming_the_step_and_keeps_good_files(llama, tiny_data, tmp_path):
    cfg = _config(llama, tiny_data, tmp_path, iters=2, save_every=0)
    train(cfg, log=lambda _: None)  # an earlier good adapter in the same directory
    before = _snapshot(tmp_path)
    with pytest.raises(UserError) as e:
        train(replace(cfg, iters=6, save_every=1, learning_rate=1e38), log=lambda _: None)
    bad = int(re.match(r"step (\d+): the loss is nan; stopped", str(e.value)).group(1))
    last_good = checkpoint_dir(tmp_path, bad - 1)
    assert f"the last good checkpoint is {last_good}" in str(e.value)
    assert not checkpoint_dir(tmp_path, bad).exists()
    assert _snapshot(tmp_path) == before
    load_adapter(load_base(str(llama)), last_good)  # loads cleanly


def test_non_finite_gradient_with_finite_loss_stops_at_step_1(llama, tiny_data, tmp_path, monkeypatch):
    real_loss = Feed.loss

    def loss_with_infinite_gradient(self, model, *inputs):
        loss, ntoks = real_loss(self, model, *inputs)
        b = next(iter(lora_layers(model).values())).lora_b  # zero at init: d sqrt(|b|) = inf there
        return loss + 0 * mx.sqrt(mx.abs(b)).sum(), ntoks

    monkeypatch.setattr(Feed, "loss", loss_with_infinite_gradient)
    with pytest.raises(UserError, match=r"^step 1: a gradient is not finite; stopped with nothing saved"):
        train(_config(llama, tiny_data, tmp_path), log=lambda _: None)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_run_that_cannot_fit_is_refused_with_the_knobs(llama, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**20)  # a 1 MiB machine
    with pytest.raises(UserError) as e:
        train(_config(llama, tiny_data, tmp_path), log=lambda _: None)
    message = str(e.value)
    assert re.match(
        r"this run needs about \d+\.\d GB .* for batch 2 x \d+ tokens\) but this machine has 0\.0 GB; ", message
    )
    for knob in ("--batch-size", "--max-seq-length", "--grad-checkpoint", "quantized base"):
        assert knob in message
    assert not (tmp_path / "checkpoints").exists()
