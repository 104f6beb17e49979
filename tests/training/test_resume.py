"""Checkpoints, interruption and resume: an interrupted-and-resumed run is the uninterrupted run."""

import os
import signal
from dataclasses import replace

import mlx.core as mx
import pytest
from conftest import assert_tensors_close, fp32_tol

from mlx_lora.config import TrainConfig
from mlx_lora.errors import Interrupted, UserError
from mlx_lora.formats.native import ADAPTER_WEIGHTS
from mlx_lora.reporting.metrics import read_metrics
from mlx_lora.training.checkpoint import OPTIMIZER_STATE, checkpoint_dir, find_checkpoint
from mlx_lora.training.loop import train


def _config(llama, tiny_data, out, **kw) -> TrainConfig:
    # dropout > 0 so the random state has to be restored too
    base = dict(
        model=str(llama),
        data=str(tiny_data),
        adapter_path=str(out),
        iters=10,
        batch_size=3,
        rank=4,
        num_layers=2,
        dropout=0.2,
        learning_rate=1e-2,
        val_every=0,
        report_every=1,
        save_every=0,
    )
    return TrainConfig(**{**base, **kw})


def _signal_after(step: int, signum: int):
    """A log function that sends `signum` to this process once step `step` is reported."""

    def log(line: str) -> None:
        if line.startswith(f"step {step}/") and "val" not in line:
            os.kill(os.getpid(), signum)

    return log


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(llama, tiny_data, tmp_path, prefix_cache):
    straight = train(_config(llama, tiny_data, tmp_path / "straight", prefix_cache=prefix_cache), log=lambda _: None)
    cfg = _config(llama, tiny_data, tmp_path / "split", prefix_cache=prefix_cache)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under a shell's `cmd &`
    with pytest.raises(Interrupted) as stopped:
        train(cfg, log=_signal_after(4, signal.SIGINT))
    checkpoint = checkpoint_dir(cfg.adapter_path, 4)
    assert stopped.value.exit_code == 130
    assert str(stopped.value) == f"stopped by SIGINT after step 4/10; resume with: mlx-lora train --resume {checkpoint}"
    assert not (tmp_path / "split" / ADAPTER_WEIGHTS).exists()  # no final adapter from an unfinished run
    assert signal.getsignal(signal.SIGINT) is before  # handlers put back

    resumed = train(replace(cfg, resume=str(checkpoint)), log=lambda _: None)
    final = mx.load(str(tmp_path / "split" / ADAPTER_WEIGHTS))
    expected = mx.load(str(tmp_path / "straight" / ADAPTER_WEIGHTS))
    assert final.keys() == expected.keys()
    if not prefix_cache:
        # steps 5-10 run the same batches in the same shapes as in the straight run: bit for bit
        assert resumed.losses == straight.losses[4:]  # exactly, step for step
        assert all(mx.array_equal(final[k], expected[k]) for k in expected)
    else:
        # The straight run reads epoch 2's frozen-block states from epoch 1's batches; the resumed
        # one never ran steps 1-4, so it computes those rows in epoch 2's batches: other shapes, so
        # sums in another order. Longest sums: the gradients' over a batch's 3 x 48 = 144 positions,
        # over the 6 AdamW steps after the resume: 6 x 3.16 x 144 x 1.2e-7 = 3.3e-4 of the losses and
        # of each tensor's norm (measured: ~1e-7 and ~1e-6). A resume that lost the random state, the data
        # position or the optimizer's moments is off by 3e-3 or more in the losses and 0.2 or more in
        # the adapter; even a learning rate 10% off moves the losses by 2e-3.
        tol = fp32_tol(3 * 48, adam_steps=6)
        assert resumed.losses == pytest.approx(straight.losses[4:], rel=tol)
        assert_tensors_close(final, expected, tol, norm=2)
    # metrics.jsonl continues: the reports before the interrupt are kept
    assert [r["step"] for r in read_metrics(tmp_path / "split") if r["loss"] is not None] == list(range(1, 11))


def test_checkpoint_holds_optimizer_state_and_resume_finds_the_latest(llama, tiny_data, tmp_path):
    cfg = _config(llama, tiny_data, tmp_path, iters=6, save_every=2)
    train(cfg, log=lambda _: None)
    assert find_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 4)
    state = mx.load(str(checkpoint_dir(tmp_path, 4) / OPTIMIZER_STATE))
    assert state["step"].item() == 4
    moments = [k for k in state if k.endswith((".m", ".v"))]
    assert len(moments) == 2 * 2 * 2 * 2  # 2 blocks x (q, v) x (A, B) x (m, v)


def test_resume_refuses_a_different_adapter_shape(llama, tiny_data, tmp_path):
    cfg = _config(llama, tiny_data, tmp_path, iters=4, save_every=2)
    train(cfg, log=lambda _: None)
    with pytest.raises(UserError, match=r"adapter_config.json: rank is 4 but this run asks for 8; drop --rank"):
        train(replace(cfg, rank=8, resume=str(tmp_path)), log=lambda _: None)


def test_resume_from_a_directory_without_checkpoints_is_a_user_error(llama, tiny_data, tmp_path):
    with pytest.raises(UserError, match="no checkpoint there"):
        train(_config(llama, tiny_data, tmp_path, resume=str(tmp_path)), log=lambda _: None)
