"""QLoRA: LoRA and DoRA on 2-, 3-, 4-, 5-, 6- and 8-bit MLX-quantized bases, and how fuse treats them."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.convert import convert

from mlx_lora.commands.fuse import fuse
from mlx_lora.config import FuseConfig, LoRAConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import load_adapter
from mlx_lora.formats.native import describe, save_adapter
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import dequantized
from mlx_lora.model.lora import LoRALinear, apply_lora, linear_dims, lora_layers

BITS = (2, 3, 4, 5, 6, 8)


@pytest.fixture(scope="session")
def quantized(llama, tmp_path_factory) -> dict:
    """The llama test model quantized by mlx-lm itself at every bit width."""
    root = tmp_path_factory.mktemp("quantized")
    for bits in BITS:
        convert(str(llama), str(root / f"q{bits}"), quantize=True, q_bits=bits, q_group_size=32)
    return {bits: root / f"q{bits}" for bits in BITS}


@pytest.mark.parametrize("bits", BITS)
def test_dims_dora_and_fuse_are_right_at_every_bit_width(bits):
    # 96 inputs: 3/5/6-bit pack 96 values into 9/15/18 words, where 32 // bits * words would say 90.
    mx.random.seed(bits)
    base = nn.QuantizedLinear.from_linear(nn.Linear(96, 40, bias=True), group_size=32, bits=bits)
    assert linear_dims(base) == (40, 96)
    layer = LoRALinear(base, rank=4, scale=2.0, dora=True)
    assert layer.lora_a.shape == (96, 4) and layer.lora_b.shape == (4, 40)
    assert mx.array_equal(layer.magnitude, mx.linalg.norm(dequantized(base), axis=1))
    x = mx.random.normal((2, 3, 96))
    assert mx.allclose(layer(x), base(x), atol=1e-5)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    layer.magnitude = layer.magnitude * 1.2
    expected = x @ layer.merged_weight().T + base.bias
    assert mx.allclose(layer(x), expected, atol=1e-4)
    fused = layer.fuse()
    assert type(fused) is nn.Linear and mx.allclose(fused(x), expected, atol=1e-4)
    requantized = layer.fuse(requantize=True)
    assert isinstance(requantized, nn.QuantizedLinear) and requantized.bits == bits
    assert linear_dims(requantized) == (40, 96)


@pytest.mark.parametrize("bits", BITS)
def test_fuse_merges_in_full_precision_and_requantizes_only_when_asked(quantized, bits, tmp_path):
    mx.random.seed(bits)
    base = load_base(str(quantized[bits]))
    cfg = LoRAConfig(targets="q_proj,v_proj,down_proj", num_layers=2, rank=4, dora=bits % 2 == 1)
    modules = apply_lora(base.model, cfg)
    assert all(
        isinstance(l.linear, nn.QuantizedLinear) and l.linear.bits == bits for l in lora_layers(base.model).values()
    )
    for layer in lora_layers(base.model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.3
    save_adapter(tmp_path / "adapter", base.model, describe(base, cfg, modules))

    plain = fuse(
        FuseConfig(adapter_path=str(tmp_path / "adapter"), save_path=str(tmp_path / "plain")), log=lambda s: None
    )
    assert "quantization" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert not any(k.endswith(".scales") for k in mx.load(str(tmp_path / "plain" / "model.safetensors")))
    assert plain.max_logit_diff < 1e-3 and plain.effect_kept is None

    said = []
    requantized = fuse(
        FuseConfig(adapter_path=str(tmp_path / "adapter"), save_path=str(tmp_path / "requantized"), requantize=True),
        log=said.append,
    )
    config = json.loads((tmp_path / "requantized" / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    assert requantized.max_logit_diff > plain.max_logit_diff  # re-quantizing costs something, and we say how much
    assert any(
        f"re-quantizing to {bits}-bit changed the logits by up to {requantized.max_logit_diff:.2e}" in s for s in said
    )


def test_requantize_needs_a_quantized_base(llama, tmp_path):
    base = load_base(str(llama))
    cfg = LoRAConfig(num_layers=1)
    save_adapter(tmp_path / "adapter", base.model, describe(base, cfg, apply_lora(base.model, cfg)))
    with pytest.raises(UserError, match="not quantized; there is nothing to re-quantize"):
        fuse(FuseConfig(adapter_path=str(tmp_path / "adapter"), save_path=str(tmp_path / "out"), requantize=True))
    assert not (tmp_path / "out").exists()


def test_olora_and_pissa_refuse_a_quantized_base(quantized):
    with pytest.raises(UserError, match="--init pissa rewrites the base weights"):
        apply_lora(load_base(str(quantized[4])).model, LoRAConfig(init="pissa"))


def test_qlora_adapter_reloads_on_its_quantized_base(quantized, tmp_path):
    base = load_base(str(quantized[3]))
    cfg = LoRAConfig(targets="all-linear", num_layers=1, dora=True)
    modules = apply_lora(base.model, cfg)
    for layer in lora_layers(base.model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    save_adapter(tmp_path, base.model, describe(base, cfg, modules))
    reloaded = load_base(str(quantized[3]))
    load_adapter(reloaded, tmp_path)
    tokens = mx.array([[1, 40, 41, 42]])
    assert mx.array_equal(reloaded.model(tokens), base.model(tokens))


@pytest.mark.slow
def test_qlora_training_through_the_cli(quantized, tiny_data, tmp_path):
    from typer.testing import CliRunner

    from mlx_lora.cli import app

    out = tmp_path / "adapters"
    runner = CliRunner()
    trained = runner.invoke(
        app,
        [
            "train",
            "--model",
            str(quantized[3]),
            "--data",
            str(tiny_data),
            "--adapter-path",
            str(out),
            "--dora",
            "--iters",
            "3",
            "--batch-size",
            "2",
            "--val-batches",
            "1",
            "--save-every",
            "0",
            "--num-layers",
            "2",
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert "LoRA DoRA r=8" in trained.output
    weights = mx.load(str(out / "adapters.safetensors"))
    assert weights["model.layers.3.self_attn.q_proj.lora_a"].shape == (64, 8)  # 3-bit: 64 inputs, not 60
    assert weights["model.layers.3.self_attn.q_proj.magnitude"].shape == (64,)
    fused = runner.invoke(app, ["fuse", "--adapter-path", str(out), "--save-path", str(tmp_path / "q"), "--requantize"])
    assert fused.exit_code == 0 and "re-quantizing to 3-bit changed the logits by up to" in fused.output, fused.output
