"""The Linux fast-BLAS switch: on by itself when OpenBLAS is there, off on request, same numbers."""

import json
import os
import subprocess
import sys

import pytest
from conftest import BY_DESIGN

from mlx_lora import blas

PROBE = """
import json, mlx_lora, mlx.core as mx, mlx.nn as nn
from mlx_lora import blas
mx.random.seed(0)
layer = nn.Linear(256, 192)
x = mx.random.normal((64, 256))
loss, grads = nn.value_and_grad(layer, lambda m, x: (m(x) ** 2).mean())(layer, x)
print(json.dumps({"used": blas.status[0], "loss": loss.item(), "grad": grads["weight"][:4, :4].flatten().tolist()}))
"""


def probe(cwd=None, **env) -> dict:
    """The probe in a fresh process; MLX_LORA_BLAS only as given here (CI also runs the suite with it off)."""
    inherited = {k: v for k, v in os.environ.items() if k != blas.ENV}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**inherited, **env}, cwd=cwd, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(sys.platform != "linux" or blas._find_openblas() is None, reason="needs OpenBLAS on Linux")
def test_openblas_is_used_by_default_and_gives_the_same_numbers():
    fast, slow = probe(), probe(MLX_LORA_BLAS="off")
    assert fast["used"] and slow["used"] is None
    assert fast["loss"] == pytest.approx(slow["loss"], rel=1e-5)
    assert fast["grad"] == pytest.approx(slow["grad"], rel=1e-4, abs=1e-6)


@pytest.mark.skipif(sys.platform != "linux" or blas._find_openblas() is None, reason="needs OpenBLAS on Linux")
def test_an_mlx_folder_in_the_working_directory_does_not_hide_the_wheel(tmp_path):
    """`python -c` puts the working directory first on sys.path, so a folder named mlx/ there makes
    mlx a namespace package whose first location is not the wheel (seen with /tmp/mlx)."""
    (tmp_path / "mlx" / "0.32.4").mkdir(parents=True)
    assert probe(cwd=tmp_path)["used"]


def test_a_missing_library_falls_back_with_a_reason():
    result = probe(MLX_LORA_BLAS="/nonexistent/libopenblas.so")
    assert result["used"] is None


def test_check_catches_a_wrong_matmul(monkeypatch):
    import mlx.core as mx

    monkeypatch.setattr(blas, "status", ("/fake/libblas.so", "test"))
    monkeypatch.setattr(mx, "array", lambda a: mx.zeros(a.shape))
    with pytest.raises(blas.UserError, match="wrong matmul results"):
        blas.check()


def test_only_a_training_run_says_which_blas_and_never_before_an_error(llama, tiny_data, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mlx_lora.cli import app

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(blas, "status", (None, "no OpenBLAS found; MLX matmuls run ~40x slower on its bundled BLAS"))
    runner = CliRunner()
    args = ["--model", str(llama), "--data", str(tiny_data), "--num-layers", "2", "--adapter-path", str(tmp_path / "a")]
    trained = runner.invoke(app, ["train", *args, "--iters", "1", "--val-batches", "1"])
    assert trained.exit_code == 0, trained.output
    assert "blas: no OpenBLAS found" in trained.stdout
    info = runner.invoke(app, ["info", *args])
    assert info.exit_code == 0 and "blas:" not in info.output
    bad = runner.invoke(app, ["train", *args, "--rank", "0"])
    assert bad.exit_code == 2 and bad.stderr.splitlines() == ["error: --rank must be at least 1, got 0"]


@pytest.mark.skipif(sys.platform != "linux" or blas._find_openblas() is None, reason="needs OpenBLAS on Linux")
@pytest.mark.skipif(os.environ.get(blas.ENV) == "off", reason=BY_DESIGN + f"{blas.ENV}=off runs on MLX's own BLAS")
def test_the_suite_itself_runs_on_the_fast_blas():
    """conftest imports mlx_lora before mlx: in-process tests compute like the CLI's processes,
    which a test comparing the two (a resume after a signal) relies on."""
    assert blas.status[0]
