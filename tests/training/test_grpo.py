"""Our GRPO losses equal TRL's on identical per-token log-probs, old and reference log-probs,
advantages and masks: the loss, its gradient with respect to the policy log-probs (torch autograd
on TRL's code vs mx.grad on ours), and the logged kl and clip ratio.

TRL's loss runs as written: GRPOTrainer._compute_loss on a stub trainer whose
_get_per_token_logps_and_entropies hands back our log-probs. TRL computes advantages inline in
_generate_and_score_completions, a method that also generates, so that formula is replicated
below line for line with TRL's own nanstd. Both sides compute in float32 from the same inputs; the
order of operations differs, a few ulps on O(1) values, so rtol 1e-5 (about 80 ulps) with atol
1e-6 for values near zero.
"""

from collections import defaultdict
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_lora.config.train import GRPO_LOSS_TYPES
from mlx_lora.training import grpo

RTOL, ATOL = 1e-5, 1e-6
B, T, MAX_TOKENS = 8, 10, 12


def inputs(seed: int):
    """Per-token log-probs (policy, old, reference) (B, T), a right-padded completion mask, advantages (B,)."""
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.05, 3.0, (B, T)).astype(np.float32)
    old = (logps + rng.normal(0, 0.3, (B, T))).astype(np.float32)  # ratios on both sides of the clip range
    ref = (logps + rng.normal(0, 0.5, (B, T))).astype(np.float32)
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float32)
    advantages = rng.normal(0, 1, B).astype(np.float32)
    return logps, old, ref, mask, advantages


def trl_loss(loss_type: str, beta: float, eps: float, eps_high: float, logps, old, ref, mask, advantages):
    """TRL's loss, d loss / d logps and logged metrics, through its own _compute_loss."""
    from trl import GRPOTrainer

    policy = torch.tensor(logps, requires_grad=True)
    sequence = loss_type == "gspo"
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (policy, torch.zeros(B, T), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="sequence" if sequence else "token",
        beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type="grpo" if sequence else loss_type,
        epsilon_low=eps,
        epsilon_high=eps_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_TOKENS,
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    batch = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": torch.tensor(mask),
        "advantages": torch.tensor(advantages),
        "old_per_token_logps": torch.tensor(old),
        "ref_per_token_logps": torch.tensor(ref),
        "num_items_in_batch": torch.tensor(mask.sum()),
    }
    loss = GRPOTrainer._compute_loss(stub, None, batch)
    loss.backward()
    return loss, policy.grad, {k: v[0] for k, v in stub._metrics["train"].items()}


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize(("beta", "eps", "eps_high"), [(0.0, 0.2, 0.2), (0.04, 0.2, 0.28)])
def test_policy_loss_equals_trl(loss_type, beta, eps, eps_high):
    logps, old, ref, mask, advantages = inputs(GRPO_LOSS_TYPES.index(loss_type))
    if loss_type == "gspo":
        old = (logps + np.random.default_rng(9).normal(0, 0.3, (B, 1))).astype(np.float32)  # sequence ratios off 1
    loss, grad, metrics = trl_loss(loss_type, beta, eps, eps_high, logps, old, ref, mask, advantages)
    p = grpo.PolicyLoss(loss_type, beta, eps, eps_high, MAX_TOKENS)

    def ours(x):
        return grpo.policy_loss(x, mx.array(old), mx.array(ref), mx.array(advantages), mx.array(mask), p)

    value, kl, clip_ratio = ours(mx.array(logps))
    np.testing.assert_allclose(value.item(), loss.item(), rtol=RTOL, atol=ATOL)
    ours_grad = mx.grad(lambda x: ours(x)[0])(mx.array(logps))
    np.testing.assert_allclose(np.array(ours_grad), grad.numpy(), rtol=RTOL, atol=ATOL)
    assert clip_ratio.item() == pytest.approx(metrics["clip_ratio/region_mean"], rel=RTOL, abs=ATOL)
    assert 0 < metrics["clip_ratio/region_mean"] < 1  # both sides of the clip range are exercised
    if beta:
        assert kl.item() == pytest.approx(metrics["kl"], rel=RTOL, abs=ATOL)


def test_dapo_normalises_by_the_update_tokens():
    """Split into parts, dapo's sum over each part / the whole update's tokens adds up to the whole's loss."""
    logps, old, ref, mask, advantages = inputs(5)
    p = grpo.PolicyLoss("dapo", 0.04, 0.2, 0.28)
    whole = grpo.policy_loss(*map(mx.array, (logps, old, ref, advantages, mask)), p)[0]
    total = mx.array(mask.sum())
    parts = [
        grpo.policy_loss(*(mx.array(x[s]) for x in (logps, old, ref, advantages, mask)), p, tokens=total)[0]
        for s in (slice(0, 3), slice(3, B))
    ]
    np.testing.assert_allclose((parts[0] + parts[1]).item(), whole.item(), rtol=RTOL)


def trl_advantages(rewards: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """TRL's sum_then_normalize advantages, scale_rewards="group", its lines on one reward function."""
    from trl.trainer.utils import nanstd

    rewards = torch.tensor(rewards)
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, group_size), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(group_size, dim=0)
    std_rewards = nanstd(rewards.view(-1, group_size), dim=1)
    std_rewards = std_rewards.repeat_interleave(group_size, dim=0)
    advantages = (rewards - mean_grouped_rewards) / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    return advantages.numpy(), is_std_zero.numpy()


def test_group_advantages_equal_trl():
    rng = np.random.default_rng(0)
    rewards = rng.normal(0, 2, 24).astype(np.float32)
    rewards[8:12] = 1.0  # one group all equal: advantage 0, and flagged
    advantages, flat = grpo.group_advantages(rewards, 4)
    theirs, zero_std = trl_advantages(rewards, 4)
    np.testing.assert_allclose(advantages, theirs, rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(flat, zero_std[::4])
    assert flat.tolist() == [False, False, True, False, False, False]
