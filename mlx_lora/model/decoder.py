"""Decoding steps outside MLX, on the CPU: a Llama, Mistral, Qwen2 or Qwen3 base (plain, 4-bit or
8-bit, LoRA adapters on any of its products) run token by token through the compiled loops of
`decode_kernels`, reading the model's own arrays in place.

Where a command decodes (`use_cpu_kernels(decoding=True)`), the model's class gains a `__call__`
that hands a one-token step to a `Decoder`: one row over a plain KV cache (generate, chat), or
several rows over a plain cache or mlx-lm's BatchKVCache (eval, serve, its rows' adapters stacked,
one a row); a prompt, and anything it does not know (another cache, DoRA), run MLX's forward. One
row continues the MLX cache the prompt filled in buffers of its own, written back into it before
MLX runs on that cache again (`Decoder.flush`); a batch reads MLX's cache in place and writes each
block's new keys and values straight into its buffers, so MLX can run on it at any step. Its numbers equal MLX's up to
fp32 rounding (the products sum in another order; tests/model/test_decoder.py).
"""

import functools
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import BatchKVCache, KVCache
from numba import get_num_threads

from mlx_lora.machine import available_bytes
from mlx_lora.model import decode_kernels as k

MODULES = {"mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3"}  # the layouts read below
FIRST_POSITIONS = 1024  # the KV buffers' and RoPE table's first size; each doubles as positions pass it
HELD = "half"  # keep_halves' attribute on a layer: (the float32 weight copied, its half bits, their loops)
HALF_SHARE = 0.25  # of the machine's memory, at most, for half-precision copies (as cpu_kernels' de-quantized ones)


class Unsupported(Exception):
    """A model, layer or cache the decoder does not run: MLX's forward runs it."""


def _np(a: mx.array, dtype=np.float32) -> np.ndarray:
    """The array's own memory as numpy (no copy)."""
    if a.dtype != {np.float32: mx.float32, np.uint32: mx.uint32}[dtype]:
        raise Unsupported(f"a {a.dtype} array")
    mx.eval(a)
    return np.asarray(a)


@dataclass
class Product:
    """One linear layer's `x @ W.T + bias` (+ its LoRA adapter's delta) on numpy views of its arrays."""

    weight: tuple  # (w,) float32, or (packed bytes, scales, biases) with `bits`
    bits: int
    bias: np.ndarray | None
    adapters: list = field(default_factory=list)  # (a (in, r), b (r, out), scale)
    half: tuple | None = None  # (a float32 w's float16 or bfloat16 bits, the one-row and batch loops reading them)
    routed: tuple | None = None  # (A (slots, in, r), scale·B (slots, r, out), Routing): an adapter a row

    @property
    def outputs(self) -> int:
        return self.weight[0].shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (in,) -> (out,)."""
        out = np.empty(self.outputs, np.float32)
        if self.half is None:
            KERNELS[self.bits][0](*self.weight, x, out)
        else:
            self.half[1](self.half[0], x, out)
        return self._added(x[None], out[None])[0]

    def batch(self, x: np.ndarray) -> np.ndarray:
        """x (R, in) -> (R, out): the weight read once for every row. Two or three rows go through
        the batch loop padded to its four with copies of the last (a step of 2 rows took 36 ms row by
        row, 3 rows 51, against 29 for 4 on the Q4_1 SmolLM2)."""
        rows = x.shape[0]
        if rows == 1:
            return self(x[0])[None]
        padded = np.ascontiguousarray(x) if rows >= 4 else np.concatenate([x, np.repeat(x[-1:], 4 - rows, axis=0)])
        out = np.empty((padded.shape[0], self.outputs), np.float32)
        chunks = get_num_threads()
        if self.half is None:
            KERNELS[self.bits][1](*self.weight, padded, out, chunks)
        else:
            self.half[2](self.half[0], padded, out, chunks)
        return self._added(x, out[:rows])

    def _added(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out (R, out) plus the bias and each adapter's scale · (x A) B."""
        if self.bias is not None:
            out += self.bias
        for a, b, scale in self.adapters:
            for row, y in zip(x, out):
                k.low_rank(row, a, b, scale, y)
        if self.routed is not None:
            a, b, routing = self.routed
            for slot, row, y in zip(routing.slots, x, out):
                if slot:  # slot 0 is the base: zeros
                    k.low_rank(row, a[slot], b[slot], ONE, y)
        return out


