"""Hidden states entering the first trained block, computed once per example and reused.

When LoRA sits only in the last blocks, the blocks before them are frozen and see the same
tokens every epoch, so their output never changes. The first epoch computes it per batch and
keeps each row's states; later epochs read them back and run only the trained blocks. With
causal attention and right padding a row's states do not depend on the rest of its batch, so
the rows can be regrouped freely. Small caches live in RAM, larger ones in a memory-mapped
temporary file (deleted when closed, also on a crash).
"""

import functools
import os
import tempfile
import time
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_lora import blas
from mlx_lora.data.batches import collate, lengths
from mlx_lora.data.examples import Example
from mlx_lora.training.cut import Cut

RAM_LIMIT = 2 * 2**30  # bytes kept in memory; beyond this the cache is a file in $TMPDIR
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


def prefix(cut: Cut, tokens: mx.array, streams: list) -> mx.array:
    """The frozen blocks' output for `tokens` (B, L), (B, L, D). On the CPU, MLX runs elementwise
    work on one core per stream while OpenBLAS spreads each matmul over every core; with the rows
    split over a stream per core and each matmul on one thread, every core is busy all the time
    (the real SmolLM2's prefix for 4 rows on 2 cores: 430 against 381 ms). Rows are independent
    under causal attention and right padding. Fewer rows than streams keep one."""
    if not streams or tokens.shape[0] < len(streams):
        return cut.prefix(tokens)
    bounds = np.linspace(0, tokens.shape[0], len(streams) + 1).astype(int)
    parts = []
    with blas.one_thread():
        for stream, a, b in zip(streams, bounds, bounds[1:]):
            with mx.stream(stream):
                parts.append(cut.prefix(tokens[a:b]))
        h = mx.concatenate(parts)
        mx.eval(h)
    return h


class SplitTrial:
    """Whether splitting a batch's rows over the streams (`prefix`) is faster on this machine than
    one stream: measured on the run's own first batches, not assumed (a split that wins on one CPU
    can lose on another). The first batch that can split warms up, the next TRIALS alternate one
    stream and the split, and the split is kept only if it took MARGIN less time per token."""

    TRIALS = 4
    MARGIN = 0.95

    def __init__(self, streams: list, log: Callable = print):
        self.streams, self.log = streams, log
        self.seconds = {False: 0.0, True: 0.0}  # per token, summed over the trials, by split
        self.tried = -1  # batches run so far that could split; the first is a warm-up
        self.split = True  # until measured (the warm-up splits)

    def streams_for(self, rows: int) -> list:
        if not self.streams or rows < len(self.streams):
            return []
        if 0 <= self.tried < self.TRIALS:
            return self.streams if self.tried % 2 else []
        return self.streams if self.split else []

    def record(self, rows: int, streams: list, seconds: float, tokens: int) -> None:
        if not self.streams or rows < len(self.streams) or self.tried >= self.TRIALS:
            return
        if self.tried >= 0:
            self.seconds[bool(streams)] += seconds / tokens
        self.tried += 1
        if self.tried == self.TRIALS:
            one, split = self.seconds[False], self.seconds[True]
            self.split = split < self.MARGIN * one
            self.log(
                f"speed: frozen prefix {'split over' if self.split else 'on one of'} {len(self.streams)} streams "
                f"({1e6 * split / 2:.0f} against {1e6 * one / 2:.0f} µs a token on one, measured on this run's batches)"
            )


class PrefixCache:
    def __init__(self, cut: Cut, examples: Sequence[Example], log: Callable = print, trial: SplitTrial | None = None):
        self.cut, self.examples, self.log = cut, examples, log
        # Row i keeps the states of its first len-1 positions: the inputs that predict a token.
        sizes = lengths(examples) - 1
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.done = np.zeros(len(examples), bool)
        self.store = None  # (total positions, D) raw bits, allocated with the first batch
        self.trial = trial or SplitTrial(split_streams(cut.model), log)

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

    def _fill(self, indices: list[int]) -> None:
        tokens, _ = collate(self.examples, indices)
        streams, start = self.trial.streams_for(len(indices)), time.perf_counter()
        h = prefix(self.cut, tokens[:, :-1], streams)  # (B, L-1, D)
        mx.eval(h)
        self.trial.record(len(indices), streams, time.perf_counter() - start, tokens[:, :-1].size)
        self._keep(indices, h)

    def _keep(self, indices: list[int], h: mx.array) -> None:
        """Keep each row's states of `h` (B, L, D), the rows `indices` collated."""
        if self.store is None:
            self._allocate(h)
        bits = np.array(h.view(BITS[h.dtype.size][0]))
        for row, i in enumerate(indices):
            a, b = self.offsets[i], self.offsets[i + 1]
            self.store[a:b] = bits[row, : b - a]
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
