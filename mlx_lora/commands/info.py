"""`mlx-lora info`: what `train` would do with the same options, without training.

The model is loaded and wrapped exactly as training wraps it, and the adapter is written to a
temporary directory by the same save function, so the parameter counts and the size on disk are
the ones training will produce; only the memory figure is an estimate (memory.py), for the largest
batch the data makes. The base's weights are not read (load_base(lazy=True)), except those of the
adapted layers with DoRA, OLoRA or PiSSA, whose initial values come from them: info takes seconds
and little memory at any model size.
"""

import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlx.utils import tree_flatten
from mlx_lm.utils import get_total_parameters

from mlx_lora.config import LoRAConfig, TrainConfig, data_part, lora_part, method_options
from mlx_lora.data.cache import cache_location
from mlx_lora.data.dataset import Encoding, load_splits
from mlx_lora.data.sources import open_source
from mlx_lora.formats.native import ADAPTER_CONFIG, ADAPTER_WEIGHTS, describe, save_adapter
from mlx_lora.machine import available_bytes
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import choose_kernels, wanted
from mlx_lora.model.lora import LINEAR_TYPES, apply_lora, block_paths, linear_dims
from mlx_lora.model.precision import dtype_name, restore
from mlx_lora.model.vision import require_text
from mlx_lora.reporting.results import spans
from mlx_lora.training.init_adapter import from_adapter
from mlx_lora.training.memory import (
    BatchLimits,
    MemoryEstimate,
    MemoryPlan,
    estimate_training_memory,
    falls_back,
    first_adapted,
    largest_batch,
    logit_rows,
    plan_memory,
    would_stream,
)
from mlx_lora.training.streaming import why_not_stream


def human(size: int) -> str:
    for unit, factor in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if size >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{size} B"


@dataclass
class ModelInfo:
    blocks: int
    linears: dict[str, tuple[int, int]]  # module path -> (out, in), before LoRA
    modules: list[str]  # the ones that get LoRA
    parameters: int  # the base model's (quantized weights counted unpacked, as mlx-lm counts them)
    trainable: int
    adapter_bytes: dict[str, int]  # file name -> size on disk
    memory: MemoryEstimate
    plan: MemoryPlan  # in memory and streamed, sized by the data's longest batch
    streams: bool  # whether train would stream the frozen blocks on this machine


def _by_block(items: dict[str, str], prefixes: list[str]) -> list[str]:
    """{module path: text} -> one line per run of blocks whose modules read the same, then the rest."""
    groups: dict[int, list[str]] = {}
    other = []
    for path, text in items.items():
        i = next((i for i, p in enumerate(prefixes) if path.startswith(p)), None)
        if i is None:
            other.append(f"{path}{text}")
        else:
            groups.setdefault(i, []).append(f"{path[len(prefixes[i]) :]}{text}")
    layouts: dict[tuple, list[int]] = {}
    for i, names in sorted(groups.items()):
        layouts.setdefault(tuple(names), []).append(i)
    lines = [f"  blocks {spans(blocks)}: {', '.join(names)}" for names, blocks in layouts.items()]
    return lines + ([f"  outside the blocks: {', '.join(other)}"] if other else [])


def _quiet(*_) -> None:
    pass


def training_sets(cfg: TrainConfig, tokenizer) -> dict[str, list]:
    """The sets train reads with these options (and its --data-cache), quietly."""
    sets = load_splits(
        open_source(cfg.data, cfg.data_config, _quiet),
        data_part(cfg),
        tokenizer,
        Encoding(cfg.max_seq_length, cfg.train_on_prompt, cfg.train_on_reasoning),
        objective=cfg.objective if cfg.preference else None,
        cache_dir=cache_location(cfg.data_cache, cfg.cache_data, _quiet),
        log=_quiet,
    )
    return {role: split.examples for role, split in sets.items()}


