"""What MLX's CPU backend computes slowly, computed another way when a model runs on the CPU.

Measured on a 2-core x86 machine (bench/RESULTS.md, "Where an epoch-1 step goes"):
- MLX's CPU `exp` runs at ~80 M values/s, so SiLU and softmax cost more than a block's matmuls.
  `fast_exp` (Cody-Waite range reduction and a degree-7 polynomial, in as few fused loops as MLX
  makes of it) is 6x faster (1.8 against 11.6 ns a value on a Xeon) and closer to float64's exp
  than MLX's own (1.7e-7 against 3.8e-6 relative error);
  `swiglu` and `attention` are built on it and stand in for mlx-lm's in the model's own modules
  (`use_cpu_kernels`, which a command asks for); the training loss takes `cross_entropy`.
- MLX's CPU quantized matmul is a plain loop, 20-50x slower than OpenBLAS sgemm at training
  shapes, while de-quantizing costs one pass over the weight. So a quantized layer given at least
  MIN_ROWS rows de-quantizes its weight just for that matmul: the weight stays quantized in
  memory and the float copy lives only as long as the matmul (or its backward pass) needs it.
  Fewer rows, as in decoding a token at a time, keep the quantized kernel, which reads 4-8x
  fewer bytes, unless the command decodes (`decoding`): then each quantized layer keeps its weight
  de-quantized once beside the quantized arrays, where this CPU measured a one-row matmul on it
  faster than MLX's quantized kernel and the copies fit in a quarter of the machine's memory (on a
  Xeon, SmolLM2-135M in 4 bits decoded 1.4x faster alone and 3.7x faster 4 rows at a time).
Results equal MLX's kernels up to fp32 rounding (tests/model/test_cpu_kernels.py). Which of them
a model gets is measured on the machine at its shapes (model/kernel_choice.py): the exp kernels at
a training batch's shapes, and for a command that decodes, apart, at one stream's decoding step.
"""

from collections.abc import Callable
from functools import cache, partial
from types import CodeType, FunctionType

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import activations
from mlx_lm.models.base import scaled_dot_product_attention as mlx_attention

from mlx_lora.machine import available_bytes
from mlx_lora.model import decoding, kernel_choice
from mlx_lora.model.exp_constants import EXP_HIGH, EXP_LOW, EXP_TAYLOR, LN2_HI, LN2_LO, LOG2E
from mlx_lora.model.kernel_choice import Candidate, Choice

MIN_ROWS = 8  # below this the quantized kernel wins
CE_CHUNK_VALUES = 2**18  # logits the loss exponentiates at once: their temporaries stay in the CPU caches
KEPT_VALUES = 2**24  # the most logits whose exponentials a loss keeps for its backward pass (64 MB)
_ROUND = 12582912.0  # 1.5 * 2**23: adding and subtracting it rounds a float32 to the nearest integer


@mx.compile  # not shapeless: the final view needs its shape
def _exp(x: mx.array) -> mx.array:
    """exp(x) as few fused loops: MLX fuses a chain of at most 11 operations into one loop and runs a
    longer one as several, slower ones (a 7-term Horner chain: 16.7 against 5.7 ms for 3.1M values),
    so the polynomial is evaluated by Estrin's scheme (depth 5), `floor` (a libm call per value) is
    a round by adding 1.5 * 2**23, and below EXP_LOW the exponent bits are 0, which is 0.0."""
    xc = mx.clip(x, EXP_LOW, EXP_HIGH)
    n = (xc * LOG2E + _ROUND) - _ROUND
    r = xc - n * LN2_HI - n * LN2_LO
    c = EXP_TAYLOR
    r2 = r * r
    p = (c[0] + c[1] * r) + r2 * (c[2] + c[3] * r) + r2 * r2 * ((c[4] + c[5] * r) + r2 * (c[6] + c[7] * r))
    bits = mx.left_shift(mx.where(x < EXP_LOW, -127, n.astype(mx.int32)) + 127, 23)
    return p * bits.view(mx.float32)  # p * 2**n


@mx.custom_function
def fast_exp(x: mx.array) -> mx.array:
    """exp(x), computed in float32 and returned in x's type."""
    return _exp(x.astype(mx.float32)).astype(x.dtype)


@fast_exp.vjp
def _fast_exp_vjp(primals, cotangent, output):
    return cotangent * output


def wanted() -> bool:
    """True when MLX computes on the CPU and MLX_LORA_CPU_KERNELS does not turn these kernels off."""
    return mx.default_device() == mx.cpu and kernel_choice.mode() != "off"


