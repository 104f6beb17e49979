"""What a training or evaluation step reads, and the loss that reads it.

The plain path feeds (tokens, mask) to `loss_fn`, which scores every position with the whole
model. When the model can be cut (cut.py) the step instead gets the hidden states entering the
first trained block from a PrefixCache and the flat positions of the loss targets: it runs only
the trained blocks, and the output projection (576 x 49k for SmolLM, more than one block costs)
only where a token is learned, in chunks, so no (B, T, V) logits exist for prompts or padding.
"""

from collections.abc import Callable, Iterator, Sequence
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, make_prompt_cache

from mlx_lora.data.batches import collate, lengths
from mlx_lora.data.examples import Example
from mlx_lora.model.cpu_kernels import cross_entropy
from mlx_lora.training.cut import Cut, find_cut
from mlx_lora.training.packing import packed_cache
from mlx_lora.training.prefix_cache import MIN_SHARED, PrefixCache, SplitTrial, shared_length, split_streams

TARGET_MULTIPLE = 32  # target counts are padded up to this, so the compiled step sees few shapes
CE_CHUNK = 1024  # target rows whose logits (rows x vocab) exist at once in the loss


def loss_fn(
    model: nn.Module, tokens: mx.array, mask: mx.array, segments: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the masked targets only, from full logits; returns (loss, number of targets).
    `segments` (B, L) marks the rows of a packed batch: attention and positions stay within each."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L-1)
    weights = mask[:, 1:].astype(mx.float32)  # (B, L-1): 1 where the token is learned
    cache = None if segments is None else packed_cache(model, segments[:, :-1])
    logits = model(inputs, cache=cache)  # (B, L-1, V)
    ce = cross_entropy(logits.astype(mx.float32), targets) * weights
    ntoks = weights.sum()
    return ce.sum() / mx.maximum(ntoks, 1), ntoks  # a group's rank can hold a batch with no targets


def _chunk_ce(cut: Cut, y: mx.array, x: mx.array) -> mx.array:
    return cross_entropy(cut.logits(x).astype(mx.float32), y, keep_exps=True)  # (C,)


def target_ce(cut: Cut, inputs, states, positions, targets, head=None, head_states=None) -> mx.array:
    """Cross-entropy (N,) of the N targets at `positions` (flat indices into (B, T)): the head runs
    on those positions only. With `head` (1, S) and its `head_states`, every row begins with those
    positions and `inputs`, `states` and `positions` are the rows' own (Feed.inputs)."""
    hidden = cut.hidden(inputs, states) if head is None else cut.hidden_after(head, head_states, inputs, states)
    picked = hidden.reshape(-1, hidden.shape[-1])[positions]  # (N, D)
    if picked.shape[0] <= CE_CHUNK:
        return _chunk_ce(cut, targets, picked)
    # recomputing each chunk's logits in the backward pass keeps one (C, V) chunk alive, not N
    return mx.concatenate(
        [
            mx.checkpoint(partial(_chunk_ce, cut, targets[i : i + CE_CHUNK]))(picked[i : i + CE_CHUNK])
            for i in range(0, picked.shape[0], CE_CHUNK)
        ]
    )


def target_loss(cut: Cut, inputs, states, positions, targets, weights, *head) -> tuple[mx.array, mx.array]:
    """Like loss_fn, but the head runs only on the target positions."""
    ce = target_ce(cut, inputs, states, positions, targets, *head)  # (N,)
    ntoks = weights.sum()
    return (ce * weights).sum() / mx.maximum(ntoks, 1), ntoks


def target_positions(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into the (B, L-1) inputs whose next token is learned, and their 0/1 weights,
    padded with index 0 / weight 0 to a multiple of TARGET_MULTIPLE."""
    flat = np.flatnonzero(mask[:, 1:])
    n = max(1, -(-len(flat) // TARGET_MULTIPLE)) * TARGET_MULTIPLE  # never empty: a group's rank may learn nothing
    positions = np.zeros(n, np.int32)
    positions[: len(flat)] = flat
    weights = np.zeros(n, np.float32)
    weights[: len(flat)] = 1.0
    return positions, weights


class Feed:
    """Turns a batch of example indices into step inputs; `loss(model, *inputs)` reads them."""

    collate = staticmethod(collate)  # how a batch of rows is laid out (preference.PreferenceFeed has its own)
    stats: tuple[str, ...] = ()  # what loss() reports besides the loss: none for SFT
    compiled = True  # whether step.py compiles the step that calls loss()

    def __init__(self, cut: Cut | None, cache_prefix: bool, log: Callable = print, share_heads: bool = False):
        self.cut, self.cache_prefix, self.log = cut, cache_prefix and cut is not None and cut.k > 0, log
        self.caches: dict[int, PrefixCache] = {}
        self.trial = SplitTrial(split_streams(cut.model), log) if self.cache_prefix else None  # one for every set
        # whether the trained blocks may run the first tokens a batch's rows share once (`_shared`)
        self.share_heads = (
            share_heads
            and self.cache_prefix
            and cut.run is None
            and all(type(c) is KVCache for c in make_prompt_cache(cut.model))
        )
        self.said_shared = False

    def inputs(self, examples: Sequence[Example], rows: list[int], batch: tuple[mx.array, ...]) -> tuple[mx.array, ...]:
        """Step inputs for `batch` (collated from `examples[rows]`: tokens, mask[, segments])."""
        if self.cut is None:
            return batch
        tokens, mask = batch
        positions, weights = target_positions(np.array(mask))
        inputs = tokens[:, :-1]  # (B, L-1)
        targets = np.array(tokens)[:, 1:].reshape(-1)[positions]  # (N,)
        flat = (mx.array(positions), mx.array(targets), mx.array(weights))
        if not self.cache_prefix:
            return inputs, *flat
        states = self.cache(examples).states(rows, inputs.shape[1])
        shared = self._shared(examples, rows, positions, weights, inputs.shape[1])
        if not shared:
            return inputs, states, *flat
        # the rows' own positions, and the flat target indices into them: (b, j) -> (b, j - S)
        width = inputs.shape[1]
        rest = np.where(weights > 0, positions // width * (width - shared) + positions % width - shared, 0)
        head = (inputs[:1, :shared], states[:1, :shared])
        return inputs[:, shared:], states[:, shared:], mx.array(rest.astype(np.int32)), *flat[1:], *head

    def _shared(
        self, examples: Sequence[Example], rows: list[int], positions: np.ndarray, weights: np.ndarray, width: int
    ) -> int:
        """How many first tokens the trained blocks run once for all `rows` (0: none): those all rows
        share (MIN_SHARED or more: a chat template's system prompt) before the first learned one, with
        the first row's frozen states for them (each row's are the same up to fp32 rounding, and the
        same bits where one fill's head gave them: PrefixCache._head). `positions` index (B, width)."""
        if not self.share_heads or self.cut.continues is not True or len(rows) < 2:
            return 0
        shared = shared_length([examples[i].tokens for i in rows])
        first = int((positions % width)[weights > 0].min(initial=width))
        shared = min(shared, first)
        if shared < MIN_SHARED:
            return 0
        if not self.said_shared:
            self.log(f"speed: the rows' first {shared} tokens are the same; the trained blocks run them once a batch")
            self.said_shared = True
        return shared

    def cache(self, examples: Sequence[Example]) -> PrefixCache:
        """The prefix cache of `examples`, made on first use (`new_cache`)."""
        if id(examples) not in self.caches:
            self.caches[id(examples)] = self.new_cache(examples)
        return self.caches[id(examples)]

    def new_cache(self, examples: Sequence[Example]) -> PrefixCache:
        return PrefixCache(self.cut, examples, self.log, self.trial)

    def read_ahead(self, examples: Sequence[Example], batches: Iterator[list[int]]) -> None:
        """The rows of the batches the run reads from `examples`, from the next on: a batch whose
        frozen states are missing computes the next batches' with them (PrefixCache.ahead)."""
        if self.cache_prefix:
            self.cache(examples).ahead = batches

    def loss(self, model: nn.Module, *inputs) -> tuple[mx.array, mx.array]:
        if self.cut is None:
            return loss_fn(model, *inputs)
        if not self.cache_prefix:
            inputs = (inputs[0], None, *inputs[1:])
        return target_loss(self.cut, *inputs)


PLAIN = Feed(None, cache_prefix=False)  # whole-model logits: evaluation outside training, packed batches


def make_feed(
    model: nn.Module,
    first_trained: int,
    examples: Sequence[Example],
    cache_prefix: bool,
    packed: bool,
    log: Callable = print,
    share_heads: bool = False,
) -> Feed:
    """The fastest feed this model allows: cut before its first trained block when the cut checks
    out. Packed batches keep the plain path: their mask and positions travel through the cache
    argument of the model's own forward, which the cut pieces do not take. `share_heads`: whether a
    batch's rows may run the first tokens they share once through the trained blocks (Feed._shared)."""
    if packed:
        return PLAIN
    probe, _ = collate(examples, [int(lengths(examples).argmin())])  # the first shortest, as min() chose
    feed = Feed(find_cut(model, first_trained, probe[:, :-1], log), cache_prefix, log, share_heads)
    if feed.cache_prefix:
        log(f"speed: blocks 0-{first_trained - 1} are frozen; their output is kept per row after its first batch")
    return feed
