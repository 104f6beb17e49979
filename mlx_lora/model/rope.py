"""Llama 3's rope scaling (rope_scaling type "llama3") as llama.cpp holds it: one factor per rotated
pair, rope_freqs.weight, by which llama.cpp divides that pair's frequency; and the Hugging Face
rope_scaling recovered from those factors, for a GGUF written by another converter."""

import math
from typing import Any

import gguf
import numpy as np

LLAMA3 = "llama3"
ROPE_FREQS = f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight"
# Our own GGUF key: the rope_scaling exactly as config.json had it (JSON), which llama.cpp ignores
ROPE_SCALING_KEY = "mlx_lora.rope_scaling"
# the keys of a llama3 rope_scaling, and transformers' defaults for the optional ones
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# Largest relative difference between the file's float32 factors and those of the recovered scaling:
# float32 rounding (2^-24) times the few operations that make a factor, with room to spare.
FACTOR_RTOL = 1e-5


def rope_type(rope: dict[str, Any] | None) -> str:
    """rope_scaling's type, under either spelling; "default" for none."""
    return (rope or {}).get("rope_type") or (rope or {}).get("type") or "default"


def wavelengths(base: float, dim: int) -> np.ndarray:
    """2π / frequency of each rotated pair, in float64: (dim / 2,)"""
    return 2 * math.pi * base ** (np.arange(0, dim, 2) / dim)


def llama3_factors(rope: dict[str, Any], base: float, dim: int) -> np.ndarray:
    """The divisor of each pair's frequency, as transformers' _compute_llama3_parameters scales them
    (and convert_hf_to_gguf.py's LlamaModel writes them): 1 for wavelengths under
    old_context / high_freq_factor, `factor` over old_context / low_freq_factor, and in between
    1 / ((1 - s) / factor + s), s = (old_context / wavelength - low) / (high - low). The old context
    is rope_scaling's original_max_position_embeddings, as transformers and mlx-lm read it."""
    rope = LLAMA3_DEFAULTS | rope
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    w = wavelengths(base, dim)
    smooth = (old / w - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(w < old / high, 1.0, np.where(w > old / low, factor, between)).astype(np.float32)


def matches(rope: dict[str, Any], factors: np.ndarray, base: float, dim: int) -> bool:
    return factors.shape == (dim // 2,) and np.allclose(llama3_factors(rope, base, dim), factors, rtol=FACTOR_RTOL)


def llama3_scaling(factors: np.ndarray, base: float, dim: int) -> dict[str, Any] | None:
    """A rope_scaling whose llama3_factors are `factors`, or None where none is. Only the thresholds
    old/low and old/high enter the factors, so low_freq_factor is taken as 1 (Llama 3's): the
    factors between the thresholds give s, linear in 1 / wavelength, whose line gives both; two of
    them are needed. The old context is rounded to a whole number where that still gives the factors."""
    f = factors.astype(np.float64)
    factor = float(f.max())
    between = (f > 1) & (f < factor)
    if factors.shape != (dim // 2,) or between.sum() < 2:
        return None
    s = (1 / f[between] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelengths(base, dim)[between], s, 1)  # s = old/(high-1)/w - 1/(high-1)
    high = 1 - 1 / intercept
    old = -slope / intercept
    nice = {"high_freq_factor": float(f"{high * round(old) / old:.6g}"), "original_max_position_embeddings": round(old)}
    for scaled in (nice, {"high_freq_factor": float(high), "original_max_position_embeddings": float(old)}):
        rope = {"rope_type": LLAMA3, "factor": float(f"{factor:.6g}"), "low_freq_factor": 1.0} | scaled
        if matches(rope, factors, base, dim):
            return rope
    return None
