"""One stream's decoding step outside MLX (decoder.py, decode_kernels.py) equals MLX's own up to
fp32 rounding, and generation through it prints the same text."""

import mlx.core as mx
import mlx.nn as nn
import numba
import numpy as np
import pytest
from conftest import EPS, fp32_tol, make_hf_model
from mlx.utils import tree_unflatten
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from mlx_lora.config import LoRAConfig
from mlx_lora.model import decode_kernels, decoder, kernel_choice
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import use_cpu_kernels, use_mlx_kernels
from mlx_lora.model.lora import adapter_off, apply_lora

PROMPT = [1, 5, 9, 14, 3, 7, 22, 8]
STEPS = [11, 4, 30, 2, 17, 9]  # the tokens fed one at a time after the prompt
# Logits come out of 4 blocks, each ~8 sums of up to 128 terms in a row (the MLP's width), summed
# in other orders than MLX's: as test_decoding's step, fp32_tol of the terms times the sums.
TOL = fp32_tol(128 * 8 * 4)


@pytest.fixture(scope="module")
def archs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("decoder-models")
    return {arch: make_hf_model(root / arch, arch) for arch in ("llama", "qwen2", "qwen3", "llama3", "mistral")}


def _model(path, bits: int | None, lora: bool) -> nn.Module:
    model = load_base(str(path)).model
    if bits:
        nn.quantize(model, group_size=64 if bits == 8 else 32, bits=bits)  # embedding and head too (tied or not)
    if lora:
        apply_lora(model, LoRAConfig(targets="q_proj,v_proj,down_proj", num_layers=2, rank=4, alpha=8))
        trained = [
            (f"{n}.lora_b", mx.random.normal(m.lora_b.shape) * 0.1) for n, m in model.named_modules() if "lora_b" in m
        ]
        model.update(tree_unflatten(trained))  # a trained adapter's B, so the adapter adds something
    model.eval()
    return model


def _steps(model: nn.Module) -> list[mx.array]:
    """Logits of the prompt's last position, then of each of STEPS fed one at a time."""
    cache = make_prompt_cache(model)
    out = [model(mx.array([PROMPT]), cache=cache)[0, -1]]
    out += [model(mx.array([[t]]), cache=cache)[0, -1] for t in STEPS]
    mx.eval(out)
    return out


def _close(ours: list[mx.array], theirs: list[mx.array]) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert mx.abs(a - b).max().item() <= TOL * mx.abs(b).max().item()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "llama3", "mistral"])
@pytest.mark.parametrize("bits", [None, 4, 8, 5])
def test_the_decoder_equals_mlx_step_by_step(archs, arch, bits, monkeypatch):
    """Float32, 4-bit (groups of 32) and 8-bit (groups of 64) weights, 5-bit ones through the
    de-quantized copies cpu_kernels keeps (a GGUF's Q5_K), a LoRA adapter on three products;
    Qwen2's biases, Qwen3's query and key norms and head_dim, Llama 3's rope scaling and untied
    heads. The decoder must run every step after the prompt, and MLX's classes none of them."""
    model = _model(archs[arch], bits, lora=True)
    assert use_cpu_kernels(model, decoding=True)
    calls, original = [], decoder.Decoder.step
    monkeypatch.setattr(decoder.Decoder, "step", lambda self, token: calls.append(token) or original(self, token))
    ours = _steps(model)
    assert calls == STEPS
    use_mlx_kernels(model)
    assert type(model).__module__.startswith("mlx_lm.")
    _close(ours, _steps(model))


