"""The embedded default job: `mlx-lora train` with no --model and no --data, from any directory."""

import json
import re

import pytest
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.model.base import DEFAULT_MODEL_DIR


def test_shipped_model_is_small_and_complete():
    size = sum(f.stat().st_size for f in DEFAULT_MODEL_DIR.iterdir())
    assert size <= 10 * 2**20
    assert json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["model_type"] == "llama"
    assert (DEFAULT_MODEL_DIR / "model.safetensors").is_file()


@pytest.mark.once
@pytest.mark.slow
def test_default_run_learns_the_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    first, last = map(float, re.search(r"val loss ([\d.]+) -> ([\d.]+)", result.stdout).groups())
    assert last <= 0.7 * first
    assert json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())["base_model"] == "mlx-lora-default"

    # the learned format: working (numbers joined by + - *, then = and a result), then an answer
    # after ####, as in data/. Which digits and operators this tiny model writes (data/ has one per
    # sum; under MLX's bundled BLAS it once wrote "1 * 1 - 1 = 12. #### 12"), and whether it stops
    # right after the answer, change with the summation order (CPU, BLAS, thread count, our exp), so
    # only the shape is checked; the base never writes "####".
    adapted = CliRunner().invoke(app, ["generate", "--adapter-path", "adapters", "--max-tokens", 40])
    base = CliRunner().invoke(app, ["generate", "--max-tokens", 40])
    assert adapted.exit_code == base.exit_code == 0, adapted.output + base.output
    assert re.match(r" \d+( [-+*] \d+)+ = \d+.* #### \d+", adapted.stdout), adapted.stdout
    assert "####" not in base.stdout, base.stdout
