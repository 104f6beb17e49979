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
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import get_total_parameters

from . import distributed, memory
from .adapters import adapter_weights, describe, save_adapter
from .atomic import check_writable, remove_stale
from .checkpoint import (
    CHECKPOINTS, TrainerState, checkpoint_dir, find_checkpoint, load_checkpoint, read_best, resume_command, rng_key,
    save_checkpoint,
)
from .config import LoRAConfig, TrainConfig, lora_part, method_options
from .data import (
    PAD_MULTIPLE, Example, batches_per_epoch, collate, epoch_batches, iterate_batches, load_dataset, resolve_data,
)
from .errors import Interrupted, UserError
from .feed import PLAIN, Feed, make_feed
from .lora import apply_lora
from .models import load_base
from .monitor import TrainMonitor
from .packing import enable_packing
from .progress import track
from .recompute import checkpoint_blocks
from .schedule import learning_rate
from .stop import deferred_stop
from .stopping import EarlyStopping


def evaluate(model: nn.Module, examples: list[Example], batch_size: int, num_batches: int = -1,
             world: distributed.World = distributed.SOLO, feed: Feed = PLAIN) -> float:
    """Token-weighted mean loss over a fixed selection of batches (the same each call); a group
    shares the batches out like training ones and sums the result."""
    batches = epoch_batches(examples, batch_size, seed=0, epoch=0)
    batches = batches if num_batches == -1 else batches[:num_batches]
    was_training = model.training  # leave the mode as found: eval runs this between generations
    model.eval()
    total, count = mx.array(0.0), mx.array(0.0)
    for indices in track(list(map(world.shard, batches)), "validation"):
        if not indices:
            continue
        loss, ntoks = feed.loss(model, *feed.inputs(examples, indices, collate(examples, indices)))
        total, count = total + loss * ntoks, count + ntoks
        mx.eval(total, count)
    with world.waiting("to finish validation"):
        total, count = world.sum(total), world.sum(count)
        mx.eval(total, count)
    model.train(was_training)
    return (total / count).item()


@dataclass
class TrainResult:
    adapter_path: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss of every step
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss
    best_step: Optional[int] = None  # with early stopping: the step whose adapter was kept
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_gb: float = 0.0


def make_step(model: nn.Module, optimizer: optim.Optimizer, world: distributed.World = distributed.SOLO,
              feed: Feed = PLAIN):
    """The compiled step and the state it reads and writes."""

    def summed_loss(model: nn.Module, *inputs: mx.array) -> tuple[mx.array, mx.array]:
        """Loss summed over the targets: summed gradients of several batches, divided by their
        total target count, are the gradient of the one batch they make together (up to fp32
        summation order)."""
        loss, ntoks = feed.loss(model, *inputs)
        return loss * ntoks, ntoks

    loss_and_grad = nn.value_and_grad(model, summed_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, acc, update: bool):
        """Add one batch's summed loss, target count and gradient to `acc`; on `update`, step
        with their ratio: the gradient of the mean over all the accumulated batches' targets."""
        (loss, ntoks), grads = loss_and_grad(model, *batch)
        if acc is not None:
            loss, ntoks, grads = loss + acc[0], ntoks + acc[1], tree_map(mx.add, grads, acc[2])
        if update:
            loss, ntoks, grads = distributed.sum_over(world, loss, ntoks, grads)  # the global batch's sums
            optimizer.update(model, tree_map(lambda g: g / ntoks, grads))
        return loss, ntoks, grads

    return step, state


def grads_finite(grads) -> mx.array:
    return mx.stack([mx.isfinite(g).all() for _, g in tree_flatten(grads)]).all()


