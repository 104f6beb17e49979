"""--stream-prefix: a run whose frozen blocks are streamed from disk is the in-memory run, and it
never holds the frozen part of the model in memory."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_tensors_close, fp32_tol, make_hf_model
from mlx.utils import tree_flatten

import mlx_lora.training.memory as memory
import mlx_lora.training.streaming as streaming
from mlx_lora.config import TrainConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.native import ADAPTER_WEIGHTS
from mlx_lora.model.base import load_base
from mlx_lora.training.checkpoint import checkpoint_dir
from mlx_lora.training.cut import cut_at
from mlx_lora.training.grad_checkpoint import _recomputed
from mlx_lora.training.loop import build_run, fit, train
from mlx_lora.training.prefix_cache import MIN_SHARED, SplitTrial, shared_length
from mlx_lora.training.streaming import cache_bytes, streamed_feed


def _config(model, data, out, **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        data=str(data),
        adapter_path=str(out),
        iters=8,
        batch_size=3,
        rank=4,
        num_layers=2,
        learning_rate=1e-2,
        val_every=4,
        report_every=1,
        save_every=0,
    )
    return TrainConfig(**{**base, **kw})


# The streamed run computes each row's frozen-block states in groups of rows sorted by length, the
# in-memory run in its training batches: other shapes, so sums in another order. Longest sums: the
# gradients' over a batch's 3 x 48 = 144 positions, over 8 AdamW steps: 8 x 3.16 x 144 x 1.2e-7 =
# 4.4e-4 of the losses and of each tensor's norm. A streamed run that read another block's output,
# a shifted row or states of another row is off by 1e-2 or more in the first loss already.
TOL = fp32_tol(3 * 48, adam_steps=8)


# an lm_head; a head tied to the embedding; gemma scales the embedding's output before block 0
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_streamed_run_equals_the_in_memory_run(hf_models, tiny_data, tmp_path, arch):
    said = []
    streamed = train(_config(hf_models[arch], tiny_data, tmp_path / "on", stream_prefix="on"), log=said.append)
    whole = train(_config(hf_models[arch], tiny_data, tmp_path / "off", stream_prefix="off"), log=lambda _: None)
    assert any(line.startswith("memory: streaming the frozen blocks from disk (--stream-prefix on)") for line in said)
    assert "memory: streamed block 1/1 over every row" in "\n".join(said)
    assert streamed.losses == pytest.approx(whole.losses, rel=TOL)
    # validation read the cache: the frozen blocks hold zeros by then, so a full forward would differ
    assert streamed.val_losses.keys() == whole.val_losses.keys() == {0, 4, 8}
    assert list(streamed.val_losses.values()) == pytest.approx(list(whole.val_losses.values()), rel=TOL)
    got, want = (mx.load(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("on", "off"))
    assert_tensors_close(got, want, TOL, norm=2)


def test_streamed_and_checkpointed_run_equals_the_in_memory_run(llama, tiny_data, tmp_path):
    run = build_run(
        _config(llama, tiny_data, tmp_path / "on", stream_prefix="on", grad_checkpoint=True), log=lambda _: None
    )
    assert all(type(block) is _recomputed(type(block).__base__) for block in run.base.model.layers)
    try:
        streamed = fit(run)
    finally:
        run.monitor.close()
    whole = train(_config(llama, tiny_data, tmp_path / "off", stream_prefix="off"), log=lambda _: None)
    # recomputing a block in the backward pass repeats its forward exactly: the streamed run's TOL
    assert streamed.losses == pytest.approx(whole.losses, rel=TOL)
    assert list(streamed.val_losses.values()) == pytest.approx(list(whole.val_losses.values()), rel=TOL)
    got, want = (mx.load(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("on", "off"))
    assert_tensors_close(got, want, TOL, norm=2)


def test_a_rank_streams_the_rows_it_reads_alone(llama, tiny_data, tmp_path):
    every = build_run(_config(llama, tiny_data, tmp_path / "all", stream_prefix="on"), log=lambda _: None)
    run = build_run(_config(llama, tiny_data, tmp_path / "some", stream_prefix="off"), log=lambda _: None)
    examples, rows, said = run.data["train"], np.array([1, 4, 5, 11]), []
    feed = streamed_feed(run.base.model, 2, [(examples, rows)], log=said.append)  # as a rank of a group does
    assert "memory: streamed block 1/1 over the 4 of 16 rows this process reads" in "\n".join(said)
    mine, full = feed.caches[id(examples)], every.feed.caches[id(every.data["train"])]
    # the other rows take no room, and the memory check's disk figure for a rank is its file's size
    assert mine.store.shape[0] == sum(len(examples[i].tokens) - 1 for i in rows)
    assert os.fstat(mine.store.file.fileno()).st_size == cache_bytes([(examples, rows)], hidden=64, itemsize=4)
    width = max(len(examples[i].tokens) for i in rows) - 1
    # the same states as the stream of every row, computed in other groups: sums over the 128-wide
    # MLP and 64-wide attention in each of the 2 frozen blocks
    got, want = (c.states(rows.tolist(), width) for c in (mine, full))
    assert_tensors_close({"states": got}, {"states": want}, fp32_tol(2 * 128))
    with pytest.raises(RuntimeError, match=r"rows \[0\] were not streamed"):  # the frozen blocks are gone
        mine.states([0], width)


def test_streamed_run_frees_the_frozen_blocks_and_feeds_both_splits_from_the_cache(llama, tiny_data, tmp_path):
    run = build_run(_config(llama, tiny_data, tmp_path, stream_prefix="on"), log=lambda _: None)
    blocks = run.base.model.layers
    for block in blocks[:2]:  # released: every weight a scalar broadcast to its shape
        weights = [w for _, w in tree_flatten(block.parameters())]
        assert weights and all(not w.any().item() for w in weights)
    assert blocks[2].self_attn.q_proj.linear.weight.abs().sum().item() > 0  # the trained blocks are whole
    assert set(run.feed.caches) == {id(run.data["train"]), id(run.data["valid"])}
    assert all(cache.done.all() for cache in run.feed.caches.values())


def test_resumed_streamed_run_equals_the_uninterrupted_one(llama, tiny_data, tmp_path):
    straight = train(_config(llama, tiny_data, tmp_path / "straight", stream_prefix="on"), log=lambda _: None)
    cfg = _config(llama, tiny_data, tmp_path / "split", stream_prefix="on", save_every=4)
    train(cfg, log=lambda _: None)  # leaves checkpoints/step-4 on the way
    resumed = train(replace(cfg, resume=str(checkpoint_dir(cfg.adapter_path, 4))), log=lambda _: None)
    # the resumed run streams only the 17 rows it still reads, in other groups than the uninterrupted
    # run's 24: the same states up to fp32 rounding (on an AMD EPYC the adapters differed by 3e-6 of
    # their size, on a Xeon not at all), so TOL, as above; a resume that lost the optimizer's state
    # or replayed a step moves some weight by the learning rate, 1e-2
    assert resumed.losses == pytest.approx(straight.losses[4:], rel=TOL)
    got, want = (mx.load(str(tmp_path / d / ADAPTER_WEIGHTS)) for d in ("split", "straight"))
    assert_tensors_close(got, want, TOL, norm=2)


def test_auto_streams_when_the_whole_model_does_not_fit(llama, tiny_data, tmp_path, monkeypatch):
    plans = []
    real = memory.choose_streaming
    monkeypatch.setattr(memory, "choose_streaming", lambda *a: plans.append(a[1]) or real(*a))
    build_run(_config(llama, tiny_data, tmp_path / "probe", stream_prefix="off"), log=lambda _: None)
    plan = plans[0]
    assert plan.streamed_peak < plan.in_memory.total
    between = (plan.streamed_peak + plan.in_memory.total) // 2
    monkeypatch.setattr(memory, "available_bytes", lambda: between)
    said = []
    run = build_run(_config(llama, tiny_data, tmp_path / "auto"), log=said.append)
    assert any("memory: streaming the frozen blocks from disk (the whole model would need" in s for s in said)
    assert run.feed.caches and all(c.done.all() for c in run.feed.caches.values())
    with pytest.raises(UserError, match=r"^this run needs about .*--stream-prefix on\) would need"):
        build_run(_config(llama, tiny_data, tmp_path / "off", stream_prefix="off"), log=lambda _: None)


@pytest.mark.parametrize("streams", [0, 2])
def test_the_pass_runs_the_shared_first_tokens_once_and_groups_over_two_streams(
    llama, tiny_data, tmp_path, monkeypatch, streams
):
    """Each block runs the first tokens every row shares once, and the rows' own positions continue its
    keys and values; the pass's groups (small here, so there are many) go two at a time over two streams.
    Each row's states are those the whole model in memory computes for the row alone: sums over the
    128-wide MLP and the 64-wide attention of each of the 3 frozen blocks, in other shapes."""
    monkeypatch.setattr(streaming, "GROUP_TOKENS", 64)
    pair = [mx.default_stream(mx.cpu), mx.new_stream(mx.cpu)][:streams]
    monkeypatch.setattr(streaming, "split_streams", lambda model: pair)
    # 3 frozen blocks: block 0's pass warms up, 1 and 2 are timed, and the split is kept whatever they measured
    monkeypatch.setattr(streaming, "PASS_TRIALS", 2)
    monkeypatch.setattr(SplitTrial, "MARGIN", 10.0)
    said = []
    run = build_run(_config(llama, tiny_data, tmp_path, stream_prefix="on", num_layers=1), log=said.append)
    shared = shared_length([ex.tokens for ex in run.data["train"]])
    assert shared >= MIN_SHARED
    assert f"speed: the rows' first {shared} tokens are the same; each block runs them once" in said
    assert any(line.startswith("speed: frozen prefix split over 2 streams") for line in said) == bool(streams)
    whole = cut_at(load_base(str(llama)).model, 3)
    for examples in (run.data["train"], run.data["valid"]):
        cache = run.feed.caches[id(examples)]
        for i, ex in enumerate(examples):
            want = whole.prefix(mx.array(ex.tokens[:-1])[None])
            got = cache.states([i], len(ex.tokens) - 1)
            assert_tensors_close({f"row {i}": got}, {f"row {i}": want}, fp32_tol(3 * 128))


def test_a_run_streams_the_rows_it_reads_alone(llama, tiny_data, tmp_path):
    said = []
    result = train(_config(llama, tiny_data, tmp_path, iters=2, stream_prefix="on"), log=said.append)
    # 2 steps of 3 rows read 6 of the 16 training rows; validation (up to 25 batches) all 8 of its own
    assert "memory: streamed block 1/1 over the 14 of 24 rows this process reads" in "\n".join(said)
    assert len(result.losses) == 2 and result.val_losses.keys() == {0, 2}


def test_auto_streams_a_run_that_fits_where_its_states_are_small(llama, tiny_data, tmp_path, monkeypatch):
    said = []
    build_run(_config(llama, tiny_data, tmp_path / "auto"), log=said.append)
    streaming_line = "memory: streaming the frozen blocks from disk (--stream-prefix auto: "
    assert any(line.startswith(streaming_line) for line in said)
    # states past AUTO_CACHE, or a disk that cannot hold them: the whole model in memory, not a refusal
    for name, value in (("AUTO_CACHE", 0), ("cache_dir_free", lambda: ("/small", 1000))):
        with monkeypatch.context() as patched:
            patched.setattr(memory, name, value)
            said = []
            run = build_run(_config(llama, tiny_data, tmp_path / name), log=said.append)
            assert not any("streaming" in line for line in said), name
            assert any(line.startswith("memory: about ") for line in said), name
            assert not any(cache.done.any() for cache in run.feed.caches.values())


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (dict(num_layers=4), "LoRA reaches block 0, so no block is frozen"),
        (dict(pack=True), "--pack runs the whole model every step"),
        (dict(prefix_cache=False), "--no-prefix-cache runs the whole model every step"),
    ],
)
def test_streaming_refuses_what_it_cannot_stream_in_one_line(llama, tiny_data, tmp_path, options, reason):
    with pytest.raises(UserError, match=rf"^--stream-prefix on: {reason}"):
        train(_config(llama, tiny_data, tmp_path, stream_prefix="on", **options), log=lambda _: None)


def test_streaming_refuses_when_the_disk_cannot_hold_the_cache(llama, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "cache_dir_free", lambda: ("/small", 1000))
    with pytest.raises(UserError, match=r"^--stream-prefix: the frozen blocks' states need 0\.0 GB in /small .*TMPDIR"):
        train(_config(llama, tiny_data, tmp_path, stream_prefix="on"), log=lambda _: None)
    assert not (tmp_path / ADAPTER_WEIGHTS).exists()


# A child process trains one model and reports how far its resident memory rose above where it
# stood just before: VmHWM (the kernel's high-water mark of resident pages) minus VmRSS then. A
# warm-up run on the shipped 1 MB model first loads every library and MLX's own state, so what is
# left is the run's. The states go through pread/pwrite, so the page cache holding them is the
# kernel's, not the process's.
CHILD = """
import json, sys
import mlx_lora.training.loop as loop
from mlx_lora.config import TrainConfig

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

