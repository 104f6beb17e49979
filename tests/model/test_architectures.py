"""Models as transformers 5 saves them, spelled the new way (layer_types, rope_parameters per layer
type, num_local_experts): mlx-lm runs them as transformers does."""

import json

import numpy as np
import pytest

from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base
from tests.conftest import TOKENS, fp32_tol, hf_logits, make_hf_model, mlx_logits


def _transformers(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()


@pytest.mark.parametrize("arch", ["gemma3", "qwen3_moe", "mixtral"])
def test_new_spellings_give_transformers_logits(arch, tmp_path):
    model_dir = make_hf_model(tmp_path / arch, arch)
    config = json.loads((model_dir / "config.json").read_text())
    assert "rope_theta" not in config and "sliding_window_pattern" not in config and "num_experts" not in config
    base = load_base(str(model_dir))
    want = hf_logits(_transformers(model_dir), TOKENS)
    got = mlx_logits(base.model, TOKENS)
    # longest sums: the MLP's inner dimension (128) and the head's 64, through a few blocks
    assert np.abs(got - want).max() <= fp32_tol(4 * 128) * np.abs(want).max()


def test_gemma3_rope_per_layer_type(tmp_path):
    """Gemma 3's rope_parameters hold one theta per layer type: global and local blocks differ."""
    model_dir = make_hf_model(
        tmp_path / "g",
        "gemma3",
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 50000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 200.0},
        },
    )
    base = load_base(str(model_dir))
    assert (base.config["rope_theta"], base.config["rope_local_base_freq"]) == (50000.0, 200.0)
    want = hf_logits(_transformers(model_dir), TOKENS)
    assert np.abs(mlx_logits(base.model, TOKENS) - want).max() <= fp32_tol(4 * 128) * np.abs(want).max()


def test_layer_types_mlx_lm_cannot_run(tmp_path):
    """All-sliding blocks (transformers' default for 4 Gemma 3 blocks) crash inside mlx-lm: refused."""
    model_dir = make_hf_model(tmp_path / "g", "gemma3", layer_types=["sliding_attention"] * 4)
    text = (model_dir / "config.json").read_text()
    with pytest.raises(UserError, match=r"config.json: layer_types .*\(sliding_window_pattern\)"):
        load_base(str(model_dir))
    assert (model_dir / "config.json").read_text() == text  # never rewritten


@pytest.mark.parametrize("arch", ["gemma3", "qwen3_moe", "mixtral"])
def test_new_spellings_train_on_the_cut_model(arch, tiny_data, tmp_path):
    """The cached-prefix cut reproduces the forward (no fall-back to the uncut model), and a short
    run lowers the training loss."""
    import mlx.core as mx

    from mlx_lora.config import TrainConfig
    from mlx_lora.training.cut import find_cut
    from mlx_lora.training.loop import train

    model_dir = make_hf_model(tmp_path / arch, arch)
    said = []
    assert find_cut(load_base(str(model_dir)).model, 2, mx.array([TOKENS]), log=said.append) is not None, said
    cfg = TrainConfig(
        model=str(model_dir),
        data=str(tiny_data),
        adapter_path=str(tmp_path / "run"),
        iters=12,
        batch_size=4,
        num_layers=2,
        learning_rate=1e-2,
    )
    losses = train(cfg, log=lambda _: None).losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
