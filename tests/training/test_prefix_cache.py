"""The speed levers change no number: cut forward == model forward, target-only loss == full loss,
prefix-cached training == uncached training, and the cache computes each row once."""

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import assert_tensors_close, fp32_tol
from mlx.utils import tree_flatten

import mlx_lora.training.feed as feed_module
import mlx_lora.training.prefix_cache as prefix_cache
from mlx_lora.config import TrainConfig
from mlx_lora.data.batches import collate
from mlx_lora.data.examples import load_dataset
from mlx_lora.model.base import load_base
from mlx_lora.model.lora import apply_lora, lora_layers
from mlx_lora.training.cut import find_cut
from mlx_lora.training.feed import Feed, target_positions
from mlx_lora.training.loop import train

TARGETS = {"phi3": "qkv_proj"}  # phi3 fuses q, k and v


def _adapted(path, arch, num_layers=2):
    base = load_base(str(path))
    mx.random.seed(0)
    apply_lora(base.model, TrainConfig(targets=TARGETS.get(arch, "q_proj,v_proj"), num_layers=num_layers))
    for layer in lora_layers(base.model).values():  # B != 0, so the adapter changes the output
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    return base


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "gemma"])
def test_cut_pieces_reproduce_the_model(hf_models, arch):
    model = _adapted(hf_models[arch], arch).model
    x = mx.array([[1, 40, 41, 5, 6, 7, 60, 2], [1, 9, 8, 7, 6, 5, 4, 3]])
    cut = find_cut(model, 2, x[:1])
    assert cut is not None and cut.tied == (arch in ("qwen2", "gemma"))
    expected = model(x)
    assert mx.array_equal(cut.logits(cut.hidden(x, cut.prefix(x))), expected)
    assert mx.array_equal(cut.logits(cut.hidden(x)), expected)
    assert mx.array_equal(model(x), expected)  # every swapped module is back


def test_architecture_the_cut_cannot_reproduce_falls_back(llama):
    model = load_base(str(llama)).model
    plain = type(model).__call__
    type(model).__call__ = lambda self, *a, **k: mx.tanh(plain(self, *a, **k) / 30) * 30  # soft-capped logits
    try:
        said = []
        assert find_cut(model, 2, mx.array([[1, 5, 6, 7]]), log=said.append) is None
        assert said and "changes its output" in said[0]
    finally:
        type(model).__call__ = plain


def test_target_positions_are_the_masked_next_tokens_padded_with_weight_zero():
    mask = np.array([[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]], bool)  # (B=2, L=5) -> inputs (2, 4)
    positions, weights = target_positions(mask)
    assert positions.tolist()[:3] == [1, 2, 4] and len(positions) == 32
    assert weights.tolist() == [1.0] * 3 + [0.0] * 29


def _losses_and_grads(model, feed, examples, indices):
    loss_and_grad = nn.value_and_grad(model, feed.loss)
    (loss, n), grads = loss_and_grad(model, *feed.inputs(examples, indices, collate(examples, indices)))
    return loss.item(), n.item(), dict(tree_flatten(grads))


@pytest.mark.parametrize("chunk", [1024, 16])  # one chunk; several, recomputed in the backward pass
def test_target_loss_and_cache_give_the_full_loss_and_its_gradients(llama, tiny_data, monkeypatch, chunk):
    monkeypatch.setattr(feed_module, "CE_CHUNK", chunk)
    base = _adapted(llama, "llama")
    examples = load_dataset(tiny_data, base.tokenizer, 256, train_on_prompt=False)["train"]
    batch = [0, 5, 9]  # different lengths: padding, prompts masked
    cut = find_cut(base.model, 2, collate(examples, [0])[0])
    plain = _losses_and_grads(base.model, Feed(None, False), examples, batch)
    for feed in (Feed(cut, False), Feed(cut, True)):
        loss, n, grads = _losses_and_grads(base.model, feed, examples, batch)
        assert n == plain[1] and loss == pytest.approx(plain[0], rel=1e-6)
        assert grads.keys() == plain[2].keys()
        assert all(mx.allclose(grads[k], plain[2][k], rtol=1e-4, atol=1e-6).item() for k in grads)


