"""fuse --by-shard: the model it writes is the in-memory fuse's, tensor for tensor, and it holds
about one shard at a time."""

import json
import subprocess
import sys

import mlx.core as mx
import pytest
from conftest import make_hf_model, random_adapter

import mlx_lora.commands.fuse as fuse_module
from mlx_lora.commands.fuse import fuse
from mlx_lora.config import FuseConfig, LoRAConfig
from mlx_lora.errors import UserError
from mlx_lora.model.lora import LoRALinear

EVERY_BLOCK = LoRAConfig(targets="q_proj,v_proj,down_proj", num_layers=-1, rank=4, alpha=8)


def _tensors(directory):
    out = {}
    for f in sorted(directory.glob("model*.safetensors")):
        out |= mx.load(str(f))
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The small llama in ~200 KB shards (4 files), with an adapter on every block."""
    root = tmp_path_factory.mktemp("sharded")
    model = make_hf_model(root / "model", "llama", max_shard_size="200KB")
    random_adapter(model, root / "adapter", EVERY_BLOCK)
    return model, root / "adapter"


def test_by_shard_writes_the_in_memory_fuse_tensor_for_tensor(sharded, tmp_path):
    model, adapter = sharded
    said = []
    by_shard = fuse(FuseConfig(str(model), str(adapter), str(tmp_path / "shards"), by_shard="on"), log=said.append)
    whole = fuse(FuseConfig(str(model), str(adapter), str(tmp_path / "whole"), by_shard="off"), log=lambda _: None)
    assert len(list(model.glob("model*.safetensors"))) > 2
    assert sorted(f.name for f in (tmp_path / "shards").glob("*.safetensors")) == sorted(
        f.name for f in model.glob("*.safetensors")
    )
    got, want = _tensors(tmp_path / "shards"), _tensors(tmp_path / "whole")
    # the same merge (LoRALinear.fuse) of the same numbers: bit for bit
    assert got.keys() == want.keys() and all(mx.array_equal(got[k], want[k]) for k in want)
    assert "fuse: merging one shard at a time (--by-shard on)" in said
    assert any(s.startswith("check: largest difference in the outputs of blocks [0, 2, 3]") for s in said)
    assert by_shard.max_logit_diff < 1e-4 and whole.max_logit_diff < 1e-3
    assert json.loads((tmp_path / "shards" / "config.json").read_text()) == json.loads(
        (model / "config.json").read_text()
    )


def test_a_merge_that_changes_the_blocks_is_refused_and_nothing_written(sharded, tmp_path, monkeypatch):
    model, adapter = sharded
    real = LoRALinear.fuse

    def off_by_one(self, *args):
        fused = real(self, *args)
        fused.weight = fused.weight + 1
        return fused

    monkeypatch.setattr(LoRALinear, "fuse", off_by_one)
    with pytest.raises(UserError, match=r"^fused model differs from the adapter model by .*; nothing written"):
        fuse(FuseConfig(str(model), str(adapter), str(tmp_path / "out"), by_shard="on"), log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_auto_merges_by_shard_only_when_the_model_would_not_fit_twice(sharded, tmp_path, monkeypatch):
    model, adapter = sharded
    size = sum(f.stat().st_size for f in model.glob("model*.safetensors"))
    for available, expected in ((2 * size, False), (2 * size - 1, True)):
        monkeypatch.setattr(fuse_module, "available_bytes", lambda available=available: available)
        said = []
        fuse(FuseConfig(str(model), str(adapter), str(tmp_path / str(available))), log=said.append)
        assert any(s.startswith("fuse: merging one shard at a time (twice its") for s in said) == expected


def test_by_shard_refuses_what_needs_the_whole_model(sharded, tmp_path):
    model, adapter = sharded
    with pytest.raises(UserError, match=r"^--by-shard on: --requantize and --export-gguf need the whole model"):
        fuse(FuseConfig(str(model), str(adapter), str(tmp_path / "g"), export_gguf=True, by_shard="on"))


CHILD = """
import json, sys
from mlx_lora.commands.fuse import fuse
from mlx_lora.config import FuseConfig

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024

model, adapter, warm, out, mode = sys.argv[1:]
fuse(FuseConfig(None, warm, out + "-warm", by_shard="off"), log=lambda _: None)  # loads every library first
before = status("VmRSS")
fuse(FuseConfig(model, adapter, out, by_shard=mode), log=lambda _: None)
print(json.dumps({"growth": status("VmHWM") - before}))
"""


@pytest.mark.once
@pytest.mark.slow
def test_by_shard_holds_about_one_shard(tmp_path):
    # 16 blocks of 16.8 MB (fp32) = 257 MB in 64 MB shards, LoRA in every block: a fuse in memory
    # holds the base and the fused copy it reads back; by shard, one shard (+ the merged weights
    # in it, computed in fp32 from the base's fp32) at a time.
    shapes = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8, head_dim=64)
    model = make_hf_model(tmp_path / "model", "llama", max_shard_size="64MB", **shapes, num_hidden_layers=16)
    random_adapter(model, tmp_path / "big", EVERY_BLOCK)
    random_adapter(make_hf_model(tmp_path / "small", "llama"), tmp_path / "tiny", EVERY_BLOCK)
    shard = max(f.stat().st_size for f in model.glob("model*.safetensors"))
    growth = {}
    for mode in ("on", "off"):
        args = [str(model), str(tmp_path / "big"), str(tmp_path / "tiny"), str(tmp_path / mode), mode]
        done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        growth[mode] = json.loads(done.stdout.strip().splitlines()[-1])["growth"]
    assert growth["on"] < 1.2 * shard, f"by shard: {growth['on'] / 2**20:.0f} MB, largest shard {shard / 2**20:.0f} MB"
    assert growth["off"] > 2 * shard  # the measurement sees more than a shard when the whole model is there
