"""mlx-lm interop against mlx-lm's own loader and LoRA code: logits must agree both ways."""

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import TOKENS, assert_round_trip, mlx_logits, random_adapter
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import load, load_model

from mlx_lora.commands.convert import convert
from mlx_lora.config import ConvertConfig, LoRAConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import load_for_inference, read_adapter
from mlx_lora.formats.native import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def _to_mlxlm(src, out):
    convert(ConvertConfig(str(src), str(out), to="mlx-lm"), log=lambda _: None)


def test_exported_adapter_loads_in_mlx_lm_with_our_logits(llama, tmp_path):
    ours = random_adapter(
        llama, tmp_path / "ours", LoRAConfig(targets="q_proj,down_proj", layers="1,3", rank=4, alpha=6)
    )
    _to_mlxlm(tmp_path / "ours", tmp_path / "mlxlm")
    config = json.loads((tmp_path / "mlxlm" / ADAPTER_CONFIG).read_text())
    assert config["num_layers"] == 3 and config["fine_tune_type"] == "lora"
    assert config["lora_parameters"] == {
        "rank": 4,
        "scale": 1.5,
        "dropout": 0.0,
        "keys": ["mlp.down_proj", "self_attn.q_proj"],
    }
    model, _ = load(str(llama), adapter_path=str(tmp_path / "mlxlm"))
    assert np.array_equal(mlx_logits(model, TOKENS), mlx_logits(ours.model, TOKENS))


def _mlxlm_adapter(model_dir, out, num_layers, params, dora=False):
    """An adapter as mlx_lm.lora makes it: freeze, linear_to_lora_layers, save the trainable tensors."""
    mx.random.seed(2)
    model, _ = load_model(model_dir)
    model.freeze()
    linear_to_lora_layers(model, num_layers, params, use_dora=dora)
    trained = {  # as if trained: B away from zero, DoRA's m away from ||W||
        k: mx.random.normal(v.shape) * 0.2 if k.endswith("lora_b") else v * (1 + 0.3 * mx.random.normal(v.shape))
        for k, v in tree_flatten(model.trainable_parameters())
        if k.endswith(("lora_b", ".m"))
    }
    model.load_weights(list(trained.items()), strict=False)
    out.mkdir()
    mx.save_safetensors(str(out / ADAPTER_WEIGHTS), dict(tree_flatten(model.trainable_parameters())))
    config = {
        "model": str(model_dir),
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": params,
        "iters": 10,
        "batch_size": 4,
        "learning_rate": 1e-5,
        "seed": 0,
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=4))
    model.eval()
    return model


@pytest.mark.parametrize(
    "params",
    [
        {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]},
        {"rank": 2, "scale": 20.0, "dropout": 0.05},  # no keys: mlx-lm's default, every linear in the blocks
    ],
)
def test_adapter_made_by_mlx_lm_loads_as_is(llama, tmp_path, params):
    theirs = _mlxlm_adapter(llama, tmp_path / "mlxlm", 2, params)
    base = load_for_inference(None, str(tmp_path / "mlxlm"))  # base found from its "model" field
    assert np.array_equal(mlx_logits(base.model, TOKENS), mlx_logits(theirs, TOKENS))
    config = read_adapter(tmp_path / "mlxlm")[0]
    assert (config.lora.rank, config.lora.scale, config.layers, config.lora.num_layers) == (
        params["rank"],
        params["scale"],
        [2, 3],
        2,
    )


def test_round_trip_through_mlx_lm_is_bit_identical(llama, tmp_path):
    random_adapter(llama, tmp_path / "ours", LoRAConfig(targets="all-linear", layers="0,2", rank=3, alpha=7))
    assert_round_trip(tmp_path / "ours", "mlx-lm", tmp_path)


def test_full_fine_tunes_are_refused(llama, tmp_path):
    _mlxlm_adapter(llama, tmp_path / "mlxlm", 1, {"rank": 2, "scale": 1.0, "dropout": 0.0})
    path = tmp_path / "mlxlm" / ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), "fine_tune_type": "full"}))
    hint = r" \(a full fine-tune is a whole model: pass it as --model\)"
    with pytest.raises(UserError, match=f"fine_tune_type full; mlx-lora reads LoRA and DoRA adapters only{hint}$"):
        read_adapter(tmp_path / "mlxlm")


