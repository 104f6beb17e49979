"""Hugging Face PEFT's LoRA format, both ways: adapter_model.safetensors + adapter_config.json.

PEFT names a tensor `base_model.model.<transformers module path>.lora_A.weight` (r, in) or
`.lora_B.weight` (out, r) and scales the update by lora_alpha / r. Ours are `<module path>.lora_a`
(in, r) / `.lora_b` (r, out) with the same scale, so converting is a transpose and a rename: exact.
DoRA's magnitude (out,) is PEFT's `.lora_magnitude_vector`; use_dora, use_rslora, rank_pattern and
alpha_pattern mean in PEFT what --dora, --rslora, --rank-pattern and --alpha-pattern mean here.
mlx-lm builds its models with transformers' module paths; export checks each path against the
base checkpoint's weight names, since a model mlx-lm renames could not be placed by PEFT.
"""

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import yaml

from mlx_lora import atomic
from mlx_lora.config import LoRAConfig, format_pattern, parse_pattern
from mlx_lora.errors import UserError
from mlx_lora.formats.native import BLOCK_MODULE, EMBEDDED_CONFIG, AdapterConfig, from_modules, read_json, read_weights
from mlx_lora.model.lora import MAGNITUDE
from mlx_lora.model.vision import Layout

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
PEFT_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
PEFT_NAMES = {
    "lora_a": "lora_A.weight",
    "lora_b": "lora_B.weight",
    MAGNITUDE: "lora_magnitude_vector",
}  # ours -> PEFT's
PEFT_KEY = re.compile(re.escape(PEFT_PREFIX) + r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
# PEFT options that change what an adapter computes and that mlx-lora does not implement yet.
# Keys whose false/empty value is the plain LoRA we compute are written only when set, so old PEFT
# versions (which lack some of them) still read our files.
UNSUPPORTED = {
    "lora_bias": "LoRA bias terms",
    "modules_to_save": "fully trained extra modules",
    "fan_in_fan_out": "fan-in-fan-out (GPT-2 Conv1D) weights",
}


def is_peft(directory: Path) -> bool:
    """Told apart by PEFT's weight file name; its keys are checked when read (peft_type alone is not trusted)."""
    return (directory / PEFT_WEIGHTS).is_file() or (directory / PEFT_PICKLE).is_file()


def to_peft_config(config: AdapterConfig, base_model_id: str, exact: bool = False) -> dict[str, Any]:
    """Our config as the LoraConfig fields every PEFT version reads (rsLoRA/DoRA: see UNSUPPORTED);
    `exact`: target_modules as the full paths (a vision-language model's tower has blocks too)."""
    targets, layers = ("|".join(re.escape(m) for m in config.modules), None) if exact else peft_targets(config.modules)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_id,
        "r": config.lora.rank,
        "lora_alpha": config.lora.alpha,
        "lora_dropout": config.lora.dropout,
        "target_modules": targets,
        "layers_to_transform": layers,
        "bias": "none",
        "inference_mode": True,
        **peft_options(config.lora),
    }


def peft_options(lora: LoRAConfig) -> dict[str, Any]:
    """DoRA, rsLoRA and per-module rank/alpha as LoraConfig fields, only those set (see UNSUPPORTED).

    Saved adapters are always plain-initialised LoRA (init.saved_config converted OLoRA/PiSSA).
    """
    options = {
        "use_dora": lora.dora,
        "use_rslora": lora.rslora,
        "rank_pattern": {k: int(v) for k, v in parse_pattern(lora.rank_pattern).items()},
        "alpha_pattern": parse_pattern(lora.alpha_pattern),
    }
    return {k: v for k, v in options.items() if v}


def from_peft_options(data: dict[str, Any]) -> dict[str, Any]:
    """The LoRAConfig fields of a PEFT config's DoRA / rsLoRA / rank_pattern / alpha_pattern."""
    return {
        "dora": bool(data.get("use_dora")),
        "rslora": bool(data.get("use_rslora")),
        "rank_pattern": format_pattern(data.get("rank_pattern") or {}),
        "alpha_pattern": format_pattern(data.get("alpha_pattern") or {}),
    }


