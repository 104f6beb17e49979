"""Sequence packing on the model side: attention kept inside each row, positions restarted per row.

mlx-lm models build their causal mask and RoPE positions from the `cache` they are given: the
mask from `cache.make_mask(...)` and the positions from `cache.offset`. `PackedRows` stands in
for that cache during a packed forward, answering with a block-diagonal causal mask and a (B, L)
array of per-row positions; `enable_packing` teaches the model's RoPE modules to take such an
array. Architectures that build masks or positions some other way are refused: before training,
`enable_packing` checks that two rows packed together give the logits they give alone.
"""

from functools import cache

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.errors import UserError

PROBE_ROWS = (5, 7)  # lengths of the two rows of the check


class PackedRows:
    """Every layer's `cache` in a packed forward; keys and values pass through unstored."""

    def __init__(self, segments: mx.array):  # (B, L): index of each token's row in its sequence
        self.segments = segments
        index = mx.arange(segments.shape[1])
        starts = mx.concatenate([mx.ones_like(segments[:, :1]), segments[:, 1:] != segments[:, :-1]], axis=1)
        self.offset = index - mx.cummax(mx.where(starts, index, 0), axis=1)  # (B, L) position within row

    def make_mask(self, n: int, return_array: bool = False, window_size=None) -> mx.array:
        q, k = self.offset[:, :, None], self.offset[:, None, :]  # positions, so windows count within a row
        mask = (self.segments[:, :, None] == self.segments[:, None, :]) & (q >= k)  # (B, L, L)
        if window_size is not None:
            mask = mask & (q < k + window_size)
        return mask[:, None]  # (B, 1, L, L): the same for every head

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values


def packed_cache(model: nn.Module, segments: mx.array) -> list[PackedRows]:
    return [PackedRows(segments)] * len(model.layers)


@cache
def _per_token(cls: type) -> type:
    """`cls` (a RoPE module) that also takes a (B, L) offset: one position per token."""

    def __call__(self, x, offset=0, **kwargs):
        if not (isinstance(offset, mx.array) and offset.ndim == 2):
            return cls.__call__(self, x, offset=offset, **kwargs)
        B, H, L, D = x.shape
        tokens = x.swapaxes(1, 2).reshape(B * L, H, 1, D)  # each token its own batch row, with its own offset
        y = cls.__call__(self, tokens, offset=offset.reshape(-1), **kwargs)
        return y.reshape(B, L, H, D).swapaxes(1, 2)

    return type(cls.__name__, (cls,), {"__call__": __call__, "per_token": True})


def enable_packing(model: nn.Module, model_type: str) -> None:
    """Make `model` accept PackedRows, then prove on two rows that packed logits equal unpacked."""
    for _, m in model.named_modules():
        if (isinstance(m, nn.RoPE) or "rope" in type(m).__name__.lower()) and not hasattr(m, "per_token"):
            m.__class__ = _per_token(type(m))
    training = model.training
    model.eval()  # no dropout in the comparison
    rows = [mx.arange(1, 1 + n)[None] for n in PROBE_ROWS]  # (1, n) token ids every vocabulary has
    segments = mx.concatenate([mx.full(r.shape, i) for i, r in enumerate(rows)], axis=1)
    try:
        alone = mx.concatenate([model(r) for r in rows], axis=1)  # (1, 12, V)
        packed = model(mx.concatenate(rows, axis=1), cache=packed_cache(model, segments))
        tolerance = 1e-4 if alone.dtype == mx.float32 else 2e-2  # half precision rounds more
        alone, packed = alone.astype(mx.float32), packed.astype(mx.float32)
        error = (mx.abs(packed - alone).max() / mx.abs(alone).max()).item()
        reason = f"two packed rows give logits {error:.1e} (relative) away from the rows alone"
    except Exception as e:  # the architecture builds its mask or positions another way
        error, tolerance, reason = float("inf"), 0.0, f"{type(e).__name__}: {e}"
    model.train(training)
    if not error <= tolerance:
        raise UserError(f"--pack is not supported for model type '{model_type}': {reason}; train without --pack")
