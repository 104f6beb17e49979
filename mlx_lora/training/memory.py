"""An estimate of a LoRA training run's peak memory, from the model's shapes alone (no training).

It counts what a step must hold at once: the weights; each LoRA weight with its gradient and
AdamW's two moments (fp32); for every block from the first adapted one up (gradients never flow
below it) the outputs of its linears and one elementwise input per output, plus the attention
probabilities; and the logits with their fp32 copies. It is an estimate, not a measurement: the
compiled step may fuse or free some of these earlier.
"""

import os
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_lora.data.batches import PAD_MULTIPLE, lengths
from mlx_lora.errors import UserError
from mlx_lora.model.lora import LINEAR_TYPES, block_paths, linear_dims, lora_layers

GB = 2**30


@dataclass
class MemoryEstimate:
    weights: int  # bytes of every parameter as loaded
    trainable: int  # LoRA weights + gradients + AdamW moments
    activations: int  # kept for the backward pass through the adapted blocks
    logits: int  # (B, L, V) in the model's dtype and in fp32, and the gradient

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.logits


def compute_dtype(model: nn.Module) -> mx.Dtype:
    """The floating dtype of the model's first floating parameter (quantized weights are uint32)."""
    return next(v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating))


def estimate_training_memory(
    model: nn.Module, config: dict, batch_size: int, seq_len: int, grad_checkpoint: bool = False
) -> MemoryEstimate:
    """`model` has LoRA applied (apply_lora); `config` is its config.json. With `grad_checkpoint`
    each block keeps only its input, and one block's activations exist at a time."""
    text = config.get("text_config", config)
    act = compute_dtype(model).size
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = 4 * sum(v.size * 4 for _, v in tree_flatten(model.trainable_parameters()))
    prefixes = [p + "." for p in block_paths(model)]
    adapted = lora_layers(model)
    first = min((i for i, p in enumerate(prefixes) for m in adapted if m.startswith(p)), default=len(prefixes))
    kept = prefixes[first:]
    out_dims = sum(  # a wrapped linear is counted through the base layer it holds
        linear_dims(m)[0]
        for name, m in model.named_modules()
        if isinstance(m, LINEAR_TYPES) and any(name.startswith(p) for p in kept)
    )
    tokens = batch_size * seq_len
    attention = len(kept) * 2 * text.get("num_attention_heads", 0) * seq_len * 4  # per token: scores, probs
    activations = tokens * (2 * out_dims * act + attention)
    if grad_checkpoint and kept:
        activations = activations // len(kept) + len(kept) * tokens * text.get("hidden_size", 0) * act
    logits = tokens * text.get("vocab_size", 0) * (act + 2 * 4)
    return MemoryEstimate(weights, trainable, activations, logits)


def available_bytes() -> int:
    """What the accelerator may use: Metal's recommended working set or the device memory, else RAM."""
    info = mx.device_info()
    for key in ("max_recommended_working_set_size", "memory_size"):
        if info.get(key):
            return int(info[key])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(est: MemoryEstimate, batch_size: int, seq_len: int, available: int) -> None:
    """Before training: a run that cannot fit stops with the knobs to turn, instead of swapping for
    an hour or being killed by the OS."""
    if est.total <= available:
        return
    raise UserError(
        f"this run needs about {est.total / GB:.1f} GB (weights {est.weights / GB:.1f}, LoRA + optimizer "
        f"{est.trainable / GB:.2f}, activations and logits {(est.activations + est.logits) / GB:.1f} for batch "
        f"{batch_size} x {seq_len} tokens) but this machine has {available / GB:.1f} GB; lower --batch-size or "
        "--max-seq-length, use --grad-checkpoint, or train on a quantized base (e.g. a 4-bit mlx-community model)"
    )


def largest_batch(examples: list, batch_size: int, max_seq_length: int, pack: bool) -> tuple[int, int]:
    """(rows, padded tokens) of the largest batch the data can make: what a step's memory is sized by."""
    sizes = lengths(examples)
    longest = min(max_seq_length, int(sizes.sum() if pack else sizes.max()))  # a pack fills up to the limit
    return min(batch_size, len(examples)), -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE


def check_training_memory(
    base, examples: list, batch_size: int, max_seq_length: int, pack: bool, grad_checkpoint: bool, log
) -> None:
    """Refuse a run the machine cannot hold, sized by the longest batch the data can make."""
    batch, seq_len = largest_batch(examples, batch_size, max_seq_length, pack)
    est = estimate_training_memory(base.model, base.config, batch, seq_len, grad_checkpoint)
    available = available_bytes()
    log(f"memory: about {est.total / GB:.2f} GB at peak (batch {batch} x {seq_len} tokens) of {available / GB:.1f} GB")
    check_fits(est, batch, seq_len, available)
