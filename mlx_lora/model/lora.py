"""The LoRA layer and the choice of which layers of a model get one."""

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten
from mlx_lm.models.switch_layers import SwitchLinear

from mlx_lora.config import LoRAConfig, parse_layers, parse_pattern, pattern_key
from mlx_lora.errors import UserError
from mlx_lora.model.cpu_kernels import dequantized
from mlx_lora.model.initialization import BASE_CHANGING, initialize
from mlx_lora.model.vision import LANGUAGE_MODEL, LAYOUTS

ALL_LINEAR = "all-linear"
LORA_KEYS = ("lora_a", "lora_b")
MAGNITUDE = "magnitude"  # DoRA's m; PEFT calls it lora_magnitude_vector
LINEAR_TYPES = (nn.Linear, nn.QuantizedLinear)
EXPERTS = "experts"  # Hugging Face's name for a mixture-of-experts block's experts, read by --targets
# mlx-lm's names of the stacked expert projections -> Hugging Face's per-expert names (Mixtral's w1/w2/w3)
EXPERT_NAMES = {"block_sparse_moe": {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}}
_REGEX_CHARS = set("\\^$*+?{}[]()|")
ADAPTABLE = (*LINEAR_TYPES, SwitchLinear)  # mlx-lm's stacked experts: LoRASwitchLinear


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a plain or quantized linear (of each expert, for mlx-lm's stacked experts);
    quantized weights pack 32/bits values per uint32."""
    out_dims, packed = layer.weight.shape[-2:]
    if isinstance(layer, nn.QuantizedLinear):
        return out_dims, packed * 32 // layer.bits
    return out_dims, packed


class LoRALinear(nn.Module):
    """y = W x + scale · (dropout(x) A) B, with A (in, r), B (r, out); scale = alpha/r (alpha/√r with rsLoRA).

    With DoRA (as PEFT defines it) y = m / ||W + ΔW|| · (W + ΔW) x + bias, where ΔW = delta(), the
    norm is taken per output row over the input dim and kept out of the gradient (DoRA paper §4.3),
    and m (out,) starts at ||W|| so a freshly wrapped layer still equals its base.
    A starts uniform in ±1/sqrt(in) and B at zero (init.py has the other starts). The base
    (nn.Linear or nn.QuantizedLinear) is never trained.
    """

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0, dora: bool = False):
        super().__init__()
        out_dims, in_dims = linear_dims(base)
        self.linear = base
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.dora = dora
        self.off = False  # adapter_off(): the layer is its base alone (the reference of preference tuning)
        self.initial = None  # (A0, B0) when init.py moved part of W into them (OLoRA / PiSSA)
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(in_dims, rank))
        self.lora_b = mx.zeros((rank, out_dims))
        if dora:
            self.magnitude = self.weight_norm()  # (out,)

    def delta(self) -> mx.array:
        """The weight update the adapter adds to W, shaped like W: (out, in), or (E, out, in) for experts."""
        return (self.scale * (self.lora_a @ self.lora_b)).swapaxes(-1, -2)

    def weight_norm(self) -> mx.array:
        """||W + ΔW|| per output row, (out,), in float32."""
        return mx.linalg.norm(dequantized(self.linear).astype(mx.float32) + self.delta(), axis=1)

    def merged_weight(self) -> mx.array:
        """The weight of the equivalent plain layer, (out, in) in float32: what fuse writes."""
        weight = dequantized(self.linear).astype(mx.float32) + self.delta()
        if self.dora:
            weight = (self.magnitude / mx.linalg.norm(weight, axis=1))[:, None] * weight
        return weight

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)  # (B, T, out)
        if self.off:
            return y
        z = (self.dropout(x) @ self.lora_a) @ self.lora_b  # (B, T, out) through rank r
        if not self.dora:
            return y + (self.scale * z).astype(y.dtype)
        bias = self.linear.get("bias")
        wx = y if bias is None else y - bias  # (B, T, out)
        g = self.magnitude / mx.stop_gradient(self.weight_norm())  # (out,)
        out = g * (wx + self.scale * z)
        return (out if bias is None else out + bias).astype(y.dtype)

    def fuse(self, requantize: bool = False) -> nn.Module:
        """A plain layer computing the merged weight in the base's dtype; re-quantized like the base only if asked."""
        base = self.linear
        quantized = isinstance(base, nn.QuantizedLinear)
        out_dims, in_dims = linear_dims(base)
        fused = nn.Linear(in_dims, out_dims, bias="bias" in base)
        fused.weight = self.merged_weight().astype(base.scales.dtype if quantized else base.weight.dtype)
        if "bias" in base:
            fused.bias = base.bias
        if quantized and requantize:
            return nn.QuantizedLinear.from_linear(fused, group_size=base.group_size, bits=base.bits, mode=base.mode)
        return fused

    def export(self) -> dict[str, mx.array]:
        """The tensors an adapter file holds, as an update to the *unmodified* base.

        After OLoRA/PiSSA the base holds W - ΔW0, so the update to W is ΔW - ΔW0 = s·(A B - A0 B0):
        the plain LoRA [A, A0] (in, 2r), [B; -B0] (2r, out), as PEFT's weight conversion does.
        """
        a, b = self.lora_a, self.lora_b
        if self.initial is not None:
            a0, b0 = self.initial
            a, b = mx.concatenate([a, a0], axis=1), mx.concatenate([b, -b0], axis=0)
        return {"lora_a": a, "lora_b": b, **({MAGNITUDE: self.magnitude} if self.dora else {})}


class LoRASwitchLinear(LoRALinear):
    """LoRA on mlx-lm's stacked experts (SwitchLinear, W (E, out, in)): one pair per expert, A (E, in, r)
    and B (E, r, out), as mlx-lm's LoRASwitchLinear; each token goes through its chosen experts' pairs.
    y_e = W_e x + scale · (dropout(x) A_e) B_e. No DoRA (lora._check_choices refuses it)."""

    def __init__(self, base: nn.Module, rank: int, scale: float, dropout: float = 0.0, dora: bool = False):
        nn.Module.__init__(self)
        experts = base.weight.shape[0]
        out_dims, in_dims = linear_dims(base)
        self.linear = base
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.dora = False
        self.off = False
        self.initial = None
        bound = 1 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(experts, in_dims, rank))
        self.lora_b = mx.zeros((experts, rank, out_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = self.linear(x, indices, sorted_indices=sorted_indices)  # (..., k, 1, out)
        if self.off:
            return y
        z = mx.gather_mm(self.dropout(x), self.lora_a, rhs_indices=indices, sorted_indices=sorted_indices)
        z = mx.gather_mm(z, self.lora_b, rhs_indices=indices, sorted_indices=sorted_indices)  # through rank r
        return y + (self.scale * z).astype(y.dtype)

    def fuse(self, requantize: bool = False) -> nn.Module:
        """A plain SwitchLinear holding W + delta() in the base's dtype (mlx_lora fuses full-precision experts)."""
        base = self.linear
        out_dims, in_dims = linear_dims(base)
        fused = SwitchLinear(in_dims, out_dims, base.weight.shape[0], bias="bias" in base)
        fused.weight = self.merged_weight().astype(base.weight.dtype)
        if "bias" in base:
            fused.bias = base.bias
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


def first_adapted_block(model: nn.Module) -> int:
    """The first block holding a LoRA layer, so that every block before it computes the base
    alone; 0 when there is none or one sits outside the blocks (an embedding, a head)."""
    paths = [p + "." for p in block_paths(model)]
    blocks = [next((i for i, p in enumerate(paths) if name.startswith(p)), -1) for name in lora_layers(model)]
    return 0 if not blocks or -1 in blocks else min(blocks)


def _is_regex(targets: str) -> bool:
    return any(c in _REGEX_CHARS for c in targets)


def expert_name(path: str) -> str:
    """Hugging Face's name for mlx-lm's stacked experts, all experts at once: '...mlp.switch_mlp.up_proj'
    -> '...mlp.experts.up_proj' (Mixtral: '...block_sparse_moe.experts.w3'); other paths as they are."""
    parent, _, rest = path.rpartition(".switch_mlp.")
    if not parent:
        return path
    return f"{parent}.{EXPERTS}.{EXPERT_NAMES.get(parent.rsplit('.', 1)[-1], {}).get(rest, rest)}"


def routers(model: nn.Module) -> set[str]:
    """The router linears of mixture-of-experts blocks (mlp.gate, block_sparse_moe.gate, a shared
    expert's gate): the linear children of a module whose experts are stacked. all-linear leaves
    them alone, as PEFT recommends (a (E, hidden) router takes no rank above E)."""
    modules = dict(model.named_modules())
    blocks = {n.rpartition(".switch_mlp.")[0] for n, m in modules.items() if isinstance(m, SwitchLinear)} - {""}
    return {n for n, m in modules.items() if isinstance(m, LINEAR_TYPES) and n.rpartition(".")[0] in blocks}


def outside_language_model(model: nn.Module) -> list[str]:
    """The linears of a vision-language model outside its language model: its vision tower's and
    projector's (mlx-vlm's `language_model` holds the rest); none for a text model."""
    if LANGUAGE_MODEL[:-1] not in model:
        return []
    return [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and not n.startswith(LANGUAGE_MODEL)]


def tower_layers(model: nn.Module) -> list[str]:
    """The LoRA layers of a vision-language model outside its language model: in its tower or projector."""
    if LANGUAGE_MODEL[:-1] not in model:
        return []
    return [p for p in lora_layers(model) if not p.startswith(LANGUAGE_MODEL)]


def _aliases(model: nn.Module, paths: list[str]) -> dict[str, set[str]]:
    """Each path's names --targets matches: mlx-lm's (mlx-vlm's), Hugging Face's expert name, and on a
    vision-language model the Hub checkpoint's and transformers' spellings (model/vision.py: LAYOUTS)."""
    spell = LAYOUTS.get(getattr(getattr(model, "config", None), "model_type", None))
    return {n: {n, expert_name(n), *(spell.spellings(n) if spell else ())} for n in paths}


def _match(targets: str, linears: list[str], names: dict[str, set[str]]) -> tuple[list[str], list[str]]:
    """(the paths --targets names, the targets that name none); a path matches by any of its `names`."""
    if targets == ALL_LINEAR:
        return linears, [] if linears else [targets]
    everything = list(names)
    if _is_regex(targets):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise UserError(f"--targets '{targets}' is not a valid regular expression: {e}") from None
        matched = [n for n in everything if any(pattern.fullmatch(a) for a in names[n])]
        return matched, [] if matched else [targets]
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    hit = lambda n, t: any(a == t or a.endswith("." + t) for a in names[n])  # noqa: E731
    return [n for n in everything if any(hit(n, t) for t in wanted)], [
        t for t in wanted if not any(hit(n, t) for n in everything)
    ]


def quoted(target: str) -> str:
    return f"'{target}'"  # as typed: repr() would double a regex's backslashes


def select_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Full paths of the linear modules (and stacked experts) that get LoRA; a target matching nothing
    is an error. --num-layers and --layers choose language-model blocks; a regex also reaches a
    vision-language model's tower and projector, by itself (they are no blocks)."""
    prefixes = [p + "." for p in block_paths(model)]
    chosen = [prefixes[i] for i in block_indices(model, cfg)]
    targets = str(cfg.targets).strip()
    in_blocks = [
        name
        for name, m in model.named_modules()
        if isinstance(m, ADAPTABLE) and any(name.startswith(p) for p in chosen)
    ]
    outside = outside_language_model(model)
    tower = outside if _is_regex(targets) else []
    skip = routers(model)
    names = _aliases(model, in_blocks + tower)
    matched, missing = _match(targets, [n for n in in_blocks if n not in skip], names)
    if missing:
        in_block = sorted({expert_name(n)[len(p) :] for n in in_blocks for p in chosen if n.startswith(p)})
        where = " nor the vision tower" if tower else ""
        hint = "; a regex reaches the vision tower and projector (docs/vision.md)" if outside and not tower else ""
        raise UserError(
            f"--targets: {', '.join(map(quoted, missing))} matches no linear module in the selected blocks{where}; "
            f"they have: {', '.join(in_block) or 'none'} (or use all-linear){hint}"
        )
    block_of = lambda n: next((i for i, p in enumerate(chosen) if n.startswith(p)), len(chosen))  # tower: last
    return sorted(matched, key=lambda n: (block_of(n), n))


def _check_choices(modules: dict[str, nn.Module], paths: list[str], cfg: LoRAConfig) -> None:
    """What only a new adapter must satisfy: ranks that fit, patterns that name a module, an init that can run."""
    problems = []
    for path in paths:
        out_dims, in_dims = linear_dims(modules[path])
        rank = cfg.rank_alpha(path)[0]
        if rank > min(out_dims, in_dims):
            problems.append(
                f"rank {rank} is larger than {path} allows ({out_dims}x{in_dims}): use {min(out_dims, in_dims)} or less"
            )
        if isinstance(modules[path], SwitchLinear) and (cfg.dora or cfg.init in BASE_CHANGING):
            problems.append(
                f"{path} holds stacked experts, which take a plain LoRA only: drop --dora and --init {cfg.init}"
            )
        if cfg.init in BASE_CHANGING and isinstance(modules[path], nn.QuantizedLinear):
            problems.append(
                f"--init {cfg.init} rewrites the base weights, which {path} holds quantized: use a full-precision base"
            )
    for name in ("rank_pattern", "alpha_pattern"):
        unused = [k for k in parse_pattern(getattr(cfg, name)) if not any(pattern_key({k: 0}, p) for p in paths)]
        if unused:
            problems.append(f"--{name.replace('_', '-')}: {', '.join(unused)} matches none of the adapted modules")
    if problems:
        raise UserError("\n".join(problems[:5]))


def apply_lora(model: nn.Module, cfg: LoRAConfig, paths: list[str] | None = None) -> list[str]:
    """Freeze the model and wrap linears in LoRALinear; only A, B (and DoRA's m) stay trainable.

    Without `paths` this starts a new adapter: choose targets, check, initialise. With `paths`
    it rebuilds a saved one: the layers are only shaped, and their weights are loaded next.
    """
    new = paths is None
    paths = select_targets(model, cfg) if new else paths
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules]
    if missing:
        raise UserError(f"the model has no module {missing[0]}: is this the base the adapter was made for?")
    not_linear = [p for p in paths if not isinstance(modules[p], ADAPTABLE)]
    if not_linear:
        raise UserError(
            f"{not_linear[0]} is a {type(modules[not_linear[0]]).__name__}; mlx-lora adapts linear layers only"
        )
    if new:
        _check_choices(modules, paths, cfg)
    model.freeze()
    wrapped = [
        (p, _wrapper(modules[p])(modules[p], cfg.rank_alpha(p)[0], cfg.scale_of(p), cfg.dropout, cfg.dora))
        for p in paths
    ]
    model.update_modules(tree_unflatten(wrapped))
    for _, layer in wrapped:
        if new:
            initialize(layer, cfg.init)
        layer.unfreeze(keys=list(LORA_KEYS) + ([MAGNITUDE] if cfg.dora else []), recurse=False)
    return paths


def _wrapper(module: nn.Module) -> type[LoRALinear]:
    return LoRASwitchLinear if isinstance(module, SwitchLinear) else LoRALinear


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def fuse_lora(model: nn.Module, requantize: bool = False) -> nn.Module:
    """Replace every LoRALinear by its merged plain layer, in place."""
    fused = [(name, layer.fuse(requantize)) for name, layer in lora_layers(model).items()]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return model


@contextmanager
def adapter_off(model: nn.Module) -> Iterator[nn.Module]:
    """The model computing its base alone (no delta, no DoRA rescaling) inside the block: the
    reference model of DPO and IPO without a second copy of the weights."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.off = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.off = False


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the untouched base layers back, in place."""
    bases = [(name, layer.linear) for name, layer in lora_layers(model).items()]
    if bases:
        model.update_modules(tree_unflatten(bases))
    return model
