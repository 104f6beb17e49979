"""The frozen prefix streamed from disk: its hidden states computed block by block, with one
block's weights in memory at a time (--stream-prefix).

With LoRA only in blocks k.., training needs from blocks 0..k-1 only the hidden states entering
block k, once per row (prefix_cache.py). A model loaded lazily (safetensors are read when an array
is first evaluated) computes them in k+1 passes over every train and valid row: the embeddings,
then block 0, then block 1, ... Each pass reads its input states from one file and writes its
output to another; after it the pass's weights are freed (`release`), so the process never holds
more than one block of the frozen part. The last file is the cache training reads.
"""

import os
import tempfile
import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map

from mlx_lora.data.batches import collate, lengths
from mlx_lora.data.examples import Example
from mlx_lora.errors import UserError
from mlx_lora.training.cut import EMBEDDINGS, Cut, cut_at
from mlx_lora.training.feed import Feed
from mlx_lora.training.prefix_cache import BITS, PrefixCache

GROUP_TOKENS = 8192  # rows x tokens per block call: bounds one call's activations, not the model's


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


def cache_bytes(sets: list[list[Example]], hidden: int, itemsize: int) -> int:
    """The cache on disk: every row's positions but its last (the inputs that predict a token) x D."""
    return sum(int(lengths(examples).sum()) - len(examples) for examples in sets) * hidden * itemsize


def groups(examples: list[Example]) -> list[list[int]]:
    """Rows of similar length together (little padding), at most GROUP_TOKENS padded tokens a group."""
    sizes = lengths(examples)
    out: list[list[int]] = []
    for i in np.argsort(sizes, kind="stable").tolist():  # stable: the order sorted() gives
        if not out or (len(out[-1]) + 1) * int(sizes[i]) > GROUP_TOKENS:
            out.append([])
        out[-1].append(i)
    return out


def largest_group(sets: list[list[Example]]) -> int:
    """Tokens (rows x the longest row) of the largest group a pass runs at once."""
    return max((len(g) * int(lengths(ex)[g[-1]]) for ex in sets for g in groups(ex)), default=0)


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


def _pass(cut: Cut, block: int, cache: PrefixCache, src: RowFile | None, dst: RowFile) -> None:
    """One pass over a split's rows: the embeddings (block -1), or block `block` on the states in `src`."""
    examples, offsets = cache.examples, cache.offsets
    for rows in groups(examples):
        inputs = collate(examples, rows)[0][:, :-1]  # (G, W)
        if block < 0:
            h = cut.prefix(inputs, 0)
        else:
            states = np.zeros((len(rows), inputs.shape[1], dst.shape[1]), dst.dtype)
            for r, i in enumerate(rows):
                states[r, : offsets[i + 1] - offsets[i]] = src[offsets[i] : offsets[i + 1]]
            h = cut.block(block, inputs, mx.array(states).view(cache.dtype))  # (G, W, D)
        bits = np.array(h.view(BITS[h.dtype.size][0]))
        for r, i in enumerate(rows):
            dst[offsets[i] : offsets[i + 1]] = bits[r, : offsets[i + 1] - offsets[i]]


def stream_prefix(cut: Cut, sets: list[list[Example]], log: Callable = print) -> list[PrefixCache]:
    """Prefix caches for `sets` (train, valid), filled block by block; afterwards the frozen blocks'
    weights (and the embedding's, unless it is also the output projection) are freed."""
    model, caches = cut.model, [PrefixCache(cut, examples, log) for examples in sets]
    training = model.training
    model.eval()
    shortest = int(np.argmin(lengths(sets[0])))
    h = check_block_alone(cut, collate(sets[0], [shortest])[0][:, :-1])
    files = []
    for cache in caches:
        cache.dtype = h.dtype
        shape = (int(cache.offsets[-1]), h.shape[-1], BITS[h.dtype.size][1])
        files.append([None, RowFile(*shape)])
    start = time.perf_counter()
    for block in range(-1, cut.k):
        for cache, pair in zip(caches, files):
            _pass(cut, block, cache, pair[0], pair[1])
            if pair[0] is not None:
                pair[0].close()
            pair[:] = [pair[1], RowFile(*pair[1].shape, pair[1].dtype)] if block + 1 < cut.k else [pair[1], None]
        if block >= 0:
            release(cut.blocks[cut.offset + block])
        elif not cut.tied:
            release(embedding(model))
        done = "the embeddings" if block < 0 else f"block {block}/{cut.k - 1}"
        log(f"memory: streamed {done} over every row ({time.perf_counter() - start:.1f}s)")
    for cache, (last, _) in zip(caches, files):
        cache.store, cache.done[:] = last, True
    model.train(training)
    return caches


def streamed_feed(model: nn.Module, first_trained: int, data: dict[str, list[Example]], log: Callable = print) -> Feed:
    """The cut feed of a streamed run: its caches of train and valid are filled now."""
    feed = Feed(cut_at(model, first_trained), cache_prefix=True, log=log)
    sets = [examples for examples in (data["train"], data.get("valid")) if examples]
    for examples, cache in zip(sets, stream_prefix(feed.cut, sets, log)):
        feed.caches[id(examples)] = cache
    return feed