@pytest.mark.parametrize("stored", [mx.float16, mx.bfloat16])
def test_a_half_base_reads_its_half_weights(tmp_path, stored, monkeypatch):
    """A float16 or bfloat16 base (saved so by transformers) computes in float32 on the CPU
    (precision.py); one row's products and a batch's read each weight's half-precision copy (the
    same floats in half the bytes), and the steps equal MLX's on its float32 arrays. Where the
    copies would not fit their share of memory, or one weight is no such cast, or a training run
    (GRPO's) decodes, every product reads float32."""
    path = make_hf_model(tmp_path / "half", "qwen2", dtype=str(stored).split(".")[-1])
    base = load_base(str(path), compute="auto")
    assert base.precision.stored == stored and base.precision.compute == mx.float32
    model = base.model
    model.eval()
    half = "f16" if stored == mx.float16 else "bf16"
    calls = []
    for name in (f"matvec_{half}", f"matmul_{half}"):
        loop = getattr(decode_kernels, name)
        monkeypatch.setattr(decode_kernels, name, lambda *a, name=name, loop=loop: calls.append(name) or loop(*a))
    use_cpu_kernels(model, decoding=True)  # which runs each loop once on tiny arrays (decode_kernels.load)
    calls.clear()
    ours = _steps(model)
    kept = decoder._current(model)
    products = [kept.head] + [p for b in kept.blocks for p in (b.q, b.k, b.v, b.o, b.gate, b.up, b.down)]
    assert all(p.half is not None for p in products)
    assert calls == [f"matvec_{half}"] * len(STEPS) * len(products)  # every product of every step after the prompt
    for p in products:
        assert np.array_equal(_widened(p.half[0], stored), p.weight[0])
    calls.clear()
    ours_batch = _batch_steps(model, 5, padded=False)
    assert calls == [f"matmul_{half}"] * len(STEPS) * len(products)
    use_mlx_kernels(model)
    _close(ours, _steps(model))
    _close(ours_batch, _batch_steps(model, 5, padded=False))

    assert not any(decoder.HELD in vars(m) for _, m in model.named_modules())  # use_mlx_kernels dropped them
    use_cpu_kernels(model, training=True, decoding=True)  # GRPO's run: the decoder, and no copies
    assert decoder._current(model) is not None
    assert not any(decoder.HELD in vars(m) for _, m in model.named_modules())
    use_mlx_kernels(model)

    monkeypatch.undo()
    monkeypatch.setattr(decoder, "HALF_SHARE", products[0].weight[0].size * 2 / decoder.available_bytes())
    assert decoder.keep_halves(model) == ""  # more than their share
    monkeypatch.undo()
    down = model.model.layers[-1].mlp.down_proj
    down.weight = down.weight + 1e-3  # no longer a half's values
    assert decoder.keep_halves(model) == ""
    assert not any(decoder.HELD in vars(m) for _, m in model.named_modules())


def _widened(bits: np.ndarray, stored) -> np.ndarray:
    """Half-precision bits as float32, by numpy."""
    if stored == mx.float16:
        return bits.view(np.float16).astype(np.float32)
    return (bits.astype(np.uint32) << 16).view(np.float32)


@pytest.mark.parametrize("brain", [False, True])
def test_a_half_product_equals_the_float32_product(brain):
    """matvec_f16/bf16 over 13 rows of 64 inputs: the weight widened exactly, each output within
    fp32_tol(64) of Σ |w| |x| of the float64 product."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((13, 64)).astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16) if brain else w.astype(np.float16).view(np.uint16)
    dense = _widened(bits, mx.bfloat16 if brain else mx.float16)
    x = rng.standard_normal(64).astype(np.float32)
    out = np.empty(13, np.float32)
    (decode_kernels.matvec_bf16 if brain else decode_kernels.matvec_f16)(bits, x, out)
    bound = fp32_tol(64) * (np.abs(dense) @ np.abs(x))
    assert np.all(np.abs(out - dense.astype(np.float64) @ x.astype(np.float64)) <= bound)


@pytest.mark.parametrize("brain", [False, True])
@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_a_half_batch_product_is_the_float32_batch_product(brain, chunks):
    """matmul_f16/bf16 widen four rows at a time into the buffer matmul's tile reads in place: over
    13 weight rows (the last block overlapping) and 6 rows of x, every output is the float matmul
    gives on the widened weight, bit for bit, however many shares the blocks are cut into (8:
    more than the blocks)."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((13, 64)).astype(np.float32)
    bits = (w.view(np.uint32) >> 16).astype(np.uint16) if brain else w.astype(np.float16).view(np.uint16)
    x = rng.standard_normal((6, 64)).astype(np.float32)
    half, dense = np.full((6, 13), np.nan, np.float32), np.full((6, 13), np.nan, np.float32)
    (decode_kernels.matmul_bf16 if brain else decode_kernels.matmul_f16)(bits, x, half, chunks)
    decode_kernels.matmul(_widened(bits, mx.bfloat16 if brain else mx.float16), x, dense, 1)
    assert np.array_equal(half, dense)


