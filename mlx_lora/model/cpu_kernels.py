"""What MLX's CPU backend computes slowly, computed another way when a model runs on the CPU.

Measured on a 2-core x86 machine (bench/RESULTS.md, "Where an epoch-1 step goes"):
- MLX's CPU `exp` runs at ~80 M values/s, so SiLU and softmax cost more than a block's matmuls.
  `fast_exp` (Cody-Waite range reduction and a degree-7 polynomial, compiled into one loop) is 4x
  faster and closer to float64's exp than MLX's own (1e-7 against 9e-7 relative error);
  `swiglu` and `attention` are built on it and stand in for mlx-lm's in the model's own modules
  (`use_cpu_kernels`, which a command asks for); the training loss takes `cross_entropy`.
- MLX's CPU quantized matmul is a plain loop, 20-50x slower than OpenBLAS sgemm at training
  shapes, while de-quantizing costs one pass over the weight. So a quantized layer given at least
  MIN_ROWS rows de-quantizes its weight just for that matmul: the weight stays quantized in
  memory and the float copy lives only as long as the matmul (or its backward pass) needs it.
  Fewer rows, as in decoding a token at a time, keep the quantized kernel, which reads 4-8x
  fewer bytes and wins there.
Results equal MLX's kernels up to fp32 rounding (tests/model/test_cpu_kernels.py).
"""

import os
from functools import cache, partial
from types import CodeType, FunctionType

import mlx.core as mx
import mlx.nn as nn

ENV, OFF = "MLX_LORA_CPU_KERNELS", ("off", "0", "false", "no")  # MLX's own kernels, to compare
MIN_ROWS = 8  # below this the quantized kernel wins
CE_CHUNK_VALUES = 2**18  # logits the loss exponentiates at once: their temporaries stay in the CPU caches
_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 split so that n * _LN2_HI is exact
_EXP_TAYLOR = (1.0, 1.0, 1 / 2, 1 / 6, 1 / 24, 1 / 120, 1 / 720, 1 / 5040)  # |r| <= ln2/2: error < 1e-7


@mx.compile  # not shapeless: the final view needs its shape
def _exp(x: mx.array) -> mx.array:
    x = mx.clip(x, -87.0, 88.0)  # float32's range; below it the result is ~1e-38 rather than 0
    n = mx.floor(x * _LOG2E + 0.5)
    r = x - n * _LN2_HI - n * _LN2_LO
    p = _EXP_TAYLOR[-1]
    for c in reversed(_EXP_TAYLOR[:-1]):
        p = p * r + c
    return p * mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)  # p * 2**n


@mx.custom_function
def fast_exp(x: mx.array) -> mx.array:
    """exp(x), computed in float32 and returned in x's type."""
    return _exp(x.astype(mx.float32)).astype(x.dtype)


@fast_exp.vjp
def _fast_exp_vjp(primals, cotangent, output):
    return cotangent * output


def wanted() -> bool:
    """True when MLX computes on the CPU and MLX_LORA_CPU_KERNELS does not turn these kernels off."""
    return mx.default_device() == mx.cpu and os.environ.get(ENV, "").strip().lower() not in OFF


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's swiglu: silu(gate) * x."""
    return gate / (1 + fast_exp(-gate)) * x


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """nn.losses.cross_entropy without reduction. On the CPU it runs on fast_exp a few rows at a
    time, with a backward pass of its own: MLX fuses at most 11 steps into one loop, so fast_exp
    leaves temporaries the size of its input, and on a whole (rows, vocabulary) array those set a
    step's peak (64 rows of a 49k vocabulary: 797 against 710 MB in a training step)."""
    if not wanted():
        return nn.losses.cross_entropy(logits, targets)
    return _chunked_ce(logits, targets)[0]


