"""Examples -> padded batches: rows of similar length grouped so padding stays small; packs of rows.

The order of every epoch follows from (seed, epoch) alone, so a resumed or sharded run reads the
same batches as an uninterrupted one.
"""

from collections.abc import Callable, Iterator, Sequence
from itertools import islice

import mlx.core as mx
import numpy as np

from mlx_lora.data.examples import Example, ExampleSet

PAD_MULTIPLE = 8  # fewer distinct batch shapes, so the compiled step is rebuilt less often


def lengths(examples: Sequence) -> np.ndarray:
    """Every example's token count: an ExampleSet's own array (no row is read), else counted."""
    if isinstance(examples, ExampleSet):
        return examples.lengths
    return np.array([len(ex.tokens) for ex in examples], np.int64)  # preference pairs, lists in tests


def epoch_plan(examples: Sequence, batch_size: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's batches as two arrays, not a list per batch (a start at a million rows would
    spend a second building them): rows shuffled, then sorted by length within windows of 16
    batches; batch k of the epoch is rows[b * batch_size : (b + 1) * batch_size] for b = order[k]."""
    rng = np.random.default_rng([seed, epoch])
    shuffled = rng.permutation(len(examples))
    window = np.arange(len(shuffled)) // (batch_size * 16)
    # By window, then length within it; stable, as the sorted() per window it replaces, so ties keep
    # their shuffled order and every epoch is the one it always was. A window holds whole batches.
    rows = shuffled[np.lexsort((lengths(examples)[shuffled], window))]
    return rows, rng.permutation(-(-len(rows) // batch_size))


def epoch_batches(examples: Sequence, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches (epoch_plan) as lists of row indices."""
    rows, order = epoch_plan(examples, batch_size, seed, epoch)
    return [rows[b * batch_size : (b + 1) * batch_size].tolist() for b in order.tolist()]


def collate(examples: Sequence[Example], indices: list[int]) -> tuple[mx.array, mx.array]:
    """Right-padded tokens (B, L) and loss mask (B, L); padding is never a target."""
    longest = max(len(examples[i].tokens) for i in indices)
    length = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens = np.zeros((len(indices), length), np.int32)
    mask = np.zeros((len(indices), length), bool)
    for row, i in enumerate(indices):
        ex = examples[i]
        tokens[row, : len(ex.tokens)] = ex.tokens
        mask[row, : len(ex.mask)] = ex.mask
    return mx.array(tokens), mx.array(mask)


def epoch_packs(
    examples: Sequence[Example], batch_size: int, length: int, seed: int, epoch: int
) -> list[list[list[int]]]:
    """One epoch of packed batches (--pack): shuffled rows laid end to end into sequences of at
    most `length` tokens (next fit), `batch_size` sequences per batch."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(examples))
    packs, used = [[]], 0
    for i, n in zip(order.tolist(), lengths(examples)[order].tolist()):
        if used + n > length and packs[-1]:
            packs.append([])
            used = 0
        packs[-1].append(i)
        used += n
    return [packs[j : j + batch_size] for j in range(0, len(packs), batch_size)]


def collate_packs(examples: Sequence[Example], packs: list[list[int]]) -> tuple[mx.array, mx.array, mx.array]:
    """Tokens, loss mask and segments (B, L): a token's segment is the index of its row within
    the sequence; padding is one more segment. A row's first token is never a target, so no
    loss crosses from one row into the next."""
    rows = [[examples[i] for i in pack] for pack in packs]
    longest = max(sum(len(ex.tokens) for ex in pack) for pack in rows)
    length = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens = np.zeros((len(packs), length), np.int32)
    mask = np.zeros((len(packs), length), bool)
    segments = np.zeros((len(packs), length), np.int32)
    for b, pack in enumerate(rows):
        ends = np.cumsum([len(ex.tokens) for ex in pack])
        tokens[b, : ends[-1]] = np.concatenate([ex.tokens for ex in pack])
        mask[b, : ends[-1]] = np.concatenate([ex.mask for ex in pack])
        segments[b] = np.searchsorted(ends, np.arange(length), side="right")  # padding: len(pack)
    return mx.array(tokens), mx.array(mask), mx.array(segments)


def batch_plan(examples: Sequence, batch_size: int, seed: int, pack_length: int | None = None) -> Iterator[list]:
    """Endless: every batch's rows (packs of rows with `pack_length`), epoch after epoch, each
    batch made as it is read."""
    epoch = 0
    while True:
        if pack_length is None:
            ordered, order = epoch_plan(examples, batch_size, seed, epoch)
            yield from (ordered[b * batch_size : (b + 1) * batch_size].tolist() for b in order)
        else:
            yield from epoch_packs(examples, batch_size, pack_length, seed, epoch)
        epoch += 1


def share(batch: list, shard: Callable[[list], list] | None) -> tuple[list, bool]:
    """This process's rows (or packs) of a batch, and whether it learns from them: one left
    without any gets the batch's first with nothing to learn, so it still joins the gradient sum."""
    mine = shard(batch) if shard else batch
    return (mine, True) if mine else (batch[:1], False)


def iterate_batches(
    examples: Sequence[Example],
    batch_size: int,
    seed: int,
    start: int = 0,
    pack_length: int | None = None,
    shard: Callable[[list], list] | None = None,
    collate_rows: Callable = collate,
) -> Iterator[tuple[list, tuple, int]]:
    """Endless (rows, batch, real token count): `batch` is (tokens, mask) collated from
    `examples[rows]`, or (tokens, mask, segments) packed ones with `pack_length` (rows are then
    packs of row indices); `start` skips that many batches, so a resumed run sees the same order
    as an uninterrupted one. In a group, `shard` picks this process's rows or packs
    (distributed.World.shard, see `share`) and the count stays the whole batch's. `collate_rows`
    collates unpacked batches (preference pairs bring their own)."""
    sizes = lengths(examples)
    collated = collate_rows if pack_length is None else collate_packs
    for batch in islice(batch_plan(examples, batch_size, seed, pack_length), start, None):
        rows = [i for pack in batch for i in pack] if pack_length else batch
        mine, learns = share(batch, shard)
        tokens, mask, *segments = collated(examples, mine)
        yield mine, (tokens, mask if learns else mx.zeros_like(mask), *segments), int(sizes[rows].sum())


def planned_rows(
    examples: Sequence[Example],
    batch_size: int,
    seed: int,
    start: int,
    count: int,
    shard: Callable[[list], list] | None,
) -> Iterator[list[int]]:
    """The rows iterate_batches (unpacked) gives this process in batches start .. start+count-1, a batch at a time."""
    return (share(batch, shard)[0] for batch in islice(batch_plan(examples, batch_size, seed), start, start + count))


def rows_read(
    examples: Sequence[Example], batch_size: int, seed: int, start: int, count: int, shard: Callable[[list], list]
) -> np.ndarray:
    """planned_rows, sorted, each once: in a group, all a rank will read of the frozen prefix's states
    (training/streaming.py)."""
    return np.unique(
        np.array([i for rows in planned_rows(examples, batch_size, seed, start, count, shard) for i in rows], np.int64)
    )


def batches_per_epoch(examples: Sequence[Example], batch_size: int, pack_length: int | None = None) -> int:
    if pack_length is not None:
        return len(epoch_packs(examples, batch_size, pack_length, seed=0, epoch=0))
    return -(-len(examples) // batch_size)
