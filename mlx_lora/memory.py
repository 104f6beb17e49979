"""An estimate of a LoRA training run's peak memory, from the model's shapes alone (no training).

It counts what a step must hold at once: the weights; each LoRA weight with its gradient and
AdamW's two moments (fp32); for every block from the first adapted one up (gradients never flow
below it) the outputs of its linears and one elementwise input per output, plus the attention
probabilities; and the logits with their fp32 copies. It is an estimate, not a measurement: the
compiled step may fuse or free some of these earlier.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .lora import LINEAR_TYPES, block_paths, linear_dims, lora_layers


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


def estimate_training_memory(model: nn.Module, config: dict, batch_size: int, seq_len: int) -> MemoryEstimate:
    """`model` has LoRA applied (apply_lora); `config` is its config.json."""
    text = config.get("text_config", config)
    act = compute_dtype(model).size
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = 4 * sum(v.size * 4 for _, v in tree_flatten(model.trainable_parameters()))
    prefixes = [p + "." for p in block_paths(model)]
    adapted = lora_layers(model)
    first = min((i for i, p in enumerate(prefixes) for m in adapted if m.startswith(p)), default=len(prefixes))
    kept = prefixes[first:]
    out_dims = sum(  # a wrapped linear is counted through the base layer it holds
        linear_dims(m)[0] for name, m in model.named_modules()
        if isinstance(m, LINEAR_TYPES) and any(name.startswith(p) for p in kept)
    )
    tokens = batch_size * seq_len
    attention = len(kept) * 2 * text.get("num_attention_heads", 0) * seq_len * 4  # per token: scores, probs
    activations = tokens * (2 * out_dims * act + attention)
    logits = tokens * text.get("vocab_size", 0) * (act + 2 * 4)
    return MemoryEstimate(weights, trainable, activations, logits)
