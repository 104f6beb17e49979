"""The on-disk adapter: adapters.safetensors (LoRA weights only) + adapter_config.json.

Weight names are the model's module paths plus `.lora_a` (in, r) / `.lora_b` (r, out), the same
names mlx-lm uses. The config is complete enough to rebuild the adapter on its base with no other
input: base model, the exact modules, rank, alpha, dropout and a fingerprint of the base's shapes.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import atomic
from .config import LoRAConfig, lora_part
from .errors import UserError
from .lora import apply_lora, block_paths, lora_layers
from .models import Base, fingerprint

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "mlx-lora"
FORMAT_VERSION = 1
LORA_KEYS = ("lora_a", "lora_b")


@dataclass
class AdapterConfig:
    lora: LoRAConfig
    modules: list[str]  # full module paths, e.g. model.layers.3.self_attn.q_proj
    layers: list[int]  # block indices adapted
    base_model: str
    base_fingerprint: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "base_model": self.base_model,
            "base_fingerprint": self.base_fingerprint,
            **lora_part(self.lora),
            "scale": self.lora.scale,
            "layer_indices": self.layers,
            "modules": self.modules,
        }

    @classmethod
    def from_json(cls, path: Path, data: dict[str, Any]) -> "AdapterConfig":
        required = ["base_model", "base_fingerprint", "modules", "layer_indices"] + [f.name for f in fields(LoRAConfig)]
        missing = [k for k in required if k not in data]
        if data.get("format") != FORMAT or missing:
            raise UserError(f"{path}: not an mlx-lora adapter config (missing {', '.join(missing) or 'format'})")
        if data["format_version"] > FORMAT_VERSION:
            raise UserError(f"{path}: format_version {data['format_version']} is newer than this mlx-lora; upgrade it")
        lora = LoRAConfig(**{f.name: data[f.name] for f in fields(LoRAConfig)})
        return cls(lora, list(data["modules"]), list(data["layer_indices"]), data["base_model"], data["base_fingerprint"])


def describe(base: Base, lora: LoRAConfig, modules: list[str]) -> AdapterConfig:
    prefixes = [p + "." for p in block_paths(base.model)]
    layers = sorted({i for m in modules for i, p in enumerate(prefixes) if m.startswith(p)})
    return AdapterConfig(lora, modules, layers, base.name, fingerprint(base.config))


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return {
        f"{path}.{key}": getattr(layer, key)
        for path, layer in lora_layers(model).items()
        for key in LORA_KEYS
    }


def save_adapter(directory: Path, model: nn.Module, config: AdapterConfig) -> None:
    """Weights first, then config: each file is replaced atomically."""
    directory = Path(directory)
    atomic.save_safetensors(directory / ADAPTER_WEIGHTS, adapter_weights(model), {"format": FORMAT})
    atomic.write_json(directory / ADAPTER_CONFIG, config.to_json())


def read_config(directory: Path) -> AdapterConfig:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{directory}: no {ADAPTER_CONFIG} here; point --adapter-path at the directory `mlx-lora train` wrote")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    return AdapterConfig.from_json(path, data)


def read_weights(path: Path) -> dict[str, mx.array]:
    if not path.is_file():
        raise UserError(f"{path}: missing; the adapter directory needs {ADAPTER_WEIGHTS}")
    try:
        return mx.load(str(path))
    except Exception as e:  # mlx raises bare RuntimeError/ValueError for torn files
        raise UserError(f"{path}: unreadable or truncated safetensors file ({e}); retrain or restore it") from None


def load_adapter(base: Base, directory: Path) -> AdapterConfig:
    """Wrap `base.model` as the adapter says and load its weights, checking that it fits."""
    directory = Path(directory)
    config = read_config(directory)
    weights = read_weights(directory / ADAPTER_WEIGHTS)
    if config.base_fingerprint != fingerprint(base.config):
        raise UserError(
            f"{directory / ADAPTER_CONFIG}: adapter was trained on '{config.base_model}', whose shapes differ "
            f"from '{base.name}' (base_fingerprint {config.base_fingerprint} != {fingerprint(base.config)}); "
            "pass the matching --model"
        )
    apply_lora(base.model, config.lora, config.modules)
    expected = dict(tree_flatten(base.model.trainable_parameters()))
    problems = [f"unexpected tensor {k}" for k in weights if k not in expected]
    problems += [f"missing tensor {k}" for k in expected if k not in weights]
    problems += [
        f"{k} has shape {tuple(weights[k].shape)}, the model needs {tuple(v.shape)}"
        for k, v in expected.items() if k in weights and weights[k].shape != v.shape
    ]
    if problems:
        raise UserError(f"{directory / ADAPTER_WEIGHTS}: does not fit '{base.name}': {'; '.join(problems[:3])}")
    base.model.load_weights(list(weights.items()), strict=False)
    mx.eval(base.model.parameters())
    return config
