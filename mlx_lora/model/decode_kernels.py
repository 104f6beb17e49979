"""The compiled loops of a decoding step on the CPU (numba): products that read float32, 4-bit or
8-bit weights where they lie, over every core, for one row or a batch, the small operations
between them, and a sampled token's draw from the logits (`draw`).

MLX has no way to add a CPU kernel, and its one-row products read float32 weights at ~7 GB/s
through OpenBLAS's sgemm on a 2-core Xeon and quantized ones at ~1 GB/s on one core; these read
float32 at ~20 GB/s and a 4-bit weight in a third of that time (bench/RESULTS.md, "One stream and
small batches outside MLX"). A one-row quantized product sums each group's q · x and scales it
once, s · Σ q x + b · Σ x, the same number as (s q + b) · x up to fp32 rounding, with activations
kept in float32 (llama.cpp rounds them to 8 bits); four weight rows at a time share each load of x.
A batch's product de-quantizes (or widens, from half precision) four weight rows at a time into a
buffer and multiplies them by four rows of x at a time. Loops are written the way LLVM was seen to
vectorize them (bench/RESULTS.md): inner loops counted from 0 with constant or plain trip counts,
named scalar sums, and a group's scale and bias read one per statement before a de-quantizing loop
(read as a tuple, matmul_q4's stayed scalar).
SwiGLU and attention's softmax take an exp of their own (`_exp`) that LLVM vectorizes, 6x faster
than libm's a value and as accurate as cpu_kernels' fast_exp. The products' inner loops are written
as LLVM vectors inside numba's functions (intrinsics, cached with them), 512 bits wide where the CPU
has AVX-512, else 256: one row's quantized sums (`_row_dotter`), a row's de-quantization
(`_dequantizer`) and the batch products' tile (`_vector_tile`), where numba's loops ran slower, were
not vectorized whole, or spilled their sums on AVX2 (bench/RESULTS.md); and one row's sums over a
half-precision copy of a float16 or bfloat16 base's weights (`_half_dotter`), those copies
(`_halver`) and their rows widened for a batch (`_widener`), which numba has no type for.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils, codegen, config
from numba.extending import intrinsic

from mlx_lora.model import exp_constants as ec

# reassociation (vector sums), contraction (FMA); no assumption about infinities or NaNs
FAST = {"reassoc", "contract", "nsz", "arcp"}


@njit(parallel=True, fastmath=FAST, cache=True)
def matvec(w, x, out):
    """out (n,) = w (n, k) float32 @ x (k,); n >= 4."""
    n, k = w.shape
    for r in prange((n + 3) // 4):
        i = min(4 * r, n - 4)  # the last four rows again where n is not a multiple of 4
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for j in range(k):
            xj = x[j]
            a0 += w[i, j] * xj
            a1 += w[i + 1, j] * xj
            a2 += w[i + 2, j] * xj
            a3 += w[i + 3, j] * xj
        out[i], out[i + 1], out[i + 2], out[i + 3] = a0, a1, a2, a3


@njit(fastmath=FAST, cache=True, inline="always")
def _four_by_four(w, o, x, out, i, r, k):
    """out[r..r+4, i..i+4] = x[r..r+4] @ w[o..o+4]ᵀ: sixteen sums, each load of w and x used four times."""
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = np.float32(0.0)
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = np.float32(0.0)
    for j in range(k):
        w0 = w[o, j]
        w1 = w[o + 1, j]
        w2 = w[o + 2, j]
        w3 = w[o + 3, j]
        x0 = x[r, j]
        x1 = x[r + 1, j]
        x2 = x[r + 2, j]
        x3 = x[r + 3, j]
        a00 += w0 * x0
        a01 += w1 * x0
        a02 += w2 * x0
        a03 += w3 * x0
        a10 += w0 * x1
        a11 += w1 * x1
        a12 += w2 * x1
        a13 += w3 * x1
        a20 += w0 * x2
        a21 += w1 * x2
        a22 += w2 * x2
        a23 += w3 * x2
        a30 += w0 * x3
        a31 += w1 * x3
        a32 += w2 * x3
        a33 += w3 * x3
    out[r, i], out[r, i + 1], out[r, i + 2], out[r, i + 3] = a00, a01, a02, a03
    out[r + 1, i], out[r + 1, i + 1], out[r + 1, i + 2], out[r + 1, i + 3] = a10, a11, a12, a13
    out[r + 2, i], out[r + 2, i + 1], out[r + 2, i + 2], out[r + 2, i + 3] = a20, a21, a22, a23
    out[r + 3, i], out[r + 3, i + 1], out[r + 3, i + 2], out[r + 3, i + 3] = a30, a31, a32, a33


def _compiles_for_avx512() -> bool:
    """Whether numba compiles for a CPU with AVX-512 (its NUMBA_CPU_FEATURES, else this CPU's): the
    width of the intrinsics' vectors, and how many sums _vector_tile keeps in registers."""
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else codegen.get_host_cpu_features()
    return "+avx512f" in str(features).split(",")


_AVX512 = _compiles_for_avx512()  # a constant of the compiled loops, as numba's cache is kept per CPU
# _vector_tile's float32 lanes a sum (one register) and rows of x a call: 4 x 4 sums of 512 bits
# fill half of AVX-512's 32 registers; AVX2's 16 hold 4 x 2 of 256 bits beside their six loads.
_WIDTH, _TILE_ROWS = (16, 4) if _AVX512 else (8, 2)


def _c_arrays(ndim: int, dtypes, *arrays) -> bool:
    """Whether each of numba's `arrays` is C-contiguous, of `ndim` dimensions and its dtype in `dtypes`."""
    return all(
        isinstance(a, types.Array) and a.layout == "C" and a.ndim == ndim and a.dtype == d
        for a, d in zip(arrays, dtypes, strict=True)
    )


def _scale_arrays(scales, biases) -> bool:
    """Whether a quantized weight's scales and biases are C arrays of one type the intrinsics read:
    float32, or uint16 holding float16's bits (numba has no float16 arrays on the CPU; decoder.py
    narrows the scales a float16 holds exactly)."""
    return scales.dtype in (types.float32, types.uint16) and _c_arrays(scales.ndim, [scales.dtype] * 2, scales, biases)


def _scale_loader(builder, array_type):
    """A load of one scale or bias as float32 from a `_scale_arrays` array."""
    if array_type.dtype == types.uint16:
        return lambda at: builder.fpext(builder.bitcast(builder.load(at), ir.HalfType()), ir.FloatType())
    return builder.load


def _scale_vectors(builder, array_type, lanes: int, splat: bool):
    """A load of `lanes` scales or biases as float32 lanes from a `_scale_arrays` array: `splat`, the
    one at the pointer in every lane (float16's bits splatted, then widened: one broadcast and one
    conversion, where a widened scalar took three); else those from the pointer on."""
    half = array_type.dtype == types.uint16
    stored = ir.VectorType(ir.IntType(16) if half else ir.FloatType(), lanes)

    def load(at):
        vector = (
            _splat(builder, builder.load(at), stored)
            if splat
            else builder.load(builder.bitcast(at, stored.as_pointer()), align=2 if half else 4)
        )
        if not half:
            return vector
        return builder.fpext(
            builder.bitcast(vector, ir.VectorType(ir.HalfType(), lanes)), ir.VectorType(ir.FloatType(), lanes)
        )

    return load


def _splat(builder, value, vector: ir.VectorType):
    """`value` in every lane of `vector`."""
    one = builder.insert_element(ir.Constant(vector, None), value, ir.IntType(32)(0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), vector.count), None))


