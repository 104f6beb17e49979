"""Hidden states entering the first trained block, computed once per example and reused.

When LoRA sits only in the last blocks, the blocks before them are frozen and see the same
tokens every epoch, so their output never changes. The first epoch computes it a few batches at a time
(a batch that misses takes the batches read next along, FILL_ROWS rows in all) and
keeps each row's states; later epochs read them back and run only the trained blocks. With
causal attention and right padding a row's states do not depend on the rest of its batch, so
the rows can be regrouped freely. Small caches live in RAM, larger ones in a memory-mapped
temporary file (deleted when closed, also on a crash).
"""

import functools
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlx_lora import blas
from mlx_lora.data.batches import PAD_MULTIPLE, collate, lengths
from mlx_lora.data.examples import Example
from mlx_lora.training.cut import Continued, Cut

RAM_LIMIT = 2 * 2**30  # bytes kept in memory; beyond this the cache is a file in $TMPDIR
# Rows one fill computes, the missing rows of the batches read next (PrefixCache.ahead): the real
# SmolLM2's prefix over 2 streams took 78, 60, 56 and 56 ms a row at 4, 8, 16 and 32 rows a call.
FILL_ROWS = 16
# First tokens every row of a fill must share for the frozen blocks to compute them once for all:
# chat templates write the same system prompt and headers into every row (SmolLM2's: 26 tokens).
MIN_SHARED = 8
WHOLE_ROWS = "speed: computing the rows' shared first tokens apart changes the states; each row is computed whole"
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)
BITS = {2: (mx.uint16, np.uint16), 4: (mx.uint32, np.uint32)}  # bf16 has no NumPy type: keep the raw bits


