"""Gradient checkpointing (--grad-checkpoint): each transformer block keeps only its input for
the backward pass and recomputes its activations there, trading ~30% more time for memory."""

from functools import cache

import mlx.core as mx
import mlx.nn as nn


@cache
def _recomputed(cls: type) -> type:
    """`cls` (a block class) whose forward runs under mx.checkpoint, as mlx-lm's trainer does."""

    def __call__(self, *args, **kwargs):
        def forward(params, *args, **kwargs):
            self.update(params)
            return cls.__call__(self, *args, **kwargs)

        return mx.checkpoint(forward)(self.trainable_parameters(), *args, **kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__})


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute every block of `model` in the backward pass. Swaps the class of these instances
    only (mlx-lm patches the class itself, which would reach every model in the process)."""
    for block in model.layers:
        block.__class__ = _recomputed(type(block))