def _codes(builder, at, bits: int) -> list:
    """A step's 32 codes from the bytes at pointer `at` as vectors of _WIDTH int32, in `_nibble_order`:
    each load of _WIDTH bytes widened as it is read (`vpmovzxbd` from memory); 8 bits, the codes in
    their order; 4 bits, a byte's low nibble then its high one, so each _WIDTH bytes give their
    2 · _WIDTH weights' even positions, then their odd ones. Widening the bytes of a register instead
    took a shuffle for every 8 codes on AVX2, which bound the one-row product (bench/RESULTS.md)."""
    width = ir.VectorType(ir.IntType(32), _WIDTH)
    loaded = ir.VectorType(ir.IntType(8), _WIDTH).as_pointer()
    codes = []
    for first in range(0, _LANES * bits // 8, _WIDTH):
        wide = builder.zext(
            builder.load(builder.bitcast(builder.gep(at, [ir.IntType(64)(first)]), loaded), align=1), width
        )
        codes += (
            [wide] if bits == 8 else [builder.and_(wide, width([15] * _WIDTH)), builder.lshr(wide, width([4] * _WIDTH))]
        )
    return codes


def _totals(builder, sums: list):
    """The four vector sums' totals as one vector of 4, summed in the tree LLVM's reduce.fadd uses
    for each (the halves, then their halves, ...: the same floats), their steps shared between them:
    a third of the instructions that four reductions and four scalar stores took."""

    def pick(a, b, lanes):
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(ir.IntType(32), len(lanes)), lanes))

    def halves(a, b, width):  # [a's low half + its high half, b's likewise]
        low = [j for j in range(width // 2)] + [width + j for j in range(width // 2)]
        return builder.fadd(pick(a, b, low), pick(a, b, [j + width // 2 for j in low]))

    if _WIDTH == 16:  # to 8 lanes each, the tree's first step
        sums = [builder.fadd(pick(v, v, list(range(8))), pick(v, v, list(range(8, 16)))) for v in sums]
    pairs = halves(sums[0], sums[1], 8), halves(sums[2], sums[3], 8)  # [u0 | u1], [u2 | u3], 4 lanes each
    quarters = builder.fadd(pick(*pairs, [0, 1, 8, 9, 4, 5, 12, 13]), pick(*pairs, [2, 3, 10, 11, 6, 7, 14, 15]))
    return builder.fadd(pick(quarters, quarters, [0, 4, 2, 6]), pick(quarters, quarters, [1, 5, 3, 7]))


@intrinsic
def _vector_tile(typingctx, w, x, out, i, r):
    """out[r..r+_TILE_ROWS, i..i+4] = x[r..r+_TILE_ROWS] @ wᵀ for w (4, k), x (R, k), out (R, n), k a
    multiple of _WIDTH: a sum of _WIDTH lanes in a register for each output, where numba's loop
    (_four_by_four) keeps 16 of them and spills on AVX2, and LLVM vectorizes it to 256 bits on a
    Xeon with AVX-512 (its tuning for that CPU). A 16-row float32 product of SmolLM2's shapes ran
    20-35% faster alone on that Xeon; the 16-row step 11% faster in float32 and 30% in Q4_1's
    products on an AMD EPYC with AVX2 (bench/RESULTS.md)."""
    if not _c_arrays(2, [types.float32] * 3, w, x, out):
        return None

    def codegen(context, builder, sig, args):
        wa, xa, oa = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args[:3], args[:3]))
        k, n = cgutils.unpack_tuple(builder, xa.shape)[1], cgutils.unpack_tuple(builder, oa.shape)[1]
        i, r = (context.cast(builder, v, t, types.intp) for v, t in zip(args[3:], sig.args[3:]))
        lanes = ir.VectorType(ir.FloatType(), _WIDTH)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(lanes, [lanes] * 3), f"llvm.fma.v{_WIDTH}f32"
        )
        sums = [
            [cgutils.alloca_once_value(builder, lanes([0.0] * _WIDTH)) for _ in range(4)] for _ in range(_TILE_ROWS)
        ]

        def load(data, row, j):
            at = builder.gep(data, [builder.add(builder.mul(k, row), j)])
            return builder.load(builder.bitcast(at, lanes.as_pointer()), align=4)

        with cgutils.for_range(builder, builder.udiv(k, k.type(_WIDTH))) as step:
            j = builder.mul(step.index, k.type(_WIDTH))
            ws = [load(wa.data, k.type(t), j) for t in range(4)]
            xs = [load(xa.data, builder.add(r, k.type(s)), j) for s in range(_TILE_ROWS)]
            for s in range(_TILE_ROWS):
                for t in range(4):
                    builder.store(builder.call(fma, [ws[t], xs[s], builder.load(sums[s][t])]), sums[s][t])
        four = ir.VectorType(ir.FloatType(), 4)
        for s in range(_TILE_ROWS):
            value = _totals(builder, [builder.load(sums[s][t]) for t in range(4)])
            at = builder.add(builder.mul(n, builder.add(r, k.type(s))), i)
            builder.store(value, builder.bitcast(builder.gep(oa.data, [at]), four.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(w, x, out, i, r), codegen


@njit(fastmath=FAST, cache=True, inline="always")
def _tile(w, x, out, i, r, k):
    """out[r..r+4, i..i+4] = x[r..r+4] @ wᵀ, w (4, k): vector sums where k allows."""
    if k % _WIDTH == 0:
        for s in range(0, 4, _TILE_ROWS):
            _vector_tile(w, x, out, i, r + s)
    else:
        _four_by_four(w, 0, x, out, i, r, k)


@njit(cache=True, inline="always")
def _share(c, chunks, blocks):
    """The range of blocks that chunk c of `chunks` even shares takes. The decoder gives a batch
    product one chunk a thread (numba's get_num_threads, which a cached loop cannot call), so each
    allocates its buffer once: one a block cost the 16-row products of SmolLM2's shapes 0-10%."""
    return c * blocks // chunks, (c + 1) * blocks // chunks


@njit(parallel=True, fastmath=FAST, cache=True)
def matmul(w, x, out, chunks):
    """out (R, n) = x (R, k) @ w (n, k) float32 transposed, R >= 4 (n >= 4): four of w's rows at a
    time against every row of x, four at a time, over `chunks` shares of the blocks (`_share`)."""
    n, rows, k = w.shape[0], x.shape[0], x.shape[1]
    blocks = (n + 3) // 4
    chunks = min(chunks, blocks)
    for c in prange(chunks):
        first, end = _share(c, chunks, blocks)
        for blk in range(first, end):
            i = min(4 * blk, n - 4)
            for r in range(0, rows, 4):
                _tile(w[i : i + 4], x, out, i, min(r, rows - 4), k)


_LANES = 32  # codes a step of de-quantization turns into floats: a group's smallest size


def _interleaved(builder, even, odd) -> tuple:
    """Two vectors of _WIDTH lanes, even[0], odd[0], even[1], odd[1], ..."""
    order = [j // 2 + _WIDTH * (j % 2) for j in range(2 * _WIDTH)]
    return tuple(
        builder.shuffle_vector(even, odd, ir.Constant(ir.VectorType(ir.IntType(32), _WIDTH), order[h : h + _WIDTH]))
        for h in (0, _WIDTH)
    )


def _dequantizer(bits: int):
    """An intrinsic that sets w (k,) = scale · q + bias (float32, one FMA, as numba's loop rounded it)
    for a row's `bits`-bit codes, packed (k · bits / 8,) bytes (4 bits: two a byte, low nibble first),
    in groups of a multiple of 32 (scales and biases (k / group,)), w in the weights' order. Numba's
    loop left ~20 scalar instructions around each group's vector body; here each 32 codes are widened
    as loaded (`_codes`; 4 bits: even and odd positions interleaved back), converted and one FMA: 30%
    faster on SmolLM2's shapes (bench/RESULTS.md)."""

    def dequantize(typingctx, packed, scales, biases, w):
        if not (
            _c_arrays(1, [types.uint8, types.float32], packed, w) and _scale_arrays(scales, biases) and scales.ndim == 1
        ):
            return None
        return types.void(packed, scales, biases, w), codegen

    def codegen(context, builder, sig, args):
        pk, sc, bi, wo = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args, args))
        groups, k = cgutils.unpack_tuple(builder, sc.shape)[0], cgutils.unpack_tuple(builder, wo.shape)[0]
        steps = builder.udiv(builder.udiv(k, k.type(_LANES)), groups)  # a group's steps of 32 codes
        size, floats = _LANES * bits // 8, ir.VectorType(ir.FloatType(), _WIDTH)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(floats, [floats] * 3), f"llvm.fma.v{_WIDTH}f32"
        )

        with cgutils.for_range(builder, groups) as g:
            load = _scale_vectors(builder, sig.args[1], _WIDTH, splat=True)
            scale, bias = (load(builder.gep(a.data, [g.index])) for a in (sc, bi))
            with cgutils.for_range(builder, steps) as j:
                step = builder.add(builder.mul(g.index, steps), j.index)
                codes = _codes(builder, builder.gep(pk.data, [builder.mul(step, step.type(size))]), bits)
                if bits == 4:  # each even and odd half back in the weights' order, so x stays as it is
                    codes = [half for pair in zip(codes[::2], codes[1::2]) for half in _interleaved(builder, *pair)]
                for c, code in enumerate(codes):
                    value = builder.call(fma, [scale, builder.uitofp(code, floats), bias])
                    dst = builder.gep(
                        wo.data, [builder.add(builder.mul(step, step.type(_LANES)), step.type(c * _WIDTH))]
                    )
                    builder.store(value, builder.bitcast(dst, floats.as_pointer()), align=4)
        return context.get_dummy_value()

    dequantize.__name__ = dequantize.__qualname__ = f"_dequantize_q{bits}"
    return intrinsic(dequantize)


_dequantize_q4, _dequantize_q8 = _dequantizer(4), _dequantizer(8)


def _row_dotter(bits: int):  # long: one intrinsic's typing and its LLVM loop nest, read as one
    """An intrinsic that sets out[i..i+4] = rows i..i+4 of a `bits`-bit affine weight @ x as
    s · Σ q x + b · Σ x a group: packed (n, k · bits / 8) bytes, scales and biases (n, groups), a
    group a multiple of 32 weights, `sums` (groups,) each group's Σ x. Each 32 codes of a row are
    widened as loaded (`_codes`), turned into floats and multiplied into a vector of partial sums,
    which the group's scale multiplies into the row's vector sums; vectors of 16 lanes with AVX-512,
    else 8, so that four rows' sums stay in AVX2's 16 registers. 4 bits: x in `_nibble_order`. The
    biases' Σ b · Σ x is summed after the groups, a vector of groups at a time. On an AMD EPYC with
    AVX2, numba's loops of the same sums took 2.4x as long for a 4-bit 1536 x 576 product in cache, a
    form that de-quantized each weight before its product spilled its sums, one that widened the
    bytes of a 32-byte register took 1.2-1.3x as long (4 bits) and 1.02-1.1x (8 bits) on SmolLM2's
    shapes, and one that added each group's bias as a scalar 1.04-1.3x (bench/RESULTS.md)."""

    def dot(typingctx, packed, scales, biases, x, sums, out, i):
        if not (
            _c_arrays(2, [types.uint8], packed)
            and _scale_arrays(scales, biases)
            and scales.ndim == 2
            and _c_arrays(1, [types.float32] * 3, x, sums, out)
            and isinstance(i, types.Integer)
        ):
            return None
        return types.void(packed, scales, biases, x, sums, out, i), codegen

    def codegen(context, builder, sig, args):
        pk, sc, bi, xa, sa, oa = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args[:6], args[:6]))
        i = context.cast(builder, args[6], sig.args[6], types.intp)
        width, groups = cgutils.unpack_tuple(builder, pk.shape)[1], cgutils.unpack_tuple(builder, sc.shape)[1]
        steps = builder.udiv(builder.udiv(cgutils.unpack_tuple(builder, xa.shape)[0], i.type(_LANES)), groups)
        f32, size, lanes = ir.FloatType(), _LANES * bits // 8, _WIDTH
        part = ir.VectorType(f32, lanes)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(part, [part] * 3), f"llvm.fma.v{lanes}f32")
        reduce = ir.FunctionType(f32, [f32, part])
        total = cgutils.get_or_insert_function(builder.module, reduce, f"llvm.vector.reduce.fadd.v{lanes}f32")
        rows = [builder.add(i, i.type(t)) for t in range(4)]
        sums = [cgutils.alloca_once_value(builder, part([0.0] * lanes)) for _ in range(4)]

        zero = part([0.0] * lanes)
        partials = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]  # a group's Σ q x
        with cgutils.for_range(builder, groups) as g:
            for t in range(4):
                builder.store(zero, partials[t])
            with cgutils.for_range(builder, steps) as j:
                step = builder.add(builder.mul(g.index, steps), j.index)
                xs = []
                for first in range(0, _LANES, lanes):
                    at = builder.gep(xa.data, [builder.add(builder.mul(step, step.type(_LANES)), step.type(first))])
                    xs.append(builder.load(builder.bitcast(at, part.as_pointer()), align=4))
                for t in range(4):
                    at = builder.add(builder.mul(rows[t], width), builder.mul(step, step.type(size)))
                    acc = builder.load(partials[t])
                    for c, codes in enumerate(_codes(builder, builder.gep(pk.data, [at]), bits)):
                        acc = builder.call(fma, [builder.uitofp(codes, part), xs[c], acc])
                    builder.store(acc, partials[t])
            splat = _scale_vectors(builder, sig.args[1], lanes, splat=True)
            for t in range(4):
                scale = splat(builder.gep(sc.data, [builder.add(builder.mul(rows[t], groups), g.index)]))
                builder.store(builder.call(fma, [scale, builder.load(partials[t]), builder.load(sums[t])]), sums[t])

        # Σ b · Σ x over the groups, `lanes` groups a vector, then the rest one at a time
        offsets = [cgutils.alloca_once_value(builder, zero) for _ in range(4)]
        blocks, vectors = builder.udiv(groups, groups.type(lanes)), _scale_vectors(builder, sig.args[1], lanes, False)
        with cgutils.for_range(builder, blocks) as block:
            first = builder.mul(block.index, block.index.type(lanes))
            totals = builder.load(builder.bitcast(builder.gep(sa.data, [first]), part.as_pointer()), align=4)
            for t in range(4):
                bias = vectors(builder.gep(bi.data, [builder.add(builder.mul(rows[t], groups), first)]))
                builder.store(builder.call(fma, [bias, totals, builder.load(offsets[t])]), offsets[t])
        values = [builder.call(total, [f32(-0.0), builder.load(a)], fastmath=("reassoc",)) for a in sums + offsets]
        values = [cgutils.alloca_once_value(builder, builder.fadd(values[t], values[4 + t])) for t in range(4)]
        load = _scale_loader(builder, sig.args[1])
        with cgutils.for_range(builder, builder.sub(groups, builder.mul(blocks, blocks.type(lanes)))) as rest:
            g = builder.add(builder.mul(blocks, blocks.type(lanes)), rest.index)
            total_x = builder.load(builder.gep(sa.data, [g]))
            for t in range(4):
                bias = load(builder.gep(bi.data, [builder.add(builder.mul(rows[t], groups), g)]))
                value = builder.fadd(builder.load(values[t]), builder.fmul(bias, total_x), flags=("contract",))
                builder.store(value, values[t])
        for t in range(4):
            builder.store(builder.load(values[t]), builder.gep(oa.data, [rows[t]]))
        return context.get_dummy_value()

    dot.__name__ = dot.__qualname__ = f"_dot_q{bits}"
    return intrinsic(dot)