def test_the_trained_blocks_run_the_first_tokens_all_rows_share_once(llama, tiny_data):
    """A batch whose rows begin alike (and learn none of those tokens) runs them through the trained
    blocks on one row, and every row continues its keys and values: the loss and gradients are the
    whole batch's. Sums over the head's positions now run in (1, S) calls, not (B, T): other orders,
    the longest over a row's 48 positions (as in the test above, whose bounds are tighter than this)."""
    base = _adapted(llama, "llama")
    examples = load_dataset(tiny_data, base.tokenizer, 256, train_on_prompt=False)["train"]
    cut = find_cut(base.model, 2, collate(examples, [0])[0])
    batch = [0, 5, 9, 14]
    said = []
    feed = Feed(cut, True, said.append, share_heads=True)
    inputs = feed.inputs(examples, batch, collate(examples, batch))
    shared = prefix_cache.shared_length([examples[i].tokens for i in batch])
    assert len(inputs) == 7 and inputs[5].shape == (1, shared) and inputs[6].shape == (1, shared, inputs[1].shape[-1])
    assert inputs[0].shape == (4, collate(examples, batch)[0].shape[1] - 1 - shared)
    assert said[-1] == f"speed: the rows' first {shared} tokens are the same; the trained blocks run them once a batch"
    plain = _losses_and_grads(base.model, Feed(None, False), examples, batch)
    loss, n, grads = _losses_and_grads(base.model, feed, examples, batch)
    tol = fp32_tol(48)
    assert n == plain[1] and loss == pytest.approx(plain[0], rel=tol)
    assert_tensors_close(grads, plain[2], tol)
    # a set that learns its prompts too learns a token among the shared ones: rows run whole
    learned = load_dataset(tiny_data, base.tokenizer, 256, train_on_prompt=True)["train"]
    assert len(feed.inputs(learned, batch, collate(learned, batch))) == 5


def test_cache_computes_each_row_once_and_file_equals_ram(llama, tiny_data, monkeypatch):
    monkeypatch.setattr(prefix_cache, "MIN_SHARED", 10**6)  # every row whole: shared heads are tested below
    base = _adapted(llama, "llama")
    examples = load_dataset(tiny_data, base.tokenizer, 256, train_on_prompt=False)["train"]
    cut = find_cut(base.model, 2, collate(examples, [0])[0])
    calls = []
    real = cut.prefix
    cut.prefix = lambda x, **kw: calls.append(x.shape[0]) or real(x, **kw)
    ram = prefix_cache.PrefixCache(cut, examples)
    width = max(len(examples[i].tokens) for i in (3, 1, 7)) + 2
    first = ram.states([3, 1, 7], width)
    again = ram.states([7, 1], width)
    assert sum(calls) == 3 and mx.array_equal(again, first[[2, 1]])  # split over cores or not
    tokens, _ = collate(examples, [3])
    n = len(examples[3].tokens) - 1
    # row 3 alone against row 3 in a batch of 3 rows: other shapes, so sums in another order. Two
    # blocks whose longest sums have 128 terms (the MLP): 128 x 1.2e-7 = 1.5e-5 of the largest state;
    # another row's states, or shifted positions, are off by ~1
    alone = real(tokens[:, :-1])[0, :n]
    assert_tensors_close({"row 3": first[0, :n]}, {"row 3": alone}, fp32_tol(128))
    assert not first[0, n:].any().item()
    monkeypatch.setattr(prefix_cache, "RAM_LIMIT", 0)
    on_disk = prefix_cache.PrefixCache(cut, examples, log=lambda s: None)
    assert mx.array_equal(on_disk.states([3, 1, 7], width), first)
    assert isinstance(on_disk.store, np.memmap)


def test_rows_split_over_streams_give_the_states_of_one_call(llama, tiny_data):
    base = _adapted(llama, "llama")
    examples = load_dataset(tiny_data, base.tokenizer, 256, train_on_prompt=False)["train"]
    cut = find_cut(base.model, 2, collate(examples, [0])[0])
    tokens = collate(examples, [0, 1, 2, 3, 4])[0][:, :-1]
    whole = cut.prefix(tokens)
    streams = [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)]
    calls = []
    real = cut.prefix
    cut.prefix = lambda x, **kw: calls.append(x.shape[0]) or real(x, **kw)
    split = prefix_cache.prefix(cut, [tokens[:2], tokens[2:]], streams)
    assert calls == [2, 3]
    # 2 and 3 rows against 5: other shapes, so sums in another order (as in the test above)
    assert_tensors_close({"states": mx.concatenate(split)}, {"states": whole}, fp32_tol(128))


