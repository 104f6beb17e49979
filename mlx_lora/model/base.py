"""Load a base model through mlx-lm (local directory or hub id) and save model directories."""

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS, load_model, load_tokenizer, save_config, save_model

from mlx_lora.errors import UserError
from mlx_lora.model.gguf import GGUF_SUFFIX, load_gguf
from mlx_lora.model.lora import expert_name
from mlx_lora.model.precision import Precision, materialize, set_precision
from mlx_lora.model.stops import GENERATION_CONFIG, add_template_stop, stop_ids
from mlx_lora.model.vision import is_vision, load_vision, read_config

DEFAULT_MODEL = "mlx-lora-default"
DEFAULT_MODEL_DIR = Path(__file__).parent.parent / "default_model"
# Config keys that fix the shapes of a model; quantization and dtype deliberately left out so a
# QLoRA adapter still fits the full-precision base it came from.
FINGERPRINT_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
EXTRA_FILES = ("generation_config.json", "*.py", "*.jinja", "tokenizer.model")  # tokenizer.model: SentencePiece scores
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")  # name or org/name, as the hub spells them
PATH_STARTS = ("./", "../", "/", "~", ".\\", "..\\")
# Where a config.json states the most positions the model reads, by family (Llama, GPT-2, MPT, Qwen 1 /
# ChatGLM, GPT-J-style, others); a multimodal config holds it in its text_config. GGUF: model/gguf.py maps
# {arch}.context_length onto max_position_embeddings.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx", "max_sequence_length")


@dataclass
class Base:
    model: nn.Module
    tokenizer: TokenizerWrapper
    config: dict[str, Any]
    path: Path
    name: str  # what the user gave (hub id or path), recorded in adapter_config.json
    precision: Precision | None = field(default=None)  # stored and compute dtype (precision.py)
    processor: Any = field(default=None)  # a vision-language model's own processor (vision.py); None for text


def context_length(config: dict[str, Any]) -> tuple[int, str] | None:
    """(the model's context length, the config key that gave it), or None if the config states none."""
    for where, part in (("", config), ("text_config.", config.get("text_config") or {})):
        for key in CONTEXT_KEYS:
            if isinstance(part.get(key), int) and part[key] > 0:
                return part[key], where + key
    return None