_dot_q4, _dot_q8 = _row_dotter(4), _row_dotter(8)


def _widened(builder, raw, brain: bool):
    """_WIDTH float16 bits (bfloat16's, `brain`) as float32 lanes: `vcvtph2ps`, or the bits shifted
    into a float32's high half."""
    floats, words = ir.VectorType(ir.FloatType(), _WIDTH), ir.VectorType(ir.IntType(32), _WIDTH)
    if brain:
        return builder.bitcast(builder.shl(builder.zext(raw, words), words([16] * _WIDTH)), floats)
    return builder.fpext(builder.bitcast(raw, ir.VectorType(ir.HalfType(), _WIDTH)), floats)


def _half_dotter(brain: bool):
    """An intrinsic that sets out[i..i+4] = rows i..i+4 of w (n, k) @ x for w's float16 bits (or
    bfloat16's, `brain`) as uint16, k a multiple of 2 · _WIDTH: each _WIDTH weights widened as loaded
    (`vcvtph2ps`; bfloat16, shifted into a float32's high half), two vector sums a row. The same
    floats as the float32 copy MLX computes with, read in half the bytes: a one-row product is bound
    by memory (bench/RESULTS.md)."""

    def dot(typingctx, w, x, out, i):
        if not (_c_arrays(2, [types.uint16], w) and _c_arrays(1, [types.float32] * 2, x, out)):
            return None
        return types.void(w, x, out, i), codegen

    def codegen(context, builder, sig, args):
        wa, xa, oa = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args[:3], args[:3]))
        i = context.cast(builder, args[3], sig.args[3], types.intp)
        k = cgutils.unpack_tuple(builder, wa.shape)[1]
        f32, bits = ir.FloatType(), ir.VectorType(ir.IntType(16), _WIDTH)
        part = ir.VectorType(f32, _WIDTH)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(part, [part] * 3), f"llvm.fma.v{_WIDTH}f32"
        )
        reduce = ir.FunctionType(f32, [f32, part])
        total = cgutils.get_or_insert_function(builder.module, reduce, f"llvm.vector.reduce.fadd.v{_WIDTH}f32")
        sums = [[cgutils.alloca_once_value(builder, part([0.0] * _WIDTH)) for _ in range(2)] for _ in range(4)]
        rows = [builder.gep(wa.data, [builder.mul(builder.add(i, i.type(t)), k)]) for t in range(4)]
        with cgutils.for_range(builder, builder.udiv(k, k.type(2 * _WIDTH))) as step:
            for h in range(2):
                j = builder.add(builder.mul(step.index, step.index.type(2 * _WIDTH)), step.index.type(h * _WIDTH))
                xs = builder.load(builder.bitcast(builder.gep(xa.data, [j]), part.as_pointer()), align=4)
                for t in range(4):
                    raw = builder.load(builder.bitcast(builder.gep(rows[t], [j]), bits.as_pointer()), align=2)
                    ws = _widened(builder, raw, brain)
                    builder.store(builder.call(fma, [ws, xs, builder.load(sums[t][h])]), sums[t][h])
        for t in range(4):
            both = builder.fadd(builder.load(sums[t][0]), builder.load(sums[t][1]))
            value = builder.call(total, [f32(-0.0), both], fastmath=("reassoc",))
            builder.store(value, builder.gep(oa.data, [builder.add(i, i.type(t))]))
        return context.get_dummy_value()

    dot.__name__ = dot.__qualname__ = "_dot_bf16" if brain else "_dot_f16"
    return intrinsic(dot)