def test_dora_exports_to_mlx_lm_with_our_logits_and_back_bit_for_bit(llama, tmp_path):
    from mlx_lora.formats.native import save_adapter
    from mlx_lora.model.lora import lora_layers

    cfg = LoRAConfig(targets="q_proj,down_proj", layers="1,3", rank=4, alpha=6, dora=True)
    ours = random_adapter(llama, tmp_path / "ours", cfg)
    for layer in lora_layers(ours.model).values():  # as if trained: m away from ||W||
        layer.magnitude = layer.magnitude * (1 + 0.3 * mx.random.normal(layer.magnitude.shape))
    save_adapter(tmp_path / "ours", ours.model, read_adapter(tmp_path / "ours")[0])
    _to_mlxlm(tmp_path / "ours", tmp_path / "mlxlm")
    assert json.loads((tmp_path / "mlxlm" / ADAPTER_CONFIG).read_text())["fine_tune_type"] == "dora"
    names = mx.load(str(tmp_path / "mlxlm" / ADAPTER_WEIGHTS))
    assert "model.layers.1.self_attn.q_proj.m" in names and not any(k.endswith("magnitude") for k in names)
    model, _ = load(str(llama), adapter_path=str(tmp_path / "mlxlm"))
    # the same float32 operations in the same order; the tolerance only allows for summation order
    np.testing.assert_allclose(mlx_logits(model, TOKENS), mlx_logits(ours.model, TOKENS), atol=1e-5, rtol=0)
    assert_round_trip(tmp_path / "ours", "mlx-lm", tmp_path / "trip")


def test_dora_adapter_made_by_mlx_lm_loads_as_is(llama, tmp_path):
    params = {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.down_proj"]}
    theirs = _mlxlm_adapter(llama, tmp_path / "mlxlm", 2, params, dora=True)
    base = load_for_inference(None, str(tmp_path / "mlxlm"))
    assert read_adapter(tmp_path / "mlxlm")[0].lora.dora
    np.testing.assert_allclose(mlx_logits(base.model, TOKENS), mlx_logits(theirs, TOKENS), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_adapter_trained_by_mlx_lm_lora_loads_as_is(llama, tiny_data, tmp_path):
    out = tmp_path / "mlxlm"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "lora",
            "--model",
            str(llama),
            "--train",
            "--data",
            str(tiny_data),
            "--iters",
            "3",
            "--batch-size",
            "2",
            "--num-layers",
            "2",
            "--learning-rate",
            "1e-2",
            "--adapter-path",
            str(out),
            "--val-batches",
            "1",
            "--steps-per-eval",
            "100",
        ],
        check=True,
        capture_output=True,
    )
    theirs, _ = load(str(llama), adapter_path=str(out))
    base = load_for_inference(None, str(out))
    assert np.array_equal(mlx_logits(base.model, TOKENS), mlx_logits(theirs, TOKENS))
    untouched, _ = load(str(llama))
    assert np.abs(mlx_logits(theirs, TOKENS) - mlx_logits(untouched, TOKENS)).max() > 1e-3  # training moved B


def test_block_count_only_where_the_adapter_says_it():
    from dataclasses import replace

    from mlx_lora.formats.mlxlm import block_count
    from mlx_lora.formats.native import from_modules

    paths = lambda *blocks: [f"model.layers.{b}.self_attn.q_proj" for b in blocks]  # noqa: E731
    mlx_lm_made = from_modules(paths(6, 7), 8, 16.0, 0.0, "base", num_layers=4)  # wraps 4..7; 4, 5 got no tensors
    assert block_count(mlx_lm_made) == 10  # 6 + 4: mlx-lm wrapped the last 4 from block 6
    peft_made = from_modules(paths(0, 5, 7), 8, 16.0, 0.0, "base")  # explicit blocks: the top is unknown
    assert peft_made.lora.layers == "0,5,7" and block_count(peft_made) is None
    ours = replace(mlx_lm_made, base_fingerprint="f", lora=replace(mlx_lm_made.lora, num_layers=16))
    assert block_count(ours) == 8  # trained by mlx-lora on the last blocks: the top one is adapted
