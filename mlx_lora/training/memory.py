"""An estimate of a LoRA training run's peak memory, from the model's shapes alone (no training).

It counts what a step must hold at once: the weights; each LoRA weight with its gradient and
AdamW's two moments (fp32); for every block from the first adapted one up (gradients never flow
below it) the outputs of its linears and one elementwise input per output, plus the attention
probabilities and the inputs of its two norms; and the logits with their fp32 copies, at the positions
whose logits exist at once (the learned tokens, a chunk at a time, unless batches are packed). On top
of all that the peak holds a working set: with the CPU kernels (model/cpu_kernels.py), whose fast_exp
keeps 5 fp32 values per value it exponentiates, one block's attention scores and the loss's chunks
pass through it. It is an estimate, not a measurement: the compiled step may fuse or free some of
these earlier.

With --stream-prefix (streaming.py) the frozen blocks before the first adapted one are never
resident together: the run holds the rest of the model during training, and one frozen block
(or the embedding) plus a group's activations per stream during the prefix pass; the pass's cache
goes to disk, two files of rows x tokens x hidden x bytes at once. auto streams where it can and
the cache is small (would_stream), as it holds less in no more time.

Everything is sized in the dtype the base computes in (model/precision.py): a bfloat16 base cast
to float32 on the CPU holds twice its size on disk. When that does not fit and --compute-dtype is
auto, the run streams (--stream-prefix auto) or, where it cannot, computes in the stored dtype with
a warning.
"""

import shutil
import tempfile
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_lora.config.precision import AUTO
from mlx_lora.data.batches import PAD_MULTIPLE, lengths
from mlx_lora.data.examples import ExampleSet
from mlx_lora.errors import UserError
from mlx_lora.machine import available_bytes
from mlx_lora.model import cpu_kernels
from mlx_lora.model.lora import LINEAR_TYPES, block_paths, linear_dims, lora_layers
from mlx_lora.model.precision import dtype_name, restore
from mlx_lora.training.cut import EMBEDDINGS, cut_at
from mlx_lora.training.feed import CE_CHUNK, TARGET_MULTIPLE
from mlx_lora.training.prefix_cache import RAM_LIMIT, split_streams
from mlx_lora.training.streaming import cache_bytes, largest_group, splits

GB = 2**30
# states a run that fits in memory streams under --stream-prefix auto at most: as much as an in-memory
# run's prefix cache keeps in RAM before it moves to a file
AUTO_CACHE = RAM_LIMIT
# fp32 (B, H, L, L) arrays one block's attention pass holds at once besides the 2 counted as kept:
# the masked and shifted scores, fast_exp's 4 temporaries and, going back, the gradients of the
# probabilities, the exponentials and the scores (12.0-13.6 measured around cpu_kernels.attention's
# forward and backward alone, L 256 and 128)
ATTENTION_WORK = 10
# fp32 values per logit of the loss chunks in flight at once: fast_exp's 5 forward and again backward,
# the shifted rows and the piece of gradient; the compiled cross-entropy's gradient measured 2 logits
# plus 12 per logit of 2 chunks (32-512 rows of 8k-32k vocabularies)
LOSS_WORK, LOSS_CHUNKS = 12, 2


@dataclass(frozen=True)
class BatchLimits:
    """The options that size a step's memory."""

    batch_size: int
    max_seq_length: int
    pack: bool
    grad_checkpoint: bool

    @classmethod
    def of(cls, cfg) -> "BatchLimits":
        """From a TrainConfig."""
        return cls(cfg.batch_size, cfg.max_seq_length, cfg.pack, cfg.grad_checkpoint)


@dataclass
class MemoryEstimate:
    weights: int  # bytes of every parameter as loaded
    trainable: int  # LoRA weights + gradients + AdamW moments
    activations: int  # kept for the backward pass through the adapted blocks
    logits: int  # (B, L, V) in the model's dtype and in fp32, and the gradient
    workspace: int = 0  # the CPU kernels' temporaries: one block's attention and the loss chunks

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations + self.logits + self.workspace


