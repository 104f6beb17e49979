"""The CPU kernels equal MLX's own up to fp32 rounding, and stand in only where they should."""

import sys
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import EPS, fp32_tol
from mlx.utils import tree_flatten
from mlx_lm.models import activations
from mlx_lm.models.base import scaled_dot_product_attention as mlx_attention

from mlx_lora.config import LoRAConfig
from mlx_lora.model import cpu_kernels, kernel_choice
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import (
    attention,
    cross_entropy,
    fast_exp,
    swiglu,
    use_cpu_kernels,
    use_mlx_kernels,
)
from mlx_lora.model.lora import apply_lora


def test_fast_exp_is_as_close_to_float64_as_mlx_exp():
    x = mx.concatenate([mx.linspace(-87, 88, 200_001), mx.random.normal((10_000,)) * 3])
    exact = np.exp(np.array(x, np.float64))
    ours = np.abs(np.array(fast_exp(x), np.float64) - exact) / exact
    theirs = np.abs(np.array(mx.exp(x), np.float64) - exact) / exact
    # The 8-term polynomial (Estrin's scheme) rounds ~8 times, each <= EPS/2 relative to values
    # near 1, and the reduction r = x - n*ln2 once more; the 7th-degree truncation on |r| <= ln2/2
    # adds < 2e-9. MLX's own exp is off by up to ~1e-6 here.
    assert ours.max() < 4 * EPS and ours.max() <= theirs.max()
    grad = mx.grad(lambda v: (fast_exp(v) * 3).sum())(x[:100])
    assert mx.allclose(grad, 3 * fast_exp(x[:100]), rtol=EPS).item()


def _qkv(tq: int, tk: int):
    mx.random.seed(1)
    return mx.random.normal((2, 9, tq, 64)), mx.random.normal((2, 3, tk, 64)), mx.random.normal((2, 3, tk, 64))


def _masks(t: int) -> dict:
    mx.random.seed(2)
    eye = mx.eye(t, dtype=mx.bool_)
    return {
        "causal": "causal",
        "none": None,
        "bool per batch": (mx.random.uniform(shape=(2, 1, t, t)) > 0.3) | eye,
        "bool per head": (mx.random.uniform(shape=(2, 9, t, t)) > 0.3) | eye,
        "additive": mx.random.normal((t, t)),
    }


def _grad_q(fn, q, k, v, mask) -> mx.array:
    return mx.grad(lambda q: (fn(q, k, v, None, 0.125, mask) ** 2).sum())(q)


@pytest.mark.parametrize("mask", list(_masks(1)))
def test_attention_equals_mlx_lm_with_every_kind_of_mask(mask):
    q, k, v = _qkv(17, 17)
    m = _masks(17)[mask]
    want = mlx_attention(q, k, v, None, 0.125, m)
    # softmax over 17 keys, then sums over 17 values and 64 dims: each in its own order
    assert mx.abs(attention(q, k, v, None, 0.125, m) - want).max() <= fp32_tol(64 + 17) * mx.abs(want).max()
    ours, theirs = _grad_q(attention, q, k, v, m), _grad_q(mlx_attention, q, k, v, m)
    assert mx.abs(ours - theirs).max() <= fp32_tol(2 * (64 + 17)) * mx.abs(theirs).max()


def test_causal_attention_of_new_queries_over_a_longer_cache():
    q, k, v = _qkv(3, 12)  # generation: the last 3 positions of 12
    want = mlx_attention(q, k, v, None, 0.125, "causal")
    assert mx.abs(attention(q, k, v, None, 0.125, "causal") - want).max() <= fp32_tol(64 + 12) * mx.abs(want).max()


