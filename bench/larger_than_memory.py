"""Peak memory, time and losses of training a model streamed from disk vs held in memory, and of
fusing it shard by shard.

    python bench/larger_than_memory.py --work /tmp/ltm-bench [--blocks 24 --hidden 2048 --mlp 7168]

It writes a random-weight llama (default: 24 blocks of hidden 2048, MLP 7168, fp32: 5.8 GB in
~1 GB shards; the shipped model's ~100-token tokenizer, so the embedding and head are small) and
200 short training rows (+ 20 valid), then runs, each in a fresh process: `mlx-lora train` with
LoRA on the last 2 blocks for one epoch (50 steps of 4 rows) with --stream-prefix on and off, and
`mlx-lora fuse --by-shard on` of the streamed run's adapter. It reports each process's peak RSS
(wait4), its net peak (minus the same command's peak on the shipped 1 MB model: the libraries'
own memory), the wall time and the losses of both runs.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx_lora  # noqa: F401  (OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx

from mlx_lora.model.base import DEFAULT_MODEL_DIR
from mlx_lora.reporting.metrics import read_metrics

GB = 2**30
BLOCKS_PER_SHARD = 4


def block_tensors(i: int, hidden: int, mlp: int) -> dict[str, mx.array]:
    p, std = f"model.layers.{i}.", 0.02
    shapes = {f"self_attn.{n}_proj": (hidden, hidden) for n in "qkvo"}
    shapes |= {"mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden), "mlp.down_proj": (hidden, mlp)}
    out = {f"{p}{name}.weight": mx.random.normal(shape) * std for name, shape in shapes.items()}
    return out | {f"{p}{n}.weight": mx.ones((hidden,)) for n in ("input_layernorm", "post_attention_layernorm")}


def write_model(directory: Path, blocks: int, hidden: int, mlp: int) -> Path:
    """A random llama in the Hugging Face layout: config, tokenizer, shards and their index."""
    if (directory / "model.safetensors.index.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    for f in DEFAULT_MODEL_DIR.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, directory / f.name)
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    heads = hidden // 128
    config |= dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=blocks, head_dim=128)
    config |= dict(num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(0)
    vocab = config["vocab_size"]
    weight_map, total = {}, 0
    shards = [list(range(s, min(s + BLOCKS_PER_SHARD, blocks))) for s in range(0, blocks, BLOCKS_PER_SHARD)]
    for n, group in enumerate(shards):
        tensors = {k: v for i in group for k, v in block_tensors(i, hidden, mlp).items()}
        if n == 0:
            tensors["model.embed_tokens.weight"] = mx.random.normal((vocab, hidden)) * 0.02
        if n == len(shards) - 1:
            tensors["model.norm.weight"] = mx.ones((hidden,))
            tensors["lm_head.weight"] = mx.random.normal((vocab, hidden)) * 0.02
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(directory / name), tensors, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(v.nbytes for v in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


def write_data(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"Q: {a}+{b}?\nA:", "completion": f" {a + b}"} for a in range(10, 40) for b in range(10, 20)]
    for split, part in (("train", rows[:200]), ("valid", rows[200:220])):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return directory


def run(args: list[str]) -> tuple[float, float, list[str]]:
    """(seconds, peak RSS in GB, output lines) of one `mlx-lora ...` process."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "mlx_lora.cli", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [line.rstrip() for line in proc.stdout]
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"mlx-lora {' '.join(args)} failed:\n" + "\n".join(lines[-20:]))
    return time.perf_counter() - start, usage.ru_maxrss / 2**20, lines  # Linux: KiB


def losses(run_dir: Path) -> dict[str, float]:
    """Step -> training loss, and 'N val' -> validation loss, at full precision from metrics.jsonl."""
    out = {}
    for r in read_metrics(run_dir):
        if r["loss"] is not None:
            out[str(r["step"])] = r["loss"]
        if r["val_loss"] is not None:
            out[f"{r['step']} val"] = r["val_loss"]
    return out


def train_runs(work: Path, model: Path, data: Path, weights: float) -> None:
    common = ["--data", str(data), "--num-layers", "2", "--batch-size", "4", "--val-every", "25"]
    common += ["--val-batches", "5", "--report-every", "5", "--save-every", "0"]
    libraries = run(["train", *common, "--iters", "1", "--adapter-path", str(work / "tiny")])[1]
    for mode in ("on", "off"):
        out = ["--adapter-path", str(work / f"adapter-{mode}")]
        seconds, peak, lines = run(
            ["train", "--model", str(model), *common, "--iters", "50", "--stream-prefix", mode, *out]
        )
        net = peak - libraries
        print(
            f"train --stream-prefix {mode}: {seconds:.0f} s, peak RSS {peak:.2f} GB ({peak / weights:.0%} of the "
            f"weights), net of the libraries' {libraries:.2f} GB: {net:.2f} GB ({net / weights:.0%})"
        )
        print("  " + "; ".join(line for line in lines if line.startswith("memory:") and "streamed " not in line))
    on, off = losses(work / "adapter-on"), losses(work / "adapter-off")
    print("step      loss streamed  loss in memory  |difference|")
    for k in on:
        print(f"{k:>8}  {on[k]:.6f}       {off[k]:.6f}        {abs(on[k] - off[k]):.1e}")


def fuse_run(work: Path, model: Path, shard: float) -> None:
    libraries = run(["fuse", "--adapter-path", str(work / "tiny"), "--save-path", str(work / "tiny-fused")])[1]
    out = ["--adapter-path", str(work / "adapter-on"), "--save-path", str(work / "fused")]
    seconds, peak, lines = run(["fuse", "--model", str(model), *out, "--by-shard", "on"])
    net = peak - libraries
    print(
        f"fuse --by-shard on: {seconds:.0f} s, peak RSS {peak:.2f} GB ({peak / shard:.2f} x the largest shard), "
        f"net of the libraries' {libraries:.2f} GB: {net:.2f} GB ({net / shard:.2f} x)"
    )
    print("  " + "; ".join(line for line in lines if line.startswith("check:")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=7168)
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.write_only:
        write_model(a.work / "model", a.blocks, a.hidden, a.mlp)
        return
    # Written by a child: Linux hands a forked child its parent's high-water RSS, which wait4 would
    # then report as the child's peak if this process had grown while writing the weights.
    sizes = ["--blocks", str(a.blocks), "--hidden", str(a.hidden), "--mlp", str(a.mlp)]
    subprocess.run([sys.executable, __file__, "--work", str(a.work), *sizes, "--write-only"], check=True)
    model, data = a.work / "model", write_data(a.work / "data")
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors")) / GB
    shard = max(f.stat().st_size for f in model.glob("*.safetensors")) / GB
    print(f"model: {a.blocks} blocks, hidden {a.hidden}, MLP {a.mlp}: {weights:.2f} GB, shards of up to {shard:.2f} GB")
    train_runs(a.work, model, data, weights)
    fuse_run(a.work, model, shard)
    print(f"(this process's own peak RSS, a floor under every figure above: {own_peak():.2f} GB)")


def own_peak() -> float:
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 2**20


if __name__ == "__main__":
    main()
