"""One optimizer step: a compiled function (where the feed allows it) that accumulates summed losses
and gradients and, on the last batch of the step, updates the adapter with their ratio."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map

from mlx_lora.distributed import group as distributed
from mlx_lora.training.feed import PLAIN, Feed


def make_step(
    model: nn.Module, optimizer: optim.Optimizer, world: distributed.World = distributed.SOLO, feed: Feed = PLAIN
):
    """The compiled step and the state it reads and writes."""

    def summed_loss(model: nn.Module, *inputs: mx.array) -> tuple[mx.array, ...]:
        """Loss summed over the targets: summed gradients of several batches, divided by their
        total target count, are the gradient of the one batch they make together (up to fp32
        summation order).
        A preference feed counts pairs and adds its statistics' sums (preference.STATS)."""
        loss, ntoks, *stats = feed.loss(model, *inputs)
        return loss * ntoks, ntoks, *stats

    loss_and_grad = nn.value_and_grad(model, summed_loss)
    state = [model.state, optimizer.state, mx.random.state]

    def step(batch, acc, update: bool):
        """Add one batch's summed loss, target count, gradient (and statistics) to `acc`; on
        `update`, step with their ratio: the gradient of the mean over all the accumulated batches' targets."""
        (loss, ntoks, *stats), grads = loss_and_grad(model, *batch)
        if acc is not None:
            loss, ntoks, grads = loss + acc[0], ntoks + acc[1], tree_map(mx.add, grads, acc[2])
            stats = [s + a for s, a in zip(stats, acc[3:])]
        if update:
            loss, ntoks, grads, stats = distributed.sum_over(world, loss, ntoks, grads, stats)  # the global batch's
            optimizer.update(model, tree_map(lambda g: g / ntoks, grads))
        return loss, ntoks, grads, *stats

    # a feed whose loss reads array values while it runs (a vision tower's) cannot be traced by compile
    return (mx.compile(step, inputs=state, outputs=state) if feed.compiled else step), state


def grads_finite(grads) -> mx.array:
    return mx.stack([mx.isfinite(g).all() for _, g in tree_flatten(grads)]).all()