def test_swiglu_equals_silu_times_x_with_gradients():
    gate, x = mx.random.normal((4, 33, 100)) * 5, mx.random.normal((4, 33, 100))
    assert mx.allclose(swiglu(gate, x), nn.silu(gate) * x, rtol=8 * EPS, atol=8 * EPS).item()
    loss = lambda f: lambda g, v: (f(g, v) ** 2).sum()  # noqa: E731
    ours = mx.grad(loss(swiglu), argnums=(0, 1))(gate, x)  # the custom backward, for both inputs
    theirs = mx.grad(loss(lambda g, v: nn.silu(g) * v), argnums=(0, 1))(gate, x)
    for a, b in zip(ours, theirs):
        assert mx.allclose(a, b, rtol=32 * EPS, atol=32 * EPS * mx.abs(b).max().item()).item()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_layers_dequantize_only_for_enough_rows(bits, monkeypatch):
    layer = nn.QuantizedLinear.from_linear(nn.Linear(256, 96, bias=True), group_size=32, bits=bits)
    kernel, calls = mx.quantized_matmul, []
    monkeypatch.setattr(mx, "quantized_matmul", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
    assert use_cpu_kernels(nn.Sequential(layer)) and type(layer) is cpu_kernels.CPUQuantizedLinear
    for rows in (1, cpu_kernels.MIN_ROWS):
        x = mx.random.normal((rows, 256))
        want = kernel(x, layer.weight, layer.scales, layer.biases, group_size=32, bits=bits) + layer.bias
        assert mx.abs(layer(x) - want).max() <= fp32_tol(256) * mx.abs(want).max()
    assert calls == [(1, 256)]  # one row kept the quantized kernel, MIN_ROWS rows did not


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_weights_equal_the_quantized_kernel_and_stay_out_of_the_parameters(bits, monkeypatch):
    """A decoding command's layers hold their weights de-quantized: every row count goes through
    them (no quantized_matmul, no de-quantizing per call), the parameters the adapter, saving and
    fusing see are the quantized arrays alone, and use_mlx_kernels lets the copies go."""
    linear = nn.QuantizedLinear.from_linear(nn.Linear(256, 96, bias=True), group_size=32, bits=bits)
    embed = nn.QuantizedEmbedding.from_embedding(nn.Embedding(96, 256), group_size=32, bits=bits)
    model = nn.Sequential(linear, embed)
    before = sorted(k for k, _ in tree_flatten(model.parameters()))
    assert use_cpu_kernels(model, decoding=True)
    assert sorted(k for k, _ in tree_flatten(model.parameters())) == before
    kernel, calls = mx.quantized_matmul, []
    monkeypatch.setattr(mx, "quantized_matmul", lambda *a, **k: calls.append(a[0].shape) or kernel(*a, **k))
    monkeypatch.setattr(cpu_kernels, "_dequantize", lambda *a: pytest.fail("de-quantized per call"))
    for rows in (1, 3, cpu_kernels.MIN_ROWS):
        x = mx.random.normal((rows, 256))
        for got, q in ((linear(x) - linear.bias, linear), (embed.as_linear(x), embed)):
            want = kernel(x, q.weight, q.scales, q.biases, group_size=32, bits=bits)
            assert mx.abs(got - want).max() <= fp32_tol(256) * mx.abs(want).max()
    assert calls == []  # `want` calls the kernel itself, not through the patch
    use_mlx_kernels(model)
    assert type(linear) is nn.QuantizedLinear and "dequantized" not in vars(linear) and "dequantized" not in vars(embed)


@pytest.mark.parametrize("quantized,decoding", [(False, False), (True, False), (True, True)])
def test_a_model_on_the_cpu_kernels_equals_it_on_mlx_kernels(llama, quantized, decoding):
    """Logits and LoRA gradients of a whole model (plain, 4-bit, 4-bit with its weights kept
    de-quantized for decoding) against the same model with mlx-lm's swiglu and attention and MLX's
    quantized layers put back (use_mlx_kernels)."""
    model = load_base(str(llama)).model
    if quantized:
        nn.quantize(model, group_size=32, bits=4)
    assert use_cpu_kernels(model, decoding=decoding)
    assert all(("dequantized" in vars(m)) == decoding for m in cpu_kernels._quantized(model))
    mlp, attn = model.layers[0].mlp, model.layers[0].self_attn
    assert type(mlp).__call__.__globals__["swiglu"].func is swiglu
    assert type(attn).__call__.__globals__["scaled_dot_product_attention"].func is attention
    apply_lora(model, LoRAConfig(targets="q_proj,v_proj", num_layers=2, rank=4, alpha=8))
    tokens = mx.array([[1, 5, 9, 14, 3, 7, 22, 8, 4, 11, 19, 2]])

    def outputs():
        loss = lambda m: nn.losses.cross_entropy(m(tokens[:, :-1]), tokens[:, 1:]).mean()  # noqa: E731
        return model(tokens), tree_flatten(nn.value_and_grad(model, loss)(model)[1])

    ours = outputs()
    cpu_classes = (cpu_kernels.CPUQuantizedLinear, cpu_kernels.CPUQuantizedEmbedding)
    swapped = [m for _, m in model.named_modules() if isinstance(m, cpu_classes)]
    assert len(swapped) == (7 * len(model.layers) + 2 if quantized else 0)  # every linear, embedding, head
    use_mlx_kernels(model)
    assert not any(isinstance(m, cpu_classes) or hasattr(m, "on_cpu_kernels") for _, m in model.named_modules())
    assert type(mlp).__module__ == "mlx_lm.models.llama" and "on_cpu_kernels" not in vars(type(mlp))
    theirs = outputs()
    tol = fp32_tol(64 * 8)  # sums of 64 terms (the hidden size) through ~8 matmuls in a row
    assert mx.abs(ours[0] - theirs[0]).max() <= tol * mx.abs(theirs[0]).max()
    for (name, g), (_, h) in zip(ours[1], theirs[1]):
        assert mx.abs(g - h).max() <= tol * mx.abs(h).max(), name


def _on_mlx_lm_kernels(model: nn.Module) -> bool:
    """Every module of `model` is of mlx-lm's or MLX's own class, and mlx-lm's modules hold their own functions."""
    source = sys.modules[type(model.layers[0].mlp).__module__]
    return (
        all(type(m).__module__.startswith(("mlx_lm.", "mlx.nn.")) for _, m in model.named_modules())
        and source.swiglu is activations.swiglu
        and source.scaled_dot_product_attention is mlx_attention
    )


def test_loading_a_model_without_asking_leaves_mlx_lm_alone(llama):
    """load_base gives mlx-lm's model as it is, even after another model of the process took our kernels."""
    first = load_base(str(llama)).model
    assert _on_mlx_lm_kernels(first)
    nn.quantize(first, group_size=32, bits=4)
    assert use_cpu_kernels(first) and not _on_mlx_lm_kernels(first)
    second = load_base(str(llama)).model
    assert _on_mlx_lm_kernels(second)


@pytest.mark.parametrize("where", ["gpu", "env"])
def test_other_devices_and_the_off_switch_keep_mlx_kernels(where, monkeypatch):
    if where == "gpu":
        monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    else:
        monkeypatch.setenv(kernel_choice.ENV, "off")
    layer = nn.QuantizedLinear.from_linear(nn.Linear(64, 32), group_size=32, bits=4)
    assert not use_cpu_kernels(nn.Sequential(layer)) and type(layer) is nn.QuantizedLinear
    if where == "env":  # the loss too is MLX's own, bit for bit
        logits, targets = mx.random.normal((8, 100)), mx.random.randint(0, 100, (8,))
        assert mx.array_equal(cross_entropy(logits, targets), nn.losses.cross_entropy(logits, targets)).item()


@pytest.mark.parametrize("kept_values, kept", [(8 * 300, True), (8 * 300 - 1, False)])
def test_the_loss_keeps_its_exponentials_only_up_to_kept_values(kept_values, kept, monkeypatch):
    """More logits than KEPT_VALUES are exponentiated again in the backward pass: the kept copy is
    one more array their size."""
    monkeypatch.setattr(cpu_kernels, "_loss", [True])
    monkeypatch.setattr(cpu_kernels, "KEPT_VALUES", kept_values)
    calls = []
    for name in ("_kept_ce", "_chunked_ce"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    cross_entropy(mx.random.normal((8, 300)), mx.random.randint(0, 300, (8,)), keep_exps=True)
    assert calls == ["_kept_ce" if kept else "_chunked_ce"]


@pytest.mark.parametrize("keep_exps", [False, True])
@pytest.mark.parametrize("rows", [(64,), (3, 37)])  # 52 rows a piece: 52 + 12, and 52 + 52 + 7 over a batch
def test_cross_entropy_equals_mlx_with_gradients(rows, keep_exps, monkeypatch):
    assert cpu_kernels.CE_CHUNK_VALUES // 5000 == 52
    monkeypatch.setattr(cpu_kernels, "_loss", [True])  # as a model put on every kernel leaves it
    logits, targets = mx.random.normal((*rows, 5000)) * 4, mx.random.randint(0, 5000, rows)
    ce = partial(cross_entropy, keep_exps=keep_exps)
    want = nn.losses.cross_entropy(logits, targets)
    # log-sum-exp over 5000 terms summed in another order: fp32_tol(5000) of its size
    assert mx.abs(ce(logits, targets) - want).max() <= fp32_tol(5000) * mx.abs(want).max()
    weights = mx.random.uniform(shape=rows)  # each row's own cotangent, as a mask and a mean give
    for grad in (mx.grad, lambda f: mx.compile(mx.grad(f))):  # the step that keeps them is compiled
        ours, theirs = (
            grad(lambda x, f=f: (f(x, targets) * weights).sum())(logits) for f in (ce, nn.losses.cross_entropy)
        )
        assert mx.abs(ours - theirs).max() <= fp32_tol(5000) * mx.abs(theirs).max()
