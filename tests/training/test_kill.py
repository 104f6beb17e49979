"""A real `mlx-lora train` process, signalled: SIGINT/SIGTERM checkpoint and say how to resume;
kill -9 at any moment leaves every checkpoint whole or absent, and the run resumes from it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.config import TrainConfig
from mlx_lora.formats.loader import load_adapter
from mlx_lora.formats.native import ADAPTER_WEIGHTS
from mlx_lora.model.base import load_base
from mlx_lora.training.checkpoint import CHECKPOINTS, OPTIMIZER_STATE, checkpoint_dir, read_state
from mlx_lora.training.loop import train

pytestmark = pytest.mark.slow
OPTIONS = dict(iters=12, batch_size=2, rank=4, num_layers=2, dropout=0.1, val_every=0, report_every=1)
REPO = Path(__file__).resolve().parents[2]


def _flags(llama, data, out, **kw) -> list[str]:
    options = {**OPTIONS, "model": llama, "data": data, "adapter_path": out, **kw}
    return [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-m", "mlx_lora.cli", "train", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for_steps(proc: subprocess.Popen, count: int) -> None:
    """Until this process has reported `count` training steps."""
    for line in proc.stdout:
        count -= line.startswith("step ") and " loss " in line and "val" not in line
        if count == 0:
            return
    raise AssertionError(f"training ended early: {proc.stderr.read()}")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_prints_resume_command_and_resume_matches(llama, tiny_data, tmp_path, signum, code):
    out = tmp_path / "out"
    # --no-prefix-cache: every step of the resumed run then runs the straight run's shapes, so the
    # adapters must agree bit for bit. (With the cache, the resumed run computes the rows cached
    # before the signal in other batches, which a BLAS may sum in another order; test_resume.py.)
    proc = _start(_flags(llama, tiny_data, out, save_every=0) + ["--no-prefix-cache"])
    _wait_for_steps(proc, 3)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code
    last = stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    step = int(last.split("after step ")[1].split("/")[0])
    checkpoint = checkpoint_dir(out, step)
    assert last == f"stopped by {name} after step {step}/12; resume with: mlx-lora train --resume {checkpoint}"
    assert "Traceback" not in stderr and not (out / ADAPTER_WEIGHTS).exists()

    # the printed command, as typed (options come back from the checkpoint)
    command = last.split("resume with: mlx-lora ")[1].split()
    assert CliRunner().invoke(app, command).exit_code == 0
    straight = tmp_path / "straight"
    train(
        TrainConfig(
            **{**OPTIONS, "model": str(llama), "data": str(tiny_data), "adapter_path": str(straight)},
            prefix_cache=False,
        ),
        log=lambda _: None,
    )
    resumed, expected = mx.load(str(out / ADAPTER_WEIGHTS)), mx.load(str(straight / ADAPTER_WEIGHTS))
    assert resumed.keys() == expected.keys() and all(mx.array_equal(resumed[k], expected[k]) for k in expected)


def _check_everything_loads(llama, out: Path) -> int:
    """Every checkpoint that exists loads: adapter (shapes checked), optimizer, trainer state."""
    checkpoints = [p for p in (out / CHECKPOINTS).glob("step-*")]
    for p in checkpoints:
        load_adapter(load_base(str(llama)), p)
        assert mx.load(str(p / OPTIMIZER_STATE))["step"].item() == int(p.name[5:])
        assert read_state(p).step == int(p.name[5:])
    return len(checkpoints)


def test_kill_9_mid_save_leaves_whole_checkpoints_and_resume_finishes(llama, tiny_data, tmp_path):
    out = tmp_path / "out"
    flags = _flags(llama, tiny_data, out, iters=20, save_every=1)
    torn = 0
    for round, (steps, delay) in enumerate([(2, 0.0), (1, 0.013), (3, 0.031)]):
        proc = _start(flags + (["--resume", str(out)] if round else []))
        _wait_for_steps(proc, steps)
        time.sleep(delay)
        proc.kill()  # SIGKILL: no handler runs
        proc.wait()
        torn += any((out / CHECKPOINTS).glob(".*.tmp"))
        assert _check_everything_loads(llama, out) >= 1
    # the killed run continues where its last whole checkpoint left it, and cleans up the temporaries
    result = CliRunner().invoke(app, ["train", "--resume", str(out), "--save-every", "0"])
    assert result.exit_code == 0, result.output
    assert not list((out / CHECKPOINTS).glob(".*"))
    load_adapter(load_base(str(llama)), out)
    print(f"kills that caught a save in progress: {torn} of 3")
