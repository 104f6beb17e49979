"""Base + adapter -> merged model directory that mlx-lm and transformers load; checks itself."""

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import dequantize_model

from mlx_lora.atomic import check_writable, claim_dir, replace_dir
from mlx_lora.commands.shard_fuse import (
    adapted,
    checked_blocks,
    outputs,
    shard_of,
    weights_bytes,
    why_not_by_shard,
    write_shards,
)
from mlx_lora.commands.vision_fuse import check_inputs, refusals, tensor_names, vision_logits
from mlx_lora.config import FuseConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.gguf import GGUF_FILE, architecture, as_stored, check_gguf, write_gguf
from mlx_lora.formats.loader import apply_adapter, read_adapter
from mlx_lora.formats.modelfile import MODELFILE, write_modelfile
from mlx_lora.formats.native import AdapterConfig
from mlx_lora.hub.repo import hub_token, upload_fused
from mlx_lora.machine import available_bytes
from mlx_lora.model.base import Base, load_base, load_mlx_model, resolve_model, write_model_files
from mlx_lora.model.cpu_kernels import use_cpu_kernels
from mlx_lora.model.gguf import ARCHITECTURES as GGUF_READABLE
from mlx_lora.model.gguf import GGUF_SUFFIX, gguf_model
from mlx_lora.model.lora import fuse_lora, lora_layers
from mlx_lora.model.precision import restore, set_precision
from mlx_lora.model.vision import is_vision, merge_width, read_config
from mlx_lora.training.memory import compute_dtype

CHECK_PROMPT = "Q: Tom has 3 apples and buys 4 more. How many apples does he have?\nA: 3 + 4 = 7. #### 7"
# Largest logit difference allowed between adapter and fused model, relative to max(1, |logits|).
COMMAND = "mlx-lora fuse"
TOLERANCE = {mx.float32: 1e-3, mx.float16: 3e-2, mx.bfloat16: 6e-2}
# The same for model.gguf read back, by --gguf-type: its weights in the type, run as our reader runs
# them (f16 and bf16 in that dtype). q8_0 rounds a weight by up to 1/254 of its block's largest, about
# bf16's 2^-9 of the weight itself (a block's weights are of like size), with float32 activations.
GGUF_TOLERANCE = {
    "f32": TOLERANCE[mx.float32],
    "f16": TOLERANCE[mx.float16],
    "bf16": TOLERANCE[mx.bfloat16],
    "q8_0": TOLERANCE[mx.bfloat16],
}


@dataclass
class FuseResult:
    save_path: Path
    max_logit_diff: float  # fused model (as saved) vs adapter model
    effect_kept: float | None = None  # re-quantized only: 1 - |fused - adapter| / |adapter - base|


def _logits(model: nn.Module, tokens: mx.array) -> mx.array:
    return model(tokens[None])[0]  # (T, V)


def fuse(cfg: FuseConfig, log=print) -> FuseResult:
    """Merge, check and save; then upload with --upload-repo."""
    if cfg.upload_repo:
        hub_token()  # a missing token stops the run before the merge, not after it
    result = merge(cfg, log)
    if cfg.upload_repo:
        upload_fused(result.save_path, Path(cfg.adapter_path), cfg.upload_repo, cfg.private, log)
    return result


def merge(cfg: FuseConfig, log=print) -> FuseResult:
    """Merge in float32 and save in the base's dtype, de-quantized unless --requantize; check in --compute-dtype's."""
    adapter, weights = read_adapter(Path(cfg.adapter_path))
    check_writable(Path(cfg.save_path).absolute().parent, "--save-path")
    claim_dir(Path(cfg.save_path), COMMAND, "--save-path", inputs(cfg, adapter.base_model))
    if is_vision(config := base_config(cfg.model or adapter.base_model)):
        return fuse_vision(cfg, config, adapter, weights, log)
    if by_shard(cfg, adapter.base_model, log):
        return fuse_by_shard(cfg, adapter, weights, log)
    merged = merge_in_memory(cfg, adapter, weights)
    with replace_dir(Path(cfg.save_path), COMMAND, "--save-path", inputs(cfg, adapter.base_model)) as tmp:
        write_model_files(tmp, merged.base.model, merged.base.tokenizer, merged.config, merged.base.path)
        set_precision(fused := read_back(tmp), cfg.compute_dtype)
        fused_logits = _logits(fused, merged.tokens).astype(mx.float32)
        diff, kept = check_saved(cfg, merged, fused_logits, log)
        if cfg.export_gguf:
            export_gguf(
                cfg, merged.base.model, merged.config, tmp, Check(merged.tokens, merged.adapter_logits, fused), log
            )
            write_modelfile(tmp, merged.base.tokenizer, f"./{GGUF_FILE}")
            log(f"wrote {MODELFILE} for Ollama (`ollama create NAME -f {Path(cfg.save_path) / MODELFILE}`)")
    log(f"fused model saved to {cfg.save_path}")
    return FuseResult(Path(cfg.save_path), diff, kept)


