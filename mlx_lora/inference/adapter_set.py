"""Several adapters on one base, as in PEFT: load_adapter, set_adapter, add_weighted_adapter, unload.

Each adapter is read and checked by formats.loader, then its wrapped layers are kept
aside. Switching puts one adapter's layers into the model and the base's own layers everywhere
else; the base layers are never copied or changed, so `unload()` (or `set_adapter(None)`) gives
back exactly the base. A weighted combination is one more adapter: Σ w_i·scale_i·A_i B_i is the
LoRA with A = [A_1 … A_n] and B = [w_1·scale_1·B_1; …; w_n·scale_n·B_n] (PEFT's "cat").
"""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlx_lora.config import InferenceConfig, split_list
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import Weights, apply_adapter, read_adapter
from mlx_lora.formats.native import AdapterConfig
from mlx_lora.model.base import Base, load_base
from mlx_lora.model.cpu_kernels import use_cpu_kernels
from mlx_lora.model.lora import LoRALinear, lora_layers, remove_lora

COMBINED = "combined"


class AdapterSet:
    """Adapters by name on one base model (for inference: wrapped layers are put in eval mode)."""

    def __init__(self, base: Base):
        self.base = base
        self.layers: dict[str, dict[str, nn.Module]] = {}  # adapter name -> module path -> wrapped layer
        self.configs: dict[str, AdapterConfig] = {}
        self.originals: dict[str, nn.Module] = {}  # module path -> the base's own layer
        self.active: str | None = None

    @property
    def names(self) -> list[str]:
        return list(self.layers)

    def load_adapter(self, directory: Path, name: str | None = None) -> str:
        """Load an adapter directory under `name` (default: the directory's name); the active one stays."""
        return self.add_adapter(*read_adapter(Path(directory)), Path(directory), name)

    def add_adapter(self, config: AdapterConfig, weights: Weights, directory: Path, name: str | None = None) -> str:
        """Add an adapter already read from `directory` under `name`; the active one stays."""
        name = name or self._free_name(Path(directory).resolve().name)
        if name in self.layers:
            raise UserError(f"an adapter named '{name}' is already loaded; pick another name")
        active = self.active
        self.set_adapter(None)
        try:
            apply_adapter(self.base, config, weights, directory)
        except UserError:
            remove_lora(self.base.model)  # a refused adapter may be half applied
            self.set_adapter(active)
            raise
        wrapped = lora_layers(self.base.model)
        self.originals.update({path: layer.linear for path, layer in wrapped.items()})
        self._add(name, wrapped)
        self.configs[name] = config
        self.set_adapter(active)
        return name

    def set_adapter(self, name: str | None) -> None:
        """Make `name` the active adapter; None: the base alone."""
        if name is not None and name not in self.layers:
            raise UserError(f"no adapter named '{name}'; loaded: {', '.join(self.layers) or 'none'}")
        chosen = self.layers[name] if name else {}
        modules = [(path, chosen.get(path, base)) for path, base in self.originals.items()]
        if modules:
            self.base.model.update_modules(tree_unflatten(modules))
        self.active = name

    def add_weighted_adapter(self, weights: dict[str, float], name: str = COMBINED) -> str:
        """A new adapter whose update is the weighted sum of the named adapters' updates."""
        for n in weights:
            if n not in self.layers:
                raise UserError(f"no adapter named '{n}' to combine; loaded: {', '.join(self.layers)}")
        paths = [p for p in self.originals if any(p in self.layers[n] for n in weights)]
        combined = {}
        for path in paths:
            parts = [(w, self.layers[n][path]) for n, w in weights.items() if path in self.layers[n]]
            if any(layer.dora for _, layer in parts):  # DoRA's update is not linear in its A B
                raise UserError(f"{path}: DoRA adapters cannot be combined with weights; use them one at a time")
            layer = LoRALinear(self.originals[path], rank=1, scale=1.0)
            layer.lora_a = mx.concatenate([l.lora_a for _, l in parts], axis=1)  # (in, Σr)
            layer.lora_b = mx.concatenate([(w * l.scale) * l.lora_b for w, l in parts], axis=0)  # (Σr, out)
            combined[path] = layer
        self.layers.pop(name, None)
        self._add(name, combined)
        return name

    def unload(self) -> Base:
        """Drop every adapter; the model is the base again, layer for layer."""
        self.set_adapter(None)
        self.layers.clear()
        self.configs.clear()
        self.originals.clear()
        return self.base

    def _add(self, name: str, layers: dict[str, nn.Module]) -> None:
        for layer in layers.values():
            layer.eval()
        mx.eval([layer.parameters() for layer in layers.values()])
        self.layers[name] = layers

    def _free_name(self, name: str) -> str:
        taken, i = name, 2
        while taken in self.layers:
            taken, i = f"{name}-{i}", i + 1
        return taken


def parse_adapters(paths: list[str], weights: str | None) -> list[tuple[str, float | None]]:
    """--adapter-path a --adapter-path b:0.3 [--adapter-weights 0.7,0.3] -> [(a, 0.7), (b, 0.3)]."""
    parsed = []
    for spec in paths:
        path, _, tail = spec.rpartition(":")
        try:
            parsed.append((path, float(tail)) if path and not Path(spec).exists() else (spec, None))
        except ValueError:  # a ':' that is part of the directory name
            parsed.append((spec, None))
    given = split_list(weights)
    if given:
        if len(given) != len(paths):
            raise UserError(f"--adapter-weights has {len(given)} values for {len(paths)} --adapter-path; give one each")
        try:
            parsed = [(p, float(w)) for (p, _), w in zip(parsed, given)]
        except ValueError:
            raise UserError(f"--adapter-weights must be numbers such as 0.7,0.3, got '{weights}'") from None
    return parsed


def load_adapters(cfg: InferenceConfig) -> AdapterSet:
    """generate's and chat's model: the base on the CPU kernels, with every --adapter-path loaded;
    active: the one adapter, or their weighted sum when there are several or any weight was given
    (1 for those without)."""
    specs = parse_adapters(cfg.adapter_path or [], cfg.adapter_weights)
    read = [(*read_adapter(Path(path)), Path(path)) for path, _ in specs]  # each file read once
    base = load_base(cfg.model or (read[0][0].base_model if read else None), compute=cfg.compute_dtype)
    use_cpu_kernels(base.model, decoding=True)
    base.model.eval()
    loaded = AdapterSet(base)
    names = [loaded.add_adapter(*adapter) for adapter in read]
    if len(specs) == 1 and specs[0][1] is None:
        loaded.set_adapter(names[0])
    elif specs:
        loaded.set_adapter(loaded.add_weighted_adapter({n: 1.0 if w is None else w for n, (_, w) in zip(names, specs)}))
    return loaded