cfg = TrainConfig(**json.loads(sys.argv[1]))
loop.train(TrainConfig(data=cfg.data, iters=1, adapter_path=cfg.adapter_path + "-warm"), log=lambda _: None)
before = status("VmRSS")
loop.train(cfg, log=lambda _: None)
print(json.dumps({"growth": status("VmHWM") - before}))
"""


def _growth(cfg: TrainConfig) -> int:
    args = {k: v for k, v in cfg.__dict__.items() if v != getattr(TrainConfig, k)}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["growth"]


@pytest.mark.once
@pytest.mark.slow
def test_streamed_run_holds_a_fraction_of_the_weights(tiny_data, tmp_path):
    # 24 blocks of 16.8 MB (hidden 512, MLP 2048, fp32) = 403 MB in 64 MB shards; LoRA on the last 2
    shapes = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8, head_dim=64)
    model = make_hf_model(tmp_path / "model", "llama", max_shard_size="64MB", **shapes, num_hidden_layers=24)
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    assert len(list(model.glob("*.safetensors"))) > 2 and weights > 380 * 2**20
    cfg = _config(model, tiny_data, tmp_path / "on", iters=2, val_every=0, stream_prefix="on")
    streamed, whole = _growth(cfg), _growth(replace(cfg, adapter_path=str(tmp_path / "off"), stream_prefix="off"))
    # Streamed, the run holds the 2 trained blocks (34 MB), one frozen block at a time (17 MB), the
    # LoRA weights with AdamW's moments and the activations of 3 rows of ~48 tokens (< 5 MB): ~56 MB,
    # plus MLX's buffer cache, which holds the freed intermediates of each shape the CPU kernels
    # (model/cpu_kernels.py) saw: 15-20 MB measured. The bound, a quarter of the weights (101 MB),
    # leaves ~25 MB for the allocator's rounding; a run that kept the frozen blocks it streamed would
    # hold all 403 MB.
    assert streamed < weights / 4, f"streamed run rose by {streamed / 2**20:.0f} MB of {weights / 2**20:.0f} MB"
    assert whole > weights  # the measurement sees the whole model when it is there
