"""Gradient accumulation, gradient checkpointing and early stopping: their effect, not just that they run."""

import json
import os
import signal

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from conftest import assert_tensors_close, fp32_tol, write_jsonl
from mlx.utils import tree_flatten, tree_map
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.config import LoRAConfig, TrainConfig
from mlx_lora.data.batches import collate, collate_packs
from mlx_lora.data.examples import load_split
from mlx_lora.errors import Interrupted
from mlx_lora.formats.native import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mlx_lora.model.base import load_base
from mlx_lora.model.lora import apply_lora, lora_layers
from mlx_lora.training import loop as train_module
from mlx_lora.training.feed import loss_fn
from mlx_lora.training.grad_checkpoint import checkpoint_blocks
from mlx_lora.training.loop import train
from mlx_lora.training.step import make_step


def _adapted(path):
    mx.random.seed(0)
    base = load_base(str(path))
    apply_lora(base.model, LoRAConfig(targets="all-linear", num_layers=-1, dropout=0.0))
    for layer in lora_layers(base.model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    return base


@pytest.fixture
def setup(llama, tmp_path):
    base = _adapted(llama)
    rows = [
        {"prompt": f"Q: {a} + {b}?\nA:", "completion": f" {a + b}" * (1 + a % 4)} for a in range(8) for b in range(2)
    ]
    examples = load_split(write_jsonl(tmp_path / "train.jsonl", rows), base.tokenizer, 2048, train_on_prompt=False)
    return base.model, examples


def _grads(model, *batch):
    return nn.value_and_grad(model, lambda m, *b: loss_fn(m, *b)[0])(model, *batch)


def _sgd_update(model, batches):
    """Weights after one SGD(lr=1) step over `batches` accumulated: w - g, so w0 - w is the gradient."""
    w0 = model.trainable_parameters()
    step, state = make_step(model, optim.SGD(learning_rate=1.0))
    acc = None
    for i, batch in enumerate(batches):
        acc = step(batch, acc, i == len(batches) - 1)
    mx.eval(state, acc)
    after = model.trainable_parameters()
    model.update(w0)
    return after, (acc[0] / acc[1]).item()


def test_accumulated_batches_give_the_update_of_the_big_batch(setup):
    model, examples = setup
    rows = [0, 2, 5, 7]  # different lengths: the mean over all targets is not the mean of the batch means
    small = [collate(examples, rows[:1]), collate(examples, rows[1:])]
    assert [m.sum().item() for _, m in small] == [3, 21]
    accumulated, acc_loss = _sgd_update(model, small)
    big, big_loss = _sgd_update(model, [collate(examples, rows)])
    # Batches of 1 and 3 rows against one of 4: other shapes, so sums in another order. The longest
    # sums have 128 terms (the MLP; the batch holds 4 x 24 = 96 positions), so loss and update agree
    # to 128 x 1.2e-7 = 1.5e-5 (of the loss; of each update's largest element; reading the update
    # back as w0 - w adds ~1e-6). The naive update below is off by ~1, and an update divided by a
    # wrong target count (21 or 3 instead of 24) by 14% or more.
    tol = fp32_tol(128)
    assert acc_loss == pytest.approx(big_loss, rel=tol)
    w0 = dict(tree_flatten(model.trainable_parameters()))
    update = lambda after: {name: w0[name] - w for name, w in tree_flatten(after)}  # SGD(lr=1): the gradient
    assert_tensors_close(update(accumulated), update(big), tol)
    # the tempting average of the batches' mean gradients is a different update
    means = [_grads(model, *b)[1] for b in small]
    naive = tree_map(lambda w, g1, g2: w - (g1 + g2) / 2, model.trainable_parameters(), *means)
    assert not all(
        mx.allclose(a, b, rtol=1e-3).item() for (_, a), (_, b) in zip(tree_flatten(naive), tree_flatten(big))
    )


@pytest.mark.parametrize("packed", [False, True])
def test_checkpointed_blocks_give_the_same_gradients(llama, setup, packed):
    model, examples = setup
    if packed:
        from mlx_lora.training.packing import enable_packing

        enable_packing(model, "llama")
    batch = collate_packs(examples, [[0, 1, 2], [3, 4]]) if packed else collate(examples, [0, 1, 2, 3])
    loss, plain = _grads(model, *batch)
    block_class = type(model.layers[0])
    checkpoint_blocks(model)
    assert type(model.layers[0]) is not block_class and isinstance(model.layers[0], block_class)
    assert type(load_base(str(llama)).model.layers[0]) is block_class  # other models keep theirs
    checkpointed_loss, checkpointed = _grads(model, *batch)
    assert checkpointed_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for (name, a), (_, b) in zip(tree_flatten(checkpointed), tree_flatten(plain)):
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-7).item(), name