def from_peft_config(path: Path, data: dict[str, Any]) -> tuple[int, float, float]:
    """(rank, alpha, dropout) of a PEFT LoRA config; every option we cannot honour is an error."""
    problems = [f"{key} ({what})" for key, what in UNSUPPORTED.items() if data.get(key)]
    if data.get("peft_type", "LORA") != "LORA":
        problems.insert(0, f"peft_type {data['peft_type']} (only LORA)")
    if data.get("bias", "none") != "none":
        problems.append(f"bias {data['bias']} (only none)")
    if problems:
        raise UserError(f"{path}: this PEFT adapter uses what mlx-lora does not support: {', '.join(problems)}")
    values = data.get("r", 8), data.get("lora_alpha", 8), data.get("lora_dropout", 0.0)
    wrong = [
        f"{k} must be a number, got {v!r:.40}"
        for k, v in zip(("r", "lora_alpha", "lora_dropout"), values)
        if not isinstance(v, (int, float)) or isinstance(v, bool)
    ]
    if wrong:
        raise UserError(f"{path}: {'; '.join(wrong)}")
    return int(values[0]), float(values[1]), float(values[2])


def peft_targets(modules: list[str]) -> tuple[list[str] | str, list[int] | None]:
    """target_modules + layers_to_transform that make PEFT wrap exactly `modules`.

    Names plus block indices when every adapted block has the same modules; otherwise a regular
    expression of the full paths (PEFT matches a string with re.fullmatch and then ignores
    layers_to_transform).
    """
    parts = [BLOCK_MODULE.match(m) for m in modules]
    if all(parts):
        layers = sorted({int(p.group(1)) for p in parts})
        relative = sorted({p.group(2) for p in parts})
        if len(modules) == len(layers) * len(relative):
            names = [r.rsplit(".", 1)[-1] for r in relative]
            return (names if len(set(names)) == len(names) else relative), layers
    return "|".join(re.escape(m) for m in modules), None


def checkpoint_names(model_dir: Path) -> set[str]:
    """Tensor names of a model directory's safetensors files, read from their JSON headers only."""
    names: set[str] = set()
    for path in model_dir.glob("*.safetensors"):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            names |= set(json.loads(f.read(size))) - {"__metadata__"}
    return names


def hub_id(model_dir: Path, name: str) -> str:
    """An id transformers can load: for an mlx-quantized conversion, the model card's base_model."""
    config, card = read_json(model_dir / "config.json"), model_dir / "README.md"
    if "quantization" not in config or not card.is_file():
        return name
    parts = card.read_text().split("---")
    front = yaml.safe_load(parts[1]) if len(parts) > 2 else None
    base = front.get("base_model") if isinstance(front, dict) else None
    return (base[0] if isinstance(base, list) and base else base) or name


def vision_names(
    config: AdapterConfig, weights: dict[str, mx.array], hf_names: set[str], layout: Layout
) -> tuple[AdapterConfig, dict[str, mx.array], set[str]]:
    """A vision-language adapter under transformers' module paths (mlx-vlm and the Hub checkpoint
    name the language model otherwise), and the checkpoint's names as transformers' paths."""
    rename = lambda key: layout.to_transformers(key.rsplit(".", 1)[0]) + "." + key.rsplit(".", 1)[1]  # noqa: E731
    modules = [layout.to_transformers(m) for m in config.modules]
    named = {rename(k): w for k, w in weights.items()}
    return replace(config, modules=modules), named, {layout.checkpoint_as_transformers(n) for n in hf_names}


def ours_from_transformers(
    config: AdapterConfig, weights: dict[str, mx.array], layout: Layout
) -> tuple[AdapterConfig, dict[str, mx.array]]:
    """vision_names undone: an adapter on a vision-language model under mlx-vlm's module paths."""
    rename = lambda key: layout.from_transformers(key.rsplit(".", 1)[0]) + "." + key.rsplit(".", 1)[1]  # noqa: E731
    return replace(config, modules=[layout.from_transformers(m) for m in config.modules]), {
        rename(k): w for k, w in weights.items()
    }


