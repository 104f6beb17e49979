"""One stream's decoding step on the CPU in fewer, cheaper MLX operations.

A token of SmolLM2-135M is ~4,400 MLX operations, 271 of them matmuls. On a 2-core Xeon each of
the others costs microseconds of dispatch on top of its work, and the one-row matmuls take
OpenBLAS's slower path (bench/RESULTS.md, "One stream in fewer operations"). Where a command decodes
(`use_cpu_kernels(decoding=True)`), these classes stand in for MLX's own, and only for one row
at one position; a prompt, a batch and training run MLX's:
- `RoPE` from a table of cosines and sines made by the same float32 operations MLX's CPU
  fallback runs on every call, so the same values, within an ulp (29 operations a call -> 7);
- `RMSNorm` as one compiled function of MLX's own formula (13 operations -> 3);
- a one-row product as `W @ x`, which OpenBLAS gives its small-matrix kernel, where `x @ W.T`
  first copies the weight into packed panels;
- a large product (an output head; every product of a larger model) in chunks over two CPU
  streams: both cores, each chunk small enough for that kernel (a 49152 x 576 head: ~10 -> 3.4 ms).
"""

import math
from functools import cache

import mlx.core as mx
import mlx.nn as nn

SPLIT_VALUES = 2**23  # a one-row product over a weight this large is split over two streams
# weight values a chunk multiplies: OpenBLAS's small-matrix kernel takes up to 1e6 multiply-adds,
# past which it packs the weight first (a 49152 x 576 head over two streams: 3.4 ms in 31 chunks of
# this size, 11.5 in 27 of 2**20)
CHUNK_VALUES = 900_000
TABLE_POSITIONS = 4096  # the RoPE table's first size; it doubles as positions pass it


def one_row(x: mx.array) -> bool:
    return x.size == x.shape[-1]


@cache
def _other_stream() -> mx.ThreadLocalStream:
    return mx.new_thread_local_stream(mx.cpu)  # each thread that decodes gets its own


def row_product(x: mx.array, weight: mx.array, matvec: bool, split: bool) -> mx.array:
    """One row `x` (..., in) times `weight` (out, in) transposed, (..., out): as W @ x where `matvec`,
    and over a weight of SPLIT_VALUES or more in chunks over two streams where `split`."""
    out, size = weight.shape
    column = x.reshape(size, 1)
    if split and weight.size >= SPLIT_VALUES:
        step = max(1, CHUNK_VALUES // size)
        streams = (None, _other_stream())  # None: the caller's stream, as mlx-lm's generation sets it
        parts = [
            mx.matmul(weight[i : i + step], column, stream=streams[k % 2]) for k, i in enumerate(range(0, out, step))
        ]
        y = mx.concatenate(parts)  # (out, 1)
    elif matvec:
        y = weight @ column
    else:
        return x @ weight.T
    return y.reshape(*x.shape[:-1], out)


class DecodingLinear(nn.Linear):
    on_cpu_kernels = True  # use_mlx_kernels takes it back off
    matvec = split = False  # set per model by use_cpu_kernels, as this CPU measured them

    def __call__(self, x: mx.array) -> mx.array:
        if not one_row(x):
            return super().__call__(x)
        y = row_product(x, self["weight"], self.matvec, self.split)
        return y + self["bias"] if "bias" in self else y


class DecodingEmbedding(nn.Embedding):
    on_cpu_kernels = True  # use_mlx_kernels takes it back off
    matvec = split = False

    def as_linear(self, x: mx.array) -> mx.array:
        return row_product(x, self.weight, self.matvec, self.split) if one_row(x) else super().as_linear(x)


@cache
def _table(dims: int, base: float, scale: float, positions: int) -> tuple[mx.array, mx.array]:
    """cos and sin (positions, dims/2) of every position, as MLX's fallback computes them for one."""
    half = dims // 2
    inv_freqs = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * mx.array(math.log(base) / half, mx.float32))
    theta = (mx.arange(positions, dtype=mx.float32) * mx.array(scale, mx.float32))[:, None] * inv_freqs
    table = mx.cos(theta), mx.sin(theta)
    mx.eval(table)
    return table


@mx.compile
def _rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """MLX's non-traditional RoPE on the first 2 * cos.shape[-1] features of x."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    rest = [x[..., 2 * half :]] if x.shape[-1] > 2 * half else []
    return mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos, *rest], axis=-1)


class DecodingRoPE(nn.RoPE):
    on_cpu_kernels = True  # use_mlx_kernels takes it back off

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.traditional or not isinstance(offset, int) or x.shape[-2] != 1 or x.ndim != 4 or x.shape[0] != 1:
            return super().__call__(x, offset)
        size = TABLE_POSITIONS
        while size <= offset:
            size *= 2
        cos, sin = _table(self.dims, float(self.base), float(self.scale), size)
        return _rotate(x, cos[offset : offset + 1], sin[offset : offset + 1])


@mx.compile
def _rms_norm(x: mx.array, weight: mx.array, eps: mx.array) -> mx.array:
    """mx.fast.rms_norm's CPU fallback: float32 mean of squares, the input's type times the weight."""
    x32 = x.astype(mx.float32)
    return (x32 * mx.rsqrt(mx.mean(mx.square(x32), axis=-1, keepdims=True) + eps)).astype(x.dtype) * weight


class DecodingRMSNorm(nn.RMSNorm):
    on_cpu_kernels = True  # use_mlx_kernels takes it back off

    def __call__(self, x: mx.array) -> mx.array:
        if not one_row(x):
            return super().__call__(x)
        return _rms_norm(x, self["weight"].astype(x.dtype), mx.array(self.eps, mx.float32))


CLASSES = {
    nn.Linear: DecodingLinear,
    nn.Embedding: DecodingEmbedding,
    nn.RoPE: DecodingRoPE,
    nn.RMSNorm: DecodingRMSNorm,
}