ONE = np.float32(1.0)


@dataclass
class Routing:
    """Which adapter slot each row of a step reads, for layers holding every adapter stacked (serve's
    MultiLoRALinear, known by its arrays: inference/ sits above this room): `rows.index` (mx (R,)),
    which the caller sets before each forward, read once a step."""

    rows: object = None  # the Rows the stacked layers share
    slots: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))

    def read(self) -> None:
        if self.rows is not None:
            self.slots = np.array(self.rows.index, np.int64).reshape(-1)


KERNELS = {  # bits -> (one row's product, a batch's)
    32: (k.matvec, k.matmul),
    4: (k.matvec_q4, k.matmul_q4),
    8: (k.matvec_q8, k.matmul_q8),
}


def product(layer: nn.Module, routing: Routing) -> Product:
    """A Product of a linear layer: plain, quantized (4 or 8 bits, affine), a LoRALinear around
    either (known by its arrays: model/lora.py imports this room's cpu_kernels, which imports us), or
    a layer of every adapter stacked, one a row (serve's), whose rows `routing` reads."""
    adapters, routed = [], None
    if "linear" in layer and "a" in layer and "b" in layer and layer["a"].ndim == 3 and hasattr(layer, "rows"):
        if routing.rows is not None and routing.rows is not layer.rows:
            raise Unsupported("stacked adapters routed by two row indices")
        routing.rows = layer.rows
        routed = (_np(layer["a"]), _np(layer["b"]), routing)
        layer = layer.linear
    if "lora_a" in layer:
        if layer.dora or layer.lora_a.ndim != 2:
            raise Unsupported("a DoRA or expert adapter")
        if not layer.off:
            adapters.append((_np(layer.lora_a), _np(layer.lora_b), np.float32(layer.scale)))
        layer = layer.linear
    if not isinstance(layer, (nn.Linear, nn.QuantizedLinear, nn.Embedding, nn.QuantizedEmbedding)):
        raise Unsupported(type(layer).__name__)
    bias = _np(layer["bias"]) if "bias" in layer else None
    weight, bits = _weight(layer)
    if weight[0].shape[0] < 4:
        raise Unsupported("a product of fewer than 4 rows")
    return Product(weight, bits, bias, adapters, _held_half(layer) if bits == 32 else None, routed)


def _weight(layer: nn.Module) -> tuple[tuple, int]:
    """The arrays a product reads, and their bits: 4- and 8-bit affine layers as they lie; others (5
    bits, a GGUF's Q5_K) through the float32 copy cpu_kernels keeps beside them, where it keeps one."""
    if "scales" not in layer:
        return (_np(layer["weight"]),), 32
    if getattr(layer, "mode", "affine") == "affine" and layer.bits in (4, 8) and layer.group_size % 32 == 0:
        packed = np.ascontiguousarray(_np(layer["weight"], np.uint32).view(np.uint8))  # as matmul_q4 reads it
        return (packed, *_narrowed(_np(layer["scales"]), _np(layer["biases"]))), layer.bits
    held = vars(layer).get("dequantized")
    if held is None:
        raise Unsupported(f"{layer.bits}-bit weights in groups of {layer.group_size}, not de-quantized")
    return (_np(held.weight),), 32


def keep_halves(model: nn.Module) -> str:
    """Give each float32 linear layer and embedding of `model` a copy of its weight in the half
    precision it came from (a float16 or bfloat16 base computes in float32 on the CPU, precision.py),
    which one row's product and a batch's read: the same floats in half the bytes, where one row is
    bound by memory and a batch waits on it. Held as a plain attribute beside MLX's float32 array
    (which prompts read), made when a command that decodes loads the model (use_cpu_kernels), so no
    first token waits for it; only where every such weight is a half's cast and the copies fit
    HALF_SHARE of memory. What was kept, for the kernels' line."""
    layers = [
        m
        for _, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Embedding)) and m["weight"].dtype == mx.float32 and m["weight"].ndim == 2
    ]
    if not layers or any(m["weight"].shape[1] % (2 * k._WIDTH) for m in layers):
        return ""
    size = sum(m["weight"].size for m in layers) * 2
    if size > HALF_SHARE * available_bytes():
        return ""
    made = []
    for m in (m for m in layers if _held_half(m) is None):  # the first weight that is no such cast ends it
        half = _half(_np(m["weight"]))
        if half is None:
            return ""
        made.append((m, half))
    for m, half in made:
        vars(m)[HELD] = (m["weight"], *half)
    return f"; {size / 1e9:.2f} GB of half-precision weights kept for decoding steps"