_loss = [False]  # whether the last model put on these kernels was given the loss: `cross_entropy` has no model to ask


def swiglu(gate: mx.array, x: mx.array, one_row: bool = True) -> mx.array:
    """mlx-lm's swiglu: silu(gate) * x. A single row (one stream's decoding step) goes to mlx-lm's
    own unless `one_row`: there our few more operations can cost more than a faster exp saves."""
    if gate.size == gate.shape[-1] and not one_row:
        return activations.swiglu(gate, x)
    return gate / (1 + fast_exp(-gate)) * x


def cross_entropy(logits: mx.array, targets: mx.array, keep_exps: bool = False) -> mx.array:
    """nn.losses.cross_entropy without reduction. On the CPU it runs on fast_exp a few rows at a
    time, with a backward pass of its own: MLX fuses at most 11 steps into one loop, so fast_exp
    leaves temporaries the size of its input, and on a whole (rows, vocabulary) array those set a
    step's peak (64 rows of a 49k vocabulary: 797 against 710 MB in a training step). `keep_exps`:
    the forward's exponentials are kept for the backward pass, which then only scales them: one more
    array the size of `logits`, for the few target rows a cut step scores, up to KEPT_VALUES (the
    same floats; that step 5% faster on SmolLM2, bench/RESULTS.md). It does not set a step's peak:
    Gemma 3's 262k vocabulary at 32 target rows (tests/training/test_large_vocab.py) peaked at 228.9
    against 225.7 MB, so the memory estimate leaves it out."""
    if not (wanted() and _loss[0]):
        return nn.losses.cross_entropy(logits, targets)
    return (_kept_ce if keep_exps and logits.size <= KEPT_VALUES else _chunked_ce)(logits, targets)[0]


def _row_chunks(n: int, vocab: int) -> list[tuple[int, int]]:
    rows = max(1, CE_CHUNK_VALUES // vocab)
    return [(i, min(n, i + rows)) for i in range(0, n, rows)]


def _exp_pieces(flat: mx.array, keep: bool) -> tuple[mx.array, mx.array, list[mx.array]]:
    """Each row's largest logit, its sum of exp(logit - largest), and (`keep`) those exponentials,
    a few rows at a time, one piece after the other: their temporaries never coexist."""
    tops, sums, exps = [], [], []
    for a, b in _row_chunks(flat.shape[0], flat.shape[1]):
        rows = mx.depends(flat[a:b], sums[-1:])
        tops.append(rows.max(axis=-1))  # any shift gives the same value
        exps.append(_exp((rows - tops[-1][:, None]).astype(mx.float32)))
        sums.append(exps[-1].sum(axis=-1))
    return mx.concatenate(tops), mx.concatenate(sums), exps if keep else []


def _ce(logits: mx.array, targets: mx.array, top: mx.array, total: mx.array) -> mx.array:
    lse = (mx.log(total) + top).reshape(targets.shape)
    return lse - mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)


