"""Loss, evaluation and the training loop: one compiled step, a flat loop that reports and saves."""

import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.utils import get_total_parameters

from . import memory
from .adapters import describe, save_adapter
from .atomic import check_writable, remove_stale
from .checkpoint import (
    CHECKPOINTS, TrainerState, checkpoint_dir, find_checkpoint, load_checkpoint, resume_command, rng_key,
    save_checkpoint,
)
from .config import LoRAConfig, TrainConfig, lora_part
from .data import (
    PAD_MULTIPLE, Example, batches_per_epoch, collate, epoch_batches, iterate_batches, load_dataset, resolve_data,
)
from .errors import Interrupted, UserError
from .lora import apply_lora
from .models import load_base
from .monitor import TrainMonitor
from .progress import track
from .stop import deferred_stop


def loss_fn(model: nn.Module, tokens: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over the masked targets only; returns (loss, number of targets)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]  # (B, L-1)
    weights = mask[:, 1:].astype(mx.float32)  # (B, L-1): 1 where the token is learned
    logits = model(inputs)  # (B, L-1, V)
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * weights
    ntoks = weights.sum()
    return ce.sum() / ntoks, ntoks


def evaluate(model: nn.Module, examples: list[Example], batch_size: int, num_batches: int = -1) -> float:
    """Token-weighted mean loss over a fixed selection of batches (the same each call)."""
    batches = epoch_batches(examples, batch_size, seed=0, epoch=0)
    batches = batches if num_batches == -1 else batches[:num_batches]
    was_training = model.training  # leave the mode as found: eval runs this between generations
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for indices in track(batches, "validation"):
        tokens, mask = collate(examples, indices)
        loss, ntoks = loss_fn(model, tokens, mask)
        total, count = total + loss * ntoks, count + ntoks
        mx.eval(total, count)
    model.train(was_training)
    return (total / count).item()


@dataclass
class TrainResult:
    adapter_path: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss of every step
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_gb: float = 0.0