_dot_f16, _dot_bf16 = _half_dotter(False), _half_dotter(True)


@njit(parallel=True, fastmath=FAST, cache=True)
def matvec_f16(w, x, out):
    """out (n,) = w (n, k) @ x for w float16's bits (uint16); n >= 4, k a multiple of 2 · _WIDTH."""
    n = w.shape[0]
    for r in prange((n + 3) // 4):
        _dot_f16(w, x, out, min(4 * r, n - 4))


@njit(parallel=True, fastmath=FAST, cache=True)
def matvec_bf16(w, x, out):
    """matvec_f16 for bfloat16's bits."""
    n = w.shape[0]
    for r in prange((n + 3) // 4):
        _dot_bf16(w, x, out, min(4 * r, n - 4))


def _halver(brain: bool):
    """An intrinsic that sets out (k,) = w (k,) float32's float16 bits (or bfloat16's, `brain`: its
    high halves), k a multiple of _WIDTH, and returns whether every value is exactly such a half:
    it round-trips (`vcvtps2ph`, `vcvtph2ps`), or its low half is zero."""

    def halve(typingctx, w, out):
        if not (_c_arrays(1, [types.float32], w) and _c_arrays(1, [types.uint16], out)):
            return None
        return types.boolean(w, out), codegen

    def codegen(context, builder, sig, args):
        wa, oa = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args, args))
        floats, words = ir.VectorType(ir.FloatType(), _WIDTH), ir.VectorType(ir.IntType(32), _WIDTH)
        halves = ir.VectorType(ir.IntType(16), _WIDTH)
        k = cgutils.unpack_tuple(builder, wa.shape)[0]
        exact = cgutils.alloca_once_value(builder, ir.IntType(1)(1))
        with cgutils.for_range(builder, builder.udiv(k, k.type(_WIDTH))) as step:
            j = builder.mul(step.index, step.index.type(_WIDTH))
            value = builder.load(builder.bitcast(builder.gep(wa.data, [j]), floats.as_pointer()), align=4)
            if brain:
                bits = builder.bitcast(value, words)
                same = builder.icmp_unsigned("==", builder.and_(bits, words([0xFFFF] * _WIDTH)), words([0] * _WIDTH))
                half = builder.trunc(builder.lshr(bits, words([16] * _WIDTH)), halves)
            else:
                narrow = builder.fptrunc(value, ir.VectorType(ir.HalfType(), _WIDTH))
                same = builder.fcmp_ordered("==", builder.fpext(narrow, floats), value)
                half = builder.bitcast(narrow, halves)
            every = builder.icmp_unsigned("==", builder.bitcast(same, ir.IntType(_WIDTH)), ir.IntType(_WIDTH)(-1))
            builder.store(builder.and_(builder.load(exact), every), exact)
            builder.store(half, builder.bitcast(builder.gep(oa.data, [j]), halves.as_pointer()), align=2)
        return builder.load(exact)

    halve.__name__ = halve.__qualname__ = "_row_to_bf16" if brain else "_row_to_f16"
    return intrinsic(halve)


