"""The on-disk adapter: adapters.safetensors (LoRA weights only) + adapter_config.json.

Weight names are the model's module paths plus `.lora_a` (in, r) / `.lora_b` (r, out), the same
names mlx-lm uses, and `.magnitude` (out,) with DoRA. The config is complete enough to rebuild the
adapter on its base with no other input: base model, the exact modules, every LoRAConfig option
and a fingerprint of the base's shapes.

This module holds what every format maps onto (AdapterConfig, from_modules, the tensor reader);
peft.py and mlxlm.py build on it, and loader.py picks the reader for a directory.
"""

import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_lora import atomic
from mlx_lora.config import LoRAConfig, lora_part
from mlx_lora.errors import UserError
from mlx_lora.model.base import Base, fingerprint
from mlx_lora.model.initialization import BASE_CHANGING, saved_config
from mlx_lora.model.lora import block_paths, lora_layers

ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "mlx-lora"
FORMAT_VERSION = 1
# Foreign formats carry our full config in their safetensors metadata, so round trips are lossless.
EMBEDDED_CONFIG = "mlx_lora_config"
# The config keys that give the weights their meaning; base_model may be edited by hand (a moved base).
WEIGHT_MEANING = {f.name for f in fields(LoRAConfig)} | {"scale", "modules", "layer_indices"}
BLOCK_MODULE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")  # model.layers.3.self_attn.q_proj


def key_types() -> dict[str, Any]:
    """The JSON type of each key the reader takes (a hand edit or another tool may write any)."""
    hints = typing.get_type_hints(LoRAConfig)
    return {f.name: hints[f.name] for f in fields(LoRAConfig)} | {
        "format_version": int,
        "base_model": str,
        "base_fingerprint": str | None,
        "modules": list[str],
        "layer_indices": list[int],
        "trained_init": str | None,
        "training": dict | None,
    }


