"""A model cut where training starts: frozen blocks whose output can be cached, then the rest.

mlx-lm models run `h = block(h, mask, cache)` over their blocks, then a norm and an output
projection. Rather than re-implement each architecture's forward, a cut swaps modules for the
length of one call and lets the model's own code build embeddings, masks and positions:
- `prefix`: block k raises with its input, so the call stops at the hidden state entering it;
- `hidden`: block 0 hands on a given hidden state and blocks 1..k-1 pass it through, and the
  output projection returns its input, so the call yields the final normed hidden state;
- `logits`: the output projection alone, for the positions the loss needs.
`find_cut` checks that the pieces reproduce the model's plain forward; architectures where they
do not (blocks that pass more than one tensor, logit soft-capping after the head) get None and
train on the plain forward.
"""

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import create_attention_mask

from mlx_lora.model.lora import LINEAR_TYPES

EMBEDDINGS = (nn.Embedding, nn.QuantizedEmbedding)


class _Stop(Exception):
    def __init__(self, h: mx.array):
        self.h = h


def _stop(x, *args, **kwargs):
    raise _Stop(x)


def _through(x, *args, **kwargs):
    return x


class _Standin:
    """Takes a module's place for one call: another function, the same attributes (llama reads
    `block.use_sliding`, a tied head is the embedding's `as_linear`)."""

    def __init__(self, module, fn: Callable, as_linear: Callable | None = None):
        self._module, self._fn, self._as_linear = module, fn, as_linear

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def as_linear(self, x):
        return self._as_linear(x)

    def __getattr__(self, name):
        return getattr(self._module, name)


@contextmanager
def _swapped(container, replacements: dict):
    """Put replacements into a module (a dict) or a list of blocks for one call, then restore."""
    saved = {k: container[k] for k in replacements}
    try:
        for k, v in replacements.items():
            container[k] = v
        yield
    finally:
        for k, v in saved.items():
            container[k] = v


class Continued:
    """A block's KV cache for a batch whose rows all continue one row's first positions: mlx-lm's
    attention calls, with that row's keys and values put before each call's. (mlx-lm's KVCache writes
    into a buffer it grows, which ran two streams' rows one after the other here: 1281 against 638 ms.)"""

    def __init__(self, keys: mx.array | None, values: mx.array | None, offset: int):
        self.keys, self.values, self.offset = keys, values, offset  # (1, H, S, Dh) each

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.offset += keys.shape[2]
        rows = keys.shape[0]
        before = [mx.broadcast_to(a, (rows, *a.shape[1:])) for a in (self.keys, self.values)]
        return mx.concatenate([before[0], keys], axis=2), mx.concatenate([before[1], values], axis=2)

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        return create_attention_mask(n, self.offset, return_array, window_size)


class Kept(Continued):
    """A block's KV cache that keeps one call's keys and values as they are, so a gradient reaches
    them (mlx-lm's KVCache writes them into a buffer)."""

    def __init__(self):
        super().__init__(None, None, 0)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values, self.offset = keys, values, keys.shape[2]
        return keys, values


def _block_list(model: nn.Module) -> tuple[list, int]:
    """The list the model iterates over (model.layers may be a copy) and where block 0 sits in it."""
    first = model.layers[0]
    for _, module in model.named_modules():
        for value in module.values():
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if item is first:
                        return value, i
    raise ValueError("no list of blocks")


def _head_site(model: nn.Module) -> tuple[nn.Module, str, bool]:
    """(parent module, attribute, tied) of the output projection: an `lm_head`, else the embedding."""
    modules = dict(model.named_modules())
    for kinds, tied in ((LINEAR_TYPES, False), (EMBEDDINGS, True)):
        found = [p for p, m in modules.items() if isinstance(m, kinds) and (tied or p.split(".")[-1] == "lm_head")]
        if len(found) == 1:
            parent, _, key = found[0].rpartition(".")
            return modules[parent], key, tied
    raise ValueError("no single output projection")


