"""Any adapter directory -> config and weights, read once; then applied to a base.

The one loader behind generate, chat, eval, fuse, convert and resume: `read_adapter` tells the
format apart (PEFT by its weight file, mlx_lm.lora by its config keys, else ours) and returns our
names and shapes; `apply_adapter` wraps the base as the config says and loads the weights.
"""

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_lora.errors import UserError
from mlx_lora.formats import mlxlm, peft
from mlx_lora.formats.native import ADAPTER_CONFIG, AdapterConfig, read_json, read_native
from mlx_lora.model.base import Base, fingerprint, load_base
from mlx_lora.model.lora import apply_lora

Weights = dict[str, mx.array]


def read_adapter(directory: Path) -> tuple[AdapterConfig, Weights]:
    """Config and weights (our names and shapes) of an mlx-lora, PEFT or mlx_lm.lora adapter directory."""
    directory = Path(directory)
    if peft.is_peft(directory):
        return peft.read_peft(directory)
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(
            f"{directory}: no {ADAPTER_CONFIG} here; point --adapter-path at a directory written by "
            f"`mlx-lora train`, PEFT ({peft.PEFT_WEIGHTS}) or mlx_lm.lora"
        )
    data = read_json(path)
    if mlxlm.is_mlxlm(data):
        return mlxlm.read_mlxlm(directory, data)
    return read_native(directory, data)


def check_base(config: AdapterConfig, base_config: dict[str, Any], base_name: str, where: Path) -> None:
    """Refuse a base whose shapes differ from the one the adapter was trained on (when recorded)."""
    if config.base_fingerprint not in (None, fingerprint(base_config)):
        raise UserError(
            f"{where}: adapter was trained on '{config.base_model}', whose shapes differ "
            f"from '{base_name}' (base_fingerprint {config.base_fingerprint} != {fingerprint(base_config)}); "
            "pass the matching --model"
        )


def apply_adapter(base: Base, config: AdapterConfig, weights: Weights, directory: Path, whole: bool = True) -> None:
    """Wrap `base.model` as `config` says and load `weights`, checking that they fit. `whole=False`
    evaluates the adapter alone, leaving a lazily loaded base unread (fuse by shard)."""
    check_base(config, base.config, base.name, Path(directory) / ADAPTER_CONFIG)
    apply_lora(base.model, config.lora, config.modules)
    expected = dict(tree_flatten(base.model.trainable_parameters()))
    problems = [f"unexpected tensor {k}" for k in weights if k not in expected]
    problems += [f"missing tensor {k}" for k in expected if k not in weights]
    problems += [
        f"{k} has shape {tuple(weights[k].shape)}, the model needs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if problems:
        raise UserError(f"{directory}: adapter weights do not fit '{base.name}': {'; '.join(problems[:3])}")
    base.model.load_weights(list(weights.items()), strict=False)
    mx.eval(base.model.parameters() if whole else base.model.trainable_parameters())


def load_adapter(base: Base, directory: Path) -> AdapterConfig:
    """Read the adapter in `directory` and apply it to `base`."""
    config, weights = read_adapter(directory)
    apply_adapter(base, config, weights, directory)
    return config


def load_for_inference(model: str | None, adapter_path: str | None, compute: str | None = None) -> Base:
    """The base the adapter names (unless `model` overrides it), with the adapter applied, in eval
    mode; `compute`: --compute-dtype (None: as stored)."""
    adapter = read_adapter(Path(adapter_path)) if adapter_path else None
    base = load_base(model or (adapter[0].base_model if adapter else None), compute=compute)
    if adapter:
        apply_adapter(base, *adapter, Path(adapter_path))
    base.model.eval()
    return base