def test_a_fill_computes_the_next_batches_rows_in_parts_of_similar_length(llama, tiny_data, monkeypatch):
    """A miss computes the rows of the batches read next until FILL_ROWS, those already kept left out, sorted by
    length into a part per stream; each row's states are its own (row i alone, within fp32 rounding)."""
    monkeypatch.setattr(prefix_cache, "FILL_ROWS", 8)
    monkeypatch.setattr(prefix_cache, "MIN_SHARED", 10**6)  # every row whole: shared heads are tested below
    base = _adapted(llama, "llama")
    examples = load_dataset(tiny_data, base.tokenizer, 256, train_on_prompt=False)["train"]
    cut = find_cut(base.model, 2, collate(examples, [0])[0])
    calls = []
    real = cut.prefix
    cut.prefix = lambda x, **kw: calls.append(x.shape) or real(x, **kw)
    cache = prefix_cache.PrefixCache(cut, examples, log=lambda s: None)
    cache.trial = prefix_cache.SplitTrial([mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)], lambda s: None)
    cache.states([5], 40)  # row 5 alone, before the plan is known
    cache.ahead = iter([[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10], [11, 12]])
    sizes = cache.sizes - 1
    first = cache.states([0, 1, 2, 3], int(sizes.max()))
    # whole batches until 8 rows: 0-4 and 6-10 (row 5 was kept already)
    assert len(calls) == 3 and calls[1][0] + calls[2][0] == 10
    assert next(cache.ahead) == [11, 12]  # the plan read just as far as it needed
    assert cache.done[:11].all() and not cache.done[11:].any()
    # the shortest rows on one stream, the longest on the other, cut where the costlier part (rows x
    # its longest, padded as collate pads) is the least
    padded = np.array([collate(examples, [i])[0].shape[1] for i in range(len(examples))])
    shortest_first = sorted([0, 1, 2, 3, 4, 6, 7, 8, 9, 10], key=lambda i: padded[i])
    costs = {k: max(k * padded[shortest_first[k - 1]], (10 - k) * padded[shortest_first[-1]]) for k in range(1, 10)}
    k = calls[1][0]
    assert costs[k] == min(costs.values())
    assert [calls[1][1], calls[2][1]] == [padded[shortest_first[k - 1]] - 1, padded[shortest_first[-1]] - 1]
    for row, i in enumerate([0, 1, 2, 3]):
        n = int(sizes[i])
        alone = real(collate(examples, [i])[0][:, :-1])[0, :n]
        # other shapes than the row alone, so sums in another order (as in the tests above)
        assert_tensors_close({f"row {i}": first[row, :n]}, {f"row {i}": alone}, fp32_tol(128))


def test_training_reads_ahead_the_rows_its_next_batches_read(llama, tiny_data, tmp_path, monkeypatch):
    """In memory (--stream-prefix off; auto streams a run this small), the run's first step computes
    the frozen states of its first FILL_ROWS rows in one fill (the whole epoch of 16 rows here), and no
    later step computes any."""
    fills = []
    real = prefix_cache.PrefixCache._fill

    def fill(self, rows):
        before = int(self.done.sum())
        real(self, rows)
        fills.append((len(self.examples), int(self.done.sum()) - before))

    monkeypatch.setattr(prefix_cache.PrefixCache, "_fill", fill)
    cfg = TrainConfig(
        model=str(llama), data=str(tiny_data), iters=6, num_layers=2, val_every=0, save_every=0, stream_prefix="off"
    )
    said = []
    train(replace(cfg, adapter_path=str(tmp_path / "a")), log=said.append)
    assert [n for size, n in fills if size == 16] == [16]
    # the shared first tokens are checked once for the run's cut, whichever set (valid, then train) fills first
    assert sum(str(line).endswith("compute them once a fill") for line in said) == 1


