"""The frozen prefix streamed from disk: its hidden states computed block by block, with one
block's weights in memory at a time (--stream-prefix).

With LoRA only in blocks k.., training needs from blocks 0..k-1 only the hidden states entering
block k, once per row (prefix_cache.py). A model loaded lazily (safetensors are read when an array
is first evaluated) computes them in k+1 passes over the rows the run reads: the embeddings, then
block 0, then block 1, ... Each pass reads its input states from one file and writes its output to
another; after it the pass's weights are freed (`release`), so the process never holds more than
one block of the frozen part. The last file is the cache training reads. The passes are as fast as
an in-memory run's fills: the first tokens every row shares run once a block (`Head`), and groups
run two at a time over a CPU stream each where measured faster (`Work`).

The rows are those the run will read (`rank_rows`): of the training batches from where it starts
to its last step (all rows over enough epochs, since an epoch's order is shuffled anew) and of the
validation batches; in a group under mlx.launch, each rank's share of them, whose losses the group
sums as it does in memory.
"""

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlx_lora import blas
from mlx_lora.config import TrainConfig
from mlx_lora.data.batches import collate, lengths, rows_read
from mlx_lora.data.examples import Example
from mlx_lora.distributed.group import World
from mlx_lora.errors import UserError
from mlx_lora.model.base import Base
from mlx_lora.model.gguf import GGUF_SUFFIX
from mlx_lora.training.cut import EMBEDDINGS, Continued, Cut, Kept, cut_at
from mlx_lora.training.feed import Feed
from mlx_lora.training.prefix_cache import (
    BITS,
    MIN_SHARED,
    WHOLE_ROWS,
    PrefixCache,
    SplitTrial,
    plain_caches,
    shared_length,
    split_streams,
)
from mlx_lora.training.validation import shares

# rows x tokens per block call: bounds one call's activations, not the model's. On the CPU the MLP's
# SwiGLU (model/cpu_kernels.py) holds ~4 (tokens, intermediate) float32 temporaries at once: at 8192
# tokens and an MLP of 7168 that was ~0.9 GB, a third of a 6 GB model's streamed peak RSS.
GROUP_TOKENS = 1024
# passes timed each way before the pass picks one stream or two (SplitTrial): one pair of groups
# each way, the way fills are timed, picked one stream in 1 run of 4 on the real SmolLM2 (33 against
# 32 µs a token, where the others measured 24-26 against 32-35; whole passes: 0.54 against 0.64 s)
PASS_TRIALS = 4
SPLITS = ("train", "valid")
Split = tuple[Sequence[Example], np.ndarray]  # a split's examples and the rows of it streamed


class RowFile:
    """(positions, D) raw bits in a temporary file, read and written with pread/pwrite rather than
    a memory map: the pages read stay in the OS page cache, out of this process's resident memory."""

    def __init__(self, positions: int, width: int, np_dtype, directory: str | None = None):
        self.file = tempfile.TemporaryFile(prefix="mlx-lora-stream-", dir=directory)  # noqa: SIM115  (lives with the cache)
        self.shape, self.dtype = (positions, width), np.dtype(np_dtype)
        self.row_bytes = width * self.dtype.itemsize

    def __getitem__(self, rows: slice) -> np.ndarray:
        size = (rows.stop - rows.start) * self.row_bytes
        data = os.pread(self.file.fileno(), size, int(rows.start) * self.row_bytes)
        return np.frombuffer(data, self.dtype).reshape(-1, self.shape[1])

    def __setitem__(self, rows: slice, value: np.ndarray) -> None:
        data = np.ascontiguousarray(value, self.dtype).tobytes()
        os.pwrite(self.file.fileno(), data, int(rows.start) * self.row_bytes)

    def close(self) -> None:
        self.file.close()


def splits(data: dict, rows: dict[str, np.ndarray] | None = None) -> list[Split]:
    """Train and valid (when there is one), each with the rows streamed: `rows`' (a rank's), or all."""
    return [(data[k], np.arange(len(data[k])) if rows is None else rows[k]) for k in SPLITS if data.get(k)]


