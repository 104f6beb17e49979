import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_lora.config import LoRAConfig
from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import dequantized
from mlx_lora.model.lora import (
    LoRALinear,
    adapter_off,
    apply_lora,
    fuse_lora,
    lora_layers,
    remove_lora,
    select_targets,
)


def _randomize_b(model):
    for layer in lora_layers(model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("quantized", [False, True])
def test_wrapped_layer_equals_base_at_init(quantized, dora):
    mx.random.seed(0)
    base = nn.Linear(64, 32, bias=True)
    if quantized:
        base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=4)
    x = mx.random.normal((2, 5, 64))
    wrapped = LoRALinear(base, rank=4, scale=2.0, dora=dora)
    assert wrapped.lora_a.shape == (64, 4) and wrapped.lora_b.shape == (4, 32)
    assert mx.all(wrapped.lora_b == 0).item()
    if dora:  # m starts at the row norms of W, so m / ||W + 0|| = 1
        assert mx.array_equal(wrapped.magnitude, mx.linalg.norm(dequantized(base), axis=1))
        assert mx.allclose(wrapped(x), base(x), atol=1e-5)
    else:
        assert mx.array_equal(wrapped(x), base(x))


def test_forward_is_base_plus_scaled_low_rank_product():
    mx.random.seed(1)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, rank=2, scale=3.0)
    layer.lora_b = mx.random.normal((2, 8))
    x = mx.random.normal((3, 16))
    expected = base(x) + 3.0 * (x @ layer.lora_a @ layer.lora_b)
    assert mx.allclose(layer(x), expected, atol=1e-5)
    assert mx.allclose(layer.delta(), 3.0 * (layer.lora_a @ layer.lora_b).T)


@pytest.mark.parametrize("quantized", [False, True])
def test_fused_layer_reproduces_wrapped_layer(quantized):
    mx.random.seed(2)
    base = nn.Linear(64, 64)
    if quantized:
        base = nn.QuantizedLinear.from_linear(base, group_size=32, bits=8)
    layer = LoRALinear(base, rank=4, scale=2.0)
    layer.lora_b = mx.random.normal((4, 64)) * 0.1
    x = mx.random.normal((2, 64))
    fused = layer.fuse()
    assert type(fused) is nn.Linear
    assert mx.allclose(fused(x), layer(x), atol=1e-4)
    if quantized:
        assert isinstance(layer.fuse(requantize=True), nn.QuantizedLinear)


def test_only_lora_weights_train(llama):
    base = load_base(str(llama))
    paths = apply_lora(base.model, LoRAConfig(targets="q_proj,v_proj", num_layers=2))
    trainable = [k for k, _ in tree_flatten(base.model.trainable_parameters())]
    assert sorted(trainable) == sorted(f"{p}.{k}" for p in paths for k in ("lora_a", "lora_b"))
    assert len(paths) == 4


def test_fused_model_reproduces_adapter_logits_and_unload_restores_base(llama):
    base = load_base(str(llama))
    tokens = mx.array([[1, 40, 41, 42, 43, 44]])
    before = base.model(tokens)
    apply_lora(base.model, LoRAConfig(targets="all-linear", num_layers=-1))
    assert mx.array_equal(base.model(tokens), before)  # B = 0: unchanged at step 0
    _randomize_b(base.model)
    adapted = base.model(tokens)
    assert not mx.allclose(adapted, before, atol=1e-3)
    remove_lora(base.model)
    assert mx.array_equal(base.model(tokens), before)


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_off_is_the_base_and_switches_back_on(llama, dora):
    """The reference of preference tuning: a trained adapter (and DoRA's trained magnitude) switched
    off gives the base's logits bit for bit, without a second copy of the model."""
    base = load_base(str(llama))
    tokens = mx.array([[1, 40, 41, 42, 43, 44]])
    before = base.model(tokens)
    apply_lora(base.model, LoRAConfig(targets="all-linear", num_layers=-1, dora=dora))
    _randomize_b(base.model)
    for layer in lora_layers(base.model).values():
        if dora:
            layer.magnitude = layer.magnitude * 1.5
    adapted = base.model(tokens)
    assert not mx.allclose(adapted, before, atol=1e-3)
    with adapter_off(base.model):
        assert mx.array_equal(base.model(tokens), before)
    assert mx.array_equal(base.model(tokens), adapted)


def test_fuse_lora_on_whole_model(llama):
    base = load_base(str(llama))
    tokens = mx.array([[1, 40, 41, 42]])
    apply_lora(base.model, LoRAConfig(targets="q_proj,v_proj,down_proj", num_layers=-1))
    _randomize_b(base.model)
    adapted = base.model(tokens)
    fuse_lora(base.model)
    assert not lora_layers(base.model)
    assert mx.allclose(base.model(tokens), adapted, atol=1e-4)


@pytest.mark.parametrize(
    "targets, num_layers, layers, expected",
    [
        ("q_proj,v_proj", 2, None, {f"model.layers.{i}.self_attn.{m}" for i in (2, 3) for m in ("q_proj", "v_proj")}),
        ("self_attn.o_proj", -1, None, {f"model.layers.{i}.self_attn.o_proj" for i in range(4)}),
        (
            r".*layers\.[13]\.mlp\.(gate|up)_proj",
            -1,
            None,
            {f"model.layers.{i}.mlp.{m}" for i in (1, 3) for m in ("gate_proj", "up_proj")},
        ),
        (
            "all-linear",
            1,
            None,
            {
                f"model.layers.3.{m}"
                for m in (
                    "self_attn.q_proj",
                    "self_attn.k_proj",
                    "self_attn.v_proj",
                    "self_attn.o_proj",
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                )
            },
        ),
        ("k_proj", 16, "0,2", {"model.layers.0.self_attn.k_proj", "model.layers.2.self_attn.k_proj"}),
    ],
)
def test_target_selection(llama, targets, num_layers, layers, expected):
    base = load_base(str(llama))
    cfg = LoRAConfig(targets=targets, num_layers=num_layers, layers=layers)
    assert set(select_targets(base.model, cfg)) == expected


def test_unknown_target_lists_the_modules_the_model_has(llama):
    base = load_base(str(llama))
    with pytest.raises(UserError) as e:
        select_targets(base.model, LoRAConfig(targets="q_proj,query"))
    message = str(e.value)
    assert "'query'" in message and "self_attn.q_proj" in message and "mlp.down_proj" in message


def test_bad_layers_and_rank_are_user_errors(llama):
    base = load_base(str(llama))
    with pytest.raises(UserError, match="blocks 0..3"):
        select_targets(base.model, LoRAConfig(layers="1,9"))
    with pytest.raises(UserError, match="rank 100 is larger"):
        apply_lora(base.model, LoRAConfig(rank=100))
