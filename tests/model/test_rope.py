"""Llama 3's rope scaling as llama.cpp's per-frequency factors: equal to transformers' own scaling,
and the rope_scaling recovered from them exactly."""

import numpy as np
import pytest
from conftest import LLAMA3_ROPE

from mlx_lora.model.rope import FACTOR_RTOL, llama3_factors, llama3_scaling

LLAMA32 = dict(LLAMA3_ROPE, original_max_position_embeddings=8192)  # Llama 3.2 1B/3B's rope_scaling
LLAMA31 = dict(LLAMA32, factor=8.0)  # Llama 3.1's
# (rope_scaling, rope_theta, head_dim, hidden_size): Llama 3.2 1B and 3.1 8B as published, and the test model
CASES = {
    "3.2-1b": (LLAMA32, 500000.0, 64, 2048),
    "3.1-8b": (LLAMA31, 500000.0, 128, 4096),
    "test model": (LLAMA3_ROPE, 10000.0, 16, 64),
}


def transformers_factors(rope: dict, theta: float, hidden: int, head_dim: int) -> np.ndarray:
    """What transformers divides each default frequency by: default inv_freq / llama3 inv_freq."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=hidden, num_attention_heads=hidden // head_dim, rope_theta=theta, rope_scaling=dict(rope)
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    default = 1 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    return (default / scaled.double().numpy()).astype(np.float32)


@pytest.mark.parametrize("case", CASES)
def test_factors_are_transformers_scaling_and_give_back_its_rope_scaling(case):
    rope, theta, head_dim, hidden = CASES[case]
    factors = llama3_factors(rope, theta, head_dim)
    np.testing.assert_allclose(factors, transformers_factors(rope, theta, hidden, head_dim), rtol=FACTOR_RTOL)
    assert factors.min() == 1 and factors.max() == rope["factor"]  # some frequencies kept, some divided
    assert llama3_scaling(factors, theta, head_dim) == rope  # the exact numbers, as config.json has them


def test_equivalent_scaling_is_recovered_with_low_freq_factor_one():
    """Only old/low and old/high enter the factors: low 2, high 8, old 128 is low 1, high 4, old 64."""
    factors = llama3_factors(dict(LLAMA3_ROPE, low_freq_factor=2.0, high_freq_factor=8.0,
                                  original_max_position_embeddings=128), 10000.0, 16)  # fmt: skip
    assert llama3_scaling(factors, 10000.0, 16) == LLAMA3_ROPE


def test_factors_llama3_cannot_give_are_not_taken_for_it():
    rope, theta, head_dim, _ = CASES["3.2-1b"]
    factors = llama3_factors(rope, theta, head_dim)
    wrong = factors.copy()
    wrong[16] *= 1.01  # the middle one of the three smoothed factors, off the line the other two lie on
    assert llama3_scaling(wrong, theta, head_dim) is None
    steps = np.where(np.arange(32) < 16, 1, 32).astype(np.float32)  # nothing between: the thresholds unknown
    assert llama3_scaling(steps, theta, head_dim) is None
    assert llama3_scaling(factors[:16], theta, head_dim) is None  # not one per frequency