def rank_rows(data: dict, world: World, batch_size: int, seed: int, val_batches: int, batches: range) -> dict:
    """The rows of each split this rank reads: its shares of the training batches `batches` (the
    run's still to come) and of the validation batches."""
    valid = [i for part in shares(data.get("valid") or [], batch_size, val_batches, world) for i in part]
    train = rows_read(data["train"], batch_size, seed, batches.start, len(batches), world.shard)
    return {"train": train, "valid": np.unique(np.array(valid, np.int64))}


def cache_bytes(sets: list[Split], hidden: int, itemsize: int) -> int:
    """The cache on disk: every streamed row's positions but its last (the inputs that predict a token) x D."""
    return sum(int(lengths(examples)[rows].sum()) - len(rows) for examples, rows in sets) * hidden * itemsize


def groups(examples: Sequence[Example], rows: np.ndarray) -> list[list[int]]:
    """`rows` of similar length together (little padding), at most GROUP_TOKENS padded tokens a group."""
    sizes = lengths(examples)
    out: list[list[int]] = []
    for i in rows[np.argsort(sizes[rows], kind="stable")].tolist():  # stable: the order sorted() gives
        if not out or (len(out[-1]) + 1) * int(sizes[i]) > GROUP_TOKENS:
            out.append([])
        out[-1].append(i)
    return out


def largest_group(sets: list[Split]) -> int:
    """Tokens (rows x the longest row) of the largest group a pass runs at once."""
    return max((len(g) * int(lengths(ex)[g[-1]]) for ex, rows in sets for g in groups(ex, rows)), default=0)


class StreamedCache(PrefixCache):
    """A prefix cache the pass fills for `rows` alone (all of them, or a rank's): the others take no
    room, and none can be computed later, as the frozen blocks are freed after the pass."""

    def __init__(self, cut: Cut, examples: Sequence[Example], rows: np.ndarray, log: Callable = print):
        super().__init__(cut, examples, log)
        sizes = np.zeros(len(examples), np.int64)
        sizes[rows] = np.diff(self.offsets)[rows]
        self.offsets, self.rows = np.concatenate([[0], np.cumsum(sizes)]), rows

    def _fill(self, indices: list[int]) -> None:
        raise RuntimeError(f"rows {indices} were not streamed (--stream-prefix), and the frozen blocks are freed")


def release(module: nn.Module) -> None:
    """Free a module's weights: each becomes a zero scalar broadcast to its shape, which holds no
    memory and keeps the shapes the model's code reads; its states are already on disk."""
    module.update(tree_map(lambda w: mx.broadcast_to(mx.zeros((), w.dtype), w.shape), module.parameters()))
    mx.clear_cache()


def embedding(model: nn.Module) -> nn.Module:
    return next(m for _, m in model.named_modules() if isinstance(m, EMBEDDINGS))


def check_block_alone(cut: Cut, probe: mx.array) -> mx.array:
    """Block 0 run alone (Cut.block) must give what the model's own forward gives after block 0;
    returns the probe's embeddings. Reads only the embedding and block 0."""
    h = cut.prefix(probe, 0)
    expected, got = cut.prefix(probe, 1), cut.block(0, probe, h)
    if not mx.allclose(expected, got, rtol=1e-4, atol=1e-4).item():
        raise UserError(
            f"--stream-prefix: {type(cut.model).__name__}'s blocks cannot be run one at a time (block 0 alone "
            "changes its output); train with --stream-prefix off on a machine that holds the model"
        )
    return h


class Work:
    """Runs a pass's groups two at a time, one on each CPU stream with every matmul on one thread,
    where the run's first passes measured that faster than one stream (prefix_cache.SplitTrial: a
    warm-up pass, then PASS_TRIALS passes alternating; each pass is the same rows through one block)."""

    def __init__(self, trial: SplitTrial):
        self.trial = trial

    def run(self, parts: list[list[int]], run: Callable, keep: Callable, sizes: np.ndarray) -> None:
        """`run(rows)` each part of rows, lazily; `keep(rows, h)` what it gave, once computed."""
        streams, began = self.trial.streams_for(len(parts)), time.perf_counter()
        width = max(1, len(streams))
        with blas.one_thread() if streams else nullcontext():
            for start in range(0, len(parts), width):
                batch = parts[start : start + width]
                out = []
                for part, stream in zip(batch, streams or [None]):
                    with mx.stream(stream) if stream is not None else nullcontext():
                        out.append(run(part))
                mx.eval(out)
                for part, h in zip(batch, out):
                    keep(part, h)
        tokens = int(sum(sizes[p].sum() for p in parts))
        self.trial.record(len(parts), streams, time.perf_counter() - began, tokens)