def test_shared_length_leaves_each_row_an_input_of_its_own():
    rows = [np.array([1, 2, 3, 4, 5, 6]), np.array([1, 2, 3, 4, 9]), np.array([1, 2, 3, 4, 5, 6, 7])]
    assert prefix_cache.shared_length(rows) == 3  # the shortest row's inputs are 1 2 3 4: one stays its own
    assert prefix_cache.shared_length([np.array([1, 2, 3, 4, 5, 6]), np.array([1, 2, 7, 4, 5, 6])]) == 2
    assert prefix_cache.shared_length([np.array([5, 2, 3]), np.array([1, 2, 3])]) == 0


def _head_fill(llama, tiny_data, said):
    base = _adapted(llama, "llama")
    examples = load_dataset(tiny_data, base.tokenizer, 256, train_on_prompt=False)["train"]
    cut = find_cut(base.model, 2, collate(examples, [0])[0])
    calls = []
    real = cut.prefix
    cut.prefix = lambda x, **kw: calls.append((x.shape, "cache" in kw and kw["cache"] is not None)) or real(x, **kw)
    cache = prefix_cache.PrefixCache(cut, examples, log=said.append)
    rows = [0, 5, 9, 14]
    states = cache.states(rows, int(cache.sizes.max()))
    return examples, real, cache, rows, states, calls


def test_the_first_tokens_all_rows_share_are_computed_once(llama, tiny_data):
    """Rows that begin alike (the prompt's "Q: What is " here; a chat template's system prompt in real
    sets) get the frozen states of that head from one row's pass, and the rest of each row continues
    its KV caches: each row's states are its states computed whole."""
    said = []
    examples, real, cache, rows, states, calls = _head_fill(llama, tiny_data, said)
    shared = prefix_cache.shared_length([examples[i].tokens for i in rows])
    assert shared >= prefix_cache.MIN_SHARED and cache.cut.continues is True
    assert said == [f"speed: the rows' first {shared} tokens are the same; the frozen blocks compute them once a fill"]
    # the head once, the first row whole and continued (the check), then the rows' rest
    assert calls[0] == ((1, shared), True) and calls[1][1] is False and calls[2][1] is True
    assert all(with_cache for _, with_cache in calls[3:])
    assert sum(shape[0] for shape, _ in calls[3:]) == len(rows)
    for row, i in enumerate(rows):
        n = len(examples[i].tokens) - 1
        whole = real(collate(examples, [i])[0][:, :-1])[0, :n]
        # other shapes than the row alone, so sums in another order (as in the tests above)
        assert_tensors_close({f"row {i}": states[row, :n]}, {f"row {i}": whole}, fp32_tol(128))


def test_a_later_fill_whose_rows_begin_with_the_last_head_reuses_it(llama, tiny_data):
    """The head's states are computed by the first fill only: a later fill whose rows begin with
    the same tokens continues them without running the head again, and each row's states are still
    its states computed whole."""
    said = []
    examples, real, cache, rows, states, calls = _head_fill(llama, tiny_data, said)
    shared = len(cache.last_head[0])
    later = [i for i in range(len(examples)) if i not in rows][:4]
    assert prefix_cache.shared_length([examples[i].tokens for i in later]) >= shared  # the test's premise
    calls.clear()
    again = cache.states(later, int(cache.sizes.max()))
    assert calls and all(with_cache and shape[0] > 0 for shape, with_cache in calls)
    assert sum(shape[0] for shape, _ in calls) == len(later)  # no call of one row for the head
    for row, i in enumerate(later):
        n = len(examples[i].tokens) - 1
        whole = real(collate(examples, [i])[0][:, :-1])[0, :n]
        assert_tensors_close({f"row {i}": again[row, :n]}, {f"row {i}": whole}, fp32_tol(128))


def test_a_model_whose_cache_does_not_continue_computes_each_row_whole(llama, tiny_data):
    """The first fill checks the continued states against one row computed whole; where they differ
    (here a forward that drops its cache, so positions restart at 0) no head is shared again."""
    base = load_base(str(llama))
    plain = type(base.model).__call__
    type(base.model).__call__ = lambda self, inputs, cache=None, **k: plain(self, inputs, **k)
    try:
        said = []
        examples, real, cache, rows, states, calls = _head_fill(llama, tiny_data, said)
        assert cache.cut.continues is False and said[-1].endswith("each row is computed whole")
        assert not any(with_cache for _, with_cache in calls[3:]) and sum(s[0] for s, _ in calls[3:]) == len(rows)
        for row, i in enumerate(rows):
            n = len(examples[i].tokens) - 1
            whole = real(collate(examples, [i])[0][:, :-1])[0, :n]
            assert_tensors_close({f"row {i}": states[row, :n]}, {f"row {i}": whole}, fp32_tol(128))
    finally:
        type(base.model).__call__ = plain