def _held_half(layer: nn.Module) -> tuple | None:
    """(bits, one-row loop, batch loop) of the half copy keep_halves gave `layer`, while its weight
    is the one copied."""
    held = vars(layer).get(HELD)
    return held[1:] if held is not None and held[0] is layer["weight"] else None


def _half(w: np.ndarray) -> tuple | None:
    """(w's bfloat16 or float16 bits, the one-row and batch loops that read them) where w holds such
    values exactly (converted over every core: ~6 ms for the 135M model's 28M-value head)."""
    out = np.empty(w.shape, np.uint16)
    for convert, *loops in ((k.to_bf16, k.matvec_bf16, k.matmul_bf16), (k.to_f16, k.matvec_f16, k.matmul_f16)):
        if convert(w[:1], out[:1]) and convert(w, out):  # the first row decides most cases at once
            return out, *loops
    return None


def _narrowed(scales: np.ndarray, biases: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A quantized weight's scales and biases in float16 where it holds every value exactly (a GGUF's
    Q4_0, Q4_1 and Q8_0 stored them so), else as they are: a one-token step reads each group's pair
    from memory, in float32 half as many bytes again as the 4-bit codes of a group of 32. The
    copies, beside MLX's arrays, take an eighth of a byte a weight there."""
    half = tuple(a.astype(np.float16) for a in (scales, biases))
    if all(np.array_equal(h.astype(np.float32), a) for h, a in zip(half, (scales, biases))):
        return tuple(h.view(np.uint16) for h in half)  # float16's bits, as decode_kernels reads them
    return np.ascontiguousarray(scales), np.ascontiguousarray(biases)


@dataclass
class Block:
    """One transformer block's parts, as numpy."""

    norms: tuple  # the input and post-attention RMSNorms, each (weight, eps)
    q: Product
    k: Product
    v: Product
    o: Product
    gate: Product
    up: Product
    down: Product
    heads: int
    kv_heads: int
    scale: float
    qk_norms: tuple | None  # Qwen3's per-head RMSNorms of queries and keys, each (weight, eps)


