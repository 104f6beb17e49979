"""Preference losses over per-sequence log-probs, written to equal TRL's (tests/training/test_objectives.py).

Every function takes the summed completion log-probs of the policy (and of the reference, where
the method has one) for the chosen and rejected sides, each (B,), and their completion token
counts, and returns (loss: the batch mean, chosen rewards (B,), rejected rewards (B,), log odds
(B,), zero but for ORPO). The rewards are what TRL logs: beta times the reference log-ratio
(DPO, IPO) or beta times the average log-prob (ORPO, SimPO).
"""

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Objective:
    """An objective and the hyperparameters its loss reads."""

    name: str  # dpo, ipo, orpo, simpo
    beta: float
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0

    @property
    def uses_reference(self) -> bool:
        return self.name in ("dpo", "ipo")


def smoothed_sigmoid_loss(logits: mx.array, beta: float, label_smoothing: float) -> mx.array:
    """-log σ(β z)(1-ε) - log σ(-β z) ε: DPO's sigmoid loss, conservative with labels flipped at rate ε."""
    return -nn.log_sigmoid(beta * logits) * (1 - label_smoothing) - nn.log_sigmoid(-beta * logits) * label_smoothing


def log1mexp(x: mx.array) -> mx.array:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (as TRL's ORPO computes it)."""
    return mx.where(x < -LN2, mx.log1p(-mx.exp(x)), mx.log(-mx.expm1(x)))


def dpo(pc, pr, rc, rr, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023), TRL DPOTrainer loss_type="sigmoid"."""
    chosen, rejected = pc - rc, pr - rr  # log-ratios against the reference, (B,)
    losses = smoothed_sigmoid_loss(chosen - rejected, beta, label_smoothing)
    return losses.mean(), beta * chosen, beta * rejected, mx.zeros_like(pc)


def ipo(pc, pr, rc, rr, nc, nr, beta: float):
    """IPO (Azar et al. 2023, eq. 17), β as τ; the log-ratios per completion token as TRL takes them."""
    chosen, rejected = pc - rc, pr - rr
    delta = chosen / mx.maximum(nc, 1) - rejected / mx.maximum(nr, 1)
    losses = (delta - 1 / (2 * beta)) ** 2
    return losses.mean(), beta * chosen, beta * rejected, mx.zeros_like(pc)


def chosen_nll(pc, nc) -> mx.array:
    """Cross-entropy per chosen completion token over the batch (the SFT term of ORPO and CPO)."""
    return -pc.sum() / mx.maximum(nc.sum(), 1)


def orpo(pc, pr, nc, nr, beta: float):
    """ORPO (Hong et al. 2024): NLL of the chosen minus λ·log σ(log odds ratio) of average log-probs."""
    ac, ar = pc / mx.maximum(nc, 1), pr / mx.maximum(nr, 1)  # (B,)
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
    ratio = nn.log_sigmoid(log_odds)
    loss = chosen_nll(pc, nc) - (beta * ratio).mean()
    return loss, beta * ac, beta * ar, log_odds


def simpo(pc, pr, nc, nr, beta: float, gamma: float, label_smoothing: float = 0.0, cpo_alpha: float = 0.0):
    """SimPO (Meng et al. 2024), TRL CPOTrainer loss_type="simpo": average log-probs, margin γ, no reference."""
    ac, ar = pc / mx.maximum(nc, 1), pr / mx.maximum(nr, 1)
    losses = smoothed_sigmoid_loss((ac - ar) - gamma / beta, beta, label_smoothing)
    loss = losses.mean()
    if cpo_alpha:
        loss = loss + cpo_alpha * chosen_nll(pc, nc)
    return loss, beta * ac, beta * ar, mx.zeros_like(pc)


def preference_loss(objective: Objective, logps: mx.array, counts: mx.array, reference: mx.array | None):
    """The objective's loss for a concatenated batch: `logps`, `counts` (2B,) with the B chosen
    first, `reference` (B, 2) the reference's (chosen, rejected) summed log-probs."""
    b = logps.shape[0] // 2
    pc, pr, nc, nr = logps[:b], logps[b:], counts[:b], counts[b:]
    o = objective
    if o.name == "dpo":
        return dpo(pc, pr, reference[:, 0], reference[:, 1], o.beta, o.label_smoothing)
    if o.name == "ipo":
        return ipo(pc, pr, reference[:, 0], reference[:, 1], nc, nr, o.beta)
    if o.name == "orpo":
        return orpo(pc, pr, nc, nr, o.beta)
    return simpo(pc, pr, nc, nr, o.beta, o.simpo_gamma, o.label_smoothing, o.cpo_alpha)
