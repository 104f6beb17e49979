"""A CPU kernel is used only where this machine measured it faster than MLX's own, the measurement is
kept per machine, and the run says what it chose. Timings are injected where the decision is under
test (a test must not depend on which kernel this CPU runs faster); one test times for real."""

import json
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import fp32_tol
from mlx_lm.models import activations

from mlx_lora.machine import cpu, platform_cache
from mlx_lora.model import cpu_kernels, kernel_choice
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import EXP_LOW, choose_kernels, cross_entropy, fast_exp, use_cpu_kernels
from mlx_lora.model.kernel_choice import CACHE_FILE, Candidate, choose


@pytest.fixture
def auto(monkeypatch):
    monkeypatch.setenv(kernel_choice.ENV, "auto")


def _timings(monkeypatch, slower: set[str]) -> list[str]:
    """Make every measurement say ours takes 1 ms, or 3 ms for the kernels in `slower`, against MLX's 2."""
    timed = []

    def fake(candidate, training):
        name = next(n for n, c in _current.items() if c is candidate)
        timed.append(name)
        return (3.0 if name in slower else 1.0), 2.0

    _current: dict = {}
    real = kernel_choice.choose

    def choose(candidates, shapes, training):
        _current.clear()
        _current.update(candidates)
        return real(candidates, shapes, training)

    monkeypatch.setattr(kernel_choice, "_time", fake)
    monkeypatch.setattr(kernel_choice, "choose", choose)
    return timed


def _on_our(model, kernel: str) -> bool:
    mlp, attn = model.layers[0].mlp, model.layers[0].self_attn
    return hasattr({"swiglu": mlp, "attention": attn}[kernel], "on_cpu_kernels")


@pytest.mark.parametrize("slower", [{"attention"}, {"swiglu", "loss"}, set()])
def test_a_kernel_measured_slower_is_not_used(slower, llama, auto, monkeypatch):
    timed = _timings(monkeypatch, slower)
    model = load_base(str(llama)).model
    lines = []
    assert use_cpu_kernels(model, training=True, log=lines.append)
    assert sorted(timed) == ["attention", "loss", "swiglu"]
    for kernel in ("swiglu", "attention"):
        assert _on_our(model, kernel) == (kernel not in slower)
    ours = []
    chunked = cpu_kernels._chunked_ce
    monkeypatch.setattr(cpu_kernels, "_chunked_ce", lambda *a: ours.append(1) or chunked(*a))
    logits, targets = mx.random.normal((8, 300)) * 4, mx.random.randint(0, 300, (8,))
    loss = cross_entropy(logits, targets)
    assert bool(ours) == ("loss" not in slower)
    want = nn.losses.cross_entropy(logits, targets)  # a log-sum-exp over 300 terms, summed in another order
    assert mx.abs(loss - want).max().item() <= fp32_tol(300) * mx.abs(want).max().item()
    # the run's line names each choice with its timings
    assert lines[0].startswith("CPU kernels (measured on this CPU in ")
    for kernel in ("attention", "loss", "swiglu"):
        who = "MLX's" if kernel in slower else "ours"
        assert f"{kernel} {who} ({3.0 if kernel in slower else 1.0:.2f} against MLX's 2.00 ms)" in lines[0]


def test_the_choice_is_kept_per_machine_and_shape(llama, auto, monkeypatch):
    timed = _timings(monkeypatch, {"attention"})
    model = load_base(str(llama)).model
    first = choose_kernels(model, training=True)
    assert len(timed) == 3
    again = choose_kernels(model, training=True)
    assert len(timed) == 3 and again.kernels == first.kernels == {"swiglu", "loss"}
    assert again.how == "measured before on this CPU"
    kept = json.loads((platform_cache() / CACHE_FILE).read_text())
    (key,) = kept
    assert json.loads(key)["cpu"] == json.loads(json.dumps(cpu())) and json.loads(key)["training"] is True
    choose_kernels(model, training=False)  # inference is timed forward only: a measurement of its own
    assert len(timed) == 6
    real = kernel_choice.version
    monkeypatch.setattr(kernel_choice, "version", lambda p: "9.9" if p == "mlx-lora" else real(p))
    choose_kernels(model, training=True)  # another release of our kernels: measured anew
    assert len(timed) == 9


def test_a_broken_or_unwritable_cache_only_costs_a_measurement(llama, auto, monkeypatch, tmp_path):
    timed = _timings(monkeypatch, set())
    model = load_base(str(llama)).model
    path = platform_cache() / CACHE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert choose_kernels(model).kernels == {"swiglu", "attention", "loss"} and len(timed) == 3
    assert json.loads(path.read_text())  # rewritten whole
    monkeypatch.setenv("MLX_LORA_CACHE", str(tmp_path / "file"))
    (tmp_path / "file").write_text("a file where the directory would be")
    assert choose_kernels(model).kernels == {"swiglu", "attention", "loss"} and len(timed) == 6


@pytest.mark.parametrize("setting", ["on", "off"])
def test_the_environment_forces_all_or_none_without_measuring(setting, llama, monkeypatch):
    monkeypatch.setenv(kernel_choice.ENV, setting)
    timed = _timings(monkeypatch, {"attention", "swiglu", "loss"})
    model = load_base(str(llama)).model
    assert use_cpu_kernels(model) == (setting == "on")
    assert not timed and _on_our(model, "attention") == (setting == "on")