def base_config(name: str | None) -> dict:
    """The base's config.json ({} for a GGUF file, which is never a vision-language model)."""
    return {} if (name or "").endswith(GGUF_SUFFIX) else read_config(resolve_model(name))


def fuse_vision(cfg: FuseConfig, config: dict, adapter: AdapterConfig, weights, log) -> FuseResult:
    """A vision-language base (vision_fuse.py): its shards rewritten with the adapted weights merged,
    checked on an image and a question, the fused model read back through mlx-vlm."""
    if problems := refusals(cfg, config):
        raise UserError("; ".join(problems))
    name = cfg.model or adapter.base_model
    base = load_base(name, compute=cfg.compute_dtype)
    use_cpu_kernels(base.model)
    apply_adapter(base, adapter, weights, Path(cfg.adapter_path))
    base.model.eval()
    probe, dtype = check_inputs(base), compute_dtype(base.model)
    expected = vision_logits(base.model, probe)  # (T, V)
    mx.eval(expected)
    names = tensor_names(base, shard_of(base.path))
    restore(base.precision, "saved as stored")  # so the merged weights come out in the base's dtype
    with replace_dir(Path(cfg.save_path), COMMAND, "--save-path", inputs(cfg, name)) as tmp:
        write_shards(base, tmp, log, names)
        if (fixed := merge_width(base.config)) is not base.config:  # so that mlx-vlm alone merges images right
            (tmp / "config.json").write_text(json.dumps(fixed, indent=2))
        fused = load_base(str(tmp), compute=cfg.compute_dtype)
        use_cpu_kernels(fused.model, quantized=False)
        diff = mx.abs(vision_logits(fused.model, probe) - expected).max().item()
        tol = max(TOLERANCE.get(d, 6e-2) for d in (dtype, base.precision.stored)) * max(
            1.0, mx.abs(expected).max().item()
        )
        log(f"check: largest logit difference on an image and a question, fused vs adapter model: {diff:.2e}")
        if diff > tol:
            raise UserError(f"fused model differs from the adapter model by {diff:.2e} (> {tol:.1e}); nothing written")
    log(f"fused model saved to {cfg.save_path}")
    return FuseResult(Path(cfg.save_path), diff)


@dataclass
class Merged:
    """The merged model in memory, and the logits the saved one is checked against."""

    base: Base  # its model merged, de-quantized unless --requantize
    config: dict  # the config.json to save
    tokens: mx.array  # (T,) the check prompt
    base_logits: mx.array  # (T, V) float32, without the adapter
    adapter_logits: mx.array  # (T, V) float32, with it
    adapter_dtype: mx.Dtype  # what the adapter model computed in
    in_memory: mx.array  # (T, V) float32, the merged model before it is saved
    bits: int | None  # --requantize: the bits of the re-quantized layers