def test_checkpointing_lowers_peak_memory(setup):
    model, examples = setup
    batch = collate(examples, list(range(16)))

    def peak():
        """What the step adds at its peak: arrays other tests left alive count in MLX's peak too."""
        mx.clear_cache()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(_grads(model, *batch))
        return mx.get_peak_memory() - before

    plain = peak()
    checkpoint_blocks(model)
    checkpointed = peak()
    assert checkpointed < 0.8 * plain


def test_early_stopping_keeps_the_best_steps_adapter(llama, tiny_data, tmp_path, monkeypatch):
    scripted = iter([5.0, 4.0, 3.0, 3.5, 3.2, 1.0])  # steps 0, 2, 4, 6, 8: best at 4, then two worse
    monkeypatch.setattr(train_module, "mean_loss", lambda *a, **k: next(scripted))
    lines = []
    cfg = TrainConfig(
        model=str(llama),
        data=str(tiny_data),
        adapter_path=str(tmp_path / "ad"),
        iters=20,
        val_every=2,
        save_every=2,
        early_stopping_patience=2,
        learning_rate=1e-2,
    )
    result = train(cfg, log=lines.append)
    assert result.steps == 8 and result.best_step == 4 and sorted(result.val_losses) == [0, 2, 4, 6, 8]
    saved = mx.load(str(tmp_path / "ad" / ADAPTER_WEIGHTS))
    at_best = mx.load(str(tmp_path / "ad" / "checkpoints" / "step-0000004" / ADAPTER_WEIGHTS))
    at_stop = mx.load(str(tmp_path / "ad" / "checkpoints" / "step-0000008" / ADAPTER_WEIGHTS))
    assert saved.keys() == at_best.keys() and all(mx.array_equal(saved[k], at_best[k]).item() for k in saved)
    assert not all(mx.array_equal(saved[k], at_stop[k]).item() for k in saved)
    training = json.loads((tmp_path / "ad" / ADAPTER_CONFIG).read_text())["training"]
    recipe = {"data": str(tiny_data), "iters": 20, "epochs": None, "batch_size": 4, "learning_rate": 1e-2}
    assert training == recipe | {
        "max_seq_length": 2048,
        "early_stopping_patience": 2,
        "steps": 8,
        "best_step": 4,
        "best_val_loss": 3.0,
    }
    assert "early stopping at step 8: no better val loss in the last 2 validations" in lines
    assert "keeping the adapter of step 4, the best val loss (3.000)" in lines