def test_a_real_measurement_tells_a_slow_kernel_from_a_fast_one(auto):
    """Real timings, no injected ones: MLX's own swiglu against itself made 30x the work, both ways round."""
    x = lambda: (mx.random.normal((256, 512)),) * 2  # noqa: E731

    def slow(g, v):
        return sum(activations.swiglu(g + i * 1e-3, v) for i in range(30))

    fast_first = choose({"k": Candidate(activations.swiglu, slow, x)}, {"case": 1}, training=True)
    slow_first = choose({"k": Candidate(slow, activations.swiglu, x)}, {"case": 2}, training=True)
    assert fast_first.kernels == {"k"} and slow_first.kernels == set()


def test_fast_exp_never_gives_a_subnormal():
    """Below float32's normal range exp is 0, as the masked attention scores need: a subnormal
    costs Intel cores a microcode assist on every operation that touches it."""
    x = mx.concatenate([mx.linspace(-1000, 0, 100_001), mx.array([-float("inf"), EXP_LOW, EXP_LOW - 1e-3])])
    out = np.array(fast_exp(x))
    tiny = np.finfo(np.float32).tiny
    assert np.all((out == 0) | (out >= tiny))
    assert np.all(out[np.array(x) < EXP_LOW] == 0) and out[-2] >= tiny
    scores = mx.array([[0.0, mx.finfo(mx.float32).min]])  # a masked score, as attention's mask writes it
    assert fast_exp(scores - scores.max()).tolist() == [[1.0, 0.0]]


def test_model_shapes_read_the_models_arguments(llama):
    model = load_base(str(llama)).model
    a = model.args
    shapes = cpu_kernels.model_shapes(model)
    assert shapes == {
        "hidden": a.hidden_size,
        "intermediate": a.intermediate_size,
        "heads": a.num_attention_heads,
        "kv_heads": a.num_key_value_heads,
        "head_dim": a.hidden_size // a.num_attention_heads,
        "vocab": a.vocab_size,
    }


def _quantized_llama(llama):
    model = load_base(str(llama)).model
    nn.quantize(model, group_size=32, bits=4)
    return model


@pytest.mark.parametrize("slower", [set(), {"dequantized"}])
def test_a_decoding_command_keeps_weights_dequantized_only_where_measured_faster(slower, llama, auto, monkeypatch):
    timed = _timings(monkeypatch, slower)
    model = _quantized_llama(llama)
    lines = []
    assert use_cpu_kernels(model, decoding=True, log=lines.append)
    assert "dequantized" in timed
    held = [vars(m).get("dequantized") for m in cpu_kernels._quantized(model)]
    assert len(held) == 7 * len(model.layers) + 2  # every linear, the embedding, the head
    if slower:
        assert held == [None] * len(held) and "dequantized MLX's (3.00" in lines[0]
    else:
        assert all(h is not None for h in held) and "dequantized ours (1.00" in lines[0]
        assert f"{cpu_kernels.dequantized_bytes(model) / 1e9:.2f} GB of de-quantized weights kept" in lines[0]


def test_dequantized_weights_over_the_memory_share_stay_quantized(llama, auto, monkeypatch):
    _timings(monkeypatch, set())
    model = _quantized_llama(llama)
    cost = cpu_kernels.dequantized_bytes(model)
    monkeypatch.setattr(cpu_kernels, "available_bytes", lambda: int(cost / cpu_kernels.DEQUANTIZED_SHARE) - 1)
    lines = []
    assert use_cpu_kernels(model, decoding=True, log=lines.append)
    assert all("dequantized" not in vars(m) for m in cpu_kernels._quantized(model))
    assert "weights kept quantized: de-quantized they would take" in lines[0]


def test_training_and_other_commands_never_time_or_keep_dequantized_weights(llama, auto, monkeypatch):
    timed = _timings(monkeypatch, set())
    for training in (True, False):
        model = _quantized_llama(llama)
        assert use_cpu_kernels(model, training=training)
        assert not {"dequantized", "decoding attention"} & set(timed)
        assert all("dequantized" not in vars(m) for m in cpu_kernels._quantized(model))


@pytest.mark.parametrize("slower", [set(), {"decoding attention"}, {"decoding swiglu"}])
def test_a_decoding_step_takes_our_kernels_only_where_measured_faster(slower, llama, auto, monkeypatch):
    """Timed apart from a prompt's: one stream's single new position goes to MLX's own attention or
    swiglu where ours measured slower there, while a prompt or a batch of rows keeps ours."""
    timed = _timings(monkeypatch, slower)
    model = load_base(str(llama)).model
    assert use_cpu_kernels(model, decoding=True)
    assert {"attention", "decoding attention", "swiglu", "decoding swiglu"} <= set(timed)
    attn = type(model.layers[0].self_attn).__call__.__globals__["scaled_dot_product_attention"]
    act = type(model.layers[0].mlp).__call__.__globals__["swiglu"]
    assert attn.func is cpu_kernels.attention and act.func is cpu_kernels.swiglu
    assert attn.keywords["one_row"] == ("decoding attention" not in slower)
    assert act.keywords["one_row"] == ("decoding swiglu" not in slower)
    theirs = []
    spy = partial(attn.func, **{**attn.keywords, "fallback": lambda *a, **k: theirs.append(a[0].shape) or a[0]})
    mlx_swiglu = activations.swiglu
    monkeypatch.setattr(cpu_kernels.activations, "swiglu", lambda g, x: theirs.append(g.shape) or mlx_swiglu(g, x))
    for rows, positions in ((1, 1), (1, 5), (3, 1)):
        q, kv = mx.random.normal((rows, 4, positions, 16)), mx.random.normal((rows, 2, 9, 16))
        spy(q, kv, kv, None, 0.25, None if positions == 1 else "causal")
        act(*(mx.random.normal((rows, positions, 32)),) * 2)
    want = [(1, 4, 1, 16)] if "decoding attention" in slower else []
    want += [(1, 1, 32)] if "decoding swiglu" in slower else []
    assert sorted(theirs) == sorted(want)