def compute_dtype(model: nn.Module) -> mx.Dtype:
    """The floating dtype of the model's first floating parameter (quantized weights are uint32)."""
    return next(v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating))


def estimate_training_memory(
    model: nn.Module,
    config: dict,
    batch_size: int,
    seq_len: int,
    grad_checkpoint: bool = False,
    logit_rows: int | None = None,
) -> MemoryEstimate:
    """`model` has LoRA applied (apply_lora); `config` is its config.json. With `grad_checkpoint`
    each block keeps only its input, and one block's activations exist at a time. `logit_rows`:
    the positions whose logits exist at once (logit_rows()); default every token of the batch."""
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
    heads, hidden = text.get("num_attention_heads", 0), text.get("hidden_size", 0)
    attention = len(kept) * 2 * heads * seq_len * 4  # per token: scores, probs
    norms = len(kept) * 2 * hidden * act  # per token: each block's two norm inputs
    activations = tokens * (2 * out_dims * act + attention + norms)
    if grad_checkpoint and kept:
        activations = activations // len(kept) + len(kept) * tokens * hidden * act
    scored = (tokens if logit_rows is None else logit_rows) * text.get("vocab_size", 0)
    workspace = 0
    if cpu_kernels.wanted():
        chunks = min(scored, LOSS_CHUNKS * cpu_kernels.CE_CHUNK_VALUES)
        workspace = (ATTENTION_WORK * tokens * heads * seq_len * bool(kept) + LOSS_WORK * chunks) * 4
    return MemoryEstimate(weights, trainable, activations, scored * (act + 2 * 4), workspace)


@dataclass
class MemoryPlan:
    """Both ways to run: the whole model in memory, or its frozen prefix streamed from disk."""

    in_memory: MemoryEstimate
    streamed: MemoryEstimate  # weights: all but the frozen blocks (and an untied embedding)
    prefix_pass: int  # the streamed pass's peak: the largest frozen block or embedding + one group
    cache_bytes: int  # the streamed cache of train + valid on disk (a rank's rows of them in a group)
    batch: int
    seq_len: int

    @property
    def streamed_peak(self) -> int:
        return max(self.streamed.total, self.prefix_pass)


def streamed_parts(model: nn.Module, first: int) -> tuple[list[int], int]:
    """Bytes of each frozen block (before `first`) and of the embedding when it is not also the head."""
    named = tree_flatten(model.parameters())
    frozen = [sum(v.nbytes for k, v in named if k.startswith(p + ".")) for p in block_paths(model)[:first]]
    tied = cut_at(model, first).tied
    path = next(n for n, m in model.named_modules() if isinstance(m, EMBEDDINGS))
    return frozen, 0 if tied else sum(v.nbytes for k, v in named if k.startswith(path + "."))


def plan_memory(base, data: dict, limits: BatchLimits, rows: dict | None = None) -> MemoryPlan:
    """Both estimates, sized by the longest batch the training rows can make; the prefix pass and
    its cache by the rows streamed (`rows`: a rank's of each split, streaming.rank_rows; else all)."""
    batch, seq_len = largest_batch(data["train"], limits.batch_size, limits.max_seq_length, limits.pack)
    model, text = base.model, base.config.get("text_config", base.config)
    scored = logit_rows(data["train"], limits.batch_size, limits.pack)
    est = estimate_training_memory(model, base.config, batch, seq_len, limits.grad_checkpoint, scored)
    first = first_adapted(model)
    act, hidden = compute_dtype(model).size, text.get("hidden_size", 0)
    try:
        frozen, embedding = streamed_parts(model, first)
    except (ValueError, StopIteration):  # no blocks or head to cut at: streaming is refused later
        frozen, embedding = [], 0
    streamed = replace(est, weights=est.weights - sum(frozen) - embedding)
    # one block call on a group: its input and output states plus its widest intermediate, twice; a
    # group on each stream the pass splits over
    sets = splits(data, rows)
    group = largest_group(sets) * (2 * hidden + 2 * text.get("intermediate_size", 4 * hidden)) * act
    group *= max(1, len(split_streams(model)))
    return MemoryPlan(est, streamed, max(frozen + [embedding]) + group, cache_bytes(sets, hidden, act), batch, seq_len)


