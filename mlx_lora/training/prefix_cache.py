"""Hidden states entering the first trained block, computed once per example and reused.

When LoRA sits only in the last blocks, the blocks before them are frozen and see the same
tokens every epoch, so their output never changes. The first epoch computes it per batch and
keeps each row's states; later epochs read them back and run only the trained blocks. With
causal attention and right padding a row's states do not depend on the rest of its batch, so
the rows can be regrouped freely. Small caches live in RAM, larger ones in a memory-mapped
temporary file (deleted when closed, also on a crash).
"""

import tempfile
from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

from mlx_lora.data.batches import collate, lengths
from mlx_lora.data.examples import Example
from mlx_lora.training.cut import Cut

RAM_LIMIT = 2 * 2**30  # bytes kept in memory; beyond this the cache is a file in $TMPDIR
BITS = {2: (mx.uint16, np.uint16), 4: (mx.uint32, np.uint32)}  # bf16 has no NumPy type: keep the raw bits


class PrefixCache:
    def __init__(self, cut: Cut, examples: Sequence[Example], log: Callable = print):
        self.cut, self.examples, self.log = cut, examples, log
        # Row i keeps the states of its first len-1 positions: the inputs that predict a token.
        sizes = lengths(examples) - 1
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.done = np.zeros(len(examples), bool)
        self.store = None  # (total positions, D) raw bits, allocated with the first batch

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
        h = self.cut.prefix(tokens[:, :-1])  # (B, L-1, D)
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