def resolve_model(name: str | None) -> Path:
    """Local directory, or hub id downloaded once and then read from the cache (offline too)."""
    if name is None or name == DEFAULT_MODEL:
        return DEFAULT_MODEL_DIR
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"--model {name}: directory has no config.json (expected a Hugging Face model directory)")
        return path
    if looks_like_path(name):
        raise UserError(f"--model {name}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as online_error:
        try:
            return Path(snapshot_download(name, allow_patterns=DEFAULT_ALLOW_PATTERNS, local_files_only=True))
        except Exception:
            pass
        if path.parent != Path(".") and path.parent.is_dir():  # org/name whose org is a local directory
            raise UserError(f"--model {name}: no such directory (and no such model on the hub)") from None
        raise UserError(
            f"--model {name}: not a local directory, and the hub download failed "
            f"({type(online_error).__name__}); check the id, your network, or the HF cache"
        ) from None


def looks_like_path(name: str) -> bool:
    """./x, ../x, /x, ~/x, a/b/c or anything else the hub could not take as an id: a local path."""
    return name.startswith(PATH_STARTS) or (os.sep != "/" and os.sep in name) or not HUB_ID.fullmatch(name)


def fingerprint(config: dict[str, Any]) -> str:
    shape = {k: config[k] for k in FINGERPRINT_KEYS if k in config}
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


# transformers' spelling -> mlx-lm's, for keys whose name changed (transformers 5 writes the left one).
RENAMED_KEYS = (("num_local_experts", "num_experts"), ("num_experts", "num_local_experts"))
FULL, SLIDING = "full_attention", "sliding_attention"  # layer_types' names, also rope_parameters' keys


def mlx_config(config: dict[str, Any], where: Path | str = "config.json") -> dict[str, Any]:
    """The keys mlx-lm reads that `config` spells the other way (transformers 5: `rope_parameters`,
    `num_local_experts`, `layer_types`), added to a copy as mlx-lm loads it, never to the file."""
    out = {new: config[old] for old, new in RENAMED_KEYS if old in config and new not in config}
    out |= _rope(config.get("rope_parameters"))
    if isinstance(config.get("layer_types"), list) and "sliding_window_pattern" not in config:
        out["sliding_window_pattern"] = _pattern(config["layer_types"], where)
    return {k: v for k, v in out.items() if k not in config or k in ("rope_theta", "rope_scaling")}


def _rope(rope: Any) -> dict[str, Any]:
    """`rope_parameters` as mlx-lm's rope_theta / rope_scaling; Gemma 3 keeps one per layer type,
    which mlx-lm reads as rope_theta (global layers) and rope_local_base_freq (sliding ones)."""
    if not isinstance(rope, dict):
        return {}
    local = rope.get(SLIDING) if isinstance(rope.get(SLIDING), dict) else None
    rope = rope.get(FULL, rope) if isinstance(rope.get(FULL), dict) else rope
    out = {"rope_local_base_freq": local["rope_theta"]} if local and "rope_theta" in local else {}
    if "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        out["rope_scaling"] = rope
    return out


def _pattern(layer_types: list, where: Path | str) -> int:
    """mlx-lm's sliding_window_pattern p (block i global iff (i + 1) % p == 0) that gives `layer_types`."""
    fulls = [i + 1 for i, kind in enumerate(layer_types) if kind == FULL]
    p = fulls[0] if fulls else 0
    if not p or [i + 1 for i in range(len(layer_types)) if (i + 1) % p == 0] != fulls:
        raise UserError(
            f"{where}: layer_types {layer_types} is not every p-th block full attention, the only pattern "
            "mlx-lm runs (sliding_window_pattern); use a model whose global layers repeat evenly"
        )
    return p


def load_mlx_model(path: Path, lazy: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """mlx-lm's load_model on a directory, reading both spellings of its config (mlx_config)."""
    file = path / "config.json"
    return load_model(path, lazy=lazy, model_config=mlx_config(json.loads(file.read_text()), file))


def _load(name: str | None, lazy: bool, shapes_only: bool) -> tuple[nn.Module, TokenizerWrapper, dict, Path, Any]:
    processor = None
    if name is not None and name.endswith(GGUF_SUFFIX):
        path = Path(name).expanduser()
        if not path.is_file():
            raise UserError(f"--model {name}: no such GGUF file; give the path of a llama.cpp .gguf model")
        model, tokenizer, config = load_gguf(path, shapes_only)
    else:
        path = resolve_model(name)
        config = read_config(path)
        if is_vision(config):
            model, processor = load_vision(path, config, lazy)
        else:
            model, config = load_mlx_model(path, lazy)
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    add_template_stop(tokenizer)
    return model, tokenizer, config, path, processor


def load_base(name: str | None, lazy: bool = False, shapes_only: bool = False, compute: str | None = None) -> Base:
    """A Hugging Face / mlx-lm model directory, a hub id, or a llama.cpp .gguf file. `lazy`: the
    safetensors are read only when a weight is first evaluated (a GGUF file is read whole);
    `shapes_only`: for shapes, dtypes and sizes alone, at no cost at any model size (a GGUF's
    weights are stand-ins made from its header, gguf_tensors.read_shapes; never evaluate them);
    `compute`: --compute-dtype, the dtype to cast the weights to (None: as stored). The model runs
    on mlx-lm's own kernels; a command that wants ours asks (cpu_kernels.use_cpu_kernels)."""
    try:
        model, tokenizer, config, path, processor = _load(name, lazy or shapes_only or compute is not None, shapes_only)
        precision = set_precision(model, compute)
        if not (lazy or shapes_only):
            materialize(model)  # read as the cast asks, one tensor at a time
    except (ValueError, TypeError, FileNotFoundError, KeyError, RuntimeError) as e:  # mlx: RuntimeError for torn files;
        # TypeError: mlx-lm's ModelArgs missing a key it requires
        raise UserError(
            f"--model {name or DEFAULT_MODEL}: mlx-lm cannot load it ({e}); re-download it or point --model at a "
            "complete model directory"
        ) from None
    shown = (
        DEFAULT_MODEL
        if name in (None, DEFAULT_MODEL)
        else (str(path.resolve()) if Path(name).expanduser().exists() else name)
    )
    return Base(model, tokenizer, config, path, shown, precision, processor)


def write_model_files(dst: Path, model: nn.Module, tokenizer: TokenizerWrapper, config: dict, src: Path) -> None:
    """Weights, config and tokenizer in a directory that mlx-lm and transformers load as-is; its
    generation_config.json lists every stop token (stops.py), so transformers and mlx-lm stop there too."""
    save_model(dst, model)
    if "quantization" not in config:  # transformers reads no MLX-quantized weights, stacked or not
        unstack_experts(dst)
    save_config(dict(config), dst / "config.json")
    tokenizer.save_pretrained(str(dst))
    for pattern in EXTRA_FILES if src.is_dir() else ():  # a GGUF base is one file
        for f in src.glob(pattern):
            if not (dst / f.name).exists():
                shutil.copy(f, dst / f.name)
    write_generation_config(dst, tokenizer)


def unstack_experts(dst: Path) -> None:
    """mlx-lm's stacked experts (E, out, in) in the safetensors files save_model wrote, rewritten one
    tensor per expert under Hugging Face's names, the form transformers reads (mlx-lm's sanitize stacks
    them again on load): '...mlp.switch_mlp.up_proj.weight' -> '...mlp.experts.{e}.up_proj.weight'."""
    index_file = dst / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    for shard in sorted({shard for key, shard in index["weight_map"].items() if ".switch_mlp." in key}):
        weights, out = mx.load(str(dst / shard)), {}
        for key, w in weights.items():
            if ".switch_mlp." not in key:
                out[key] = w
                continue
            module, _, leaf = key.rpartition(".")
            experts, _, name = expert_name(module).rpartition(".")
            out |= {f"{experts}.{e}.{name}.{leaf}": w[e] for e in range(w.shape[0])}
        mx.eval(out)  # read whole before the file is replaced
        mx.save_safetensors(str(dst / shard), out, metadata={"format": "mlx"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard} | dict.fromkeys(out, shard)
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    index_file.write_text(json.dumps(index, indent=4))


def write_generation_config(dst: Path, tokenizer: TokenizerWrapper) -> None:
    """The base's generation_config.json (copied into `dst`, or none) with `eos_token_id` listing
    every stop token."""
    file = dst / GENERATION_CONFIG
    try:
        generation = json.loads(file.read_text()) if file.is_file() else {}
    except ValueError:
        generation = {}
    generation = generation if isinstance(generation, dict) else {}
    file.write_text(json.dumps(generation | {"eos_token_id": stop_ids(tokenizer)}, indent=2) + "\n")
