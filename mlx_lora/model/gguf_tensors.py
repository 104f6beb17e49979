"""A GGUF file's tensors as MLX arrays, by type. MLX reads F32, F16, Q4_0, Q4_1 and Q8_0 itself
(mx.load; the three block types as its own quantized arrays). The others are read with gguf-py:
a type whose blocks are affine on groups of 32 (w = scale * q + bias: Q5_0, Q5_1, Q4_K, Q5_K, and
Q4_0/Q4_1/Q8_0 in a file MLX cannot read whole) becomes MLX's quantized form exactly, the same
integer codes with each group's scale and bias in float32; BF16 stays bfloat16 (mx.load would round
it to float16); Q2_K, Q3_K and Q6_K, whose 16-weight sub-blocks MLX's group sizes cannot hold, are
de-quantized to float32 by gguf-py: 32 bits a weight instead of the file's 2.6 to 6.6."""

from collections.abc import Callable
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np

from mlx_lora.errors import UserError

QTYPE = gguf.GGMLQuantizationType
GROUP_SIZE = 32  # the group of every affine GGUF block: Q4_0..Q8_0 blocks, K-quant sub-blocks
MLX_NATIVE = {QTYPE.F32, QTYPE.F16, QTYPE.Q4_0, QTYPE.Q4_1, QTYPE.Q8_0}
DEQUANTIZED = {QTYPE.Q2_K, QTYPE.Q3_K, QTYPE.Q6_K}


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of each block, as float32: (n_blocks, 1)."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)


def _symmetric(offset: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Q4_0, Q5_0, Q8_0: w = d * (q - offset), so scale d and bias -offset * d (exact: a power of 2)."""
    return lambda blocks: (_f16(blocks, 0), -offset * _f16(blocks, 0))


def _with_min(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_1, Q5_1: w = d * q + m."""
    return _f16(blocks, 0), _f16(blocks, 2)


def _k_quant(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K, Q5_K: 8 sub-blocks of 32, w = d * sc * q - dmin * m with 6-bit sc and m (gguf-py unpacks them)."""
    sc, m = gguf.quants.Q4_K.get_scale_min(blocks[:, 4 : 4 + gguf.quants.Q4_K.K_SCALE_SIZE])
    return _f16(blocks, 0) * sc, -(_f16(blocks, 2) * m)  # (n_blocks, 8) each, exact in float32


# type -> (bits of a code, its groups' scale and bias from its raw blocks)
AFFINE = {
    QTYPE.Q4_0: (4, _symmetric(8)),
    QTYPE.Q4_1: (4, _with_min),
    QTYPE.Q5_0: (5, _symmetric(16)),
    QTYPE.Q5_1: (5, _with_min),
    QTYPE.Q8_0: (8, _symmetric(128)),  # the int8 code + 128, unsigned as MLX's
    QTYPE.Q4_K: (4, _k_quant),
    QTYPE.Q5_K: (5, _k_quant),
}
READABLE = MLX_NATIVE | AFFINE.keys() | DEQUANTIZED | {QTYPE.BF16}


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing: each row a little-endian stream of `bits`-bit codes, read as uint32."""
    rows, cols = codes.shape
    stream = (codes[..., None].astype(np.uint32) >> np.arange(bits, dtype=np.uint32)) & 1  # (rows, cols, bits)
    return np.packbits(stream.astype(np.uint8).reshape(rows, cols * bits), axis=-1, bitorder="little").view(np.uint32)


def affine(data: np.ndarray, qtype: QTYPE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A quantized 2-D tensor's raw rows (rows, bytes) as MLX's (packed codes, scales, biases). The
    codes come back from gguf-py's de-quantized values, (w - bias) / scale, which are whole numbers."""
    bits, scale_bias = AFFINE[qtype]
    rows = data.shape[0]
    scale, bias = scale_bias(data.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1]))
    scale, bias = scale.reshape(rows, -1), bias.reshape(rows, -1)  # (rows, cols / 32)
    w = gguf.quants.dequantize(data, qtype).reshape(rows, scale.shape[1], GROUP_SIZE)
    codes = (w - bias[..., None].astype(np.float64)) / np.where(scale == 0, 1, scale)[..., None]
    codes = np.clip(np.rint(codes), 0, 2**bits - 1).reshape(rows, -1)  # scale 0: every weight is the bias
    return pack(codes, bits), scale, bias


def tensor_arrays(tensor) -> dict[str, mx.array]:
    """One gguf-py ReaderTensor under mx.load's names (`x.weight`, plus `x.scales` and `x.biases`)."""
    qtype, data = tensor.tensor_type, tensor.data
    if qtype in AFFINE and data.ndim == 2:
        codes, scales, biases = affine(data, qtype)
        base = tensor.name.removesuffix(".weight")
        return {tensor.name: mx.array(codes), f"{base}.scales": mx.array(scales), f"{base}.biases": mx.array(biases)}
    if qtype in (QTYPE.F32, QTYPE.F16):
        return {tensor.name: mx.array(np.ascontiguousarray(data))}
    values = gguf.quants.dequantize(data, qtype)  # float32, exactly gguf-py's (BF16 widened, exactly)
    return {tensor.name: mx.array(values).astype(mx.bfloat16 if qtype == QTYPE.BF16 else mx.float32)}


def _types(reader: gguf.GGUFReader, path: Path) -> set:
    types = {t.tensor_type for t in reader.tensors}
    if unknown := types - READABLE:
        raise UserError(
            f"--model {path}: tensors of type {', '.join(sorted(t.name for t in unknown))} in this GGUF; mlx-lora "
            f"reads {', '.join(t.name for t in sorted(READABLE))}: use a GGUF of one of those or the Hugging Face model"
        )
    return types


def read_tensors(reader: gguf.GGUFReader, path: Path) -> dict[str, mx.array]:
    if _types(reader, path) <= MLX_NATIVE:
        return mx.load(str(path))
    return {name: a for t in reader.tensors for name, a in tensor_arrays(t).items()}


def read_shapes(reader: gguf.GGUFReader, path: Path) -> dict[str, mx.array]:
    """What read_tensors returns, as stand-ins with the same names, shapes and dtypes: zeros never
    evaluated, so never allocated, made from the header alone (what `mlx-lora info` needs)."""
    scales = mx.float16 if _types(reader, path) <= MLX_NATIVE else mx.float32  # mx.load's, else affine()'s
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims inner first
        if t.tensor_type in AFFINE and len(shape) == 2:
            base, bits = t.name.removesuffix(".weight"), AFFINE[t.tensor_type][0]
            out[t.name] = mx.zeros((shape[0], shape[1] * bits // 32), mx.uint32)
            out[f"{base}.scales"] = out[f"{base}.biases"] = mx.zeros((shape[0], shape[1] // GROUP_SIZE), scales)
        else:
            kind = {QTYPE.F16: mx.float16, QTYPE.BF16: mx.bfloat16}.get(t.tensor_type, mx.float32)
            out[t.name] = mx.zeros(shape, kind)
    return out
