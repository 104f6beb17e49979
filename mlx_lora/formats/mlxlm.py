"""mlx_lm.lora's adapter format, both ways: adapters.safetensors + adapter_config.json.

The tensors are named and shaped like ours, except DoRA's magnitude, `m` in mlx-lm's DoRALinear
(fine_tune_type "dora"), which computes what our LoRALinear does with --dora. The config
differs: mlx-lm wraps the same `keys` (module paths inside a block) in each of the last
`num_layers` blocks, and its `scale` is the multiplier itself where ours is alpha / r. Blocks it
wraps that we did not adapt get no tensors and keep mlx-lm's zero-initialised B (and with DoRA
m = ||W||), so they add nothing.
"""

import json
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_lora import atomic
from mlx_lora.errors import UserError
from mlx_lora.formats.native import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BLOCK_MODULE,
    EMBEDDED_CONFIG,
    FORMAT,
    AdapterConfig,
    from_modules,
    read_weights,
)
from mlx_lora.model.lora import LORA_KEYS, MAGNITUDE

MLXLM_PARAMETERS = "lora_parameters"
MLXLM_MAGNITUDE = "m"  # DoRALinear's name for our MAGNITUDE
KINDS = ("lora", "dora")  # fine_tune_type values that are adapters


def is_mlxlm(data: dict[str, Any]) -> bool:
    return MLXLM_PARAMETERS in data and data.get("format") != FORMAT


def read_mlxlm(directory: Path, data: dict[str, Any]) -> tuple[AdapterConfig, dict[str, mx.array]]:
    path = directory / ADAPTER_CONFIG
    kind = data.get("fine_tune_type", "lora")
    if kind not in KINDS:
        raise UserError(
            f"{path}: fine_tune_type {kind}; mlx-lora reads LoRA and DoRA adapters only"
            + (" (a full fine-tune is a whole model: pass it as --model)" if kind == "full" else "")
        )
    params = data[MLXLM_PARAMETERS] if isinstance(data[MLXLM_PARAMETERS], dict) else {}
    missing = [k for k in ("rank", "scale") if k not in params] + ([] if "num_layers" in data else ["num_layers"])
    if missing:
        raise UserError(f"{path}: mlx-lm adapter config lacks {', '.join(missing)}")
    numbers = {"rank": params["rank"], "scale": params["scale"], "num_layers": data["num_layers"]}
    numbers["dropout"] = params.get("dropout", 0.0)
    wrong = [f"{k} must be a number, got {v!r:.40}" for k, v in numbers.items() if not _number(v)]
    if wrong:
        raise UserError(f"{path}: {'; '.join(wrong)}")
    weights, metadata = read_weights(directory / ADAPTER_WEIGHTS)
    leaves = (*LORA_KEYS, MLXLM_MAGNITUDE) if kind == "dora" else LORA_KEYS
    foreign = [k for k in weights if k.rsplit(".", 1)[-1] not in leaves]
    if foreign or not weights:
        raise UserError(f"{directory / ADAPTER_WEIGHTS}: {', '.join(foreign[:3]) or 'no tensors'}: not {kind} weights")
    weights = {_rename(k, MLXLM_MAGNITUDE, MAGNITUDE): _experts(w) for k, w in weights.items()}
    rank, scale = int(params["rank"]), float(params["scale"])
    modules = sorted({k.rsplit(".", 1)[0] for k in weights})
    config = from_modules(
        modules,
        rank,
        scale * rank,
        float(params.get("dropout", 0.0)),
        str(data.get("model") or ""),
        num_layers=int(data["num_layers"]),
        embedded=metadata.get(EMBEDDED_CONFIG),
        methods={"dora": kind == "dora"},
    )
    return config, weights


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _experts(w: mx.array) -> mx.array:
    """Stacked experts' pairs both ways: ours A (E, in, r), B (E, r, out); mlx-lm's LoRASwitchLinear
    A (E, r, in), B (E, out, r). Other tensors as they are."""
    return mx.contiguous(w.swapaxes(-1, -2)) if w.ndim == 3 else w


def _rename(key: str, leaf: str, to: str) -> str:
    """'model.layers.0.self_attn.q_proj.m' -> '....magnitude' (leaf -> to); other keys unchanged."""
    path, last = key.rsplit(".", 1)
    return f"{path}.{to}" if last == leaf else key


def block_count(config: AdapterConfig) -> int | None:
    """The base's number of transformer blocks, where the adapter alone says it (else None: read the base).

    An mlx-lora adapter on the last N blocks (or all) adapts the last block, so it is one past the
    highest adapted index. An mlx-lm adapter wraps the last `num_layers` blocks, from its lowest
    one. Explicit --layers (or PEFT's layers_to_transform) say nothing about the blocks above.
    """
    if config.lora.layers is not None or not config.layers:
        return None
    if config.base_fingerprint is not None:  # trained by mlx-lora
        return max(config.layers) + 1
    return min(config.layers) + config.lora.num_layers  # from_modules gives -1 (all) explicit layers


def write_mlxlm(
    directory: Path, config: AdapterConfig, weights: dict[str, mx.array], num_blocks: int, base_model: str
) -> None:
    """The two files `mlx_lm.load(model, adapter_path=...)` and `mlx_lm.lora --resume-adapter-file` read."""
    parts = [BLOCK_MODULE.match(m) for m in config.modules]
    if not all(parts):
        outside = config.modules[[p is None for p in parts].index(True)]
        raise UserError(f"{outside}: mlx-lm adapters hold only modules inside transformer blocks; use --to peft or mlx")
    unsaid = [
        what
        for what, on in (
            ("per-module ranks", config.lora.rank_pattern),
            ("per-module alphas", config.lora.alpha_pattern),
        )
        if on
    ]
    if unsaid:
        raise UserError(
            f"mlx-lm's adapter format cannot hold {', '.join(unsaid)} as mlx-lora computes them; use --to peft or mlx"
        )
    data = {
        "model": base_model,
        "fine_tune_type": "dora" if config.lora.dora else "lora",
        "num_layers": num_blocks - min(config.layers),
        MLXLM_PARAMETERS: {
            "rank": config.lora.rank,
            "scale": config.lora.scale,
            "dropout": config.lora.dropout,
            "keys": sorted({p.group(2) for p in parts}),
        },
    }
    metadata = {"format": "mlx", EMBEDDED_CONFIG: json.dumps(config.to_json())}
    weights = {_rename(k, MAGNITUDE, MLXLM_MAGNITUDE): _experts(w) for k, w in weights.items()}
    atomic.save_safetensors(directory / ADAPTER_WEIGHTS, weights, metadata)
    atomic.write_json(directory / ADAPTER_CONFIG, data)
