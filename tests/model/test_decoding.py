"""One stream's decoding step on decoding.py's classes equals it on MLX's own up to fp32 rounding."""

import threading

import mlx.core as mx
import mlx.nn as nn
import pytest
from conftest import EPS, fp32_tol
from mlx.utils import tree_unflatten
from mlx_lm.models.cache import make_prompt_cache

from mlx_lora.config import LoRAConfig
from mlx_lora.model import decoder, decoding, kernel_choice
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import use_cpu_kernels, use_mlx_kernels
from mlx_lora.model.lora import apply_lora


@pytest.mark.parametrize("dims,base,scale", [(64, 10000.0, 1.0), (32, 500000.0, 0.25)])  # 32: a partial rotary
@pytest.mark.parametrize("offset", [0, 7, 4095, 4096, 9000])  # 4096 on: the table grows
def test_rope_from_the_table_equals_mlx_rope(dims, base, scale, offset):
    """The table holds the cos and sin MLX's fallback computes from the same float32 theta; cos and
    sin taken over a table row or one position may still round apart by an ulp each (a vector loop
    or a scalar one), so each output, x1 cos - x2 sin, may be off by ~2 ulps of |x1| + |x2|."""
    x = mx.random.normal((1, 9, 1, 64))
    want = nn.RoPE(dims, base=base, scale=scale)(x, offset=offset)
    got = decoding.DecodingRoPE(dims, base=base, scale=scale)(x, offset=offset)
    assert mx.abs(got - want).max().item() <= 4 * EPS * mx.abs(x).max().item()
    assert mx.array_equal(got[..., dims:], x[..., dims:]).item()  # past dims, as it was


def test_rms_norm_compiled_equals_mlx():
    """At a scale where eps (1e-5) is a tenth of the mean square, so eps counts."""
    x, norm = mx.random.normal((1, 1, 576)) * 1e-2, nn.RMSNorm(576)
    norm.weight = mx.random.normal((576,))
    got, want = decoding.DecodingRMSNorm.__call__(norm, x), norm(x)
    assert mx.abs(got - want).max().item() <= fp32_tol(576) * mx.abs(want).max().item()


@pytest.mark.parametrize("matvec,split", [(True, False), (False, True), (True, True)])
def test_a_one_row_product_equals_x_times_w_transposed(matvec, split):
    """Sums of 576 products in another order (W @ x, or chunks over two streams): each output within
    576 EPS of the sum of its products' magnitudes, the bound on any order of the sum. The weight is
    just over SPLIT_VALUES, so its last chunk is a short one; the product is also computed on another
    thread, as serve's engine computes it."""
    weight = mx.random.normal((decoding.SPLIT_VALUES // 576 + 37, 576))
    x = mx.random.normal((1, 1, 576))
    mx.eval(weight, x)  # arrays a thread is handed are evaluated, as a loaded model's weights are
    want, bound = x @ weight.T, fp32_tol(576) * (mx.abs(x) @ mx.abs(weight).T)
    got = [decoding.row_product(x, weight, matvec, split)]
    thread = threading.Thread(target=lambda: got.append(mx.eval(decoding.row_product(x, weight, matvec, split)) or 0))
    thread.start()
    thread.join()
    assert got[0].shape == want.shape and len(got) == 2
    assert mx.all(mx.abs(got[0] - want) <= bound).item()


def test_a_decoding_step_on_our_classes_equals_mlx(llama, monkeypatch):
    """A 4-bit llama with LoRA: its logits for one new token after a prompt, with every decoding
    kernel taken (on), against the same model put back on MLX's classes; the prompt's logits (more
    than one row) go through MLX's code in both. The model's RoPE, RMSNorm and products are ours:
    decoder.py, which would run a llama's one-row steps, is kept off, as for the layouts it does not
    read and for serve's batch of one row."""
    monkeypatch.setenv(kernel_choice.ENV, "on")
    monkeypatch.setattr(decoder, "supports", lambda model: False)
    model = load_base(str(llama)).model
    nn.quantize(model, group_size=32, bits=4, class_predicate=lambda p, m: isinstance(m, nn.Linear))
    apply_lora(model, LoRAConfig(targets="q_proj,v_proj", num_layers=2, rank=4, alpha=8))
    lora_b = [
        (f"{n}.lora_b", mx.random.normal(m.lora_b.shape) * 0.1) for n, m in model.named_modules() if "lora_b" in m
    ]
    assert len(lora_b) == 4
    model.update(tree_unflatten(lora_b))  # a trained adapter's, so the LoRA product adds something
    prompt, token = mx.array([[1, 5, 9, 14, 3, 7, 22, 8]]), mx.array([[11]])

    def step() -> mx.array:
        cache = make_prompt_cache(model)
        model(prompt, cache=cache)
        return model(token, cache=cache)

    assert use_cpu_kernels(model, decoding=True)
    modules = [m for _, m in model.named_modules()]
    assert {type(m) for m in modules if isinstance(m, (nn.RoPE, nn.RMSNorm))} == {
        decoding.DecodingRoPE,
        decoding.DecodingRMSNorm,
    }
    products = [m for m in modules if isinstance(m, (nn.Linear, nn.QuantizedLinear, nn.Embedding))]
    assert len(products) == 7 * len(model.layers) + 2 and all(type(m).matvec and type(m).split for m in products)
    ours = step()
    use_mlx_kernels(model)
    assert all(
        type(m).__module__.startswith(("mlx_lm.", "mlx.nn.", "mlx_lora.model.lora")) for _, m in model.named_modules()
    )
    theirs = step()
    tol = fp32_tol(64 * 8)  # sums of 64 terms (the hidden size) through ~8 matmuls in a row
    assert mx.abs(ours - theirs).max().item() <= tol * mx.abs(theirs).max().item()