@functools.cache
def _cpu_streams() -> list:
    """One MLX stream per core where rows can be split over them (see `prefix`), else none."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cores < 2 or mx.default_device() != mx.cpu or not blas.sets_threads():
        return []
    return [mx.default_stream(mx.cpu)] + [mx.new_stream(mx.cpu) for _ in range(cores - 1)]


def split_streams(model: nn.Module) -> list:
    """The streams `prefix` splits rows over for this model: none for a quantized one, whose every
    stream would de-quantize each weight again (the 4-bit SmolLM2: 547 ms on one, 558 on two)."""
    return [] if any(isinstance(m, QUANTIZED) for _, m in model.named_modules()) else _cpu_streams()


def prefix(cut: Cut, parts: list[mx.array], streams: list, head: list | None = None) -> list[mx.array]:
    """The frozen blocks' output for each of `parts` (B_i, L_i) token batches, [(B_i, L_i, D)]; with
    `head` (mlx-lm's KV caches of one row's first positions) every row continues that row. On
    the CPU, MLX runs elementwise work on one core per stream while OpenBLAS spreads each matmul over
    every core; with a part on each stream and each matmul on one thread, every core is busy all the
    time (the real SmolLM2's prefix for 4 rows on 2 cores: 430 against 381 ms). Rows are independent
    under causal attention and right padding, so they may be grouped in any way."""
    if not streams:
        return [cut.prefix(tokens, cache=None if head is None else _rows_of(head)) for tokens in parts]
    out = []
    with blas.one_thread():
        for i, tokens in enumerate(parts):
            with mx.stream(streams[i % len(streams)]):
                out.append(cut.prefix(tokens, cache=None if head is None else _rows_of(head)))
        mx.eval(out)
    return out


def plain_caches(cut: Cut) -> bool:
    """Whether every frozen block keeps mlx-lm's plain KVCache, the only kind a head's keys and values
    are continued from (not a sliding window's, say)."""
    return all(type(c) is KVCache for c in make_prompt_cache(cut.model)[: cut.offset + cut.k])


def _rows_of(head: list) -> list:
    """One row's KV caches (mlx-lm's, for the blocks that filled theirs) as caches its continuations read."""
    return [Continued(*c.keys_and_values(), c.offset) if c.keys is not None else None for c in head]


def shared_length(rows: list[np.ndarray]) -> int:
    """How many first tokens all `rows` begin with, leaving each at least one input of its own (a
    row's inputs are its tokens but the last)."""
    n = min(len(t) for t in rows) - 2
    for t in rows[1:]:
        differ = np.flatnonzero(t[:n] != rows[0][:n])
        n = int(differ[0]) if differ.size else n
    return max(n, 0)


def parts_of(sizes: np.ndarray, rows: list[int], streams: int) -> list[list[int]]:
    """`rows` sorted by length and cut into at most `streams` runs of consecutive lengths (one when
    none), each padded to its own longest row: the cut that makes the costliest part (rows x its
    longest, padded as collate pads) the least, as the streams run side by side and the call ends
    with the last of them."""
    ordered = sorted(rows, key=lambda i: sizes[i])
    if streams < 2:
        return [ordered]
    width = [int(w) for w in -(-sizes[ordered] // PAD_MULTIPLE) * PAD_MULTIPLE]  # as collate pads
    costs = sorted({(b - a) * width[b - 1] for a in range(len(ordered)) for b in range(a + 1, len(ordered) + 1)})
    # the largest cost takes every row in one part, so some bound always fits
    return next(parts for bound in costs if (parts := _within(ordered, width, bound, streams)))


def _within(ordered: list[int], width: list[int], bound: int, streams: int) -> list[list[int]] | None:
    """`ordered` cut greedily into parts of at most `bound` padded tokens, or None if it takes more than `streams`."""
    parts, start = [], 0
    while start < len(ordered):
        end = start + 1
        while end < len(ordered) and (end + 1 - start) * width[end] <= bound:
            end += 1
        parts.append(ordered[start:end])
        start = end
    return parts if len(parts) <= streams else None


class SplitTrial:
    """Whether splitting a batch's rows over the streams (`prefix`) is faster on this machine than
    one stream: measured on the run's own first batches, not assumed (a split that wins on one CPU
    can lose on another). The first fill that can split warms up, the next `trials` (TRIALS for
    fills) alternate one stream and the split, and the split is kept only if it took MARGIN less time
    per token."""

    TRIALS = 2  # a fill each way: FILL_ROWS rows each, as many as four batches of 4 were before fills
    MARGIN = 0.95

    def __init__(self, streams: list, log: Callable = print, trials: int = TRIALS):
        self.streams, self.log, self.trials = streams, log, trials
        self.seconds = {False: 0.0, True: 0.0}  # per token, summed over the trials, by split
        self.tried = -1  # fills run so far that could split; the first is a warm-up
        self.split = True  # until measured (the warm-up splits)

    def streams_for(self, rows: int) -> list:
        if not self.streams or rows < len(self.streams):
            return []
        if 0 <= self.tried < self.trials:
            return self.streams if self.tried % 2 else []
        return self.streams if self.split else []

    def record(self, rows: int, streams: list, seconds: float, tokens: int) -> None:
        if not self.streams or rows < len(self.streams) or self.tried >= self.trials:
            return
        if self.tried >= 0:
            self.seconds[bool(streams)] += seconds / tokens
        self.tried += 1
        if self.tried == self.trials:
            one, split, runs = self.seconds[False], self.seconds[True], self.trials // 2
            self.split = split < self.MARGIN * one
            self.log(
                f"speed: frozen prefix {'split over' if self.split else 'on one of'} {len(self.streams)} streams "
                f"({1e6 * split / runs:.0f} against {1e6 * one / runs:.0f} µs a token on one, measured on this run)"
            )


class PrefixCache:
    def __init__(self, cut: Cut, examples: Sequence[Example], log: Callable = print, trial: SplitTrial | None = None):
        self.cut, self.examples, self.log = cut, examples, log
        self.ahead: Iterator[list[int]] | None = None  # the rows of the batches the run reads, from the next on
        self.sizes = lengths(examples)
        # Row i keeps the states of its first len-1 positions: the inputs that predict a token.
        sizes = self.sizes - 1
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.done = np.zeros(len(examples), bool)
        self.store = None  # (total positions, D) raw bits, allocated with the first batch
        self.trial = trial or SplitTrial(split_streams(cut.model), log)
        self.last_head: tuple[np.ndarray, mx.array, list] | None = None  # (its tokens, states, KV caches)

    def _allocate(self, h: mx.array) -> None:
        self.dtype = h.dtype
        _, np_bits = BITS[h.dtype.size]
        shape = (int(self.offsets[-1]), h.shape[-1])
        nbytes = shape[0] * shape[1] * h.dtype.size
        if nbytes <= RAM_LIMIT:
            self.store = np.empty(shape, np_bits)
        else:
            self.file = tempfile.TemporaryFile(prefix="mlx-lora-prefix-")  # noqa: SIM115  (lives with the cache)
            self.store = np.memmap(self.file, np_bits, "w+", shape=shape)
            self.log(f"speed: caching {nbytes / 2**30:.1f} GB of frozen-block states in a temporary file")

    def _wanted(self, missing: list[int]) -> list[int]:
        """`missing` and the rows not yet computed of the batches read next, FILL_ROWS in all: a
        larger call computes each row in less time, and every row it adds is read by a later step."""
        rows = dict.fromkeys(missing)
        while self.ahead is not None and len(rows) < FILL_ROWS:
            batch = next(self.ahead, None)
            if batch is None:
                self.ahead = None
                break
            rows.update(dict.fromkeys(i for i in batch if not self.done[i]))
        return list(rows)

    def _head(self, indices: list[int]) -> tuple[int, mx.array, list] | None:
        """(S, the frozen states of the S first tokens all `indices` share (S, D), their KV caches), or None:
        fewer than MIN_SHARED shared, or continuing a KV cache was found on the first try not to give this
        model's states (then never tried again). A head the last fill computed is reused while the rows
        begin with it: every row of a chat set begins with the same system prompt, and one row's 26 tokens
        through SmolLM2's 26 frozen blocks took 150-180 ms a fill, ~7% of an epoch-1 run."""
        rows = [self.examples[i].tokens for i in indices]
        shared = shared_length(rows)
        if self.cut.continues is False or len(rows) < 2 or shared < MIN_SHARED:
            return None
        if self.last_head is not None:
            tokens, h, caches = self.last_head
            if len(tokens) <= shared and np.array_equal(rows[0][: len(tokens)], tokens):
                return len(tokens), h, caches
        if not plain_caches(self.cut):
            self.cut.continues = False  # a sliding window or another kind of cache: not tried
            return None
        caches = make_prompt_cache(self.cut.model)
        h = self.cut.prefix(mx.array(rows[0][:shared])[None], cache=caches)[0]  # (S, D)
        mx.eval(h, [c.state[:2] for c in caches if c.keys is not None])
        if self.cut.continues is None:
            self.cut.continues = self._check_head(rows[0], h, caches)
        if not self.cut.continues:
            return None
        self.last_head = rows[0][:shared].copy(), h, caches
        return shared, h, caches

    def _check_head(self, row: np.ndarray, h: mx.array, caches: list) -> bool:
        """Whether the states of `row` computed after its head (h, caches) are its states computed whole."""
        whole = self.cut.prefix(mx.array(row[:-1])[None])[0]
        try:
            rest = self.cut.prefix(mx.array(row[len(h) : -1])[None], cache=_rows_of(caches))[0]
            ok = mx.allclose(mx.concatenate([h, rest]), whole, rtol=1e-4, atol=1e-4).item()
        except (TypeError, ValueError) as e:  # a model whose forward takes no cache
            ok = False
            self.log(f"speed: cannot continue {type(self.cut.model).__name__}'s KV cache ({e})")
        self.log(
            f"speed: the rows' first {len(h)} tokens are the same; the frozen blocks compute them once a fill"
            if ok
            else WHOLE_ROWS
        )
        return ok

    def _fill(self, missing: list[int]) -> None:
        indices = self._wanted(missing)
        streams, start = self.trial.streams_for(len(indices)), time.perf_counter()
        parts = parts_of(self.sizes, indices, len(streams))
        head = self._head(indices)
        skip = head[0] if head else 0
        tokens = [collate(self.examples, part)[0][:, skip:-1] for part in parts]  # (B, L-1-skip) each
        states = prefix(self.cut, tokens, streams, head[2] if head else None)  # (B, L-1-skip, D) each
        mx.eval(states)
        self.trial.record(len(indices), streams, time.perf_counter() - start, int(self.sizes[indices].sum()))
        for part, h in zip(parts, states):
            self._keep(part, h, head[1] if head else None)

    def _keep(self, indices: list[int], h: mx.array, head: mx.array | None = None) -> None:
        """Keep each row's states: `h` (B, L, D) of the rows `indices` collated, after the states (S, D)
        of the `head` every row begins with."""
        if self.store is None:
            self._allocate(h)
        skip = 0 if head is None else head.shape[0]
        shared = None if head is None else np.array(head.view(BITS[head.dtype.size][0]))
        bits = np.array(h.view(BITS[h.dtype.size][0]))
        for row, i in enumerate(indices):
            a, b = self.offsets[i], self.offsets[i + 1]
            if shared is not None:
                self.store[a : a + skip] = shared
            self.store[a + skip : b] = bits[row, : b - a - skip]
            self.done[i] = True

    def states(self, indices: list[int], width: int) -> mx.array:
        """(B, width, D) states entering the first trained block; zeros past each row's end."""
        missing = [i for i in indices if not self.done[i]]
        if missing:
            self._fill(missing)
        out = np.zeros((len(indices), width, self.store.shape[1]), self.store.dtype)
        for row, i in enumerate(indices):
            a, b = self.offsets[i], self.offsets[i + 1]
            out[row, : b - a] = self.store[a:b]
        return mx.array(out).view(self.dtype)
