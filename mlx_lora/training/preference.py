"""What a preference step reads, and its loss: pairs scored in one forward, against reference
log-probs computed once.

The reference model is the base itself with the adapter switched off (model/lora.adapter_off),
never a second copy of the weights. It is frozen, so its log-probs of every pair are constant:
they are computed once, before the first step, kept as two floats per pair, and handed to the
step with the batch. Every later step runs only the policy, one forward and backward over the
2B sequences, where a two-model implementation keeps two sets of weights in memory and runs a
second forward per step. A resumed run recomputes them the same way (same batches, adapter off),
so they need no place in the checkpoint.
"""

import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lora.data.preference import Pair, collate_pairs
from mlx_lora.model.cpu_kernels import cross_entropy
from mlx_lora.model.lora import adapter_off
from mlx_lora.training.objectives import Objective, preference_loss

# What each preference step reports, as mean per pair: TRL's names.
STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "log_odds_ratio", "log_odds_chosen")


def sequence_logps(model: nn.Module, tokens: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Summed log-probs of each row's completion tokens and their count, both (R,)."""
    logits = model(tokens[:, :-1]).astype(mx.float32)  # (R, L-1, V)
    weights = mask[:, 1:].astype(mx.float32)  # (R, L-1): 1 on completion tokens
    logps = -cross_entropy(logits, tokens[:, 1:]) * weights  # (R, L-1)
    return logps.sum(axis=1), weights.sum(axis=1)


def pair_logps(model: nn.Module, pairs: list[Pair], batch_size: int) -> np.ndarray:
    """(N, 2) summed completion log-probs of every pair's (chosen, rejected), in eval mode; fixed
    batches in file order, so a resumed run gets the same numbers."""
    was_training = model.training
    model.eval()
    out = np.zeros((len(pairs), 2), np.float32)
    for start in range(0, len(pairs), batch_size):
        rows = list(range(start, min(start + batch_size, len(pairs))))
        logps, _ = sequence_logps(model, *collate_pairs(pairs, rows))  # (2b,)
        out[rows] = np.array(logps).reshape(2, -1).T
    model.train(was_training)
    return out


def reference_logps(model: nn.Module, pairs: list[Pair], batch_size: int) -> np.ndarray:
    """pair_logps under the base: the model with its adapter switched off."""
    with adapter_off(model):
        return pair_logps(model, pairs, batch_size)


def pair_stats(chosen: mx.array, rejected: mx.array, log_odds: mx.array) -> mx.array:
    """(5,) sums over the batch's pairs of STATS; divided by the pair count when reported."""
    values = [chosen, rejected, (chosen > rejected).astype(mx.float32), nn.log_sigmoid(log_odds), log_odds]
    return mx.stop_gradient(mx.stack([v.sum() for v in values]))


class PreferenceFeed:
    """A Feed for pairs: inputs are (tokens, mask) of 2B rows plus the (B, 2) reference log-probs;
    the loss is the objective's, averaged over pairs, with the batch's STATS sums."""

    collate = staticmethod(collate_pairs)

    def __init__(self, objective: Objective, reference: dict[int, np.ndarray]):
        self.objective, self.reference = objective, reference
        self.stats = STATS if objective.name == "orpo" else STATS[:3]  # the log odds are ORPO's alone

    def inputs(self, pairs: list[Pair], rows: list[int], batch: tuple[mx.array, ...]) -> tuple[mx.array, ...]:
        tokens, mask = batch
        ref = self.reference.get(id(pairs))
        refs = mx.array(ref[rows]) if ref is not None else mx.zeros((len(rows), 2))
        return tokens, mask, refs

    def loss(self, model: nn.Module, tokens: mx.array, mask: mx.array, refs: mx.array):
        logps, counts = sequence_logps(model, tokens, mask)
        loss, chosen, rejected, log_odds = preference_loss(self.objective, logps, counts, refs)
        return loss, mx.array(float(refs.shape[0])), pair_stats(chosen, rejected, log_odds)


def make_preference_feed(
    model: nn.Module, data: dict[str, list[Pair]], objective: Objective, batch_size: int, log: Callable = print
) -> PreferenceFeed:
    """The feed, with the reference log-probs of every split computed now (DPO, IPO) or none
    needed (ORPO, SimPO have no reference)."""
    reference = {}
    if objective.uses_reference:
        start = time.perf_counter()
        for pairs in data.values():
            reference[id(pairs)] = reference_logps(model, pairs, batch_size)
        n = sum(len(p) for p in data.values())
        log(
            f"reference: log-probs of {n} pairs from the base with the adapter off, computed once "
            f"in {time.perf_counter() - start:.1f}s; the steps run the policy alone"
        )
    return PreferenceFeed(objective, reference)
