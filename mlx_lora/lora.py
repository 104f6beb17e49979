"""The LoRA layer and the choice of which layers of a model get one."""

import math
import re

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .config import LoRAConfig, parse_layers
from .errors import UserError

ALL_LINEAR = "all-linear"
LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)
_REGEX_CHARS = set("\\^$*+?{}[]()|")


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a plain or quantized linear; quantized weights pack 32/bits values per uint32."""
    out_dims, packed = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        return out_dims, packed * 32 // layer.bits
    return out_dims, packed


def dequantized_weight(layer: nn.Module) -> mx.array:
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(
            layer.weight, layer.scales, layer.get("biases"),
            group_size=layer.group_size, bits=layer.bits, mode=layer.mode,
        )
    return layer.weight


class LoRALinear(nn.Module):
    """y = W x + scale · (dropout(x) A) B, with A (in, r), B (r, out) and scale = alpha / r.

    A starts uniform in ±1/sqrt(in) and B at zero, so a freshly wrapped layer equals its base.
    The base (nn.Linear or nn.QuantizedLinear) is kept as it is and never trained.
    """

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        out_dims, in_dims = linear_dims(base)
        self.linear = base
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))

    def delta(self) -> mx.array:
        """The weight update the adapter adds to W, shaped like W: (out, in)."""
        return (self.scale * (self.lora_a @ self.lora_b)).T

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)  # (B, T, out)
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b  # (B, T, out) through rank r
        return y + (self.scale * z).astype(y.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        """A plain layer computing W + delta; re-quantized like the base unless `dequantize`."""
        base = self.linear
        weight = dequantized_weight(base)
        out_dims, in_dims = weight.shape
        fused = nn.Linear(in_dims, out_dims, bias="bias" in base)
        fused.weight = weight + self.delta().astype(weight.dtype)
        if "bias" in base:
            fused.bias = base.bias
        if isinstance(base, nn.QuantizedLinear) and not dequantize:
            return nn.QuantizedLinear.from_linear(
                fused, group_size=base.group_size, bits=base.bits, mode=base.mode
            )
        return fused


def block_indices(model: nn.Module, cfg: LoRAConfig) -> list[int]:
    """The transformer blocks to adapt: --layers exactly, else the last --num-layers."""
    n = len(model.layers)
    explicit = parse_layers(cfg.layers)
    if explicit is not None:
        bad = [i for i in explicit if not 0 <= i < n]
        if bad:
            raise UserError(f"--layers {cfg.layers}: the model has blocks 0..{n - 1}, not {bad}")
        return sorted(set(explicit))
    return list(range(n)) if cfg.num_layers == -1 else list(range(n))[-cfg.num_layers :]


def block_paths(model: nn.Module) -> list[str]:
    """Module path of every transformer block, e.g. 'model.layers.3'."""
    names = {id(m): name for name, m in model.named_modules()}
    return [names[id(block)] for block in model.layers]


def _is_regex(targets: str) -> bool:
    return any(c in _REGEX_CHARS for c in targets)


def select_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Full paths of the linear modules that get LoRA; a target matching nothing is an error."""
    prefixes = [p + "." for p in block_paths(model)]
    chosen = [prefixes[i] for i in block_indices(model, cfg)]
    linears = [
        name for name, m in model.named_modules()
        if isinstance(m, LINEAR_TYPES) and any(name.startswith(p) for p in chosen)
    ]
    targets = str(cfg.targets).strip()
    if targets == ALL_LINEAR:
        matched, missing = linears, [] if linears else [targets]
    elif _is_regex(targets):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise UserError(f"--targets '{targets}' is not a valid regular expression: {e}") from None
        matched = [n for n in linears if pattern.fullmatch(n)]
        missing = [] if matched else [targets]
    else:
        names = [t.strip() for t in targets.split(",") if t.strip()]
        matched = [n for n in linears if any(n == t or n.endswith("." + t) for t in names)]
        missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in linears)]
    if missing:
        in_block = sorted({n[len(p):] for n in linears for p in chosen if n.startswith(p)})
        raise UserError(
            f"--targets: {', '.join(repr(m) for m in missing)} matches no linear module in the "
            f"selected blocks; they have: {', '.join(in_block) or 'none'} (or use all-linear)"
        )
    block_of = lambda n: next(i for i, p in enumerate(chosen) if n.startswith(p))
    return sorted(matched, key=lambda n: (block_of(n), n))


def apply_lora(model: nn.Module, cfg: LoRAConfig, paths: list[str] | None = None) -> list[str]:
    """Freeze the model and wrap the chosen linears in LoRALinear; only A and B stay trainable."""
    paths = select_targets(model, cfg) if paths is None else paths
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise UserError(f"the model has no module {missing[0]}: is this the base the adapter was made for?")
    not_linear = [p for p in paths if not isinstance(modules[p], LINEAR_TYPES)]
    if not_linear:
        raise UserError(f"{not_linear[0]} is a {type(modules[not_linear[0]]).__name__}; mlx-lora adapts linear layers only")
    for path in paths:
        out_dims, in_dims = linear_dims(modules[path])
        if cfg.rank > min(out_dims, in_dims):
            raise UserError(
                f"--rank {cfg.rank} is larger than {path} allows ({out_dims}x{in_dims}): "
                f"use --rank {min(out_dims, in_dims)} or less"
            )
    model.freeze()
    wrapped = [(p, LoRALinear(modules[p], cfg.rank, cfg.scale, cfg.dropout)) for p in paths]
    model.update_modules(tree_unflatten(wrapped))
    for _, layer in wrapped:
        layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    return paths


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def fuse_lora(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Replace every LoRALinear by its merged plain layer, in place."""
    fused = [(name, layer.fuse(dequantize)) for name, layer in lora_layers(model).items()]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the untouched base layers back, in place."""
    bases = [(name, layer.linear) for name, layer in lora_layers(model).items()]
    if bases:
        model.update_modules(tree_unflatten(bases))
    return model