def _batch_steps(model: nn.Module, rows: int, padded: bool) -> list[mx.array]:
    """Logits of each step of `rows` rows fed one token each after their prompts: over a KV cache of
    `rows` rows (one prompt), or over mlx-lm's BatchKVCache (prompts of different lengths, left
    padded, as eval and serve batch them; after two steps the batch loses its unpadded rows, as when
    they end, and the cache drops the slots every row left pads: a strided view of its buffers)."""
    if padded:
        prompts = [PROMPT[: len(PROMPT) - i % 4] for i in range(rows)]
        width = max(map(len, prompts))
        cache = [BatchKVCache([width - len(p) for p in prompts]) for _ in model.layers]
        model(mx.array([[0] * (width - len(p)) + p for p in prompts]), cache=cache)
    else:
        cache = make_prompt_cache(model)
        model(mx.array([PROMPT] * rows), cache=cache)
    out = []
    for n, t in enumerate(STEPS):
        if padded and n == 2:
            kept = [r for r in range(rows) if r % 4]  # rows 0 and 4 had the whole PROMPT
            for c in cache:
                c.filter(kept)
            assert not np.asarray(cache[0].keys).flags.c_contiguous
            rows = len(kept)
        out.append(model(mx.array([[(t + r) % 50] for r in range(rows)]), cache=cache)[:, -1])
        mx.eval(out[-1])
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("rows,padded", [(5, False), (2, False), (3, False), (7, True)])
def test_a_batch_through_the_decoder_equals_mlx(archs, arch, bits, rows, padded, monkeypatch):
    """Several rows a step (eval's, serve's and GRPO's batches): 5 rows (one past a multiple of the
    products' four), 2 and 3 (padded to four with copies of the last row), 7 left-padded rows in a
    batch cache that then drops its two unpadded ones; every step through the decoder, with an
    adapter, against MLX's own."""
    model = _model(archs[arch], bits, lora=True)
    use_cpu_kernels(model, decoding=True)
    calls, original = [], decoder.Decoder.batch
    monkeypatch.setattr(decoder.Decoder, "batch", lambda self, *a: calls.append(len(a[0])) or original(self, *a))
    ours = _batch_steps(model, rows, padded)
    assert calls == [len(o) for o in ours]
    use_mlx_kernels(model)
    _close(ours, _batch_steps(model, rows, padded))


def test_mlx_after_the_decoder_sees_every_position(archs):
    """Steps decoded outside MLX are written into MLX's cache before MLX runs on it again: a
    two-token call after three decoded steps gives the logits of the same positions run all in MLX."""
    model = _model(archs["llama"], 4, lora=False)
    use_cpu_kernels(model, decoding=True)

    def run(waiting: int) -> mx.array:
        cache = make_prompt_cache(model)
        model(mx.array([PROMPT]), cache=cache)
        for t in STEPS[:3]:
            model(mx.array([[t]]), cache=cache)
        assert cache[0].offset == len(PROMPT) + 3 - waiting  # positions the decoder holds, until:
        return model(mx.array([STEPS[3:5]]), cache=cache)[0]

    ours = run(waiting=3)
    assert model.__dict__[decoder.KEPT][1] is not None
    use_mlx_kernels(model)
    theirs = run(waiting=0)
    assert mx.abs(ours - theirs).max().item() <= TOL * mx.abs(theirs).max().item()