@dataclass
class Head:
    """The first S tokens every streamed row of a split begins with (a chat template's system prompt):
    each pass runs them once, and the rows' own positions continue their keys and values there."""

    tokens: mx.array  # (1, S)
    h: mx.array | None = None  # (1, S, D) entering the block the pass runs

    @property
    def size(self) -> int:
        return self.tokens.shape[1]

    def run(self, cut: Cut, block: int) -> Continued:
        """Block `block` on the head, its output kept for the next pass; returns its keys and values
        as the cache the rows' own positions continue."""
        kept = Kept()
        self.h = cut.block(block, self.tokens, self.h, _offsets(cut, 0, {block: kept}))
        mx.eval(self.h, kept.keys, kept.values)
        return Continued(kept.keys, kept.values, self.size)


def _offsets(cut: Cut, offset: int, caches: dict) -> list:
    """A cache per block of the model: `caches`' (by frozen block) and elsewhere one that only sets
    where positions start, for the masks and positions the model's forward makes."""
    every = [Continued(None, None, offset) for _ in cut.blocks]
    for block, cache in caches.items():
        every[cut.offset + block] = cache
    return every


def find_head(cut: Cut, examples: Sequence[Example], rows: np.ndarray, log: Callable = print) -> Head | None:
    """The head `rows` share (MIN_SHARED tokens or more), where continuing block 0's keys and values
    gives a row's states computed whole (checked on one row); else None."""
    tokens = [examples[i].tokens for i in rows.tolist()]
    if len(tokens) < 2 or cut.continues is False:
        return None
    shared = shared_length(tokens)
    if shared < MIN_SHARED or not plain_caches(cut):
        return None
    if cut.continues is None:
        row = mx.array(tokens[0][:-1])[None]
        h = cut.prefix(row, 0)
        whole = cut.block(0, row, h)
        head = Head(row[:, :shared], h[:, :shared])
        rest = cut.block(0, row[:, shared:], h[:, shared:], _offsets(cut, shared, {0: head.run(cut, 0)}))
        cut.continues = mx.allclose(mx.concatenate([head.h, rest], axis=1), whole, rtol=1e-4, atol=1e-4).item()
        if not cut.continues:
            log(WHOLE_ROWS)
            return None
        log(f"speed: the rows' first {shared} tokens are the same; each block runs them once")
    return Head(mx.array(tokens[0][:shared])[None])


def _pass(
    cut: Cut,
    block: int,
    cache: StreamedCache,
    files: tuple[RowFile | None, RowFile],
    head: Head | None,
    work: Work,
    embed: Work,
) -> None:
    """One pass over a split's rows: the embeddings (block -1), or block `block` on the states in
    `files[0]`. With a `head`, the rows' own positions alone: the head's states are written into
    every row by the last pass. The embeddings' pass runs on `embed`, which measures nothing."""
    examples, offsets, (src, dst) = cache.examples, cache.offsets, files
    skip = head.size if head else 0
    if head is not None:
        if block < 0:
            head.h = cut.prefix(head.tokens, 0)
        else:
            kv = head.run(cut, block)

    def run(rows: list[int]) -> mx.array:
        inputs = collate(examples, rows)[0][:, skip:-1]  # (G, W)
        if block < 0:
            return cut.prefix(inputs, 0)
        states = np.zeros((len(rows), inputs.shape[1], dst.shape[1]), dst.dtype)
        for r, i in enumerate(rows):
            states[r, : offsets[i + 1] - offsets[i] - skip] = src[offsets[i] + skip : offsets[i + 1]]
        # a cache of its own: a call moves its offset on
        caches = None if head is None else _offsets(cut, skip, {block: Continued(kv.keys, kv.values, skip)})
        return cut.block(block, inputs, mx.array(states).view(cache.dtype), caches)  # (G, W, D)

    def keep(rows: list[int], h: mx.array) -> None:
        bits = np.array(h.view(BITS[h.dtype.size][0]))
        for r, i in enumerate(rows):
            dst[offsets[i] + skip : offsets[i + 1]] = bits[r, : offsets[i + 1] - offsets[i] - skip]
        if skip and block == cut.k - 1:
            shared = np.array(head.h[0].view(BITS[h.dtype.size][0]))
            for i in rows:
                dst[offsets[i] : offsets[i] + skip] = shared

    (embed if block < 0 else work).run(groups(examples, cache.rows), run, keep, lengths(examples))