def _row_chunks(n: int, vocab: int) -> list[tuple[int, int]]:
    rows = max(1, CE_CHUNK_VALUES // vocab)
    return [(i, min(n, i + rows)) for i in range(0, n, rows)]


@mx.custom_function
def _chunked_ce(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(cross-entropy, each row's largest logit, its sum of exp(logit - largest)), over the rows."""
    flat = logits.reshape(-1, logits.shape[-1])
    tops, sums = [], []
    for a, b in _row_chunks(flat.shape[0], flat.shape[1]):
        rows = mx.depends(flat[a:b], sums[-1:])  # one piece after the other: their temporaries never coexist
        tops.append(rows.max(axis=-1))  # any shift gives the same value
        sums.append(fast_exp(rows - tops[-1][:, None]).sum(axis=-1))
    top, total = mx.concatenate(tops), mx.concatenate(sums)
    lse = (mx.log(total) + top).reshape(targets.shape)
    return lse - mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1), top, total


@_chunked_ce.vjp
def _chunked_ce_vjp(primals, cotangents, outputs):
    """d ce / d logits = softmax - one-hot, a few rows at a time; the softmax as exp(x - top) / sum,
    the forward's own terms (exp(x - lse) would carry lse's rounding into every value)."""
    logits, targets = primals
    flat, top, total = logits.reshape(-1, logits.shape[-1]), outputs[1][:, None], outputs[2][:, None]
    hot, grad = targets.reshape(-1, 1), cotangents[0].reshape(-1, 1)
    vocab = mx.arange(flat.shape[1])
    parts = []
    for a, b in _row_chunks(flat.shape[0], flat.shape[1]):
        rows = mx.depends(flat[a:b], parts[-1:])
        g = grad[a:b]
        parts.append(fast_exp(rows - top[a:b]) * (g / total[a:b]) - (vocab == hot[a:b]) * g)
    return mx.concatenate(parts).reshape(logits.shape), mx.zeros_like(targets)


def attention(queries, keys, values, cache, scale: float, mask, sinks=None, fallback=None):
    """mlx-lm's scaled_dot_product_attention: queries (B, H, Tq, D), keys and values (B, KV, Tk, D).
    The H/KV query heads that share a key head go through one matmul, and the softmax is taken in
    float32 with fast_exp. Quantized KV caches and attention sinks go to mlx-lm's own (`fallback`)."""
    if hasattr(cache, "bits") or sinks is not None:
        return fallback(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
    b, h, tq, d = queries.shape
    kv, tk = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(b, kv, h // kv * tq, d)
    scores = (q @ keys.swapaxes(-1, -2)).reshape(b, kv, h // kv, tq, tk).astype(mx.float32)
    scores = _masked(scores, mask)
    scores = fast_exp(scores - mx.stop_gradient(scores.max(axis=-1, keepdims=True)))
    probs = (scores / scores.sum(axis=-1, keepdims=True)).astype(values.dtype)
    return (probs.reshape(b, kv, h // kv * tq, tk) @ values).reshape(b, h, tq, d)


def _masked(scores: mx.array, mask) -> mx.array:
    """scores (B, KV, G, Tq, Tk) with `mask` applied: "causal" (the last Tq of Tk positions), a
    boolean (True = attend) or additive array broadcasting to (B, H, Tq, Tk), or None."""
    _, kv, g, tq, tk = scores.shape
    if mask is None:
        return scores
    if isinstance(mask, str):
        mask = mx.arange(tq)[:, None] + (tk - tq) >= mx.arange(tk)[None]
    if mask.ndim > 2:  # (B or 1, H or 1, Tq, Tk): split H into (KV, G) like the scores
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        heads = (kv, g) if mask.shape[1] > 1 else (1, 1)
        mask = mask.reshape(mask.shape[0], *heads, tq, tk)
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.finfo(mx.float32).min)
    return scores + mask.astype(mx.float32)


def dequantized(layer: nn.Module) -> mx.array:
    """The weight of a plain or quantized linear or embedding as the floats it stands for, (out, in)."""
    if "scales" not in layer:
        return layer.weight
    args = (layer["weight"], layer["scales"], layer.get("biases"))
    if layer.mode == "affine" and layer.bits in (2, 4, 8) and args[2] is not None:
        return _dequantize(*args, layer.group_size, layer.bits)
    return mx.dequantize(*args, group_size=layer.group_size, bits=layer.bits, mode=layer.mode)


@mx.compile  # traced per shape: the reshapes read it
def _dequantize(w: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int) -> mx.array:
    """mx.dequantize for affine 2/4/8-bit weights as one compiled loop: the same values, computed
    ~1.7x faster on the CPU (a 49k x 576 head: 87 against 152 ms)."""
    out, packed = w.shape
    codes = (w[..., None] >> mx.arange(0, 32, bits, dtype=mx.uint32)) & ((1 << bits) - 1)  # (out, packed, 32/bits)
    codes = codes.reshape(out, -1, group_size).astype(scales.dtype)
    return (codes * scales[..., None] + biases[..., None]).reshape(out, -1)


def _rows(x: mx.array) -> int:
    return x.size // x.shape[-1]


class CPUQuantizedLinear(nn.QuantizedLinear):
    def __call__(self, x: mx.array) -> mx.array:
        if _rows(x) < MIN_ROWS:
            return super().__call__(x)
        y = x @ dequantized(self).T
        return y + self["bias"] if "bias" in self else y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    def as_linear(self, x: mx.array) -> mx.array:
        """The tied output projection: the whole vocabulary against every row."""
        if _rows(x) < MIN_ROWS:
            return super().as_linear(x)
        return x @ dequantized(self).T


_CPU_CLASSES = {nn.QuantizedLinear: CPUQuantizedLinear, nn.QuantizedEmbedding: CPUQuantizedEmbedding}
KERNELS = ("swiglu", "scaled_dot_product_attention")  # the globals mlx-lm's model code calls them by


def _names(code: CodeType) -> set[str]:
    return set(code.co_names).union(*(_names(c) for c in code.co_consts if isinstance(c, CodeType)))


def _on_our_kernels(fn: FunctionType) -> FunctionType:
    """`fn`'s code over a copy of its module's globals in which swiglu and attention are ours: the
    module itself, and every other model of the process, keep mlx-lm's."""
    names = dict(fn.__globals__)
    if "swiglu" in names:
        names["swiglu"] = swiglu
    own = names.get("scaled_dot_product_attention")
    if own is not None:
        names["scaled_dot_product_attention"] = partial(attention, fallback=own)
    ours = FunctionType(fn.__code__, names, fn.__name__, fn.__defaults__, fn.__closure__)
    ours.__kwdefaults__, ours.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return ours


@cache
def _cpu_class(cls: type) -> type | None:
    """`cls` with every method that calls its module's swiglu or attention calling ours instead;
    None if it has none. A subclass, so isinstance checks and the class name are unchanged."""
    if cls in _CPU_CLASSES.values() or getattr(cls, "on_cpu_kernels", False):
        return None
    methods = {}
    for owner in reversed(cls.__mro__[: cls.__mro__.index(nn.Module)]):  # a subclass's own method wins
        for name, fn in vars(owner).items():
            if isinstance(fn, FunctionType) and _names(fn.__code__) & set(KERNELS) & set(fn.__globals__):
                methods[name] = _on_our_kernels(fn)
    return type(cls.__name__, (cls,), {**methods, "on_cpu_kernels": True}) if methods else None


def use_cpu_kernels(model: nn.Module, quantized: bool = True) -> bool:
    """When MLX computes on the CPU, give `model` the kernels above (the GPU's own are fast); True if
    it did. Swaps the class of the model's own module instances, as packing.py does: nothing in
    mlx-lm changes, other models keep its kernels, and `use_mlx_kernels` undoes it. Quantized
    layers keep their arrays, so saving, fusing and LoRA wrapping see the same layers;
    `quantized=False` leaves them on MLX's quantized kernel."""
    if not wanted():
        return False
    for _, module in model.named_modules():
        ours = (_CPU_CLASSES.get(type(module)) if quantized else None) or _cpu_class(type(module))
        if ours is not None:
            module.__class__ = ours
    return True


def use_mlx_kernels(model: nn.Module) -> None:
    """Undo `use_cpu_kernels`: every module of `model` back on its mlx-lm or MLX class."""
    for _, module in model.named_modules():
        if type(module) in _CPU_CLASSES.values() or "on_cpu_kernels" in vars(type(module)):
            module.__class__ = type(module).__bases__[0]