def train(cfg: TrainConfig, log=print) -> TrainResult:
    out = Path(cfg.adapter_path)
    check_writable(out, "--adapter-path")
    remove_stale(out)
    remove_stale(out / CHECKPOINTS)
    mx.random.seed(cfg.seed)
    base = load_base(cfg.model)
    data_dir = resolve_data(cfg.data)
    data = load_dataset(data_dir, base.tokenizer, cfg.max_seq_length, cfg.train_on_prompt, log=log)
    model = base.model
    optimizer = optim.AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.resume:
        last_saved = find_checkpoint(cfg.resume)
        progress, adapter = load_checkpoint(last_saved, base, cfg, optimizer)
        log(f"resuming from {last_saved} after step {progress.step}")
    else:
        last_saved = None
        adapter = describe(base, LoRAConfig(**lora_part(cfg)), apply_lora(model, cfg))
        optimizer.init(model.trainable_parameters())
        progress = TrainerState(step=0, batches_seen=0, rng_key=rng_key())
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    log(
        f"model {base.name}: {cfg.summary()} on {len(adapter.modules)} modules in blocks "
        f"{adapter.layers}; {trainable:,} trainable parameters "
        f"({100 * trainable / get_total_parameters(model):.3f}%)"
    )
    check_memory(base, data["train"], cfg, log)
    iters = cfg.iters if cfg.epochs is None else max(1, round(cfg.epochs * batches_per_epoch(data["train"], cfg.batch_size)))
    run_config = {**asdict(cfg), "model": base.name, "data": str(data_dir.resolve()), "resume": None}
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens, mask):
        (loss, ntoks), grads = loss_and_grad(model, tokens, mask)
        optimizer.update(model, grads)
        grads_finite = mx.stack([mx.isfinite(g).all() for _, g in tree_flatten(grads)]).all()
        return loss, grads_finite

    def validate(at: int) -> None:
        result.val_losses[at] = evaluate(model, data["valid"], cfg.batch_size, cfg.val_batches)
        monitor.validation(at, result.val_losses[at])

    def save_checkpoint_at(at: int) -> Path:
        path = checkpoint_dir(out, at)
        # one batch per step, so the data position is the step
        save_checkpoint(path, model, adapter, optimizer, TrainerState(at, at, rng_key(), run_config))
        return path

    result = TrainResult(out, iters)
    monitor = TrainMonitor(cfg, out, iters, log)  # bar or plain lines, metrics.jsonl, loss.png
    model.train()
    validate(progress.step)
    mx.reset_peak_memory()
    total_tokens, window_tokens, window_start = 0, 0, time.perf_counter()
    start = window_start
    batches = iterate_batches(data["train"], cfg.batch_size, cfg.seed, start=progress.batches_seen)
    with deferred_stop() as stop:
        for it in range(progress.step + 1, iters + 1):
            tokens, mask, ntokens = next(batches)
            loss, grads_finite = step(tokens, mask)
            mx.eval(state, loss, grads_finite)
            result.losses.append(loss.item())
            if not (math.isfinite(result.losses[-1]) and grads_finite.item()):
                monitor.close()
                raise UserError(numerical_fault(it, result.losses[-1], out, last_saved))
            monitor.step(result.losses[-1])
            total_tokens, window_tokens = total_tokens + ntokens, window_tokens + ntokens
            if it % cfg.report_every == 0 or it == iters:
                now = time.perf_counter()
                recent = result.losses[-cfg.report_every :]
                monitor.report(
                    it, sum(recent) / len(recent), window_tokens / (now - window_start),
                    mx.get_peak_memory() / 2**30, optimizer.learning_rate.item(),
                )
                window_tokens, window_start = 0, now
            if cfg.val_every and it % cfg.val_every == 0 and it != iters:
                validate(it)
            interrupted = stop.signum is not None and it != iters
            if interrupted or (cfg.save_every and it % cfg.save_every == 0 and it != iters):
                last_saved = save_checkpoint_at(it)
            if interrupted:
                monitor.close()
                name = signal.Signals(stop.signum).name
                raise Interrupted(f"stopped by {name} after step {it}/{iters}; resume with: {resume_command(last_saved)}", stop.signum)
    validate(iters)
    save_adapter(out, model, adapter)
    result.seconds = time.perf_counter() - start
    result.tokens_per_second = total_tokens / result.seconds
    result.peak_memory_gb = mx.get_peak_memory() / 2**30
    monitor.close()
    first, last = result.val_losses[progress.step], result.val_losses[iters]
    log(
        f"done in {result.seconds:.1f}s: val loss {first:.3f} -> {last:.3f} "
        f"({100 * (last - first) / first:+.1f}%); adapter saved to {out}{os.sep}"
    )
    return result


def numerical_fault(step: int, loss: float, out: Path, last_saved: Optional[Path]) -> str:
    what = f"the loss is {loss}" if not math.isfinite(loss) else "a gradient is not finite"
    if last_saved is None:
        return (f"step {step}: {what}; stopped with nothing saved ({out} left as it was); "
                "lower --learning-rate or check the data, and start again")
    return (f"step {step}: {what}; stopped, {out} left as it was; the last good checkpoint is {last_saved}: "
            f"lower --learning-rate and continue with {resume_command(last_saved)} --learning-rate <smaller>")


def check_memory(base, examples: list[Example], cfg: TrainConfig, log) -> None:
    """Refuse a run the machine cannot hold, sized by the longest batch the data can make."""
    longest = min(cfg.max_seq_length, max(len(e.tokens) for e in examples))
    seq_len = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    batch = min(cfg.batch_size, len(examples))
    est = memory.estimate_training_memory(base.model, base.config, batch, seq_len)
    available = memory.available_bytes()
    log(f"memory: about {est.total / memory.GB:.2f} GB at peak (batch {batch} x {seq_len} tokens) of {available / memory.GB:.1f} GB")
    memory.check_fits(est, batch, seq_len, available)
