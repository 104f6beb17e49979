"""The mean loss of a split: what validation during training and `mlx-lora eval` report."""

from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.data.batches import epoch_batches
from mlx_lora.data.examples import Example
from mlx_lora.distributed import group as distributed
from mlx_lora.reporting.progress import track
from mlx_lora.training.feed import PLAIN, Feed


def shares(examples: Sequence[Example], batch_size: int, num_batches: int, world: distributed.World) -> list[list[int]]:
    """This rank's rows of each batch a validation reads: the same selection every call."""
    batches = epoch_batches(examples, batch_size, seed=0, epoch=0)
    return list(map(world.shard, batches if num_batches == -1 else batches[:num_batches]))


def mean_loss(
    model: nn.Module,
    examples: Sequence[Example],
    batch_size: int,
    num_batches: int = -1,
    world: distributed.World = distributed.SOLO,
    feed: Feed = PLAIN,
    log=print,
    stats: dict[str, float] | None = None,
) -> float:
    """Token-weighted mean loss over a fixed selection of batches (the same each call); a group
    shares the batches out like training ones and sums the result. A feed with statistics (a
    preference feed: rewards, accuracy) puts their means per pair into `stats` when given."""
    was_training = model.training  # leave the mode as found: eval runs this between generations
    model.eval()
    total, count, sums = mx.array(0.0), mx.array(0.0), mx.zeros(len(feed.stats))
    for indices in track(shares(examples, batch_size, num_batches, world), "validation", log=log):
        if not indices:
            continue
        loss, ntoks, *extra = feed.loss(model, *feed.inputs(examples, indices, feed.collate(examples, indices)))
        total, count = total + loss * ntoks, count + ntoks
        sums = sums + extra[0][: len(feed.stats)] if extra else sums
        mx.eval(total, count, sums)
    with world.waiting("to finish validation"):
        total, count = world.sum(total), world.sum(count)
        sums = world.sum(sums) if feed.stats else sums
        mx.eval(total, count, sums)
    model.train(was_training)
    if stats is not None:
        stats.update(zip(feed.stats, (sums / count).tolist()))
    return (total / count).item()