@dataclass
class Cut:
    model: nn.Module
    k: int  # the first trained block: blocks before it are frozen
    blocks: list  # the model's own list of blocks
    offset: int  # index of block 0 in `blocks`
    head_parent: nn.Module
    head_key: str
    tied: bool
    run: Callable | None = None  # how the model is called on `inputs` (a language model on merged embeddings)
    # whether `prefix` continuing one row's KV caches gives the states of the row whole (prefix_cache.py
    # checks it once, on the first fill of any set, for every set of the run); None: not tried yet
    continues: bool | None = None

    def forward(self, inputs, cache: list | None = None) -> mx.array:
        kwargs = {} if cache is None else {"cache": cache}  # mlx-lm's KV caches, where `inputs` continue them
        return self.model(inputs, **kwargs) if self.run is None else self.run(inputs, **kwargs)

    def _entering(self, j: int, inputs: mx.array, swaps: dict, cache: list | None = None) -> mx.array:
        """The hidden state entering block j, (B, T, D), with `swaps` in place for the call."""
        stop = {self.offset + j: _Standin(self.blocks[self.offset + j], _stop)}
        try:
            with _swapped(self.blocks, swaps | stop):
                self.forward(inputs, cache)
        except _Stop as stop:
            return stop.h
        raise ValueError(f"block {j} was never called")

    def prefix(self, inputs: mx.array, k: int | None = None, cache: list | None = None) -> mx.array:
        """The hidden state entering block k (default: the first trained one), (B, T, D); with
        `cache` (mlx-lm's, a KV cache per block) `inputs` continue the positions it holds."""
        return self._entering(self.k if k is None else k, inputs, {}, cache)

    def block(self, i: int, inputs: mx.array, h: mx.array, cache: list | None = None) -> mx.array:
        """Block i (i < k) alone on `h` (B, T, D) entering it, with the masks and positions the model
        makes for `inputs`: blocks before it pass through, and the embedding's output reaches no
        result, so only block i's weights are read. `cache`: one per block, block i's the one read
        (the others set the mask's and the positions' offset)."""
        real = self.blocks[self.offset + i]
        swaps = {self.offset + j: _Standin(self.blocks[self.offset + j], _through) for j in range(i)}
        swaps[self.offset + i] = _Standin(real, lambda x, *args, **kwargs: real(h, *args, **kwargs))
        return self._entering(i + 1, inputs, swaps, cache)

    def hidden(self, inputs: mx.array, h: mx.array | None = None, cache: list | None = None) -> mx.array:
        """Final normed hidden state (B, T, D); with `h` entering block k (k >= 1), blocks before k are
        skipped; with `cache` (a KV cache per block) `inputs` continue the positions it holds."""
        head = self.head_parent[self.head_key]
        standin = _Standin(head, head, _through) if self.tied else _Standin(head, _through)
        skip = {}
        if h is not None:
            skip = {self.offset + i: _Standin(self.blocks[self.offset + i], _through) for i in range(1, self.k)}
            skip[self.offset] = _Standin(self.blocks[self.offset], lambda *args, **kwargs: h)
        with _swapped(self.blocks, skip), _swapped(self.head_parent, {self.head_key: standin}):
            return self.forward(inputs, cache)

    def hidden_after(self, head: mx.array, head_h: mx.array, inputs: mx.array, h: mx.array) -> mx.array:
        """`hidden(inputs, h)` for rows that all begin with the positions of `head` (1, S), `head_h`
        (1, S, D) entering block k: the trained blocks run those positions once, and every row continues
        their keys and values. Returns the rows' own positions, (B, T, D)."""
        kept = [Kept() for _ in self.model.layers]
        self.hidden(head, head_h, kept)  # read for its keys and values only
        return self.hidden(inputs, h, [Continued(c.keys, c.values, head.shape[1]) for c in kept])

    def logits(self, x: mx.array) -> mx.array:
        """The output projection alone: (..., D) -> (..., V)."""
        head = self.head_parent[self.head_key]
        return head.as_linear(x) if self.tied else head(x)


def cut_at(model: nn.Module, k: int, run: Callable | None = None) -> Cut:
    """The pieces of `model` cut before block k, unchecked; ValueError where they cannot be found.
    `run(inputs)`: the model's logits where it is not called as `model(tokens)`."""
    blocks, offset = _block_list(model)
    parent, key, tied = _head_site(model)
    return Cut(model, k, blocks, offset, parent, key, tied, run)


def find_cut(model: nn.Module, k: int, probe, log: Callable = print, run: Callable | None = None) -> Cut | None:
    """A Cut before block k that reproduces the model's forward on `probe` (B, T), else None."""
    training = model.training
    model.eval()  # dropout would make the two forwards differ
    try:
        cut = cut_at(model, k, run)
        expected = cut.forward(probe)
        got = cut.logits(cut.hidden(probe, cut.prefix(probe) if k else None))
        ok = expected.shape == got.shape and mx.allclose(expected, got, rtol=1e-4, atol=1e-4).item()
    except Exception as e:  # any architecture we cannot cut trains uncut; say why
        ok, cut = False, None
        log(f"speed: cannot cut {type(model).__name__} ({type(e).__name__}: {e}); training on the full forward")
    finally:
        model.train(training)
    if cut is not None and not ok:
        log(f"speed: cutting {type(model).__name__} changes its output; training on the full forward")
    return cut if ok else None