def stream_prefix(cut: Cut, sets: list[Split], log: Callable = print) -> list[StreamedCache]:
    """Prefix caches for `sets` (train, valid), filled block by block; afterwards the frozen blocks'
    weights (and the embedding's, unless it is also the output projection) are freed."""
    model, caches = cut.model, [StreamedCache(cut, examples, rows, log) for examples, rows in sets]
    training = model.training
    model.eval()
    shortest = int(np.argmin(lengths(sets[0][0])))
    h = check_block_alone(cut, collate(sets[0][0], [shortest])[0][:, :-1])
    heads = [find_head(cut, examples, rows, log) for examples, rows in sets]
    work, embed = Work(SplitTrial(split_streams(model), log, PASS_TRIALS)), Work(SplitTrial([], log))
    streamed, total = sum(len(rows) for _, rows in sets), sum(len(ex) for ex, _ in sets)
    which = "every row" if streamed == total else f"the {streamed} of {total} rows this process reads"
    files = []
    for cache in caches:
        cache.dtype = h.dtype
        shape = (int(cache.offsets[-1]), h.shape[-1], BITS[h.dtype.size][1])
        files.append([None, RowFile(*shape)])
    start = time.perf_counter()
    for block in range(-1, cut.k):
        for cache, pair, head in zip(caches, files, heads):
            _pass(cut, block, cache, (pair[0], pair[1]), head, work, embed)
            if pair[0] is not None:
                pair[0].close()
            pair[:] = [pair[1], RowFile(*pair[1].shape, pair[1].dtype)] if block + 1 < cut.k else [pair[1], None]
        if block >= 0:
            release(cut.blocks[cut.offset + block])
        elif not cut.tied:
            release(embedding(model))
        done = "the embeddings" if block < 0 else f"block {block}/{cut.k - 1}"
        log(f"memory: streamed {done} over {which} ({time.perf_counter() - start:.1f}s)")
    for cache, (last, _) in zip(caches, files):
        cache.store, cache.done[cache.rows] = last, True
    model.train(training)
    return caches


def streamed_feed(
    model: nn.Module, first_trained: int, sets: list[Split], log: Callable = print, share_heads: bool = False
) -> Feed:
    """The cut feed of a streamed run: its caches of train and valid (`splits`) are filled now.
    `share_heads`: as make_feed's."""
    feed = Feed(cut_at(model, first_trained), cache_prefix=True, log=log, share_heads=share_heads)
    for (examples, _), cache in zip(sets, stream_prefix(feed.cut, sets, log)):
        feed.caches[id(examples)] = cache
    return feed


def why_not_stream(cfg: TrainConfig, base: Base, first_trained: int) -> str | None:
    """Why this run cannot stream its frozen blocks (--stream-prefix), or None."""
    if first_trained == 0:
        return "LoRA reaches block 0, so no block is frozen; adapt the last blocks only (--num-layers)"
    if base.path.suffix == GGUF_SUFFIX:
        return "a GGUF base is read whole; convert it to a safetensors directory"
    if cfg.preference:  # its reference pass fills the prefix cache from the whole model, in memory
        return f"--objective {cfg.objective} is not streamed yet; train it with --stream-prefix off"
    if cfg.pack or not cfg.prefix_cache:
        return f"{'--pack' if cfg.pack else '--no-prefix-cache'} runs the whole model every step"
    try:
        cut_at(base.model, first_trained)
    except ValueError as e:
        return f"cannot cut {type(base.model).__name__} into blocks and a head ({e})"
    return None