_row_to_f16, _row_to_bf16 = _halver(False), _halver(True)


def _widener(brain: bool):
    """An intrinsic that sets out (k,) float32 = w (k,) float16's bits (or bfloat16's, `brain`), k a
    multiple of _WIDTH: _WIDTH a load (`vcvtph2ps`; bfloat16, shifted into a float32's high half)."""

    def widen(typingctx, w, out):
        if not (_c_arrays(1, [types.uint16], w) and _c_arrays(1, [types.float32], out)):
            return None
        return types.void(w, out), codegen

    def codegen(context, builder, sig, args):
        wa, oa = (context.make_array(t)(context, builder, v) for t, v in zip(sig.args, args))
        floats, halves = ir.VectorType(ir.FloatType(), _WIDTH), ir.VectorType(ir.IntType(16), _WIDTH)
        k = cgutils.unpack_tuple(builder, wa.shape)[0]
        with cgutils.for_range(builder, builder.udiv(k, k.type(_WIDTH))) as step:
            j = builder.mul(step.index, step.index.type(_WIDTH))
            raw = builder.load(builder.bitcast(builder.gep(wa.data, [j]), halves.as_pointer()), align=2)
            at = builder.bitcast(builder.gep(oa.data, [j]), floats.as_pointer())
            builder.store(_widened(builder, raw, brain), at, align=4)
        return context.get_dummy_value()

    widen.__name__ = widen.__qualname__ = "_widen_bf16" if brain else "_widen_f16"
    return intrinsic(widen)


