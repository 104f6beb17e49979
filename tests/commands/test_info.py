import os
from dataclasses import replace

import mlx.nn as nn
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.commands.info import info
from mlx_lora.config import TrainConfig
from mlx_lora.formats.native import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mlx_lora.model.base import load_base
from mlx_lora.training.loop import build_run, train


def test_info_numbers_match_the_model_and_what_training_writes(llama, tiny_data, tmp_path):
    cfg = TrainConfig(
        model=str(llama),
        data=str(tiny_data),
        targets="q_proj,down_proj",
        layers="0,3",
        rank=4,
        batch_size=2,
        max_seq_length=64,
        iters=1,
        adapter_path=str(tmp_path / "run"),
    )
    lines = []
    shown = info(cfg, log=lines.append)
    base = load_base(str(llama))
    params = dict(tree_flatten(base.model.parameters()))
    linears = {n: m.weight.shape for n, m in base.model.named_modules() if isinstance(m, nn.Linear)}
    chosen = [f"model.layers.{i}.{m}" for i in (0, 3) for m in ("mlp.down_proj", "self_attn.q_proj")]
    assert shown.modules == chosen and shown.blocks == 4
    assert shown.linears == {n: tuple(s) for n, s in linears.items()}
    assert shown.trainable == sum(4 * (linears[m][0] + linears[m][1]) for m in chosen)
    assert shown.parameters == sum(v.size for v in params.values())
    assert shown.memory.weights == sum(v.nbytes for v in params.values()) + 4 * shown.trainable
    assert shown.memory.trainable == 4 * 4 * shown.trainable  # fp32 weight, gradient, two AdamW moments
    train(cfg, log=lambda line: None)
    written = {name: (tmp_path / "run" / name).stat().st_size for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)}
    assert shown.adapter_bytes == written
    text = "\n".join(lines)
    share = f"{100 * shown.trainable / shown.parameters:.3f}%"
    assert f"trainable parameters: {shown.trainable:,} ({share} of {shown.parameters:,})" in text
    assert f"adapter on disk: {sum(written.values()):,} bytes" in text
    assert "blocks 0, 3: mlp.down_proj, self_attn.q_proj" in text
    assert "blocks 0-3: " in text and "outside the blocks: lm_head" in text
    assert "training memory for batch 2 × 64 tokens, estimated" in text


def test_info_command_changes_nothing_and_reports_bad_targets(llama, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["info", "--model", str(llama), "--num-layers", "1", "--adapter-path", str(tmp_path / "a")])
    assert (
        ok.exit_code == 0
        and "on 2 modules" in ok.stdout
        and "blocks 3: self_attn.q_proj, self_attn.v_proj" in ok.stdout
    )
    assert not (tmp_path / "a").exists()
    bad = runner.invoke(app, ["info", "--model", str(llama), "--targets", "qq_proj"])
    assert bad.exit_code == 2 and "'qq_proj' matches no linear module" in bad.output


def test_info_shows_both_modes_and_the_cache_a_streamed_run_writes(llama, tiny_data, tmp_path):
    cfg = TrainConfig(model=str(llama), data=str(tiny_data), num_layers=2, batch_size=2, adapter_path=str(tmp_path))
    lines = []
    shown = info(cfg, log=lines.append)
    text = "\n".join(lines)
    assert not shown.streams and "--stream-prefix auto: train runs whole model in memory here" in text
    assert "frozen blocks 0-1 streamed from disk: " in text and "their states take " in text
    assert shown.plan.streamed.weights < shown.plan.in_memory.weights
    run = build_run(replace(cfg, stream_prefix="on"), log=lambda _: None)
    files = [cache.store for cache in run.feed.caches.values()]  # train and valid, on disk
    assert shown.plan.cache_bytes == sum(os.fstat(f.file.fileno()).st_size for f in files)
    assert info(replace(cfg, stream_prefix="on"), log=lambda _: None).streams
    everywhere = info(replace(cfg, num_layers=4), log=lines.append)
    assert not everywhere.streams and "streamed from disk: not possible (LoRA reaches block 0" in "\n".join(lines)