def test_bf16_states_round_trip_exactly(llama, tiny_data):
    base = _adapted(llama, "llama")
    base.model.set_dtype(mx.bfloat16)
    examples = load_dataset(tiny_data, base.tokenizer, 256, train_on_prompt=False)["train"]
    cut = find_cut(base.model, 2, collate(examples, [0])[0])
    n = len(examples[2].tokens) - 1
    states = prefix_cache.PrefixCache(cut, examples).states([2], n + 3)
    tokens, _ = collate(examples, [2])
    assert states.dtype == mx.bfloat16
    assert mx.array_equal(states[0, :n], cut.prefix(tokens[:, :-1])[0, :n])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_training_with_the_prefix_cache_gives_the_same_losses_and_adapter(llama, tiny_data, tmp_path, dropout):
    cfg = TrainConfig(
        model=str(llama),
        data=str(tiny_data),
        iters=12,
        num_layers=2,
        dropout=dropout,
        learning_rate=1e-2,
        val_every=0,
        save_every=0,
        report_every=4,
    )  # 12 steps = 3 epochs
    said = []
    cached = train(replace(cfg, adapter_path=str(tmp_path / "cached")), log=said.append)
    # without dropout a batch's shared first tokens run once through the trained blocks too
    assert any("the trained blocks run them once a batch" in line for line in said) == (dropout == 0)
    plain = train(replace(cfg, adapter_path=str(tmp_path / "plain"), prefix_cache=False), log=lambda s: None)
    # Epochs 2 and 3 (steps 5-12) read states cached from epoch 1's batches, where the plain run
    # recomputes them in its current batches: other shapes, so sums in another order. Longest sums:
    # the gradients' over a batch's 4 x 48 = 192 positions, over 8 AdamW steps:
    # 8 x 3.16 x 192 x 1.2e-7 = 5.8e-4 of the losses and of each tensor's norm (measured: 0 to
    # 1e-7). States handed to the wrong rows of a batch put the losses 3e-3 and the adapter 0.1 off.
    tol = fp32_tol(4 * 48, adam_steps=8)
    assert cached.losses == pytest.approx(plain.losses, rel=tol)
    assert cached.val_losses.keys() == plain.val_losses.keys()
    assert list(cached.val_losses.values()) == pytest.approx(list(plain.val_losses.values()), rel=tol)
    assert len(set(cached.losses)) == 12 and cached.losses[-1] < cached.losses[0]
    a = mx.load(str(tmp_path / "cached" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "plain" / "adapters.safetensors"))
    assert_tensors_close(a, b, tol, norm=2)


@pytest.mark.parametrize("split_faster", [True, False])
def test_the_prefix_splits_only_where_this_run_measured_it_faster(split_faster):
    """The first fill that can split warms up, the next two are one stream and the split, then the
    faster per token stays; fills too small to split neither count nor split."""
    lines = []
    trial = prefix_cache.SplitTrial(["s0", "s1"], lines.append)
    used = []
    for rows in (4, 1, 4, 1, 4, 4, 4):
        streams = trial.streams_for(rows)
        used.append(bool(streams))
        per_token = (1.0 if streams else 2.0) if split_faster else (2.0 if streams else 1.0)
        trial.record(rows, streams, per_token * 100 * rows, 100 * rows)
    # warm-up split, (1 row: one), one, (1 row), split, then the choice twice
    assert used == [True, False, False, False, True, split_faster, split_faster]
    assert len(lines) == 1 and lines[0].startswith(
        f"speed: frozen prefix {'split over' if split_faster else 'on one of'} 2 streams"
    )
    assert trial.streams_for(1) == []


def test_no_streams_no_trial():
    trial = prefix_cache.SplitTrial([], print)
    assert trial.streams_for(8) == []
    trial.record(8, [], 1.0, 100)
    assert trial.tried == -1