def test_a_batch_past_the_caches_first_256_slots_then_mlx(archs, monkeypatch):
    """A batch's new keys and values go into MLX's cache at the end of each step, also the steps
    that grow it past its first 256 slots; MLX then runs a two-token call on that cache: every
    logit equals the run all in MLX."""
    model = _model(archs["llama"], 4, lora=False)
    prompt = [(7 * i) % 50 for i in range(253)]

    def run() -> list[mx.array]:
        cache = make_prompt_cache(model)
        model(mx.array([prompt] * 4), cache=cache)
        out = [model(mx.array([[(t + r) % 50] for r in range(4)]), cache=cache)[:, -1] for t in STEPS]
        assert cache[0].offset == 253 + len(STEPS) and cache[0].keys.shape[2] == 512
        out.append(model(mx.array([STEPS[:2]] * 4), cache=cache)[:, -1])
        mx.eval(out)
        return out

    use_cpu_kernels(model, decoding=True)
    calls, original = [], decoder.Decoder.batch
    monkeypatch.setattr(decoder.Decoder, "batch", lambda self, *a: calls.append(len(a[0])) or original(self, *a))
    ours = run()
    assert calls == [4] * len(STEPS)
    use_mlx_kernels(model)
    _close(ours, run())


def test_an_adapter_turned_off_or_changed_gets_a_new_decoder(archs):
    """The decoder reads the model's arrays once; a model changed between generations (its adapter
    off, as preference evaluation does, or other weights) is read again."""
    model = _model(archs["qwen2"], None, lora=True)
    use_cpu_kernels(model, decoding=True)
    with_adapter = _steps(model)
    with adapter_off(model):
        base = _steps(model)
    assert mx.abs(with_adapter[-1] - base[-1]).max().item() > 1e-3  # the adapter changed them
    use_mlx_kernels(model)
    with adapter_off(model):
        _close(base, _steps(model))
    _close(with_adapter, _steps(model))


def test_what_the_decoder_does_not_read_runs_on_mlx(archs):
    """A DoRA adapter: the model keeps MLX's forward for every step (the same numbers as MLX's), and
    the decoder is not built; Gemma, a layout it does not read, keeps its own class."""
    model = load_base(str(archs["llama"])).model
    apply_lora(model, LoRAConfig(targets="q_proj,v_proj", num_layers=2, rank=4, alpha=8, dora=True))
    use_cpu_kernels(model, decoding=True)
    ours = _steps(model)
    assert model.__dict__[decoder.KEPT][1] is None
    use_mlx_kernels(model)
    _close(ours, _steps(model))
    assert not decoder.supports(load_base(str(make_hf_model(archs["llama"].parent / "gemma", "gemma"))).model)


def test_cpu_kernels_off_keeps_mlx_decoding(archs, monkeypatch):
    monkeypatch.setenv(kernel_choice.ENV, "off")
    model = _model(archs["llama"], None, lora=False)
    assert not use_cpu_kernels(model, decoding=True)
    assert type(model).__module__ == "mlx_lm.models.llama"


def test_generation_through_the_decoder_prints_the_same_text(smollm2_gguf):
    """The real SmolLM2-135M-Instruct Q4_1 file, greedy, 48 tokens: the same tokens through the
    decoder as through MLX's own forward (the issue's 'generate output unchanged')."""
    base = load_base(str(smollm2_gguf), compute="auto")
    text = base.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a short poem about the sea."}], tokenize=False, add_generation_prompt=True
    )
    tokens = base.tokenizer.encode(text, add_special_tokens=False)

    def generate() -> list[int]:
        steps = stream_generate(base.model, base.tokenizer, tokens, max_tokens=48, sampler=make_sampler(temp=0.0))
        return [r.token for r in steps]

    use_cpu_kernels(base.model, decoding=True)
    ours = generate()
    kept = base.model.__dict__[decoder.KEPT][1]
    assert kept is not None
    assert kept.blocks[0].q.weight[1].dtype == np.uint16  # Q4_1's float16 scales read narrowed, and the embedding
    use_mlx_kernels(base.model)
    assert ours == generate()