_widen_f16, _widen_bf16 = _widener(False), _widener(True)


@njit(parallel=True, cache=True)
def to_f16(w, out):
    """out = w (n, k) float32's float16 bits (uint16), k a multiple of _WIDTH, over every core;
    whether every value is a float16's."""
    exact = np.empty(w.shape[0], np.bool_)
    for r in prange(w.shape[0]):
        exact[r] = _row_to_f16(w[r], out[r])
    return exact.all()


@njit(parallel=True, cache=True)
def to_bf16(w, out):
    """to_f16 for bfloat16: out the high halves of w's bits; whether every low half is zero."""
    exact = np.empty(w.shape[0], np.bool_)
    for r in prange(w.shape[0]):
        exact[r] = _row_to_bf16(w[r], out[r])
    return exact.all()


@njit(fastmath=FAST, cache=True)
def _nibble_order(x):
    """x (k,) with each 2 · _WIDTH values as _codes gives 4-bit weights: the _WIDTH at even
    positions, then the _WIDTH at odd."""
    out = np.empty_like(x)
    for s in range(0, x.shape[0], 2 * _WIDTH):
        for j in range(_WIDTH):
            out[s + j] = x[s + 2 * j]
            out[s + _WIDTH + j] = x[s + 2 * j + 1]
    return out


