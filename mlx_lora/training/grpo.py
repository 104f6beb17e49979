"""GRPO and its successors over per-token log-probs, written to equal TRL's GRPOTrainer
(tests/training/test_grpo.py runs TRL's own `_compute_loss` on the same inputs).

A group is the G completions sampled for one prompt. Each completion's advantage is its reward
against its group's: minus the group mean, divided by the group's standard deviation (TRL's
scale_rewards="group", its default). The loss types differ in the ratio and in how per-token
terms become one number (TRL's names, and GSPO as TRL runs it):

- grpo:    token ratios; each sequence's mean over its tokens, then the mean over sequences.
- dr_grpo: token ratios; the sum over all tokens / (sequences x --max-completion-tokens).
- dapo:    token ratios; the sum over all tokens / the batch's completion tokens.
- gspo:    one ratio per sequence, exp of its mean token log-ratio (importance_sampling_level
           "sequence"), aggregated as grpo.

The ratio is clipped to [1 - epsilon, 1 + epsilon_high] (asymmetric: DAPO's clip-higher), and
beta > 0 adds beta times the k3 estimate of KL(policy || reference) per token.
"""

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

STD_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


@dataclass(frozen=True)
class PolicyLoss:
    """A loss type and the hyperparameters it reads."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float = 0.2
    max_completion_tokens: int = 256  # dr_grpo's constant


def group_advantages(rewards: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(advantages (N,), whether each group's rewards are all equal (N/G,)) for N = groups x G
    rewards, each group's G consecutive. Bessel-corrected std, as TRL's nanstd."""
    grouped = np.asarray(rewards, np.float32).reshape(-1, group_size)  # (N/G, G)
    mean = grouped.mean(axis=1, keepdims=True)
    std = grouped.std(axis=1, ddof=1, keepdims=True)
    advantages = (grouped - mean) / (std + np.float32(STD_EPS))
    return advantages.reshape(-1), np.isclose(std[:, 0], 0.0)


def masked_mean(x: mx.array, mask: mx.array) -> mx.array:
    """Mean over the mask's tokens; a (B, 1) x is one value per sequence, its mean over sequences."""
    if x.shape[1] == 1:
        return x.mean()
    return (x * mask).sum() / mx.maximum(mask.sum(), 1)


def policy_loss(
    logps: mx.array,
    old: mx.array,
    reference: mx.array | None,
    advantages: mx.array,
    mask: mx.array,
    p: PolicyLoss,
    tokens: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """(loss, kl, clip_ratio) for completions' per-token log-probs under the policy, the policy
    that sampled them (`old`) and the reference, all (B, T) with `mask` (B, T) 1 on completion
    tokens; `advantages` (B,). `tokens`: dapo's normaliser, the update's completion tokens
    (default: this batch's). kl and clip_ratio are TRL's logged means (kl 0 without beta)."""
    a = advantages[:, None]  # (B, 1)
    log_ratio = logps - old  # (B, T)
    if p.loss_type == "gspo":
        log_ratio = ((log_ratio * mask).sum(-1) / mx.maximum(mask.sum(-1), 1))[:, None]  # (B, 1)
    ratio = mx.exp(log_ratio)
    clipped = mx.clip(ratio, 1 - p.epsilon, 1 + p.epsilon_high)
    per_token = -mx.minimum(ratio * a, clipped * a)  # (B, T) or (B, 1)
    kl = mx.zeros(())
    if p.beta:
        diff = reference - logps
        per_token_kl = mx.exp(diff) - diff - 1  # (B, T): k3, unbiased and never negative
        per_token = per_token + p.beta * per_token_kl
        kl = mx.stop_gradient(masked_mean(per_token_kl, mask))
    per_token = mx.broadcast_to(per_token, mask.shape) * mask
    if p.loss_type in ("grpo", "gspo"):
        loss = (per_token.sum(-1) / mx.maximum(mask.sum(-1), 1)).mean()
    elif p.loss_type == "dr_grpo":
        loss = per_token.sum() / (mask.shape[0] * p.max_completion_tokens)
    else:
        loss = per_token.sum() / mx.maximum(mask.sum() if tokens is None else tokens, 1)
    outside = ((ratio < 1 - p.epsilon) & (a < 0)) | ((ratio > 1 + p.epsilon_high) & (a > 0))
    clip_ratio = mx.stop_gradient(masked_mean(outside.astype(mx.float32), mask))
    return loss, kl, clip_ratio
