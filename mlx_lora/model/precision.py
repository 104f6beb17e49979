"""The dtype a base computes in (--compute-dtype), kept apart from the dtype it is stored in.

MLX's CPU backend multiplies bfloat16/float16 matrices without a BLAS, ~9x slower than float32
through OpenBLAS or Accelerate. So on the CPU a half-precision base is cast to float32 when loaded
(lazily: a streamed prefix is cast block by block as it is read); what is saved from it (the
fused model) is cast back. Quantized bases are left as loaded: their layers compute in their
scales' dtype through MLX's quantized kernels, and a llama.cpp quantized file already computes in
float32 (gguf.compute_dtype). On Metal and CUDA the base computes in its own dtype.
"""

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_lora.config.precision import AUTO

HALF = (mx.bfloat16, mx.float16)
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).split(".")[-1]


@dataclass
class Precision:
    stored: mx.Dtype  # the base's dtype on disk: what adapters and fused models keep
    compute: mx.Dtype  # what its matmuls run in
    why: str
    # (module, parameter, stored dtype) of those cast: by module, which LoRA wraps and keeps
    cast: list[tuple[nn.Module, str, mx.Dtype]] = field(default_factory=list)

    def describe(self) -> str:
        stored, compute = dtype_name(self.stored), dtype_name(self.compute)
        held = stored if self.compute == self.stored else f"{stored}, computed in {compute}"
        return f"{held} ({self.why})"


def _floating(model: nn.Module) -> list[tuple[str, mx.array]]:
    return [(k, v) for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]


def stored_dtype(model: nn.Module) -> mx.Dtype:
    """The dtype of the largest floating parameter: the weights', not a norm kept in float32."""
    return max(_floating(model), key=lambda kv: kv[1].size, default=("", mx.array(0.0)))[1].dtype


def is_quantized(model: nn.Module) -> bool:
    return any(k.endswith(".scales") for k, _ in tree_flatten(model.parameters()))


def choose(model: nn.Module, requested: str) -> tuple[mx.Dtype, mx.Dtype, str]:
    """(stored, compute, why) for --compute-dtype `requested` on this device."""
    stored = stored_dtype(model)
    if requested != AUTO:
        return stored, DTYPES[requested], f"--compute-dtype {requested}"
    if stored not in HALF:
        return stored, stored, "the base's dtype"
    if is_quantized(model):
        return stored, stored, "a quantized base computes in its scales' dtype"
    if mx.default_device() != mx.cpu:
        return stored, stored, "the base's dtype on the GPU"
    why = f"a {dtype_name(stored)} base on the CPU, whose BLAS multiplies float32 only; --compute-dtype to change"
    return stored, mx.float32, why


def cast_to(model: nn.Module, dtype: mx.Dtype) -> list[tuple[nn.Module, str, mx.Dtype]]:
    """Cast every floating parameter to `dtype` (lazily); returns those changed, with their old dtype."""
    changed = [
        (m, k, v.dtype)
        for _, m in model.named_modules()
        for k, v in m.items()
        if isinstance(v, mx.array)
        and not k.startswith("_")
        and mx.issubdtype(v.dtype, mx.floating)
        and v.dtype != dtype
    ]
    for m, k, _ in changed:
        m[k] = m[k].astype(dtype)
    return changed


def set_precision(model: nn.Module, requested: str | None) -> Precision:
    """The model cast to what `requested` (--compute-dtype) asks for; None keeps it as stored."""
    if requested is None:
        stored = stored_dtype(model)
        return Precision(stored, stored, "as stored")
    stored, compute, why = choose(model, requested)
    return Precision(stored, compute, why, cast_to(model, compute))


def restore(precision: Precision, why: str) -> None:
    """Cast back what set_precision cast (exact: an up-cast loses nothing), to compute as stored."""
    for m, k, dtype in precision.cast:
        m[k] = m[k].astype(dtype)
    precision.compute, precision.why, precision.cast = precision.stored, why, []


def materialize(model: nn.Module) -> None:
    """Evaluate the parameters one at a time, so a cast never holds both copies of the whole model."""
    for _, v in tree_flatten(model.parameters()):
        mx.eval(v)