@mx.custom_function
def _chunked_ce(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """(cross-entropy, each row's largest logit, its sum of exp(logit - largest)), over the rows."""
    top, total, _ = _exp_pieces(logits.reshape(-1, logits.shape[-1]), keep=False)
    return _ce(logits, targets, top, total), top, total


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


@mx.custom_function
def _kept_ce(logits: mx.array, targets: mx.array) -> tuple[mx.array, ...]:
    """(cross-entropy, each row's sum of exp(logit - largest), those exponentials piece by piece)."""
    top, total, exps = _exp_pieces(logits.reshape(-1, logits.shape[-1]), keep=True)
    return _ce(logits, targets, top, total), total, *exps


@_kept_ce.vjp
def _kept_ce_vjp(primals, cotangents, outputs):
    """_chunked_ce_vjp's softmax - one-hot from the kept exponentials: a scaling, then each row's
    target written apart."""
    logits, targets = primals
    total, exps = outputs[1][:, None], outputs[2:]
    hot, grad = targets.reshape(-1, 1), cotangents[0].reshape(-1, 1)
    scale = grad / total
    rows = _row_chunks(total.shape[0], logits.shape[-1])
    d = mx.concatenate([e * scale[a:b] for e, (a, b) in zip(exps, rows)])
    d = mx.put_along_axis(d, hot, mx.take_along_axis(d, hot, axis=-1) - grad, axis=-1)
    return d.reshape(logits.shape), mx.zeros_like(targets)


def attention(queries, keys, values, cache, scale: float, mask, sinks=None, fallback=None, one_row=True):
    """mlx-lm's scaled_dot_product_attention: queries (B, H, Tq, D), keys and values (B, KV, Tk, D).
    The H/KV query heads that share a key head go through one matmul, and the softmax is taken in
    float32 with fast_exp. Quantized KV caches and attention sinks go to mlx-lm's own (`fallback`),
    and so does one query of one row (a single stream's decoding step) unless `one_row`: MLX's own
    can win there while ours wins over a prompt or a batch (kernel_choice times them apart)."""
    single = queries.shape[0] * queries.shape[2] == 1
    if hasattr(cache, "bits") or sinks is not None or (single and not one_row):
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


class Dequantized:
    """A quantized layer's weight de-quantized once (`keep_dequantized`). Held as a plain attribute, so
    the module's parameters, and with them saving, fusing and LoRA wrapping, still see the quantized
    arrays only."""

    def __init__(self, weight: mx.array):
        self.weight = weight


def _held(layer: nn.Module) -> mx.array | None:
    held = vars(layer).get("dequantized")
    return held.weight if held is not None else None


class CPUQuantizedLinear(nn.QuantizedLinear):
    matvec = split = False  # a held weight's one-row products, as decoding.DecodingLinear's

    def __call__(self, x: mx.array) -> mx.array:
        weight = _held(self)
        if weight is None and _rows(x) < MIN_ROWS:
            return super().__call__(x)
        weight = dequantized(self) if weight is None else weight
        y = decoding.row_product(x, weight, self.matvec, self.split) if decoding.one_row(x) else x @ weight.T
        return y + self["bias"] if "bias" in self else y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    matvec = split = False

    def as_linear(self, x: mx.array) -> mx.array:
        """The tied output projection: the whole vocabulary against every row."""
        weight = _held(self)
        if weight is None and _rows(x) < MIN_ROWS:
            return super().as_linear(x)
        weight = dequantized(self) if weight is None else weight
        return decoding.row_product(x, weight, self.matvec, self.split) if decoding.one_row(x) else x @ weight.T


def _quantized(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))]


def dequantized_bytes(model: nn.Module) -> int:
    """What keeping every quantized layer's weight de-quantized costs, in bytes."""
    return sum(m.scales.shape[0] * m.scales.shape[1] * m.group_size * m.scales.itemsize for m in _quantized(model))


def keep_dequantized(model: nn.Module) -> None:
    """Every quantized layer of `model` (on our classes) holds its weight de-quantized, one layer
    evaluated at a time so the peak is the copies, not their temporaries."""
    for layer in _quantized(model):
        weight = dequantized(layer)
        mx.eval(weight)
        layer.dequantized = Dequantized(weight)


def drop_dequantized(model: nn.Module) -> None:
    for _, module in model.named_modules():
        vars(module).pop("dequantized", None)


_CPU_CLASSES = {nn.QuantizedLinear: CPUQuantizedLinear, nn.QuantizedEmbedding: CPUQuantizedEmbedding}
KERNELS = {"swiglu": "swiglu", "attention": "scaled_dot_product_attention"}  # ours -> the global mlx-lm calls
TOKENS = (4, 64)  # rows x tokens the kernels are timed at: a training batch of short rows
DECODE_CACHE = 256  # cached positions a decoding step's attention is timed over


def _names(code: CodeType) -> set[str]:
    return set(code.co_names).union(*(_names(c) for c in code.co_consts if isinstance(c, CodeType)))


def _on_our_kernels(fn: FunctionType, kernels: frozenset[str]) -> FunctionType:
    """`fn`'s code over a copy of its module's globals in which the chosen `kernels` are ours: the
    module itself, and every other model of the process, keep mlx-lm's."""
    names = dict(fn.__globals__)
    if "swiglu" in kernels and "swiglu" in names:
        names["swiglu"] = partial(swiglu, one_row="decoding swiglu" in kernels)
    own = names.get("scaled_dot_product_attention")
    if "attention" in kernels and own is not None:
        names["scaled_dot_product_attention"] = partial(
            attention, fallback=own, one_row="decoding attention" in kernels
        )
    ours = FunctionType(fn.__code__, names, fn.__name__, fn.__defaults__, fn.__closure__)
    ours.__kwdefaults__, ours.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return ours