@njit(parallel=True, fastmath=FAST, cache=True)
def matvec_q4(packed, scales, biases, x, out):
    """out (n,) = the 4-bit affine weight (packed (n, k/2) bytes, scales and biases (n, groups)) @ x;
    n >= 4, a group a multiple of 32 weights. Byte m of a row holds weight 2m in its low nibble and
    2m+1 in its high one (MLX's packing, little-endian)."""
    n, sums = packed.shape[0], x.reshape(scales.shape[1], -1).sum(axis=1)
    ordered = _nibble_order(x)
    for r in prange((n + 3) // 4):
        _dot_q4(packed, scales, biases, ordered, sums, out, min(4 * r, n - 4))  # the last four again where n % 4


@njit(parallel=True, fastmath=FAST, cache=True)
def matvec_q8(packed, scales, biases, x, out):
    """out (n,) = the 8-bit affine weight (packed (n, k) bytes, scales and biases (n, groups)) @ x;
    n >= 4, a group a multiple of 32 weights."""
    n, sums = packed.shape[0], x.reshape(scales.shape[1], -1).sum(axis=1)
    for r in prange((n + 3) // 4):
        _dot_q8(packed, scales, biases, x, sums, out, min(4 * r, n - 4))


@njit(parallel=True, fastmath=FAST, cache=True)
def _matmul_codes(packed, scales, biases, x, out, chunks, bits):
    """matmul of a `bits`-bit affine weight (C-contiguous arrays): each block of four rows
    de-quantized once (scale · q + bias, float32, as MLX's), into a buffer that stays in the core's
    cache for every row of x; `chunks` shares of the blocks, one buffer each (`_share`). (The kind
    of weight is an argument, not a function: numba caches no loop that is passed a function.)"""
    n, rows, k = packed.shape[0], x.shape[0], x.shape[1]
    blocks = (n + 3) // 4
    chunks = min(chunks, blocks)
    for c in prange(chunks):
        w = np.empty((4, k), np.float32)
        first, end = _share(c, chunks, blocks)
        for blk in range(first, end):
            i = min(4 * blk, n - 4)
            for t in range(4):
                if bits == 4:
                    _dequantize_q4(packed[i + t], scales[i + t], biases[i + t], w[t])
                else:
                    _dequantize_q8(packed[i + t], scales[i + t], biases[i + t], w[t])
            for r in range(0, rows, 4):
                _tile(w, x, out, i, min(r, rows - 4), k)


@njit(parallel=True, fastmath=FAST, cache=True)
def _matmul_halves(w, x, out, chunks, brain):
    """matmul of a weight as float16's bits (bfloat16's, `brain`), four rows at a time widened into
    the buffer _matmul_codes de-quantizes into: the float32 weight's own products, bit for bit."""
    n, rows, k = w.shape[0], x.shape[0], x.shape[1]
    blocks = (n + 3) // 4
    chunks = min(chunks, blocks)
    for c in prange(chunks):
        wide = np.empty((4, k), np.float32)
        first, end = _share(c, chunks, blocks)
        for blk in range(first, end):
            i = min(4 * blk, n - 4)
            if brain:
                _widen_bf16(w[i : i + 4].reshape(-1), wide.reshape(-1))
            else:
                _widen_f16(w[i : i + 4].reshape(-1), wide.reshape(-1))
            for r in range(0, rows, 4):
                _tile(wide, x, out, i, min(r, rows - 4), k)


@njit(fastmath=FAST, cache=True)
def matmul_q4(packed, scales, biases, x, out, chunks):
    """matmul of a 4-bit affine weight over `chunks` shares (one a thread), as _matmul_codes'."""
    _matmul_codes(packed, scales, biases, x, out, chunks, 4)


@njit(fastmath=FAST, cache=True)
def matmul_q8(packed, scales, biases, x, out, chunks):
    """matmul_q4 for an 8-bit affine weight."""
    _matmul_codes(packed, scales, biases, x, out, chunks, 8)


@njit(fastmath=FAST, cache=True)
def matmul_f16(w, x, out, chunks):
    """matmul of a weight as float16's bits (uint16, k a multiple of _WIDTH), reading half the
    float32 weight's bytes from memory for the same products (_matmul_halves)."""
    _matmul_halves(w, x, out, chunks, False)


@njit(fastmath=FAST, cache=True)
def matmul_bf16(w, x, out, chunks):
    """matmul_f16 for bfloat16's bits."""
    _matmul_halves(w, x, out, chunks, True)


@njit(fastmath=FAST, cache=True)
def low_rank(x, a, b, scale, out):
    """out (n,) += scale · (x @ a) @ b: a LoRA adapter's one-row delta, a (k, r), b (r, n)."""
    k, rank = a.shape
    t = np.zeros(rank, np.float32)
    for j in range(k):
        xj = x[j]
        for c in range(rank):
            t[c] += xj * a[j, c]
    for c in range(rank):
        tc = scale * t[c]
        for m in range(b.shape[1]):
            out[m] += tc * b[c, m]


@njit(fastmath=FAST, cache=True)
def rms_norm(x, weight, eps, out):
    """out = x / sqrt(mean(x²) + eps) · weight, over the last axis of x (rows, d); the sum of
    squares vectorized (4x faster on 16 rows of 576 than in order)."""
    for r in range(x.shape[0]):
        s = np.float32(0.0)
        for j in range(x.shape[1]):
            s += x[r, j] * x[r, j]
        inv = np.float32(1.0) / np.sqrt(s / np.float32(x.shape[1]) + eps)
        for j in range(x.shape[1]):
            out[r, j] = (x[r, j] * inv) * weight[j]


@njit(cache=True)
def _rotate(x, cos, sin):
    """x (heads, d) rotated in place as MLX's non-traditional RoPE at one position: each head's
    halves (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)."""
    half = cos.shape[0]
    for h in range(x.shape[0]):
        for j in range(half):
            x1, x2 = x[h, j], x[h, j + half]
            x[h, j] = x1 * cos[j] - x2 * sin[j]
            x[h, j + half] = x1 * sin[j] + x2 * cos[j]


# exp with cpu_kernels' fast_exp's constants, from exp_constants (Cody-Waite reduction by ln 2, a
# degree-7 Taylor polynomial, 2**n from its exponent bits; below EXP_LOW 0, never a subnormal), as float32
LOG2E, LN2_HI, LN2_LO, EXP_LOW, EXP_HIGH = (
    np.float32(c) for c in (ec.LOG2E, ec.LN2_HI, ec.LN2_LO, ec.EXP_LOW, ec.EXP_HIGH)
)
C2, C3, C4, C5, C6, C7 = (np.float32(c) for c in ec.EXP_TAYLOR[2:])


@njit(fastmath=FAST, cache=True, inline="always")
def _exp(x, bits, n):
    """x[:n] = exp(x[:n]) in two loops LLVM vectorizes (libm's expf, a call a value, is 6x slower);
    bits: int32 room for n values."""
    scale = bits.view(np.float32)
    for p in range(n):
        v = x[p]
        c = min(max(v, EXP_LOW), EXP_HIGH)
        m = np.floor(c * LOG2E + np.float32(0.5))
        r = c - m * LN2_HI - m * LN2_LO
        y = ((((((C7 * r + C6) * r + C5) * r + C4) * r + C3) * r + C2) * r + np.float32(1.0)) * r + np.float32(1.0)
        x[p] = y
        bits[p] = np.int32(0) if v < EXP_LOW else (np.int32(m) + np.int32(127)) << np.int32(23)
    for p in range(n):
        x[p] *= scale[p]


@njit(fastmath=FAST, cache=True)
def _attend(q, keys, values, key, value, start, end, scale, scores, bits, out):
    """out (d,) = softmax(scale · q kᵀ) v over one key head's cached positions start..end and the
    newest one (key, value (d,)), which a batch has not yet counted in MLX's cache; scores and bits
    (float32, int32): room for end - start + 1 values."""
    d = q.shape[0]
    span = end - start
    top = -np.inf
    for p in range(start, end):
        s = np.float32(0.0)
        for j in range(d):
            s += q[j] * keys[p, j]
        s *= scale
        scores[p - start] = s
        top = max(top, s)
    s = np.float32(0.0)
    for j in range(d):
        s += q[j] * key[j]
    s *= scale
    scores[span] = s
    top = max(top, s)
    for p in range(span + 1):
        scores[p] -= top
    _exp(scores, bits, span + 1)
    total = np.float32(0.0)
    for p in range(span + 1):
        total += scores[p]
    w = scores[span] / total
    for j in range(d):
        out[j] = w * value[j]
    for p in range(start, end):
        w = scores[p - start] / total
        for j in range(d):
            out[j] += w * values[p, j]


@njit(parallel=True, fastmath=FAST, cache=True)
def attention(q, keys, values, length, scale, out):
    """out (heads, d): each query head's softmax(scale · q kᵀ) v over the first `length` cached
    positions of its key head (keys, values (kv_heads, capacity, d); heads sharing a key head in
    order, as MLX's grouped attention)."""
    group = q.shape[0] // keys.shape[0]
    last = length - 1
    for h in prange(q.shape[0]):
        g = h // group
        scores, bits = np.empty(length, np.float32), np.empty(length, np.int32)
        _attend(q[h], keys[g], values[g], keys[g, last], values[g, last], 0, last, scale, scores, bits, out[h])


@njit(parallel=True, fastmath=FAST, cache=True)
def attention_rows(q, keys, values, key, value, starts, end, scale, out):
    """attention for each of R rows (q, out (R, heads, d)) over their cached positions (keys, values
    (R, kv_heads, capacity, d)) starts[r]..end and their newest ones (key, value (R, kv_heads, d))."""
    group = q.shape[1] // keys.shape[1]
    for r in prange(q.shape[0]):
        span = end - starts[r] + 1
        scores, bits = np.empty(span, np.float32), np.empty(span, np.int32)
        for h in range(q.shape[1]):
            g = h // group
            _attend(
                q[r, h],
                keys[r, g],
                values[r, g],
                key[r, g],
                value[r, g],
                starts[r],
                end,
                scale,
                scores,
                bits,
                out[r, h],
            )


@njit(cache=True)
def rotate_rows(x, cos, sin, positions):
    """_rotate for each of R rows (x (R, heads, d)), row r at positions[r]."""
    for r in range(x.shape[0]):
        _rotate(x[r], cos[positions[r]], sin[positions[r]])


SPAN = 512  # values a SwiGLU loop exponentiates at once


@njit(parallel=True, fastmath=FAST, cache=True)
def swiglu(gate, up, out):
    """out = silu(gate) · up, SPAN values at a time over both cores (out may be gate)."""
    n = gate.shape[0]
    for part in prange((n + SPAN - 1) // SPAN):
        o = part * SPAN
        m = min(SPAN, n - o)
        t, bits = np.empty(SPAN, np.float32), np.empty(SPAN, np.int32)
        for j in range(m):
            t[j] = -gate[o + j]
        _exp(t, bits, m)
        for j in range(m):
            out[o + j] = gate[o + j] / (np.float32(1.0) + t[j]) * up[o + j]


@njit(fastmath=FAST, cache=True)
def _nucleus(e, mass):
    """The smallest weight top-p keeps of e (exp(logit − max), the largest 1): the largest weights in
    order until their sum reaches `mass`, as mlx-lm's apply_top_p (its threshold and ties kept). Only
    the weights above a bound are sorted, the bound lowered until they hold `mass`."""
    bound = np.float32(2.0**-6)
    while True:
        held = np.sort(e[e >= bound])[::-1]
        reached = 0.0
        for i in range(held.shape[0]):
            reached += held[i]
            if reached >= mass:
                return held[i]
        if bound == 0:  # float rounding left the sum of all a hair under mass (or NaN weights): keep all
            return held[-1] if held.shape[0] else np.float32(0.0)
        bound = bound * np.float32(2.0**-6) if bound > np.float32(2.0**-120) else np.float32(0.0)


@njit(parallel=True, fastmath=FAST, cache=True)
def draw(logits, temperature, top_p, uniforms, tokens, logps):
    """For each row r of logits (R, V): a token drawn at `temperature` from those top-p keeps, by the
    inverse of its distribution at uniforms[r] in [0, 1) (the first id whose running weight passes
    uniforms[r] x the kept weights' sum), into tokens[r], and its log-probability at temperature 1
    into logps[r]. mlx-lm's sampler normalizes each row, sorts it for top-p and draws a Gumbel
    sample in MLX: ~27 ms for 16 rows of SmolLM2's 49152 logits, 113 with top-p (bench/RESULTS.md)."""
    rows, n = logits.shape
    for r in prange(rows):
        x = logits[r]
        e, bits = np.empty(n, np.float32), np.empty(n, np.int32)
        top = x[0]
        for j in range(n):
            top = max(top, x[j])
        for j in range(n):
            e[j] = x[j] - top
        _exp(e, bits, n)
        total = 0.0  # float64: 49k float32 terms
        for j in range(n):
            total += e[j]
        keep = _nucleus(e, top_p * total) if top_p < 1 else np.float32(0.0)
        w = e
        if temperature != 1:
            w = np.empty(n, np.float32)
            inverse = np.float32(1.0) / temperature
            for j in range(n):
                w[j] = (x[j] - top) * inverse
            _exp(w, bits, n)
        kept = 0.0
        for j in range(n):
            if e[j] < keep:
                w[j] = 0
            kept += w[j]
        target, running, t = uniforms[r] * kept, 0.0, 0  # id 0 only for a row of NaN logits
        for j in range(n):
            if w[j] > 0:
                t = j  # the last kept id, where rounding leaves the target unpassed
                running += w[j]
                if running > target:
                    break
        tokens[r] = t
        logps[r] = x[t] - top - np.log(total)


def load() -> None:
    """Each loop once on tiny arrays of the types a step passes, so that numba reads their machine
    code from its cache (or compiles it: ~10 s, the first time on a machine) when a model is loaded,
    not at a prompt's first token."""
    f32 = np.ones((4, 32), np.float32)
    x, out, small = f32[0].copy(), np.empty(4, np.float32), np.ones((4, 1), np.float32)
    q4, q8 = np.ones((4, 16), np.uint8), np.ones((4, 32), np.uint8)
    matvec(f32, x, out)
    matvec_q4(q4, small, small, x, out)
    matvec_q8(q8, small, small, x, out)
    halves = np.ones((4, 32), np.uint16)
    matvec_f16(halves, x, out)
    matvec_bf16(halves, x, out)
    to_f16(f32, halves)
    to_bf16(f32, halves)
    matmul(f32, f32, f32.copy(), 2)
    matmul_q4(q4, small, small, f32, np.empty((4, 4), np.float32), 2)
    matmul_q8(q8, small, small, f32, np.empty((4, 4), np.float32), 2)
    matmul_f16(halves, f32, np.empty((4, 4), np.float32), 2)
    matmul_bf16(halves, f32, np.empty((4, 4), np.float32), 2)
    low_rank(x, f32.T.copy(), f32, np.float32(1.0), x.copy())
    rms_norm(f32, x, np.float32(1e-5), f32.copy())
    heads = f32.reshape(2, 2, 32)
    table = f32[:, :16].copy()  # positions, d / 2
    rotate_rows(heads.copy(), table, table, np.zeros(2, np.int64))
    attention(f32, f32[None], f32[None], 4, np.float32(1.0), f32.copy())
    cached = np.ones((2, 1, 2, 32), np.float32)  # rows, key heads, positions, d
    newest = cached[:, :, 0].copy()
    attention_rows(heads, cached, cached, newest, newest, np.zeros(2, np.int64), 2, np.float32(1.0), heads.copy())
    swiglu(x, x, x.copy())
    draw(f32, np.float32(0.7), np.float32(0.9), np.zeros(4, np.float32), np.empty(4, np.uint32), out)