def first_adapted(model: nn.Module) -> int:
    prefixes = [p + "." for p in block_paths(model)]
    adapted = lora_layers(model)
    return min((i for i, p in enumerate(prefixes) for m in adapted if m.startswith(p)), default=len(prefixes))


def cache_dir_free() -> tuple[str, int]:
    """Where the streamed cache goes ($TMPDIR) and the bytes free there."""
    directory = tempfile.gettempdir()
    return directory, shutil.disk_usage(directory).free


def would_stream(mode: str, plan: MemoryPlan, why_not: str | None, available: int) -> bool:
    """auto streams when the whole model would not fit and the streamed run would; and where it fits,
    when streaming holds less and its states are at most AUTO_CACHE with room for them on disk. The pass
    then computes, block by block before the first step, what the run's fills would compute between
    steps, in no more time (bench/RESULTS.md); past AUTO_CACHE, fills let training start sooner."""
    if mode != "auto" or why_not is not None:
        return mode == "on"
    if plan.in_memory.total > available:
        return available >= plan.streamed_peak
    return (
        plan.streamed_peak < plan.in_memory.total
        and plan.cache_bytes <= AUTO_CACHE
        and 2 * plan.cache_bytes <= cache_dir_free()[1]
    )


def fits(mode: str, plan: MemoryPlan, why_not: str | None, available: int) -> bool:
    """Whether the run fits here, held as --stream-prefix `mode` would hold it."""
    streams = would_stream(mode, plan, why_not, available)
    return (plan.streamed_peak if streams else plan.in_memory.total) <= available


def falls_back(requested: str, precision, fit: tuple) -> bool:
    """--compute-dtype auto gives up its cast when the run would not fit here in the cast dtype
    (`fit`: fits()'s arguments); an explicit --compute-dtype is refused instead."""
    return requested == AUTO and bool(precision.cast) and not fits(*fit)


def choose_streaming(mode: str, plan: MemoryPlan, why_not: str | None, available: int, log) -> bool:
    """--stream-prefix auto|on|off against the plan: whether to stream, said in one line, or a refusal."""
    if mode == "on" and why_not:
        raise UserError(f"--stream-prefix on: {why_not}")
    whole = plan.in_memory.total
    streamable = why_not is None
    stream = would_stream(mode, plan, why_not, available)
    if not stream:
        batch = f"batch {plan.batch} x {plan.seq_len} tokens"
        log(f"memory: about {whole / GB:.2f} GB at peak ({batch}) of {available / GB:.1f} GB")
        hint = f"; streaming the frozen blocks (--stream-prefix on) would need {plan.streamed_peak / GB:.1f} GB"
        check_fits(plan.in_memory, plan.batch, plan.seq_len, available, hint if streamable else "")
        return False
    if plan.streamed_peak > available:
        raise UserError(
            f"even with --stream-prefix this run needs about {plan.streamed_peak / GB:.1f} GB (weights outside the "
            f"frozen blocks {plan.streamed.weights / GB:.1f}) but this machine has {available / GB:.1f} GB; lower "
            "--batch-size or --max-seq-length, use --grad-checkpoint, or adapt fewer blocks (--num-layers)"
        )
    directory, free = cache_dir_free()
    if 2 * plan.cache_bytes > free:  # a pass reads one file while it writes the next
        raise UserError(
            f"--stream-prefix: the frozen blocks' states need {2 * plan.cache_bytes / GB:.1f} GB in {directory} while "
            f"they are computed, but it has {free / GB:.1f} GB free; point TMPDIR at a larger disk, or use fewer "
            "or shorter rows"
        )
    why = "--stream-prefix on"
    if mode == "auto" and whole > available:
        why = f"the whole model would need about {whole / GB:.1f} GB of {available / GB:.1f} GB"
    elif mode == "auto":
        why = f"--stream-prefix auto: {whole / GB:.2f} GB with the whole model in memory; off keeps it"
    log(
        f"memory: streaming the frozen blocks from disk ({why}): about {plan.streamed_peak / GB:.2f} GB at peak, "
        f"{plan.cache_bytes / GB:.2f} GB of their states cached in {directory}"
    )
    return True


