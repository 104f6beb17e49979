"""The dtype a base computes in: one option shared by every command that runs the base."""

from dataclasses import dataclass

from mlx_lora.config.fields import opt

AUTO = "auto"
COMPUTE_DTYPES = (AUTO, "float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    """What train, info, generate, chat, eval, serve and fuse share: the dtype the base computes in.
    Keyword-only, so the commands' own fields keep their positions (FuseConfig(model, adapter, ...))."""

    # auto: MLX's CPU multiplies bfloat16/float16 matrices without BLAS (~9x slower than float32),
    # so a half-precision base computes in float32 there; on Metal and CUDA nothing changes.
    # Adapters and fused models keep the base's dtype either way (docs/training.md).
    compute_dtype: str = opt(
        AUTO,
        "dtype the base computes in: auto, float32, bfloat16 or float16 (auto: float32 for a bfloat16/float16 "
        "base on the CPU, else the base's own dtype).",
    )

    def problems(self) -> list[str]:
        if self.compute_dtype in COMPUTE_DTYPES:
            return []
        return [f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got '{self.compute_dtype}'"]
