"""What a preference step reads, and its loss: pairs scored in one forward, against reference
log-probs computed once.

The reference model is the base itself with the adapter switched off (model/lora.adapter_off),
never a second copy of the weights. It is frozen, so its log-probs of every pair are constant:
they are computed once, before the first step, kept as two floats per pair, and handed to the
step with the batch. Every later step runs only the policy, one forward and backward over the
2B sequences, where a two-model implementation keeps two sets of weights in memory and runs a
second forward per step. A resumed run recomputes them the same way (same batches, adapter off),
so they need no place in the checkpoint.

Both passes go through the feed's cut (feed.py) where the model allows one: the output projection
runs only on completion tokens, so no (2B, L, V) logits exist, and the frozen blocks before the
first adapted one, which compute the same with the adapter on or off, run once per row: in the
reference pass, whose states the prefix cache keeps for every later step.
"""

import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lora.data.batches import collate
from mlx_lora.data.examples import Example
from mlx_lora.data.preference import Pair, collate_pairs
from mlx_lora.distributed import group as distributed
from mlx_lora.model.cpu_kernels import cross_entropy
from mlx_lora.model.lora import adapter_off
from mlx_lora.training.cut import Cut, find_cut
from mlx_lora.training.feed import Feed, target_ce
from mlx_lora.training.objectives import Objective, preference_loss

# What each preference step reports, as mean per pair: TRL's names.
STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "log_odds_ratio", "log_odds_chosen")