def train(cfg: TrainConfig, log=print) -> TrainResult:
    world = distributed.init(cfg.peer_timeout)
    log = log if world.main else distributed.quiet
    out = Path(cfg.adapter_path)
    if world.main:
        check_writable(out, "--adapter-path")
        remove_stale(out)
        remove_stale(out / CHECKPOINTS)
    mx.random.seed(cfg.seed)
    base = load_base(cfg.model)
    data_dir = resolve_data(cfg.data)
    data = load_dataset(data_dir, base.tokenizer, cfg.max_seq_length, cfg.train_on_prompt, log=log)
    model = base.model
    pack_length = cfg.max_seq_length if cfg.pack else None
    accumulate = cfg.grad_accumulation_steps
    per_epoch = batches_per_epoch(data["train"], cfg.batch_size, pack_length) / accumulate
    iters = cfg.iters if cfg.epochs is None else max(1, round(cfg.epochs * per_epoch))
    optimizer = optim.AdamW(learning_rate=learning_rate(cfg, iters), weight_decay=cfg.weight_decay)
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
    distributed.check_group(world, cfg, data, trainable)
    if world.size > 1:
        log(f"group of {world.size} processes: each computes 1/{world.size} of every batch of {cfg.batch_size} rows")
    if cfg.pack:
        enable_packing(model, base.config.get("model_type", "?"))
    if cfg.grad_checkpoint:
        checkpoint_blocks(model)
    run_config = {**asdict(cfg), "model": base.name, "data": str(data_dir.resolve()), "resume": None}
    feed = make_feed(model, min(adapter.layers), data["train"], cfg.prefix_cache, cfg.pack, log)
    step, state = make_step(model, optimizer, world, feed)

    def train_step(batches) -> tuple[float, bool, int]:
        """One optimizer step over `accumulate` batches: (mean loss per target, gradients finite, tokens read)."""
        acc, ntokens = None, 0
        for i in range(accumulate):
            rows, batch, count = next(batches)
            acc, ntokens = step(feed.inputs(data["train"], rows, batch), acc, i == accumulate - 1), ntokens + count
        finite = grads_finite(acc[2])
        with world.waiting("in a step"):
            mx.eval(state, acc, finite)
        return (acc[0] / acc[1]).item(), finite.item(), ntokens

    stopping = None if cfg.early_stopping_patience is None else EarlyStopping(cfg.early_stopping_patience)
    if stopping and cfg.resume and progress.early_stopping:
        stopping = EarlyStopping(cfg.early_stopping_patience, **progress.early_stopping, best_weights=read_best(last_saved))

    def validate(at: int, observe: bool = True) -> None:
        result.val_losses[at] = evaluate(model, data["valid"], cfg.batch_size, cfg.val_batches, world, feed)
        monitor.validation(at, result.val_losses[at])
        if stopping and observe:
            stopping.observe(at, result.val_losses[at], adapter_weights(model))

    def save_checkpoint_at(at: int) -> Path:
        path = checkpoint_dir(out, at)
        if world.main:  # `accumulate` batches per step, so the data position follows from the step
            counters, best = (stopping.counters(), stopping.best_weights) if stopping else ({}, None)
            state = TrainerState(at, at * accumulate, rng_key(), run_config, counters)
            save_checkpoint(path, model, adapter, optimizer, state, best)
        return path

    result = TrainResult(out, iters)
    # bar or plain lines, metrics.jsonl, loss.png: rank 0's alone
    monitor = TrainMonitor(cfg, out, iters, log) if world.main else distributed.Silent()
    model.train()
    validate(progress.step, observe=not cfg.resume)  # a resumed run observed this step before, or never would have
    mx.reset_peak_memory()
    total_tokens, window_tokens, window_start = 0, 0, time.perf_counter()
    start = window_start
    batches = iterate_batches(data["train"], cfg.batch_size, cfg.seed, start=progress.batches_seen, pack_length=pack_length,
                              shard=world.shard)
    it = progress.step  # the last step done, also when the loop has none left to do
    with deferred_stop() as stop:
        for it in range(progress.step + 1, iters + 1):
            loss, finite, ntokens = train_step(batches)
            result.losses.append(loss)
            if not (math.isfinite(loss) and finite):
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
            interrupted = world.any(stop.signum is not None) and it != iters  # the whole group stops at one step
            if interrupted or (cfg.save_every and it % cfg.save_every == 0 and it != iters):
                last_saved = save_checkpoint_at(it)
            if interrupted:
                monitor.close()
                signum = stop.signum or signal.SIGTERM  # in a group: the signal reached another rank
                name = signal.Signals(signum).name
                raise Interrupted(f"stopped by {name} after step {it}/{iters}; resume with: {resume_command(last_saved)}", signum)
            if stopping and stopping.exhausted:
                log(f"early stopping at step {it}: no better val loss in the last {stopping.patience} validations")
                break
    result.steps = it
    if it not in result.val_losses:
        validate(it)
    if stopping:
        model.load_weights(list(stopping.best_weights.items()), strict=False)
        result.best_step = stopping.best_step
        log(f"keeping the adapter of step {stopping.best_step}, the best val loss ({stopping.best_loss:.3f})")
    adapter.training = method_options(cfg)
    if stopping:
        adapter.training |= {"steps": it, "best_step": stopping.best_step, "best_val_loss": stopping.best_loss}
    if world.main:
        save_adapter(out, model, adapter)
    result.seconds = time.perf_counter() - start
    result.tokens_per_second = total_tokens / result.seconds
    result.peak_memory_gb = mx.get_peak_memory() / 2**30
    monitor.close()
    first, last = result.val_losses[progress.step], stopping.best_loss if stopping else result.val_losses[it]
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
    lengths = [len(e.tokens) for e in examples]
    longest = min(cfg.max_seq_length, sum(lengths) if cfg.pack else max(lengths))  # a pack fills up to the limit
    seq_len = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    batch = min(cfg.batch_size, len(examples))
    est = memory.estimate_training_memory(base.model, base.config, batch, seq_len, cfg.grad_checkpoint)
    available = memory.available_bytes()
    log(f"memory: about {est.total / memory.GB:.2f} GB at peak (batch {batch} x {seq_len} tokens) of {available / memory.GB:.1f} GB")
    memory.check_fits(est, batch, seq_len, available)