def write_peft(
    directory: Path,
    config: AdapterConfig,
    weights: dict[str, mx.array],
    base_model_id: str,
    hf_names: set[str],
    exact: bool = False,
) -> None:
    """PEFT's two files; `hf_names` are the base checkpoint's tensor names, to check module paths;
    `exact`: target the full module paths (to_peft_config)."""
    experts = [k.rsplit(".", 1)[0] for k, w in weights.items() if w.ndim == 3]
    if experts:
        raise UserError(
            f"{experts[0]}: LoRA on stacked experts has no PEFT form transformers loads (PEFT adapts its "
            "fused expert tensors with another layout); use --to mlx-lm, or fuse the adapter instead"
        )
    unplaced = [m for m in config.modules if f"{m}.weight" not in hf_names]
    if unplaced:
        raise UserError(
            f"{unplaced[0]}{f' and {len(unplaced) - 1} more' if len(unplaced) > 1 else ''}: no such weight in the "
            f"base checkpoint of '{config.base_model}', so PEFT could not place the adapter there (mlx-lm names "
            "this module differently from transformers); use --to mlx-lm, or fuse the adapter instead"
        )
    tensors = {
        f"{PEFT_PREFIX}{key.rsplit('.', 1)[0]}.{PEFT_NAMES[key.rsplit('.', 1)[1]]}": mx.contiguous(
            w.T if w.ndim == 2 else w
        )
        for key, w in weights.items()
    }
    metadata = {"format": "pt", EMBEDDED_CONFIG: json.dumps(config.to_json())}
    atomic.save_safetensors(directory / PEFT_WEIGHTS, tensors, metadata)
    atomic.write_json(directory / PEFT_CONFIG, to_peft_config(config, base_model_id, exact))


def read_peft(directory: Path) -> tuple[AdapterConfig, dict[str, mx.array]]:
    if not (directory / PEFT_WEIGHTS).is_file():
        raise UserError(
            f"{directory / PEFT_PICKLE}: pickled PEFT weights; re-save the adapter with "
            "PeftModel.save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors"
        )
    config_path = directory / PEFT_CONFIG
    if not config_path.is_file():
        raise UserError(f"{directory}: {PEFT_WEIGHTS} without {PEFT_CONFIG}; copy the config PEFT saved beside it")
    data = read_json(config_path)
    rank, alpha, dropout = from_peft_config(config_path, data)
    tensors, metadata = read_weights(directory / PEFT_WEIGHTS)
    ours = {PEFT_NAMES[k]: k for k in PEFT_NAMES}
    weights, foreign = {}, []
    for key, w in tensors.items():
        match = PEFT_KEY.fullmatch(key)
        if match is None:
            foreign.append(key)
        else:
            weights[f"{match.group(1)}.{ours[match.group(2)]}"] = w.T if w.ndim == 2 else w
    if foreign or not weights:
        raise UserError(
            f"{directory / PEFT_WEIGHTS}: {', '.join(foreign[:3]) or 'no tensors'}: mlx-lora reads only "
            f"{PEFT_PREFIX}<module>.lora_A.weight / .lora_B.weight (LoRA on linear layers)"
        )
    base = data.get("base_model_name_or_path") or ""
    modules = sorted({k.rsplit(".", 1)[0] for k in weights})
    config = from_modules(
        modules, rank, alpha, dropout, base, embedded=metadata.get(EMBEDDED_CONFIG), methods=from_peft_options(data)
    )
    wrong_rank = [
        k
        for k, w in weights.items()
        if not k.endswith(MAGNITUDE)
        and w.shape[1 if k.endswith("lora_a") else 0] != config.lora.rank_alpha(k.rsplit(".", 1)[0])[0]
    ]
    if wrong_rank:
        raise UserError(
            f"{config_path}: r / rank_pattern do not give {wrong_rank[0]} its rank; the files do not belong together"
        )
    return config, weights