def _quantized(rows: int, size: int, group: int, bits: int):
    w = mx.random.normal((rows, size))
    packed, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    dense = mx.dequantize(packed, scales, biases, group_size=group, bits=bits)
    return [np.asarray(a) for a in (packed, scales, biases, dense)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_a_quantized_product_equals_the_dequantized_weight_times_x(bits, group):
    """13 rows (not a multiple of four) of 256 inputs: each output within fp32_tol(256) of the sum
    of its terms' magnitudes, s·|q|·|x| + |b|·|x|, the bound on any order of those sums."""
    packed, scales, biases, dense = _quantized(13, 256, group, bits)
    x = np.random.default_rng(0).standard_normal(256).astype(np.float32)
    out = np.empty(13, np.float32)
    kernel = decode_kernels.matvec_q4 if bits == 4 else decode_kernels.matvec_q8
    kernel(packed.view(np.uint8), scales, biases, x, out)
    b = np.repeat(biases, group, 1)
    bound = fp32_tol(256) * ((np.abs(dense - b) + np.abs(b)) @ np.abs(x))  # |s q| + |b| per term
    assert np.all(np.abs(out - dense.astype(np.float64) @ x) <= bound)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group,chunks", [(32, 1), (64, 3), (128, 8)])
def test_a_batchs_quantized_product_equals_the_dequantized_weight_times_x(bits, group, chunks):
    """matmul_q4/q8 over 13 weight rows of 256 inputs and 6 rows of x, their four blocks in 1, 3
    (uneven) or 8 shares (more than the blocks): the weight de-quantized exactly as MLX's (s · q + b,
    one float32 rounding), then summed in some order, so each output is within fp32_tol(256) of
    Σ |w| |x|."""
    packed, scales, biases, dense = _quantized(13, 256, group, bits)
    x = np.random.default_rng(3).standard_normal((6, 256)).astype(np.float32)
    out = np.empty((6, 13), np.float32)
    kernel = decode_kernels.matmul_q4 if bits == 4 else decode_kernels.matmul_q8
    kernel(packed.view(np.uint8), scales, biases, x, out, chunks)
    bound = fp32_tol(256) * (np.abs(x) @ np.abs(dense).T)
    assert np.all(np.abs(out - x.astype(np.float64) @ dense.T.astype(np.float64)) <= bound)


@pytest.mark.parametrize("bits", [4, 8])
def test_scales_narrowed_to_float16_give_the_same_products(bits):
    """Scales and biases that float16 holds exactly (a GGUF's) are read as float16's bits: the same
    numbers into the same loops, one row or a batch. Each output is within fp32 rounding of the
    other's, not always the same float: numba's cached machine code for one of the two loops and a
    fresh compile of the other were seen to sum an ulp apart (bench/RESULTS.md), so the bound is
    fp32_tol(256) of Σ |terms|; a scale read wrongly (another group's, or float16's bits taken as an
    integer) moves outputs by far more. Where one value needs float32, both stay float32."""
    packed, scales, biases, dense = _quantized(13, 256, 32, bits)
    scales, biases = (a.astype(np.float16).astype(np.float32) for a in (scales, biases))
    half = decoder._narrowed(scales, biases)
    assert [a.dtype for a in half] == [np.uint16] * 2
    assert all(np.array_equal(_widened(h, mx.float16), a) for h, a in zip(half, (scales, biases)))
    x = np.random.default_rng(4).standard_normal((6, 256)).astype(np.float32)
    one_row, batch = decoder.KERNELS[bits]
    terms = np.abs(x) @ (np.abs(dense) + np.abs(np.repeat(biases, 32, axis=1))).T  # (6, 13)
    for kernel, xs, bound, chunks in ((one_row, x[0], terms[0], ()), (batch, x, terms, (2,))):
        wide, narrow = np.empty(bound.shape, np.float32), np.empty(bound.shape, np.float32)
        kernel(packed.view(np.uint8), scales, biases, xs, wide, *chunks)
        kernel(packed.view(np.uint8), *half, xs, narrow, *chunks)
        assert np.all(np.abs(wide - narrow) <= fp32_tol(256) * bound)
    scales[3, 0] += scales[3, 0] * 2**-20  # a float32 that no float16 holds
    assert [a.dtype for a in decoder._narrowed(scales, biases)] == [np.float32] * 2


@pytest.mark.parametrize("k", [320, 300])  # 512-bit sums (a multiple of 16), and numba's loop
@pytest.mark.parametrize("rows,chunks", [(4, 1), (6, 3), (16, 8)])
def test_a_batchs_float_product_equals_x_times_w(k, rows, chunks):
    """matmul over 13 weight rows (not a multiple of four: the last block overlaps) and `rows` rows of
    x (6: the last four overlap), its four blocks in 1, 3 or 8 shares, every output within
    fp32_tol(k) of Σ |w| |x|."""
    w = np.random.default_rng(1).standard_normal((13, k)).astype(np.float32)
    x = np.random.default_rng(2).standard_normal((rows, k)).astype(np.float32)
    out = np.full((rows, 13), np.nan, np.float32)
    decode_kernels.matmul(w, x, out, chunks)
    bound = fp32_tol(k) * (np.abs(x) @ np.abs(w).T)
    assert np.all(np.abs(out - x.astype(np.float64) @ w.T.astype(np.float64)) <= bound)


@pytest.mark.parametrize("features, wide", [("+avx2,+fma,-avx512f", False), ("+avx2,+avx512f,+fma", True), ("", False)])
def test_the_512_bit_tile_is_taken_only_where_numba_compiles_for_avx512(features, wide, monkeypatch):
    """NUMBA_CPU_FEATURES (here set as numba reads it) decides, not the machine: in AVX2's 16
    registers 16 sums of the tile would spill, so it keeps 8 of 256 bits there."""
    monkeypatch.setattr(numba.core.config, "CPU_FEATURES", features)
    assert decode_kernels._compiles_for_avx512() is wide


def test_a_float_product_equals_w_times_x():
    w = np.random.default_rng(1).standard_normal((13, 300)).astype(np.float32)
    x = np.random.default_rng(2).standard_normal(300).astype(np.float32)
    out = np.empty(13, np.float32)
    decode_kernels.matvec(w, x, out)
    assert np.all(np.abs(out - w.astype(np.float64) @ x) <= fp32_tol(300) * (np.abs(w) @ np.abs(x)))


def test_exp_matches_float64_and_never_returns_a_subnormal():
    """The loops' exp (SwiGLU, attention's softmax): within 4 float32 epsilons of float64's exp over
    float32's normal range, exactly 0 below EXP_LOW (a subnormal costs Intel cores a microcode
    assist on every later operation), the largest input clamped to a finite number."""
    x = np.concatenate([np.linspace(-200, 100, 30001), [-87.0, -86.99, 0.0, 1e-9, -1e-9]]).astype(np.float32)
    out, bits = x.copy(), np.empty(len(x), np.int32)
    decode_kernels._exp(out, bits, len(x))
    want = np.exp(x.astype(np.float64))
    normal = (x >= decode_kernels.EXP_LOW) & (x <= decode_kernels.EXP_HIGH)
    assert np.all(np.abs(out[normal] - want[normal]) <= 4 * EPS * want[normal])
    assert np.all(out[x < decode_kernels.EXP_LOW] == 0.0)
    assert np.all((out == 0) | (out >= np.finfo(np.float32).tiny)) and np.all(np.isfinite(out))


def test_swiglu_equals_silu_times_up():
    gate = np.linspace(-100, 100, 3001).astype(np.float32)  # several of its spans, the last one short
    up = np.random.default_rng(3).standard_normal(3001).astype(np.float32)
    out = np.empty_like(gate)
    decode_kernels.swiglu(gate, up, out)
    g = gate.astype(np.float64)
    want = g / (1 + np.exp(-g)) * up
    assert np.all(np.abs(out - want) <= 8 * EPS * np.abs(want) + 1e-35)