def check_fits(est: MemoryEstimate, batch_size: int, seq_len: int, available: int, hint: str = "") -> None:
    """Before training: a run that cannot fit stops with the knobs to turn, instead of swapping for
    an hour or being killed by the OS."""
    if est.total <= available:
        return
    step = est.activations + est.logits + est.workspace
    raise UserError(
        f"this run needs about {est.total / GB:.1f} GB (weights {est.weights / GB:.1f}, LoRA + optimizer "
        f"{est.trainable / GB:.2f}, activations, logits and working set {step / GB:.1f} for batch "
        f"{batch_size} x {seq_len} tokens) but this machine has {available / GB:.1f} GB; lower --batch-size or "
        "--max-seq-length, use --grad-checkpoint, or train on a quantized base (e.g. a 4-bit mlx-community model)"
        + hint
    )


def logit_rows(examples, batch_size: int, pack: bool) -> int | None:
    """How many positions' logits a step holds at once: unpacked batches score only the learned
    tokens, CE_CHUNK at a time (feed.py), so the most a batch learns, padded as target_positions
    pads it, up to CE_CHUNK; packed ones score every token (None), and preference pairs, whose
    feed is not measured against this, are counted so too."""
    if pack or (len(examples) and not hasattr(examples[0], "mask")):
        return None
    if isinstance(examples, ExampleSet):
        learned = np.add.reduceat(np.asarray(examples.mask[:], np.int64), examples.offsets[:-1])
    else:  # a list of examples (tests)
        learned = np.array([int(np.asarray(ex.mask).sum()) for ex in examples], np.int64)
    most = int(np.sort(learned)[-batch_size:].sum()) if len(learned) else 0
    return min(CE_CHUNK, max(1, -(-most // TARGET_MULTIPLE)) * TARGET_MULTIPLE)


def largest_batch(examples: list, batch_size: int, max_seq_length: int, pack: bool) -> tuple[int, int]:
    """(rows, padded tokens) of the largest batch the data can make: what a step's memory is sized by."""
    sizes = lengths(examples)
    longest = min(max_seq_length, int(sizes.sum() if pack else sizes.max()))  # a pack fills up to the limit
    return min(batch_size, len(examples)), -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE


def check_training_memory(
    base,
    data: dict,
    limits: BatchLimits,
    *,
    rows: dict | None,
    stream: str,
    requested: str,
    why_not: str | None,
    log,
) -> bool:
    """Refuse a run the machine cannot hold; True when the frozen blocks are to be streamed (`stream`:
    --stream-prefix; `requested`: --compute-dtype; `why_not`: why they cannot be streamed, or None)."""
    precision = base.precision
    plan, available = plan_memory(base, data, limits, rows), available_bytes()
    if falls_back(requested, precision, (stream, plan, why_not, available)):
        cast, stored = dtype_name(precision.compute), dtype_name(precision.stored)
        need = plan.in_memory.total if why_not or stream == "off" else plan.streamed_peak
        restore(precision, f"in {cast} it would need about {need / GB:.1f} GB of {available / GB:.1f} GB")
        log(f"warning: computing in {stored}, several times slower on the CPU than {cast}, which would not fit here")
        plan = plan_memory(base, data, limits, rows)
    log(f"compute: {precision.describe()}")
    return choose_streaming(stream, plan, why_not, available, log)
