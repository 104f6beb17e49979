"""Any adapter directory -> config and weights, read once; then applied to a base.

The one loader behind generate, chat, eval, fuse, convert and resume: `read_adapter` asks the
formats of registry.FORMATS in turn which one the directory is (PEFT by its weight file,
mlx_lm.lora by its config keys, else ours) and returns our names and shapes; `apply_adapter`
wraps the base as the config says and loads the weights.
"""

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_lora.errors import UserError
from mlx_lora.formats.native import ADAPTER_CONFIG, AdapterConfig, check_base
from mlx_lora.formats.peft import PEFT_WEIGHTS, ours_from_transformers
from mlx_lora.formats.registry import Weights, detect
from mlx_lora.model.base import Base, load_base
from mlx_lora.model.lora import apply_lora
from mlx_lora.model.vision import layout


def read_adapter(directory: Path, flag: str = "--adapter-path") -> tuple[AdapterConfig, Weights]:
    """Config and weights (our names and shapes) of an adapter directory in any format FORMATS reads;
    `flag`: the option that named it, for the error."""
    directory = Path(directory)
    found = detect(directory)
    if found is None:
        raise UserError(
            f"{directory}: no {ADAPTER_CONFIG} here; point {flag} at a directory written by "
            f"`mlx-lora train`, PEFT ({PEFT_WEIGHTS}) or mlx_lm.lora"
        )
    fmt, probe = found
    return fmt.read(probe)


def apply_adapter(base: Base, config: AdapterConfig, weights: Weights, directory: Path, whole: bool = True) -> None:
    """Wrap `base.model` as `config` says and load `weights`, checking that they fit. `whole=False`
    evaluates the adapter alone, leaving a lazily loaded base unread (fuse by shard)."""
    check_base(config, base.config, base.name, Path(directory) / ADAPTER_CONFIG)
    if base.processor is not None:  # a PEFT export names the language model as transformers does
        config, weights = ours_from_transformers(config, weights, layout(base.config, "an adapter"))
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