def merge_in_memory(cfg: FuseConfig, adapter: AdapterConfig, weights: dict[str, mx.array]) -> Merged:
    """The base with and without the adapter on the check prompt, then the adapter merged into it."""
    base = load_base(cfg.model or adapter.base_model, compute=cfg.compute_dtype)
    use_cpu_kernels(base.model)
    check_export(cfg, base.config)
    tokens = mx.array(base.tokenizer.encode(CHECK_PROMPT))
    base_logits = _logits(base.model, tokens).astype(mx.float32)
    apply_adapter(base, adapter, weights, Path(cfg.adapter_path))
    base.model.eval()
    raw = _logits(base.model, tokens)
    adapter_logits = raw.astype(mx.float32)
    quantized = [l.linear for l in lora_layers(base.model).values() if isinstance(l.linear, nn.QuantizedLinear)]
    if cfg.requantize and not quantized:
        raise UserError(
            "--requantize: the adapted layers of this base are not quantized; there is nothing to re-quantize"
        )
    restore(base.precision, "saved as stored")  # so the merged layers come out in the base's dtype
    fuse_lora(base.model, requantize=cfg.requantize)
    config = dict(base.config)
    if not cfg.requantize:
        dequantize_model(base.model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    in_memory = _logits(base.model, tokens).astype(mx.float32)
    return Merged(
        base=base,
        config=config,
        tokens=tokens,
        base_logits=base_logits,
        adapter_logits=adapter_logits,
        adapter_dtype=raw.dtype,
        in_memory=in_memory,
        bits=quantized[0].bits if cfg.requantize else None,
    )


def check_saved(cfg: FuseConfig, merged: Merged, fused_logits: mx.array, log) -> tuple[float, float | None]:
    """(the largest logit difference, fused as saved vs the adapter model; with --requantize the share
    of the adapter's effect kept). Refuses a difference beyond the tolerance of the dtypes involved."""
    diff = mx.abs(fused_logits - merged.adapter_logits).max().item()
    scale = max(1.0, mx.abs(merged.adapter_logits).max().item())
    tol = max(TOLERANCE.get(d, 6e-2) for d in (merged.adapter_dtype, merged.base.precision.stored)) * scale  # as saved
    log(f"check: largest logit difference, fused vs adapter model: {diff:.2e}")
    if cfg.requantize:
        return diff, requantized_effect(merged, fused_logits, diff, tol, log)
    if diff > tol:
        raise UserError(f"fused model differs from the adapter model by {diff:.2e} (> {tol:.1e}); nothing written")
    return diff, None


def requantized_effect(merged: Merged, fused_logits: mx.array, diff: float, tol: float, log) -> float:
    """Re-quantizing rounds the merged weights: the saved model must equal the merged one, and the
    report says how much of the adapter's effect on the check prompt the rounding kept."""
    saved_diff = mx.abs(fused_logits - merged.in_memory).max().item()
    if saved_diff > tol:
        raise UserError(
            f"fused model on disk differs from the merged model by {saved_diff:.2e} (> {tol:.1e}); nothing written"
        )
    effect = mx.sqrt(mx.square(merged.adapter_logits - merged.base_logits).sum()).item()
    lost = mx.sqrt(mx.square(fused_logits - merged.adapter_logits).sum()).item()
    kept = 1 - lost / effect if effect > 0 else 1.0
    log(
        f"re-quantizing to {merged.bits}-bit changed the logits by up to {diff:.2e} and kept "
        f"{100 * kept:.0f}% of the adapter's effect on the check prompt"
        + ("" if kept > 0.8 else "; fuse without --requantize to keep all of it")
    )
    return kept


@dataclass
class Check:
    tokens: mx.array  # (T,) the check prompt
    adapter_logits: mx.array  # (T, V) float32
    fused: nn.Module  # the fused model as saved in safetensors, read back


def export_gguf(cfg: FuseConfig, model: nn.Module, config: dict, tmp: Path, check: Check, log) -> None:
    """Write model.gguf, read it back with our GGUF reader, and compare its logits with those of the
    fused model whose weights are rounded in MLX to the file's type (the same weights, so float32's
    tolerance: a tensor misnamed, misplaced or mis-permuted is off by far more), and with the adapter
    model's (the rounding's cost, within the type's tolerance)."""
    weights = dict(tree_flatten(model.parameters()))
    write_gguf(tmp / GGUF_FILE, weights, config, tmp, cfg.gguf_type, Path(cfg.save_path).name)
    if (arch := architecture(config)) not in GGUF_READABLE:
        log(f"wrote {GGUF_FILE} ({cfg.gguf_type}) for llama.cpp; not read back (our GGUF reader has no {arch})")
        return
    read, _, _ = gguf_model(tmp / GGUF_FILE)
    held = read.model.norm.weight.dtype  # the reader holds an f16/bf16 file's float32 norms in that type too
    # As `--model model.gguf` runs it: --compute-dtype (auto: an f16/bf16 file in float32 on the CPU,
    # in its own type on a GPU), on the CPU kernels.
    computes_in = set_precision(read, cfg.compute_dtype).compute
    use_cpu_kernels(read)
    as_read = _logits(read, check.tokens).astype(mx.float32)
    in_float32 = as_read
    if computes_in != mx.float32:  # the same weights again in float32, as the fused model below computes
        read.set_dtype(mx.float32)
        in_float32 = _logits(read, check.tokens).astype(mx.float32)
    rounded = {k: w.astype(held).astype(mx.float32) for k, w in as_stored(weights, config, cfg.gguf_type).items()}
    check.fused.update(tree_unflatten(list(rounded.items())))
    check.fused.set_dtype(mx.float32)
    same = mx.abs(in_float32 - _logits(check.fused, check.tokens)).max().item()
    cost = mx.abs(as_read - check.adapter_logits).max().item()
    scale = max(1.0, mx.abs(check.adapter_logits).max().item())
    same_tol, cost_tol = TOLERANCE[mx.float32] * scale, GGUF_TOLERANCE[cfg.gguf_type] * scale
    log(
        f"check: {GGUF_FILE} ({cfg.gguf_type}) read back: largest logit difference vs the fused weights rounded "
        f"to {cfg.gguf_type}: {same:.2e} (allowed {same_tol:.1e}); vs the adapter model: {cost:.2e} "
        f"(allowed {cost_tol:.1e})"
    )
    if same > same_tol:
        raise UserError(
            f"{GGUF_FILE} read back differs from the fused weights rounded to {cfg.gguf_type} by {same:.2e} "
            f"(> {same_tol:.1e}): the file's tensors are not the model's; nothing written"
        )
    if cost > cost_tol:
        raise UserError(
            f"{GGUF_FILE} ({cfg.gguf_type}) differs from the adapter model by {cost:.2e} (> {cost_tol:.1e}); "
            "nothing written; try a wider --gguf-type (f32)"
        )
    log(f"wrote {GGUF_FILE} ({cfg.gguf_type}) for llama.cpp")


def read_back(path: Path, lazy: bool = False) -> nn.Module:
    """The fused model as saved, on the CPU kernels the adapter model ran, quantized layers but on
    MLX's kernel, as the merged model they are compared with (a by-shard base is never quantized)."""
    model = load_mlx_model(path, lazy)[0]
    use_cpu_kernels(model, quantized=False)
    return model


def inputs(cfg: FuseConfig, base_model: str) -> dict[str, Path]:
    """What --save-path must not replace: the adapter, and the base where it is a local path."""
    return {"--adapter-path": Path(cfg.adapter_path), "--model": Path(cfg.model or base_model)}


def check_export(cfg: FuseConfig, config: dict) -> None:
    if cfg.export_gguf:
        check_gguf(config, cfg.gguf_type)
        if cfg.requantize:
            raise UserError("--export-gguf needs full-precision weights: drop --requantize")


def by_shard(cfg: FuseConfig, name: str, log) -> bool:
    """--by-shard auto|on|off: auto merges shard by shard when the whole model would not fit twice
    (the base, and the fused copy read back for the check)."""
    if cfg.by_shard == "off" or (cfg.by_shard == "auto" and (cfg.model or name or "").endswith(GGUF_SUFFIX)):
        return False  # a GGUF base is read whole: not worth reading twice to learn that
    base = load_base(cfg.model or name, lazy=True)  # shapes and paths only: nothing is read
    why_not = why_not_by_shard(base) or (
        "--requantize and --export-gguf need the whole model" if cfg.requantize or cfg.export_gguf else None
    )
    if why_not and cfg.by_shard == "on":
        raise UserError(f"--by-shard on: {why_not}")
    size, available = weights_bytes(base.path) if not why_not else 0, available_bytes()
    if why_not or (cfg.by_shard == "auto" and 2 * size <= available):
        return False
    why = (
        "--by-shard on"
        if cfg.by_shard == "on"
        else f"twice its {size / 2**30:.1f} GB would not fit in {available / 2**30:.1f} GB"
    )
    log(f"fuse: merging one shard at a time ({why})")
    return True


def fuse_by_shard(cfg: FuseConfig, adapter, weights, log) -> FuseResult:
    """Merge shard by shard; the check compares a few adapted blocks' outputs (shard_fuse.py)."""
    name, directory = cfg.model or adapter.base_model, Path(cfg.adapter_path)
    reference = adapted(name, adapter, weights, directory)
    model, text = reference.model, reference.config.get("text_config", reference.config)
    blocks, dtype = checked_blocks(model), compute_dtype(model)
    tokens = mx.array(reference.tokenizer.encode(CHECK_PROMPT))[None]  # (1, T)
    h = mx.random.normal((*tokens.shape, text["hidden_size"]), key=mx.random.key(0)).astype(dtype)  # (1, T, D)
    expected = outputs(model, blocks, tokens, h)
    del reference, model
    base = adapted(name, adapter, weights, directory)
    with replace_dir(Path(cfg.save_path), COMMAND, "--save-path", inputs(cfg, name)) as tmp:
        write_shards(base, tmp, log)
        got = outputs(read_back(tmp, lazy=True), blocks, tokens, h)
        diff = max(mx.abs(got[i] - expected[i]).max().item() for i in blocks)
        scale = max(1.0, *(mx.abs(expected[i]).max().item() for i in blocks))
        tol = TOLERANCE.get(dtype, 6e-2) * scale
        log(f"check: largest difference in the outputs of blocks {blocks}, fused vs adapter model: {diff:.2e}")
        if diff > tol:
            raise UserError(f"fused model differs from the adapter model by {diff:.2e} (> {tol:.1e}); nothing written")
    log(f"fused model saved to {cfg.save_path}")
    return FuseResult(Path(cfg.save_path), diff)