class Decoder:
    """A model's decoding steps on numpy and numba: `step(token)` -> logits (vocab,) for one row
    continuing the cache `follows` read, `batch(tokens, cache)` -> (R, vocab) over MLX's cache."""

    def __init__(self, model: nn.Module):
        if not supports(model):
            raise Unsupported(type(model).__module__)
        inner = model.model
        if any(getattr(layer, "use_sliding", False) for layer in inner.layers):
            raise Unsupported("sliding-window layers")
        keep_halves(model)  # layers the model gained since it was loaded (none where it is as loaded)
        self.routing = Routing()
        self.blocks = [_block(layer, self.routing) for layer in inner.layers]
        self.embed_weights = product(inner.embed_tokens, self.routing)  # the rows a token reads
        self.head = product(model.lm_head, self.routing) if "lm_head" in model else self.embed_weights  # tied
        self.norm = _norm(inner.norm)
        self.rope = inner.layers[0].self_attn.rope
        self.head_dim = self.blocks[0].q.outputs // self.blocks[0].heads
        if getattr(self.rope, "traditional", True) or getattr(self.rope, "dims", None) != self.head_dim:
            raise Unsupported("this RoPE")
        self.cos = self.sin = np.empty((0, self.head_dim // 2), np.float32)
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.cache = None  # the MLX cache list the buffers continue
        self.batch_cache = None  # the cache list of the batch last decoded
        self.synced = self.filled = 0  # positions in the MLX cache, and in ours

    # ---- the MLX cache ----

    def continues(self, cache: list) -> bool:
        """True where our buffers continue `cache` as it stands."""
        return cache is self.cache and cache[0].offset == self.synced

    def follows(self, cache: list) -> bool:
        """True once our buffers continue `cache` (read from it if they did not)."""
        if not (len(cache) == len(self.blocks) and all(type(c) is KVCache for c in cache)):
            return False
        offset = cache[0].offset
        if offset == 0 or any(c.offset != offset for c in cache):
            return False
        self._reserve(offset + 1)
        for i, c in enumerate(cache):
            self.keys[i][:, :offset] = np.asarray(c.keys[0, :, :offset])  # float32: _cache_kind
            self.values[i][:, :offset] = np.asarray(c.values[0, :, :offset])
        self.cache, self.synced, self.filled = cache, offset, offset
        return True

    def flush(self, cache: list) -> None:
        """Write the positions we decoded past the MLX cache into it, before MLX runs on it again."""
        if cache is not self.cache or self.filled == self.synced:
            return
        part = slice(self.synced, self.filled)
        for i, c in enumerate(cache):
            c.update_and_fetch(mx.array(self.keys[i][None, :, part]), mx.array(self.values[i][None, :, part]))
        self.synced = self.filled

    def _reserve(self, positions: int) -> None:
        """The RoPE table and our KV buffers for `positions`, grown (doubled) where short."""
        self._table(positions)
        size = self.cos.shape[0]
        for buffers in (self.keys, self.values):
            for i, block in enumerate(self.blocks):
                if i < len(buffers) and buffers[i].shape[1] == size:
                    continue
                grown = np.zeros((block.kv_heads, size, self.head_dim), np.float32)
                if i < len(buffers):
                    grown[:, : buffers[i].shape[1]] = buffers[i]
                    buffers[i] = grown
                else:
                    buffers.append(grown)

    def _table(self, positions: int) -> None:
        size = max(FIRST_POSITIONS, self.cos.shape[0])
        while size < positions:
            size *= 2
        if size == self.cos.shape[0]:
            return
        half = self.head_dim // 2
        unit = mx.concatenate([mx.ones((1, 1, size, half)), mx.zeros((1, 1, size, half))], axis=-1)
        table = np.array(self.rope(unit, offset=0)[0, 0])  # the model's own RoPE of (1, 0): (cos, sin)
        self.cos, self.sin = np.ascontiguousarray(table[:, :half]), np.ascontiguousarray(table[:, half:])

    # ---- the step ----

    def step(self, token: int) -> np.ndarray:
        """Logits (vocab,) of the token after `token` at position `filled`; its keys and values kept."""
        pos = self.filled
        self._reserve(pos + 1)
        self.routing.read()
        positions = np.array([pos])
        logits = self._forward(self._embed(token)[None], lambda i, b, x: self._attend(i, b, x, positions))
        self.filled = pos + 1
        return logits[0]

    def batch(self, tokens: np.ndarray, cache: list) -> np.ndarray:
        """Logits (R, vocab) of one token for each of R rows over MLX's own cache (a KVCache of R
        rows, or mlx-lm's BatchKVCache, whose rows are left-padded), read in place. Each block's new
        keys and values go straight into the cache's buffers, at the slot after its last, which no
        array reads yet, and the step ends with the cache counting that slot, as update_and_fetch
        would (MLX evaluating 60 such writes cost ~4 ms of a 50 ms step of 16 rows); a buffer that is
        full or not one contiguous block gets them through update_and_fetch at the end of the step."""
        first = cache[0]
        if type(first) is KVCache:
            positions, starts = np.full(len(tokens), first.offset), np.zeros(len(tokens), np.int64)
        else:
            positions, starts = np.array(first.offset, np.int64), np.array(first.left_padding, np.int64)
        self._table(int(positions.max()) + 1)
        self.routing.read()
        end = int(positions[0] + starts[0])  # cached slots before this step, the same for every row
        mx.eval([(c.keys, c.values) for c in cache])
        buffers = [(np.asarray(c.keys), np.asarray(c.values)) for c in cache]  # (R, kv_heads, slots, d)
        in_place = all(a.flags.c_contiguous and a.shape[2] > end for pair in buffers for a in pair)
        new = []
        h = np.stack([self._embed(int(t)) for t in tokens])
        logits = self._forward(
            h, lambda i, b, x: self._attend_batch(b, buffers[i], x, positions, starts, end, in_place, new)
        )
        buffers.clear()  # MLX writes in place only into a buffer nothing else holds
        for c, (key, value) in zip(cache, new):
            if in_place:
                _advance(c)
            else:
                c.update_and_fetch(mx.array(key[:, :, None]), mx.array(value[:, :, None]))  # (R, kv_heads, 1, d)
        if not in_place:
            mx.eval([(c.keys, c.values) for c in cache])
        return logits

    def _forward(self, h: np.ndarray, attend) -> np.ndarray:
        """Logits (R, vocab) from the embeddings h (R, dim) through every block, `attend(i, block, x)`
        giving block i's attention output (R, heads · d) for its normed input x."""
        x = np.empty_like(h)
        for i, b in enumerate(self.blocks):
            k.rms_norm(h, *b.norms[0], x)
            h += b.o.batch(attend(i, b, x))
            k.rms_norm(h, *b.norms[1], x)
            gate, up = b.gate.batch(x), b.up.batch(x)
            k.swiglu(gate.reshape(-1), up.reshape(-1), gate.reshape(-1))
            h += b.down.batch(gate)
        k.rms_norm(h, *self.norm, x)
        return self.head.batch(x)

    def _qkv(self, b: Block, x: np.ndarray, positions: np.ndarray) -> tuple:
        """Queries (R, heads, d), keys and values (R, kv_heads, d) of x (R, dim), rotated to `positions`."""
        rows, d = x.shape[0], self.head_dim
        q = b.q.batch(x).reshape(rows, b.heads, d)
        key, value = b.k.batch(x).reshape(rows, b.kv_heads, d), b.v.batch(x).reshape(rows, b.kv_heads, d)
        if b.qk_norms is not None:
            k.rms_norm(q.reshape(-1, d), *b.qk_norms[0], q.reshape(-1, d))
            k.rms_norm(key.reshape(-1, d), *b.qk_norms[1], key.reshape(-1, d))
        k.rotate_rows(q, self.cos, self.sin, positions)
        k.rotate_rows(key, self.cos, self.sin, positions)
        return q, key, value

    def _attend(self, i: int, b: Block, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One row's attention (1, heads · d), its keys and values kept in our buffers at positions[0]."""
        pos = int(positions[0])
        q, key, value = self._qkv(b, x, positions)
        self.keys[i][:, pos] = key[0]
        self.values[i][:, pos] = value[0]
        out = np.empty_like(q[0])
        k.attention(q[0], self.keys[i], self.values[i], pos + 1, np.float32(b.scale), out)
        return out.reshape(1, -1)

    def _attend_batch(
        self, b: Block, buffers: tuple, x: np.ndarray, positions, starts, end: int, in_place: bool, new: list
    ):
        """R rows' attention (R, heads · d) over a cache's `buffers` (its first `end` slots) and their
        new keys and values, which go into slot `end` (in_place) and onto `new`."""
        q, key, value = self._qkv(b, x, positions)
        keys, values = buffers
        if in_place:
            keys[:, :, end], values[:, :, end] = key, value
        else:
            keys, values = np.ascontiguousarray(keys), np.ascontiguousarray(values)
        out = np.empty_like(q)
        k.attention_rows(q, keys, values, key, value, starts, end, np.float32(b.scale), out)
        new.append((key, value))
        return out.reshape(x.shape[0], -1)

    def _embed(self, token: int) -> np.ndarray:
        """The token's row of the embedding, de-quantized as MLX does (scale · q + bias, float32)."""
        weight = self.embed_weights.weight
        if self.embed_weights.bits == 32:
            return weight[0][token].copy()
        packed, scales, biases = (w[token] for w in weight)
        q = packed if self.embed_weights.bits == 8 else np.stack([packed & 15, packed >> 4], axis=-1).reshape(-1)
        group = q.shape[0] // scales.shape[0]
        scales, biases = (np.repeat(_floats(a), group) for a in (scales, biases))
        return q.astype(np.float32) * scales + biases


def _floats(scales: np.ndarray) -> np.ndarray:
    """Scales or biases as float32, from float16's bits where `_narrowed` kept those."""
    return scales.view(np.float16).astype(np.float32) if scales.dtype == np.uint16 else scales


def _advance(c) -> None:
    """One more position in cache `c` (its new keys and values already in its buffers), counted as
    update_and_fetch counts it."""
    if type(c) is KVCache:
        c.offset += 1
    else:  # BatchKVCache: each row's offset and the slot index (mlx-lm 0.32's attributes)
        c.offset = c.offset + 1
        c._idx += 1


def _norm(norm: nn.Module) -> tuple:
    if not isinstance(norm, nn.RMSNorm):
        raise Unsupported(type(norm).__name__)
    return _np(norm.weight), np.float32(norm.eps)


def _block(layer: nn.Module, routing: Routing) -> Block:
    attn, mlp = layer.self_attn, layer.mlp
    qk = (_norm(attn.q_norm), _norm(attn.k_norm)) if "q_norm" in attn else None
    return Block(
        norms=(_norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)),
        q=product(attn.q_proj, routing),
        k=product(attn.k_proj, routing),
        v=product(attn.v_proj, routing),
        o=product(attn.o_proj, routing),
        gate=product(mlp.gate_proj, routing),
        up=product(mlp.up_proj, routing),
        down=product(mlp.down_proj, routing),
        heads=attn.n_heads,
        kv_heads=attn.n_kv_heads,
        scale=float(attn.scale),
        qk_norms=qk,
    )


def _signature(model: nn.Module) -> tuple:
    """What a Decoder read from `model`: its modules' and arrays' identities and its adapters'
    switches, so a changed model (another adapter, one turned off) gets a new Decoder."""
    parts = [(id(m), getattr(m, "off", None), getattr(m, "scale", None)) for _, m in model.named_modules()]
    return (*parts, *(id(a) for _, a in tree_flatten(model.parameters())))


KEPT = "_mlx_lora_decoder"  # (the model's signature, its Decoder or None) in the model's __dict__


def forget(model: nn.Module) -> None:
    """Drop the model's Decoder: its next step reads the layers again. For a model changed while a
    batch runs (serve's adapters come and go between steps), which the check at each new batch
    cache would miss."""
    model.__dict__.pop(KEPT, None)


def supports(model: nn.Module) -> bool:
    """Whether `model`'s architecture is one the Decoder reads (its layers are checked on first use)."""
    known = any(c.__module__ in MODULES for c in type(model).__mro__)  # under our subclasses
    return known and getattr(model.model, "pipeline_size", 1) == 1


@functools.cache
def decoding_class(cls: type) -> type:
    """`cls` whose call hands one-token steps (one row or a batch, decoded_call) to the model's Decoder.
    A subclass, so isinstance checks and the class name hold; `on_cpu_kernels` lets
    cpu_kernels.use_mlx_kernels take it back off."""

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: mx.array | None = None):
        logits = decoded_call(self, inputs, cache, input_embeddings)
        return cls.__call__(self, inputs, cache, input_embeddings) if logits is None else logits

    return type(cls.__name__, (cls,), {"__call__": __call__, "on_cpu_kernels": True})


def decoded_call(model: nn.Module, inputs: mx.array, cache, input_embeddings) -> mx.array | None:
    """Logits (R, 1, vocab) of a one-token step of R rows, from the model's Decoder: one row over a
    plain KV cache through its own buffers, several (or a batch cache) through MLX's cache; None
    where MLX runs the call (the cache the Decoder continued made current first)."""
    kept = model.__dict__.get(KEPT)
    decoder = kept[1] if kept else None
    kind = _cache_kind(cache, inputs, input_embeddings)
    if kind is None:
        if decoder is not None and cache is not None:
            decoder.flush(cache)
        return None
    known = decoder is not None and (decoder.continues(cache) if kind == "one" else cache is decoder.batch_cache)
    if not known:  # a new generation: the model may have changed since the last
        decoder = _current(model)
        if decoder is None or (kind == "one" and not decoder.follows(cache)):
            return None
    if kind == "one":
        return mx.array(decoder.step(int(inputs.item())))[None, None]
    decoder.flush(cache)
    decoder.batch_cache = cache
    return mx.array(decoder.batch(np.array(inputs[:, 0]), cache))[:, None]


def _cache_kind(cache, inputs: mx.array, input_embeddings) -> str | None:
    """ "one": one row over plain KV caches; "batch": several rows over plain ones, or any rows over
    mlx-lm's BatchKVCache, already filled; None: something else, which MLX runs."""
    if input_embeddings is not None or inputs.ndim != 2 or inputs.shape[1] != 1 or not isinstance(cache, list):
        return None
    kinds = {type(c) for c in cache}
    if not cache or len(kinds) != 1 or cache[0].keys is None or cache[0].keys.dtype != mx.float32:
        return None
    if kinds == {KVCache}:
        return "one" if inputs.shape[0] == 1 else "batch"
    return "batch" if kinds == {BatchKVCache} else None


def _current(model: nn.Module) -> Decoder | None:
    """The model's Decoder, made anew where the model changed since (checked once a generation)."""
    kept = model.__dict__.get(KEPT)
    signature = _signature(model)
    if kept is None or kept[0] != signature:
        try:
            kept = (signature, Decoder(model))
        except Unsupported:
            kept = (signature, None)
        model.__dict__[KEPT] = kept
    return kept[1]