def _calls(cls: type) -> dict[str, FunctionType]:
    """The methods of `cls` (and its bases up to nn.Module) that call swiglu or attention by name."""
    methods = {}
    for owner in reversed(cls.__mro__[: cls.__mro__.index(nn.Module)]):  # a subclass's own method wins
        for name, fn in vars(owner).items():
            if isinstance(fn, FunctionType) and _names(fn.__code__) & set(KERNELS.values()) & set(fn.__globals__):
                methods[name] = fn
    return methods


@cache
def _decoding_class(cls: type, kernels: frozenset[str]) -> type | None:
    """`cls` as decoding.py runs one stream's step where this CPU measured that faster; None if MLX's own."""
    matvec, split = "decoding matvec" in kernels, "decoding split" in kernels
    if cls in (nn.Linear, nn.Embedding, *_CPU_CLASSES.values()) and (matvec or split):
        flags = {"matvec": matvec, "split": split, "on_cpu_kernels": True}
        return type(cls.__name__, (decoding.CLASSES.get(cls, cls),), flags)
    if (cls is nn.RoPE and "decoding rope" in kernels) or (cls is nn.RMSNorm and "decoding norm" in kernels):
        return decoding.CLASSES[cls]
    return None


@cache
def _cpu_class(cls: type, kernels: frozenset[str]) -> type | None:
    """`cls` with every method that calls its module's swiglu or attention calling ours instead (those
    of `kernels`); None if it has none. A subclass, so isinstance checks and the class name hold."""
    if cls in _CPU_CLASSES.values() or getattr(cls, "on_cpu_kernels", False):
        return None
    wanted_names = {KERNELS[k] for k in kernels if k in KERNELS}
    methods = {n: _on_our_kernels(fn, kernels) for n, fn in _calls(cls).items() if _names(fn.__code__) & wanted_names}
    return type(cls.__name__, (cls,), {**methods, "on_cpu_kernels": True}) if methods else None


def used_kernels(model: nn.Module) -> set[str]:
    """Which of our exp kernels `model` would call: the loss always, swiglu and attention where its code calls them."""
    names = set().union(*(_names(fn.__code__) for _, m in model.named_modules() for fn in _calls(type(m)).values()))
    return {"loss"} | {ours for ours, global_name in KERNELS.items() if global_name in names}


