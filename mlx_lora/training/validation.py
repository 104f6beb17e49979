"""The mean loss of a split: what validation during training and `mlx-lora eval` report."""

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.data.batches import epoch_batches
from mlx_lora.data.examples import Example
from mlx_lora.distributed import group as distributed
from mlx_lora.reporting.progress import track
from mlx_lora.training.feed import PLAIN, Feed


def mean_loss(
    model: nn.Module,
    examples: list[Example],
    batch_size: int,
    num_batches: int = -1,
    world: distributed.World = distributed.SOLO,
    feed: Feed = PLAIN,
) -> float:
    """Token-weighted mean loss over a fixed selection of batches (the same each call); a group
    shares the batches out like training ones and sums the result."""
    batches = epoch_batches(examples, batch_size, seed=0, epoch=0)
    batches = batches if num_batches == -1 else batches[:num_batches]
    was_training = model.training  # leave the mode as found: eval runs this between generations
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for indices in track(list(map(world.shard, batches)), "validation"):
        if not indices:
            continue
        loss, ntoks, *_ = feed.loss(model, *feed.inputs(examples, indices, feed.collate(examples, indices)))
        total, count = total + loss * ntoks, count + ntoks
        mx.eval(total, count)
    with world.waiting("to finish validation"):
        total, count = world.sum(total), world.sum(count)
        mx.eval(total, count)
    model.train(was_training)
    return (total / count).item()