def sequence_logps(model: nn.Module, tokens: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Summed log-probs of each row's completion tokens and their count, both (R,)."""
    logits = model(tokens[:, :-1]).astype(mx.float32)  # (R, L-1, V)
    weights = mask[:, 1:].astype(mx.float32)  # (R, L-1): 1 on completion tokens
    logps = -cross_entropy(logits, tokens[:, 1:]) * weights  # (R, L-1)
    return logps.sum(axis=1), weights.sum(axis=1)


def target_logps(cut: Cut, inputs, states, positions, targets, weights) -> tuple[mx.array, mx.array]:
    """sequence_logps from the N target positions alone (feed.target_ce): (R,) each."""
    logps = -target_ce(cut, inputs, states, positions, targets) * weights  # (N,)
    rows = inputs.shape[0]
    owner = (positions // inputs.shape[1])[None] == mx.arange(rows)[:, None]  # (R, N): the row of each target
    owner = owner.astype(mx.float32)
    return owner @ logps, owner @ weights


def pair_stats(chosen: mx.array, rejected: mx.array, log_odds: mx.array, real: mx.array) -> mx.array:
    """(5,) sums over the batch's real pairs (`real` 1, else 0) of STATS; divided by the pair count when reported."""
    values = [chosen, rejected, (chosen > rejected).astype(mx.float32), nn.log_sigmoid(log_odds), log_odds]
    return mx.stop_gradient(mx.stack([(v * real).sum() for v in values]))


class PreferenceFeed(Feed):
    """A Feed for pairs: inputs are the 2B rows' (Feed's inputs of the sides, chosen first) plus the
    (B, 2) reference log-probs; the loss is the objective's, averaged over pairs, with the
    batch's STATS sums. The prefix cache keeps each side's frozen-block states as a row."""

    collate = staticmethod(collate_pairs)

    def __init__(
        self,
        objective: Objective,
        cut: Cut | None,
        cache_prefix: bool,
        log: Callable = print,
        world: distributed.World = distributed.SOLO,
    ):
        super().__init__(cut, cache_prefix, log)
        self.objective, self.world = objective, world
        self.reference: dict[int, np.ndarray] = {}  # id(pairs) -> (N, 2)
        self.sides: dict[int, list[Example]] = {}  # id(pairs) -> the N chosen sides, then the N rejected
        self.stats = STATS if objective.name == "orpo" else STATS[:3]  # the log odds are ORPO's alone

    def inputs(self, pairs: list[Pair], rows: list[int], batch: tuple[mx.array, ...]) -> tuple[mx.array, ...]:
        sides = self.sides.setdefault(id(pairs), [p.chosen for p in pairs] + [p.rejected for p in pairs])
        ref = self.reference.get(id(pairs))
        refs = mx.array(ref[rows]) if ref is not None else mx.zeros((len(rows), 2))
        return *super().inputs(sides, rows + [len(pairs) + r for r in rows], batch), refs

    def read_ahead(self, pairs: list[Pair], batches) -> None:
        """Nothing to read ahead: the reference pass computed every side's frozen states before the first step."""

    def logps(self, model: nn.Module, *inputs: mx.array) -> tuple[mx.array, mx.array]:
        """Summed completion log-probs of the 2B rows and their token counts, (2B,) each."""
        if self.cut is None:
            return sequence_logps(model, *inputs)
        if not self.cache_prefix:
            inputs = (inputs[0], None, *inputs[1:])
        return target_logps(self.cut, *inputs)

    def loss(self, model: nn.Module, *inputs: mx.array):
        """(mean loss over the pairs, their count, STATS sums). A group's rank left without pairs
        gets one with nothing learned (batches.iterate_batches): finite stand-ins, counted 0."""
        logps, counts = self.logps(model, *inputs[:-1])
        refs = inputs[-1]
        real = (counts[: refs.shape[0]] > 0).astype(mx.float32)  # (B,): 0 for that stand-in pair
        empty = counts == 0
        logps, counts = mx.where(empty, -1.0, logps), mx.where(empty, 1.0, counts)  # ORPO's log(1 - p) stays finite
        loss, chosen, rejected, log_odds = preference_loss(self.objective, logps, counts, refs)
        return loss, real.sum(), pair_stats(chosen, rejected, log_odds, real)

    def pair_logps(self, model: nn.Module, pairs: list[Pair], batch_size: int) -> np.ndarray:
        """(N, 2) summed completion log-probs of every pair's (chosen, rejected), in eval mode;
        fixed batches in file order, so a resumed run gets the same numbers. In a group each
        rank scores its share of each batch and the ranks' tables are summed (the others' rows are 0)."""
        was_training = model.training
        model.eval()
        out = np.zeros((len(pairs), 2), np.float32)
        for start in range(0, len(pairs), batch_size):
            rows = self.world.shard(list(range(start, min(start + batch_size, len(pairs)))))
            if rows:
                logps, _ = self.logps(model, *self.inputs(pairs, rows, collate_pairs(pairs, rows))[:-1])  # (2b,)
                out[rows] = np.array(logps).reshape(2, -1).T
        model.train(was_training)
        if self.world.size > 1:
            with self.world.waiting("to share the reference log-probs"):
                out = np.array(self.world.sum(mx.array(out)))
        return out

    def reference_logps(self, model: nn.Module, pairs: list[Pair], batch_size: int) -> np.ndarray:
        """pair_logps under the base: the model with its adapter switched off."""
        with adapter_off(model):
            return self.pair_logps(model, pairs, batch_size)


def pair_cut(model: nn.Module, first_trained: int, pairs: list[Pair], log: Callable = print) -> Cut | None:
    """feed.find_cut, checked on the shortest chosen side."""
    shortest = min((p.chosen for p in pairs), key=lambda ex: len(ex.tokens))
    probe, _ = collate([shortest], [0])
    return find_cut(model, first_trained, probe[:, :-1], log)


def make_preference_feed(
    model: nn.Module,
    first_trained: int,
    data: dict[str, list[Pair]],
    objective: Objective,
    batch_size: int,
    cache_prefix: bool = True,
    log: Callable = print,
    world: distributed.World = distributed.SOLO,
) -> PreferenceFeed:
    """The feed, cut before the first trained block where the model allows, with the reference
    log-probs of every split computed now (DPO, IPO) or none needed (ORPO, SimPO)."""
    cut = pair_cut(model, first_trained, data["train"], log)
    feed = PreferenceFeed(objective, cut, cache_prefix, log, world)
    if feed.cache_prefix:
        log(f"speed: blocks 0-{first_trained - 1} are frozen; their output is computed once per side and kept")
    if objective.uses_reference:
        start = time.perf_counter()
        for pairs in data.values():
            feed.reference[id(pairs)] = feed.reference_logps(model, pairs, batch_size)
        n = sum(len(p) for p in data.values())
        log(
            f"reference: log-probs of {n} pairs from the base with the adapter off, computed once "
            f"in {time.perf_counter() - start:.1f}s; the steps run the policy alone"
        )
    return feed