def model_shapes(model: nn.Module) -> dict:
    """The sizes the kernels run at in `model`, from its mlx-lm arguments (generic ones where it has none)."""
    args = getattr(model, "args", None) or getattr(getattr(model, "language_model", None), "args", None)
    args = vars(args) if hasattr(args, "__dict__") else dict(args or {})
    text = args.get("text_config") or {}

    def get(*names, default):
        return next((v for n in names for v in (args.get(n), text.get(n)) if isinstance(v, int) and v > 0), default)

    hidden = get("hidden_size", "dim", default=512)
    heads = get("num_attention_heads", "n_heads", default=8)
    return {
        "hidden": hidden,
        "intermediate": get("moe_intermediate_size", "intermediate_size", "hidden_dim", default=4 * hidden),
        "heads": heads,
        "kv_heads": get("num_key_value_heads", "n_kv_heads", default=heads),
        "head_dim": get("head_dim", default=hidden // heads),
        "vocab": get("vocab_size", default=32000),
    }


def quantization(model: nn.Module) -> dict | None:
    """How `model`'s linear layers are quantized (the first one's bits, group size, mode, scales'
    dtype), None if none is."""
    layer = next((m for m in _quantized(model) if isinstance(m, nn.QuantizedLinear)), None)
    if layer is None:
        return None
    return {"bits": layer.bits, "group_size": layer.group_size, "mode": layer.mode, "dtype": str(layer.scales.dtype)}


def _dequantized_candidate(shapes: dict, q: dict) -> Candidate:
    """One row through an (intermediate, hidden) layer: its weight de-quantized once against MLX's
    quantized kernel, the choice `keep_dequantized` makes."""
    quant = {"group_size": q["group_size"], "bits": q["bits"], "mode": q["mode"]}

    def inputs():
        dtype = getattr(mx, q["dtype"].split(".")[-1])
        packed = mx.quantize(mx.random.normal((shapes["intermediate"], shapes["hidden"])).astype(dtype), **quant)
        return (mx.random.normal((1, shapes["hidden"])).astype(dtype), mx.dequantize(*packed, **quant), *packed)

    return Candidate(
        lambda x, w, *packed: x @ w.T,
        lambda x, w, *packed: mx.quantized_matmul(x, *packed, transpose=True, **quant),
        inputs,
    )


def candidates(shapes: dict, kernels: set[str]) -> dict[str, Candidate]:
    """Ours against MLX's own for each of `kernels`, on random inputs at `shapes` and TOKENS."""
    b, t = TOKENS
    f, h, kv, d, v = (shapes[k] for k in ("intermediate", "heads", "kv_heads", "head_dim", "vocab"))
    rows = min(64, max(8, 2**21 // v))  # target rows of a batch, fewer for a large vocabulary
    scale = d**-0.5
    every = {
        "swiglu": Candidate(swiglu, activations.swiglu, lambda: (mx.random.normal((b * t, f)),) * 2),
        "attention": Candidate(
            lambda q, k, v: attention(q, k, v, None, scale, "causal", fallback=mlx_attention),
            lambda q, k, v: mlx_attention(q, k, v, None, scale=scale, mask="causal"),
            lambda: tuple(mx.random.normal((b, n, t, d)) for n in (h, kv, kv)),
        ),
        "loss": Candidate(
            lambda x, y: _kept_ce(x, y)[0],  # as the target rows of a cut step run it
            nn.losses.cross_entropy,
            lambda: (4 * mx.random.normal((rows, v)), mx.random.randint(0, v, (rows,))),
        ),
    }
    if "quantization" in shapes and "dequantized" in kernels:
        every["dequantized"] = _dequantized_candidate(shapes, shapes["quantization"])
    if "decoding swiglu" in kernels:  # one stream's one new position
        every["decoding swiglu"] = Candidate(
            _chained(swiglu), _chained(activations.swiglu), lambda: (mx.random.normal((1, 1, f)),) * 2, compiled=False
        )
    every.update(_decoding_candidates(shapes, kernels))
    if "decoding attention" in kernels:  # one new position over a cache of DECODE_CACHE
        every["decoding attention"] = Candidate(
            _chained(lambda q, k, v: attention(q, k, v, None, scale, None, fallback=mlx_attention)),
            _chained(lambda q, k, v: mlx_attention(q, k, v, None, scale=scale, mask=None)),
            lambda: tuple(mx.random.normal((1, n, t, d)) for n, t in ((h, 1), (kv, DECODE_CACHE), (kv, DECODE_CACHE))),
            compiled=False,
        )
    return {name: c for name, c in every.items() if name in kernels}


def _chained(fn: Callable, calls: int = 32) -> Callable:
    """`fn` applied `calls` times in a row in one graph, its output the next call's first input, as
    a decoding step's layers apply it: one call of tens of microseconds, timed alone, is within the
    timer's noise (one run chose ours, the next MLX's)."""

    def chained(x: mx.array, *rest: mx.array) -> mx.array:
        for _ in range(calls):
            x = fn(x, *rest)
        return x

    return chained


def _decoding_candidates(shapes: dict, kernels: set[str]) -> dict[str, Candidate]:
    """decoding.py's classes against MLX's own at one stream's decoding step, uncompiled as it runs."""
    hidden, f, h, d, v = (shapes[k] for k in ("hidden", "intermediate", "heads", "head_dim", "vocab"))
    head = min(v, max(decoding.SPLIT_VALUES, 2**25) // hidden)  # a head's rows, at most 128 MB of them
    row = lambda: mx.random.normal((1, 1, hidden))  # noqa: E731
    every = {
        "decoding matvec": Candidate(
            partial(decoding.row_product, matvec=True, split=False),
            lambda x, w: x @ w.T,
            lambda: (row(), mx.random.normal((f, hidden))),
            compiled=False,
        ),
        "decoding split": Candidate(
            partial(decoding.row_product, matvec=False, split=True),
            lambda x, w: x @ w.T,
            lambda: (row(), mx.random.normal((head, hidden))),
            compiled=False,
        ),
        "decoding rope": Candidate(
            _chained(partial(decoding.DecodingRoPE(d), offset=DECODE_CACHE)),
            _chained(partial(nn.RoPE(d), offset=DECODE_CACHE)),
            lambda: (mx.random.normal((1, h, 1, d)),),
            compiled=False,
        ),
        "decoding norm": Candidate(
            _chained(decoding.DecodingRMSNorm(hidden)), _chained(nn.RMSNorm(hidden)), lambda: (row(),), compiled=False
        ),
    }
    return {name: c for name, c in every.items() if name in kernels}


def _decoding_kernels(model: nn.Module) -> set[str]:
    """decoding.py's kernels `model` has layers for: its products, and MLX's own RoPE and RMSNorm classes."""
    classes = {type(m) for _, m in model.named_modules()}
    return {"decoding matvec", "decoding split"} | {
        f"decoding {name}" for name, cls in (("rope", nn.RoPE), ("norm", nn.RMSNorm)) if cls in classes
    }


def choose_kernels(model: nn.Module, training: bool = False, decoding: bool = False) -> Choice:
    """The kernels `model` gets on this machine: those measured faster than MLX's (kernel_choice);
    `decoding` adds attention and swiglu at one stream's decoding step and a quantized model's
    de-quantized weights."""
    used = used_kernels(model)
    shapes = model_shapes(model)
    decoding = decoding and not training
    used |= {f"decoding {k}" for k in ("attention", "swiglu") if decoding and k in used}
    used |= _decoding_kernels(model) if decoding else set()
    q = quantization(model) if decoding else None
    if q is not None:
        used.add("dequantized")
        shapes["quantization"] = q
    return kernel_choice.choose(candidates(shapes, used), {**shapes, "kernels": sorted(used)}, training)


DEQUANTIZED_SHARE = 0.25  # of the machine's memory, at most, for de-quantized copies


def use_cpu_kernels(
    model: nn.Module, quantized: bool = True, training: bool = False, decoding: bool = False, log=None
) -> bool:
    """When MLX computes on the CPU, give `model` the kernels above that this machine runs faster (the
    GPU's own are fast); True if it did. Swaps the class of the model's own module instances, as
    packing.py does: nothing in mlx-lm changes, other models keep its kernels, and `use_mlx_kernels`
    undoes it. Quantized layers keep their arrays, so saving, fusing and LoRA wrapping see the same
    layers; `quantized=False` leaves them on MLX's quantized kernel. `training`: the kernels are
    chosen by forward and backward time. `decoding` (a command that generates): quantized layers
    also keep their weights de-quantized where that measured faster and fits DEQUANTIZED_SHARE of
    memory, and one-token steps run outside MLX (model/decoder.py); with `training` (GRPO, which
    samples between updates), the training kernels and the one-token steps, no de-quantized or
    half-precision copies.
    `log` is told the choice."""
    if not wanted():
        return False
    choice = choose_kernels(model, training, decoding)
    line = choice.line()
    _loss[0] = "loss" in choice.kernels
    for _, module in model.named_modules():
        ours = (_CPU_CLASSES.get(type(module)) if quantized else None) or _cpu_class(type(module), choice.kernels)
        ours = _decoding_class(ours or type(module), choice.kernels) or ours
        if ours is not None:
            module.__class__ = ours
    if quantized and "dequantized" in choice.kernels:
        cost, limit = dequantized_bytes(model), DEQUANTIZED_SHARE * available_bytes()
        if cost <= limit:
            keep_dequantized(model)
            line += f"; {cost / 1e9:.2f} GB of de-quantized weights kept"
        else:
            line += f"; weights kept quantized: de-quantized they would take {cost / 1e9:.1f} GB > {limit / 1e9:.1f}"
    if decoding:
        line += _use_decoder(model, halves=not training)
    if log is not None:
        log(line)
    return True


def _use_decoder(model: nn.Module, halves: bool) -> str:
    """One-token steps handed to model/decoder.py where it reads the architecture (numba
    is a Linux dependency; without it MLX decodes). Not measured per machine: it read the weights
    3-4x faster than MLX's one-row products on every CPU tried (bench/RESULTS.md). `halves`: a
    half base's weights also kept in half precision (decoder.keep_halves), which training does not
    get: its memory is what its estimate counts, and GRPO's batches are bound by their sums."""
    try:
        from mlx_lora.model import decode_kernels, decoder
    except ImportError:
        return "; decoding steps on MLX (numba is not installed)"
    if not decoder.supports(model):
        return ""
    model.__class__ = decoder.decoding_class(type(model))
    decode_kernels.load()
    return (decoder.keep_halves(model) if halves else "") + "; decoding steps by model/decoder.py"


def use_mlx_kernels(model: nn.Module) -> None:
    """Undo `use_cpu_kernels`: every module of `model` back on its mlx-lm or MLX class."""
    drop_dequantized(model)
    for _, module in model.named_modules():
        vars(module).pop("half", None)  # decoder.keep_halves' copies (decoder.HELD; numba may be absent)
        while type(module) in _CPU_CLASSES.values() or "on_cpu_kernels" in vars(type(module)):
            module.__class__ = type(module).__bases__[0]