def test_early_stopping_survives_an_interrupt_and_resume(llama, tiny_data, tmp_path, monkeypatch):
    """Best step, its weights and the patience count travel in the checkpoint: the resumed run
    stops at the same step and keeps the same adapter as the uninterrupted one."""

    def run(out, losses, log=lambda _: None, **kw):
        scripted = iter(losses)
        monkeypatch.setattr(train_module, "mean_loss", lambda *a, **k: next(scripted))
        cfg = TrainConfig(
            model=str(llama),
            data=str(tiny_data),
            adapter_path=str(out),
            iters=20,
            val_every=2,
            save_every=2,
            report_every=1,
            early_stopping_patience=2,
            learning_rate=1e-2,
            **kw,
        )
        return train(cfg, log=log)

    straight = run(tmp_path / "straight", [5.0, 4.0, 3.0, 3.5, 3.2])  # steps 0-8: best 4, stops at 8

    def interrupt_after_6(line):
        if line.startswith("step 6/") and "val" not in line:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        run(tmp_path / "split", [5.0, 4.0, 3.0, 3.5], log=interrupt_after_6)
    resumed = run(tmp_path / "split", [3.5, 3.2], resume=str(tmp_path / "split"))  # step 6 again, then 8
    assert (straight.steps, straight.best_step) == (resumed.steps, resumed.best_step) == (8, 4)
    # both keep step 4's adapter, trained before the interrupt in the same shapes: bit for bit
    want, got = (mx.load(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("straight", "split"))
    assert want.keys() == got.keys() and all(mx.array_equal(want[k], got[k]).item() for k in want)


@pytest.mark.once
def test_cli_takes_every_method_option_and_records_them(llama, tiny_data, tmp_path):
    out = tmp_path / "ad"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            str(llama),
            "--data",
            str(tiny_data),
            "--adapter-path",
            str(out),
            "--iters",
            "3",
            "--pack",
            "--grad-checkpoint",
            "--grad-accumulation-steps",
            "2",
            "--lr-schedule",
            "cosine",
            "--warmup-steps",
            "1",
            "--final-lr-ratio",
            "0.5",
            "--early-stopping-patience",
            "5",
            "--val-every",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    training = json.loads((out / ADAPTER_CONFIG).read_text())["training"]
    assert training | {"best_val_loss": None} == {
        # the recipe, always recorded (the card `upload` writes reads it)
        "data": str(tiny_data),
        "iters": 3,
        "epochs": None,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "max_seq_length": 2048,
        # the methods changed from their defaults
        "pack": True,
        "grad_accumulation_steps": 2,
        "lr_schedule": "cosine",
        "warmup_steps": 1,
        "final_lr_ratio": 0.5,
        "early_stopping_patience": 5,
        "steps": 3,
        "best_step": training["best_step"],
        "best_val_loss": None,
    }


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr-schedule", "step"], "--lr-schedule must be one of constant, linear, cosine, got 'step'"),
        (["--grad-accumulation-steps", "0"], "--grad-accumulation-steps must be at least 1, got 0"),
        (["--early-stopping-patience", "2", "--val-every", "0"], "--early-stopping-patience needs validations"),
    ],
)
def test_bad_method_options_exit_2_with_one_line(flags, message):
    result = CliRunner().invoke(app, ["train", *flags])
    assert result.exit_code == 2 and message in result.output


def test_resume_continues_packing_accumulation_and_schedule_exactly(llama, tiny_data, tmp_path):
    """The schedule's position is the optimizer's step and the data position counts batches, not steps."""
    from dataclasses import replace

    from mlx_lora.training.checkpoint import checkpoint_dir

    cfg = TrainConfig(
        model=str(llama),
        data=str(tiny_data),
        adapter_path=str(tmp_path / "straight"),
        iters=6,
        batch_size=1,
        max_seq_length=96,
        rank=4,
        num_layers=2,
        learning_rate=1e-2,
        val_every=0,
        save_every=3,
        pack=True,
        grad_accumulation_steps=2,
        lr_schedule="cosine",
        warmup_steps=2,
    )
    straight = train(cfg, log=lambda _: None)
    resumed = train(
        replace(cfg, adapter_path=str(tmp_path / "resumed"), resume=str(checkpoint_dir(tmp_path / "straight", 3))),
        log=lambda _: None,
    )
    # packed batches train on the plain forward (no prefix cache), so steps 4-6 run the straight
    # run's shapes again: bit for bit
    assert resumed.losses == straight.losses[3:]
    final, expected = (mx.load(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("resumed", "straight"))
    assert all(mx.array_equal(final[k], expected[k]).item() for k in expected)


def test_memory_estimate_counts_checkpointing(llama):
    from mlx_lora.training.memory import estimate_training_memory

    base = _adapted(llama)
    plain, checkpointed = (estimate_training_memory(base.model, base.config, 4, 512, c) for c in (False, True))
    assert checkpointed.activations < plain.activations / 2  # 4 blocks: one block's activations + 4 block inputs
    assert (checkpointed.weights, checkpointed.logits) == (plain.weights, plain.logits)