def _is(value: Any, tp: Any) -> bool:
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType):
        return any(_is(value, a) for a in args)
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_is(v, args[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return value is None if tp is type(None) else isinstance(value, tp)


def _name(tp: Any) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false", dict: "an object"}
    if isinstance(tp, types.UnionType):
        return " or ".join("null" if a is type(None) else _name(a) for a in typing.get_args(tp))
    return (
        f"a list of {_name(typing.get_args(tp)[0]).split(' ', 1)[1]}s" if typing.get_origin(tp) is list else names[tp]
    )


@dataclass
class AdapterConfig:
    lora: LoRAConfig
    modules: list[str]  # full module paths, e.g. model.layers.3.self_attn.q_proj
    layers: list[int]  # block indices adapted
    base_model: str
    base_fingerprint: str | None  # None for a foreign adapter: its format records no base shapes
    trained_init: str | None = None  # olora/pissa: how it was trained before saved_config made it plain
    training: dict[str, Any] = field(default_factory=dict)  # how it was trained; informative only

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
            **({"trained_init": self.trained_init} if self.trained_init else {}),
            **({"training": self.training} if self.training else {}),
        }

    @classmethod
    def from_json(cls, path: Path, data: dict[str, Any]) -> "AdapterConfig":
        required = ["base_model", "base_fingerprint", "modules", "layer_indices"] + [f.name for f in fields(LoRAConfig)]
        missing = [k for k in required if k not in data]
        if data.get("format") != FORMAT or missing:
            raise UserError(f"{path}: not an mlx-lora adapter config (missing {', '.join(missing) or 'format'})")
        wrong = [
            f"{k} must be {_name(tp)}, got {data[k]!r:.40}" for k, tp in key_types().items() if not _is(data.get(k), tp)
        ]
        if wrong:
            raise UserError(f"{path}: {'; '.join(wrong)}; restore the file the adapter was saved with, or retrain")
        if data["format_version"] > FORMAT_VERSION:
            raise UserError(f"{path}: format_version {data['format_version']} is newer than this mlx-lora; upgrade it")
        lora = LoRAConfig(**{f.name: data[f.name] for f in fields(LoRAConfig)})
        problems = lora.problems()
        if problems:
            raise UserError(f"{path}: {'; '.join(problems)}")
        return cls(
            lora,
            list(data["modules"]),
            list(data["layer_indices"]),
            data["base_model"],
            data["base_fingerprint"],
            data.get("trained_init"),
            data.get("training", {}),
        )


def from_modules(
    modules: list[str],
    rank: int,
    alpha: float,
    dropout: float,
    base_model: str,
    num_layers: int = -1,
    embedded: str | None = None,
    methods: dict | None = None,
) -> AdapterConfig:
    """Our config for a foreign adapter, from the module paths its tensors name.

    `methods` are LoRAConfig's DoRA/rsLoRA/pattern fields the format states. `embedded` is the
    config an mlx-lora export stored beside the tensors; it is taken (for the fields the foreign
    format cannot hold) only where it agrees with what the files say now.
    """
    modules = sorted(modules, key=lambda m: (_block_of(m), m))
    layers = sorted({_block_of(m) for m in modules} - {-1})
    targets = ",".join(sorted({BLOCK_MODULE.match(m).group(2) if _block_of(m) >= 0 else m for m in modules}))
    layer_list = None if num_layers != -1 else ",".join(map(str, layers))
    lora = LoRAConfig(targets, rank, alpha, dropout, num_layers, layer_list, **(methods or {}))
    derived = AdapterConfig(lora, modules, layers, base_model, None)
    if embedded is None:
        return derived
    try:
        ours = AdapterConfig.from_json(Path(EMBEDDED_CONFIG), json.loads(embedded))
    except (UserError, json.JSONDecodeError, TypeError):
        return derived
    same = (ours.modules, ours.lora.rank, ours.lora.dropout, ours.lora.dora) == (modules, rank, dropout, lora.dora)
    same = (
        same
        and math.isclose(ours.lora.scale, lora.scale, rel_tol=1e-9)
        and all(
            math.isclose(ours.lora.rank_alpha(m)[0], lora.rank_alpha(m)[0])
            and math.isclose(ours.lora.scale_of(m), lora.scale_of(m), rel_tol=1e-9)
            for m in modules
        )
    )
    return (
        AdapterConfig(ours.lora, ours.modules, ours.layers, base_model, ours.base_fingerprint, ours.trained_init)
        if same
        else derived
    )


def _block_of(module: str) -> int:
    match = BLOCK_MODULE.match(module)
    return int(match.group(1)) if match else -1


def describe(base: Base, lora: LoRAConfig, modules: list[str]) -> AdapterConfig:
    """The config of the adapter file that training `lora` on `base` writes (see init.saved_config)."""
    prefixes = [p + "." for p in block_paths(base.model)]
    layers = sorted({i for m in modules for i, p in enumerate(prefixes) if m.startswith(p)})
    trained_init = lora.init if lora.init in BASE_CHANGING else None
    return AdapterConfig(saved_config(lora), modules, layers, base.name, fingerprint(base.config), trained_init)


def adapter_weights(model: nn.Module) -> dict[str, mx.array]:
    return {
        f"{path}.{key}": value for path, layer in lora_layers(model).items() for key, value in layer.export().items()
    }


def save_adapter(directory: Path, model: nn.Module, config: AdapterConfig) -> None:
    write_adapter(directory, config, adapter_weights(model))


def write_adapter(directory: Path, config: AdapterConfig, weights: dict[str, mx.array]) -> None:
    """Weights first, then config: each file is replaced atomically, and the weights carry a copy of
    the config so a save cut between the two files is detected on load instead of mixing runs."""
    directory = Path(directory)
    metadata = {"format": FORMAT, EMBEDDED_CONFIG: json.dumps(config.to_json())}
    atomic.save_safetensors(directory / ADAPTER_WEIGHTS, weights, metadata)
    atomic.write_json(directory / ADAPTER_CONFIG, config.to_json())


def read_native(directory: Path, data: dict[str, Any]) -> tuple[AdapterConfig, dict[str, mx.array]]:
    """Our own files, refusing weights saved with another config (a save cut between the two files)."""
    path = directory / ADAPTER_CONFIG
    weights, metadata = read_weights(directory / ADAPTER_WEIGHTS)
    saved = embedded_config(directory / ADAPTER_WEIGHTS, metadata)
    differ = [k for k in saved if k in WEIGHT_MEANING and saved[k] != data.get(k)]
    if differ:
        raise UserError(
            f"{path}: {', '.join(differ)} differ from what {ADAPTER_WEIGHTS} was saved with (an interrupted save "
            f"or a hand edit); use the last checkpoint under {directory / 'checkpoints'} or retrain"
        )
    return AdapterConfig.from_json(path, data), weights


def check_base(config: AdapterConfig, base_config: dict[str, Any], base_name: str, where: Path) -> None:
    """Refuse a base whose shapes differ from the one the adapter was trained on (when recorded)."""
    if config.base_fingerprint not in (None, fingerprint(base_config)):
        raise UserError(
            f"{where}: adapter was trained on '{config.base_model}', whose shapes differ "
            f"from '{base_name}' (base_fingerprint {config.base_fingerprint} != {fingerprint(base_config)}); "
            "pass the matching --model"
        )


def embedded_config(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    """The copy of the config saved in the weights' metadata ({} where there is none)."""
    try:
        saved = json.loads(metadata.get(EMBEDDED_CONFIG, "{}"))
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path}: its metadata {EMBEDDED_CONFIG} is not valid JSON ({e.msg}); retrain or restore it"
        ) from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: its metadata {EMBEDDED_CONFIG} is not a JSON object; retrain or restore it")
    return saved


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); restore the file or write it again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_weights(path: Path) -> tuple[dict[str, mx.array], dict[str, str]]:
    """The tensors of a safetensors file and its metadata."""
    if not path.is_file():
        raise UserError(f"{path}: missing; the directory needs {path.name}")
    try:
        return mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises bare RuntimeError/ValueError for torn files
        raise UserError(f"{path}: unreadable or truncated safetensors file ({e}); retrain or restore it") from None