def info(cfg: TrainConfig, log=print) -> ModelInfo:
    cfg, initial = from_adapter(cfg)  # --init-adapter: the adapter's shape, on the base it names
    # no weight is read: a model larger than memory is fine
    base = load_base(cfg.model, shapes_only=True, compute=cfg.compute_dtype)
    require_text(base, "info")
    model = base.model
    prefixes = [p + "." for p in block_paths(model)]
    linears = {n: linear_dims(m) for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}
    bits = {n: m.bits for n, m in model.named_modules() if hasattr(m, "bits")}
    parameters = get_total_parameters(model)
    lora = LoRAConfig(**lora_part(cfg))
    modules = apply_lora(model, lora, initial[0].modules if initial else None)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    with tempfile.TemporaryDirectory() as tmp:
        adapter = describe(base, lora, modules)
        adapter.training = method_options(cfg)
        save_adapter(Path(tmp), model, adapter)
        sizes = {name: (Path(tmp) / name).stat().st_size for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)}
    data = training_sets(cfg, base.tokenizer)
    batch, seq_len = largest_batch(data["train"], cfg.batch_size, cfg.max_seq_length, cfg.pack)
    rows = logit_rows(data["train"], cfg.batch_size, cfg.pack)
    memory = estimate_training_memory(model, base.config, batch, seq_len, cfg.grad_checkpoint, rows)

    log(
        f"model {base.name} ({base.config.get('model_type', '?')}): {len(prefixes)} blocks, "
        f"{parameters:,} parameters, {base.precision.describe()}"
    )
    log("linear modules (out×in):")
    for line in _by_block(
        {n: f" {o}×{i}" + (f" {bits[n]}-bit" if n in bits else "") for n, (o, i) in linears.items()}, prefixes
    ):
        log(line)
    log(f"LoRA r={cfg.rank} alpha={cfg.alpha} (scale {lora.scale:g}) on {len(modules)} modules:")
    for line in _by_block(dict.fromkeys(modules, ""), prefixes):
        log(line)
    log(f"trainable parameters: {trainable:,} ({100 * trainable / parameters:.3f}% of {parameters:,})")
    log(f"learning rate: {cfg.learning_rate_text}")
    log(
        f"adapter on disk: {sum(sizes.values()):,} bytes ("
        + " + ".join(f"{name} {size:,}" for name, size in sizes.items())
        + ")"
    )
    log(
        f"training memory for batch {batch} × {seq_len} tokens (the largest batch of the data), estimated: "
        f"{human(memory.total)} = weights {human(memory.weights)} + LoRA, gradients and AdamW "
        f"{human(memory.trainable)} + activations {human(memory.activations)} + logits {human(memory.logits)} "
        f"+ working set {human(memory.workspace)}"
    )
    if wanted():
        log(choose_kernels(model, training=True).line())
    plan, streams = show_modes(cfg, base, data, log)
    return ModelInfo(len(prefixes), linears, modules, parameters, trainable, sizes, memory, plan, streams)


def show_modes(cfg: TrainConfig, base, data: dict, log) -> tuple[MemoryPlan, bool]:
    """Both ways train can hold the model, sized by the data's longest batch, and the one it would take here."""
    plan, first, available = plan_memory(base, data, BatchLimits.of(cfg)), first_adapted(base.model), available_bytes()
    why_not = why_not_stream(cfg, base, first)
    streams = why_not is None and would_stream(cfg.stream_prefix, plan, why_not, available)
    log(f"peak memory for the data's longest batch ({plan.batch} × {plan.seq_len} tokens):")
    log(f"  whole model in memory: {human(plan.in_memory.total)}")
    if why_not:
        log(f"  frozen blocks streamed from disk: not possible ({why_not})")
    else:
        log(
            f"  frozen blocks 0-{first - 1} streamed from disk: {human(plan.streamed_peak)} (training "
            f"{human(plan.streamed.total)}, prefix pass {human(plan.prefix_pass)}); their states take "
            f"{human(plan.cache_bytes)} on disk"
        )
    mode = "streamed" if streams else "whole model in memory"
    fits = (plan.streamed_peak if streams else plan.in_memory.total) <= available
    verdict = "" if fits else ", refused: too large"
    log(f"--stream-prefix {cfg.stream_prefix}: train runs {mode} here ({human(available)} available{verdict})")
    if falls_back(cfg.compute_dtype, base.precision, (cfg.stream_prefix, plan, why_not, available)):
        cast, stored = dtype_name(base.precision.compute), dtype_name(base.precision.stored)
        restore(base.precision, f"in {cast} it would not fit here")
        log(f"in {cast} it would not fit here: train computes in {stored} (slower on the CPU):")
        return show_modes(cfg, base, data, log)
    return plan, streams
