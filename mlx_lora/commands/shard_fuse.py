"""`mlx-lora fuse --by-shard`: merge a base larger than memory one safetensors shard at a time.

The base is loaded lazily (a weight is read when first evaluated), so the adapted model costs only
its adapter. Each shard is read, the adapted weights in it are replaced by their merged ones
(LoRALinear.fuse, the one place the merge lives), written under the shard's own name, and freed
before the next, so peak memory follows the largest shard, not the model. The check cannot run
the whole model either: it compares the outputs of a few adapted blocks (the first, middle and
last) of the adapter model and of the fused model read back from disk, on the same input states.
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.errors import UserError
from mlx_lora.formats.loader import apply_adapter
from mlx_lora.model.base import Base, load_base, write_generation_config
from mlx_lora.model.cpu_kernels import use_cpu_kernels
from mlx_lora.model.lora import block_paths, lora_layers
from mlx_lora.training.cut import cut_at
from mlx_lora.training.streaming import release

INDEX = "model.safetensors.index.json"
CHECKED_BLOCKS = 3


def shard_of(directory: Path) -> dict[str, str]:
    """Tensor name -> the safetensors file holding it, from the index or the one file's header."""
    if (directory / INDEX).is_file():
        return json.loads((directory / INDEX).read_text())["weight_map"]
    return {name: f.name for f in directory.glob("model*.safetensors") for name in mx.load(str(f))}


def weights_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("model*.safetensors"))


def why_not_by_shard(base: Base) -> str | None:
    """Why this base cannot be merged shard by shard, or None."""
    if not (base.path.is_dir() and any(base.path.glob("model*.safetensors"))):
        return "the base is not a directory of safetensors shards"
    if "quantization" in base.config or "quantization_config" in base.config:
        return "the base is quantized (merging de-quantizes, so the shards would change size); fuse it in memory"
    return None


def adapted(name: str, adapter, weights, directory: Path) -> Base:
    """The base read lazily, with the adapter on it (only the adapter evaluated)."""
    base = load_base(name, lazy=True)
    use_cpu_kernels(base.model)
    apply_adapter(base, adapter, weights, directory, whole=False)
    base.model.eval()
    return base


def block_output(model: nn.Module, i: int, tokens: mx.array, h: mx.array) -> mx.array:
    """Block i alone on `h`, (1, T, D); the last block with the final norm after it."""
    if i + 1 < len(model.layers):
        return cut_at(model, i + 1).block(i, tokens, h)
    return cut_at(model, i).hidden(tokens, h)


def checked_blocks(model: nn.Module) -> list[int]:
    prefixes = [p + "." for p in block_paths(model)]
    blocks = sorted({i for path in lora_layers(model) for i, p in enumerate(prefixes) if path.startswith(p)})
    return sorted({blocks[0], blocks[len(blocks) // 2], blocks[-1]})[:CHECKED_BLOCKS]


def outputs(model: nn.Module, blocks: list[int], tokens: mx.array, h: mx.array) -> dict[int, mx.array]:
    """Each block's output, its weights freed once computed, so no two blocks are held at once."""
    out = {}
    for i in blocks:
        out[i] = block_output(model, i, tokens, h).astype(mx.float32)
        mx.eval(out[i])
        release(model.layers[i])
    return out


def write_shards(base: Base, tmp: Path, log, names: dict[str, str] | None = None) -> None:
    """Every shard of the base in `tmp`, the adapted weights merged; one shard in memory at a time.
    `names`: each adapted layer's weight's tensor name in the shards (default: its module path's)."""
    layers = lora_layers(base.model)
    where = shard_of(base.path)
    names = names or {p: p + ".weight" for p in layers}
    missing = [p for p in layers if names[p] not in where]
    if missing:
        raise UserError(
            f"--by-shard: {base.path} names no tensor {missing[0]}.weight (its names differ from the model's); "
            "fuse with --by-shard off"
        )
    for shard in sorted(set(where.values())):
        tensors, metadata = mx.load(str(base.path / shard), return_metadata=True)
        merged = [p for p in layers if where[names[p]] == shard]
        for path in merged:  # one layer at a time: its base weight and fp32 merge freed before the next
            tensors[names[path]] = layers[path].fuse().weight  # in the base's dtype
            mx.eval(tensors[names[path]])
            release(layers[path])
        mx.save_safetensors(str(tmp / shard), tensors, metadata=metadata)
        del tensors
        mx.clear_cache()
        log(f"fuse: wrote {shard} ({len(merged)} merged weights)")
    for f in base.path.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, tmp / f.name)
    write_generation_config(tmp, base.tokenizer)  # every stop token, as an in-memory fuse writes it
