"""`mlx-lora train`: build the run from its options, then fit it; a flat loop that reports and saves.

build_run() loads the base, the data and the adapter (new or resumed) and prepares the compiled
step; fit() runs the steps, with `if step % n == 0` blocks for reports, validation and checkpoints.
"""

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten
from mlx_lm.utils import get_total_parameters

from mlx_lora import blas
from mlx_lora.atomic import check_writable, claim_dir, mark_dir, remove_stale
from mlx_lora.config import LoRAConfig, TrainConfig, data_part, lora_part, method_options, split_list
from mlx_lora.data.batches import batch_plan, batches_per_epoch, iterate_batches, planned_rows
from mlx_lora.data.cache import cache_location
from mlx_lora.data.dataset import Encoding, load_splits
from mlx_lora.data.examples import Example
from mlx_lora.data.mapping import map_rows
from mlx_lora.data.marking import mask_report
from mlx_lora.data.sources import open_source, train_valid_rows
from mlx_lora.distributed import group as distributed
from mlx_lora.errors import Interrupted, UserError
from mlx_lora.formats.native import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    adapter_weights,
    describe,
    save_adapter,
)
from mlx_lora.model.base import Base, load_base
from mlx_lora.model.cpu_kernels import use_cpu_kernels
from mlx_lora.model.lora import apply_lora, first_adapted_block
from mlx_lora.model.precision import materialize
from mlx_lora.reporting.metrics import METRICS, TENSORBOARD_DIR, MetricsLog
from mlx_lora.reporting.monitor import TrainMonitor
from mlx_lora.reporting.plot import LOSS_PNG
from mlx_lora.training.checkpoint import (
    CHECKPOINTS,
    TRAIN,
    TrainerState,
    checkpoint_dir,
    find_checkpoint,
    load_checkpoint,
    read_best,
    resume_command,
    rng_key,
    save_checkpoint,
)
from mlx_lora.training.early_stopping import EarlyStopping
from mlx_lora.training.feed import Feed, make_feed
from mlx_lora.training.grad_checkpoint import checkpoint_blocks
from mlx_lora.training.grpo import PolicyLoss
from mlx_lora.training.grpo_step import VALID_ROLLOUTS, GrpoStep, Sampling, grpo_cut, read_prompts
from mlx_lora.training.init_adapter import apply_initial, from_adapter
from mlx_lora.training.memory import BatchLimits, check_training_memory
from mlx_lora.training.objectives import Objective
from mlx_lora.training.packing import enable_packing
from mlx_lora.training.preference import PreferenceFeed, make_preference_feed
from mlx_lora.training.rewards import make_rewards
from mlx_lora.training.schedule import learning_rate
from mlx_lora.training.signals import deferred_stop
from mlx_lora.training.step import grads_finite, make_step
from mlx_lora.training.streaming import Split, rank_rows, splits, streamed_feed, why_not_stream
from mlx_lora.training.validation import mean_loss
from mlx_lora.training.vision import VisionFeed, vision_refusals, vision_sets

# The names a run writes in --adapter-path (wandb makes its own directory there).
TRAIN_WRITES = {
    ADAPTER_WEIGHTS,
    ADAPTER_CONFIG,
    METRICS,
    LOSS_PNG,
    TENSORBOARD_DIR,
    "wandb",
    CHECKPOINTS,
    VALID_ROLLOUTS,
}


@dataclass
class TrainResult:
    adapter_path: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # training loss of every step
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss
    val_rewards: dict[int, float] = field(default_factory=dict)  # grpo: step -> mean reward on the valid prompts
    best_step: Optional[int] = None  # with early stopping: the step whose adapter was kept
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    peak_memory_gb: float = 0.0


@dataclass
class Run:
    """A run ready to fit: the model with its adapter applied, the data, the optimizer and the
    compiled step, and where a resumed run continues from."""

    cfg: TrainConfig
    world: distributed.World
    log: Callable[[str], None]
    out: Path
    base: Base
    data: dict[str, Sequence[Example]]
    adapter: AdapterConfig
    optimizer: optim.Optimizer
    progress: TrainerState  # where this run starts: step 0, or the checkpoint's
    iters: int
    feed: Feed | None  # None for grpo, whose step samples what it reads
    step: Callable | GrpoStep
    state: list  # what the compiled step reads and writes
    run_config: dict[str, Any]  # saved in checkpoints, so --resume alone restores the options
    monitor: Any  # TrainMonitor on rank 0, distributed.Silent elsewhere
    stopping: Optional[EarlyStopping] = None
    last_saved: Optional[Path] = None

    def train_step(self, batches: Iterator) -> tuple[float, bool, int, dict[str, float]]:
        """One optimizer step over the accumulated batches: (mean loss per target, gradients finite,
        tokens read, the feed's statistics per pair: rewards and accuracy of a preference objective)."""
        accumulate, examples = self.cfg.grad_accumulation_steps, self.data["train"]
        acc, ntokens = None, 0
        for i in range(accumulate):
            rows, batch, count = next(batches)
            acc = self.step(self.feed.inputs(examples, rows, batch), acc, i == accumulate - 1)
            ntokens += count
        finite = grads_finite(acc[2])
        with self.world.waiting("in a step"):
            mx.eval(self.state, acc, finite)
        stats = dict(zip(self.feed.stats, (acc[3] / acc[1]).tolist())) if self.feed.stats else {}
        return (acc[0] / acc[1]).item(), finite.item(), ntokens, stats

    def report(self, it: int, losses: list[float], stats: list[dict], tokens: int, seconds: float) -> None:
        """The report of the steps since the last: mean loss (and statistics), throughput, memory."""
        means = {k: sum(s[k] for s in stats) / len(stats) for k in (stats[0] if stats else {})}
        self.monitor.report(
            it,
            sum(losses) / len(losses),
            tokens / seconds,
            mx.get_peak_memory() / 2**30,
            self.optimizer.learning_rate.item(),
            **means,
        )

    def validate(self, result: TrainResult, at: int, observe: bool = True) -> None:
        cfg = self.cfg
        if cfg.objective == "grpo":
            return self.validate_rewards(result, at)
        stats = {}
        model, valid = self.base.model, self.data["valid"]
        loss = mean_loss(model, valid, cfg.batch_size, cfg.val_batches, self.world, self.feed, stats=stats)
        result.val_losses[at] = loss
        self.monitor.validation(at, loss, **stats)
        if self.stopping and observe:
            self.stopping.observe(at, loss, adapter_weights(self.base.model))

    def validate_rewards(self, result: TrainResult, at: int) -> None:
        """GRPO: the mean reward of rollouts on the valid prompts (--val-batches batches of
        --batch-size, in file order), sampled from --seed; the rollouts go to VALID_ROLLOUTS."""
        cfg, valid = self.cfg, self.data["valid"]
        count = len(valid) if cfg.val_batches == -1 else cfg.val_batches * cfg.batch_size
        batches = [valid[i : i + cfg.batch_size] for i in range(0, min(count, len(valid)), cfg.batch_size)]
        append = bool(cfg.resume) or bool(result.val_rewards)  # a fresh run starts the file afresh
        stats = self.step.validate(batches, cfg.seed, self.out, at, append)
        result.val_rewards[at] = stats.pop("reward")
        stats.pop("reward_std"), stats.pop("completion_length")
        self.monitor.reward_validation(at, result.val_rewards[at], **stats)

    def save_or_stop(self, it: int, signum: Optional[int]) -> None:
        """A checkpoint every --save-every steps, and on a signal, which then ends the run (a group
        stops at one step)."""
        interrupted = self.world.any(signum is not None) and it != self.iters
        if interrupted or (self.cfg.save_every and it % self.cfg.save_every == 0 and it != self.iters):
            self.save_checkpoint(it)
        if interrupted:
            raise interruption(signum, it, self.iters, self.last_saved)

    def finish(self, result: TrainResult, it: int, start: float) -> TrainResult:
        """After the last step `it`: its validation unless done, the adapter saved, the totals."""
        result.steps = it
        if it not in result.val_losses and it not in result.val_rewards:
            self.validate(result, it)
        save_result(self, result)
        result.seconds = time.perf_counter() - start
        result.peak_memory_gb = mx.get_peak_memory() / 2**30
        return result

    def save_checkpoint(self, at: int) -> None:
        path = checkpoint_dir(self.out, at)
        if self.world.main:  # `accumulate` batches per step, so the data position follows from the step
            counters, best = (self.stopping.counters(), self.stopping.best_weights) if self.stopping else ({}, None)
            state = TrainerState(at, at * self.cfg.grad_accumulation_steps, rng_key(), self.run_config, counters)
            save_checkpoint(path, self.base.model, self.adapter, self.optimizer, state, best)
        self.last_saved = path


def train(cfg: TrainConfig, log=print) -> TrainResult | None:
    if cfg.show_mask:
        return show_mask(cfg, log)
    run = build_run(cfg, log)
    try:
        result = fit_grpo(run) if cfg.objective == "grpo" else fit(run)
    except BaseException:
        with contextlib.suppress(UserError):  # a full disk fails loss.png too; the first error is the one to show
            run.monitor.close()
        raise
    run.monitor.close()  # bar, metrics.jsonl and loss.png
    if cfg.objective == "grpo":
        first, last = result.val_rewards[run.progress.step], result.val_rewards[result.steps]
        run.log(
            f"done in {result.seconds:.1f}s: val reward {first:.3f} -> {last:.3f}; adapter saved to {run.out}{os.sep}"
        )
        return result
    first = result.val_losses[run.progress.step]
    last = run.stopping.best_loss if run.stopping else result.val_losses[result.steps]
    run.log(
        f"done in {result.seconds:.1f}s: val loss {first:.3f} -> {last:.3f} "
        f"({100 * (last - first) / first:+.1f}%); adapter saved to {run.out}{os.sep}"
    )
    return result


def show_mask(cfg: TrainConfig, log=print) -> None:
    """--show-mask N: the first N training rows as the loss sees them; nothing is trained or written."""
    if cfg.objective != "sft":
        raise UserError(f"--show-mask shows sft rows; --objective {cfg.objective} trains on each whole completion")
    base = load_base(cfg.model, lazy=True, compute=cfg.compute_dtype)
    sets = read_data(cfg, open_source(cfg.data, cfg.data_config, log), base, log)
    for line in mask_report(base.tokenizer, sets["train"], cfg.show_mask, colour=sys.stdout.isatty()):
        log(line)


def build_run(cfg: TrainConfig, log=print) -> Run:
    """Everything before the first step; refuses (UserError) what cannot run."""
    world = distributed.init(cfg.peer_timeout)
    cfg, initial = from_adapter(cfg)  # --init-adapter's LoRA options (and base) become the run's
    log = log if world.main else distributed.quiet
    out = Path(cfg.adapter_path)
    if world.main:
        claim_output(out)
    mx.random.seed(cfg.seed)
    base = load_base(cfg.model, lazy=True, compute=cfg.compute_dtype)  # streamed: frozen blocks never read whole
    use_cpu_kernels(base.model, training=True, decoding=cfg.objective == "grpo", log=log)  # grpo samples
    source = open_source(cfg.data, cfg.data_config, log)
    data = read_data(cfg, source, base, log)
    per_epoch = batches_per_epoch(data["train"], cfg.batch_size, cfg.max_seq_length if cfg.pack else None)
    per_epoch /= cfg.grad_accumulation_steps
    iters = cfg.iters if cfg.epochs is None else max(1, round(cfg.epochs * per_epoch))
    lr = learning_rate(cfg.learning_rate_value, cfg.lr_schedule, cfg.warmup_steps, cfg.final_lr_ratio, iters)
    optimizer = optim.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay)
    last_saved = find_checkpoint(cfg.resume) if cfg.resume else None
    progress, adapter = start_adapter(cfg, base, optimizer, last_saved, initial, log)
    trainable = sum(v.size for _, v in tree_flatten(base.model.trainable_parameters()))
    log(
        f"model {base.name}: {cfg.summary()} on {len(adapter.modules)} modules in blocks "
        f"{adapter.layers}; {trainable:,} trainable parameters "
        f"({100 * trainable / get_total_parameters(base.model):.3f}%); learning rate {cfg.learning_rate_text}"
    )
    first = first_adapted_block(base.model)  # 0 where a layer sits outside the blocks (a vision tower's)
    stream = choose_memory(cfg, world, base, data, first=first, progress=progress, iters=iters, log=log)
    if blas.note():  # once the run is sure to start, so an error stays one line
        log(blas.note())
    distributed.check_group(world, data, trainable, iters=cfg.iters, batch_size=cfg.batch_size, seed=cfg.seed)
    if world.size > 1:
        log(f"group of {world.size} processes: each computes 1/{world.size} of every batch of {cfg.batch_size} rows")
    if cfg.pack:
        enable_packing(base.model, base.config.get("model_type", "?"))
    if cfg.grad_checkpoint:
        checkpoint_blocks(base.model)
    feed = choose_feed(cfg, world, base.model, first, data, log, stream, processor=base.processor)
    step, state = choose_step(cfg, base, optimizer, world, feed, first, data, log)
    return Run(
        cfg=cfg,
        world=world,
        log=log,
        out=out,
        base=base,
        data=data,
        adapter=adapter,
        optimizer=optimizer,
        progress=progress,
        iters=iters,
        feed=feed,
        step=step,
        state=state,
        run_config={**asdict(cfg), "model": base.name, "data": source.origin, "resume": None},
        # bar or plain lines, metrics.jsonl, loss.png: rank 0's alone
        monitor=start_monitor(cfg, world, out, iters, log),
        stopping=early_stopping(cfg, last_saved, progress),
        last_saved=last_saved,
    )


def claim_output(out: Path) -> None:
    """Before any work: none of the names a run writes is taken in --adapter-path, unless by a
    previous run (other files are left alone); what a killed save left there is cleared."""
    check_writable(out, "--adapter-path")
    claim_dir(out, TRAIN, "--adapter-path", writes=TRAIN_WRITES)
    remove_stale(out)
    remove_stale(out / CHECKPOINTS)


def start_monitor(cfg: TrainConfig, world, out: Path, iters: int, log):
    """Bar or plain lines, metrics.jsonl, loss.png: rank 0's alone, in the directory it marks as train's."""
    if not world.main:
        return distributed.Silent()
    extra = ()
    if cfg.objective == "grpo":
        means = [f"rewards/{name}/mean" for name in split_list(cfg.rewards)]
        extra = (*means, *(f"val_{m}" for m in means))
    metrics = MetricsLog(out, cfg.report_to, append=bool(cfg.resume), options=asdict(cfg), extra=extra)  # may refuse
    mark_dir(out, TRAIN)
    return TrainMonitor(out, iters, metrics, log)


def read_data(cfg: TrainConfig, source, base: Base, log) -> dict[str, list]:
    """The training and validation sets (preference pairs for a preference objective, prompts for grpo;
    a vision-language base's image and text rows, training/vision.py)."""
    tokenizer = base.tokenizer
    if base.processor is not None:
        masking = dict(train_on_prompt=cfg.train_on_prompt, train_on_reasoning=cfg.train_on_reasoning)
        return vision_sets(source, data_part(cfg), base, cfg.max_seq_length, log, **masking)
    if cfg.objective == "grpo":
        rows = train_valid_rows(source, data_part(cfg), log)
        return {role: read_prompts(map_rows(r, data_part(cfg)), tokenizer) for role, r in zip(("train", "valid"), rows)}
    sets = load_splits(
        source,
        data_part(cfg),
        tokenizer,
        Encoding(cfg.max_seq_length, cfg.train_on_prompt, cfg.train_on_reasoning),
        objective=cfg.objective if cfg.preference else None,
        cache_dir=cache_location(cfg.data_cache, cfg.cache_data, log),
        log=log,
    )
    return {role: split.examples for role, split in sets.items()}


def objective(cfg: TrainConfig) -> Objective:
    return Objective(cfg.objective, cfg.beta_value, cfg.label_smoothing, cfg.simpo_gamma, cfg.cpo_alpha)


def choose_memory(
    cfg: TrainConfig,
    world: distributed.World,
    base: Base,
    data: dict,
    *,
    first: int,
    progress: TrainerState,
    iters: int,
    log,
) -> Optional[list[Split]]:
    """Refuse a run the machine cannot hold, or a vision-language run what it does not do yet
    (vision.vision_refusals; such a run is not sized here, and runs in memory). Streamed: the splits
    to stream, each with the rows this process reads (from where the run starts, `progress`, to its
    last step, `iters`); else None, and the lazily loaded model is read whole now, as an in-memory
    run always was."""
    refusals = vision_refusals(cfg.objective, cfg.pack, cfg.stream_prefix, world.size) if base.processor else []
    if refusals:
        raise UserError("\n".join(refusals))
    if cfg.objective == "grpo" or base.processor is not None:  # no frozen prefix to stream: the whole model runs
        materialize(base.model)
        return None
    why_not, rows = why_not_stream(cfg, base, first), None
    if why_not is None:  # only the rows this process reads (a rank its own share), from where it starts
        ahead = (iters - progress.step) * cfg.grad_accumulation_steps  # the batches still to read
        todo = range(progress.batches_seen, progress.batches_seen + ahead)
        rows = rank_rows(data, world, cfg.batch_size, cfg.seed, cfg.val_batches, todo)
    if check_training_memory(
        base,
        data,
        BatchLimits.of(cfg),
        rows=rows,
        stream=cfg.stream_prefix,
        requested=cfg.compute_dtype,
        why_not=why_not,
        log=log,
    ):
        return splits(data, rows)
    materialize(base.model)
    return None


def choose_feed(
    cfg: TrainConfig,
    world: distributed.World,
    model,
    first_trained: int,
    data: dict,
    log,
    stream: Optional[list[Split]],
    processor=None,
) -> Feed | PreferenceFeed:
    """SFT: the fastest feed the model allows; streamed, the frozen blocks' output computed now,
    block by block, over the rows in `stream`. Preference: the same cut over pairs, with the
    reference log-probs computed now, once. GRPO: none, its step samples what it reads. A
    vision-language base (its `processor`): the language model on embeddings with images merged in."""
    if cfg.objective == "grpo":
        return None
    if processor is not None:
        return VisionFeed(
            model, processor, log, first_trained=first_trained, cache_prefix=cfg.prefix_cache, examples=data["train"]
        )
    # a batch's rows share their first tokens' pass through the trained blocks only where those
    # are the same in every row: no dropout, and no recomputed block that would keep its keys inside
    share_heads = cfg.dropout == 0 and not cfg.grad_checkpoint
    if stream is not None:
        return streamed_feed(model, first_trained, stream, log, share_heads)
    if not cfg.preference:
        return make_feed(model, first_trained, data["train"], cfg.prefix_cache, cfg.pack, log, share_heads)
    return make_preference_feed(
        model, first_trained, data, objective(cfg), cfg.batch_size, cfg.prefix_cache, log, world
    )


def choose_step(
    cfg: TrainConfig, base: Base, optimizer: optim.Optimizer, world: distributed.World, feed, first: int, data, log
):
    """The compiled step and its state; for grpo the GrpoStep, which samples, scores and updates,
    on the model cut before its `first` trained block where the cut checks out."""
    if cfg.objective != "grpo":
        return make_step(base.model, optimizer, world, feed)
    cut = grpo_cut(base.model, first, data["train"], log)
    sampling = Sampling(cfg.group_size, cfg.max_completion_tokens, cfg.temperature, cfg.top_p)
    loss = PolicyLoss(cfg.loss_type, cfg.beta_value, cfg.epsilon, cfg.epsilon_high_value, cfg.max_completion_tokens)
    rewards = make_rewards(split_list(cfg.rewards), cfg.format_regex)
    weights = cfg.reward_weight_values
    step = GrpoStep(
        base.model, base.tokenizer, optimizer, sampling, loss, rewards, weights, cfg.grpo_iterations, cut, world
    )
    return step, []


def start_adapter(cfg: TrainConfig, base: Base, optimizer: optim.Optimizer, checkpoint: Optional[Path], initial, log):
    """A new adapter on `base` (fresh, or `initial`'s (config, weights) from --init-adapter), or the
    checkpoint's with its optimizer state: (where to start, its config)."""
    if checkpoint:
        progress, adapter = load_checkpoint(checkpoint, base, cfg, optimizer)
        log(f"resuming from {checkpoint} after step {progress.step}")
        return progress, adapter
    if initial:
        adapter = apply_initial(base, *initial, Path(cfg.init_adapter))
        log(f"starting from the adapter in {cfg.init_adapter}: its weights, a fresh optimizer, step 0")
    else:
        lora = LoRAConfig(**lora_part(cfg))
        adapter = describe(base, lora, apply_lora(base.model, lora))
    optimizer.init(base.model.trainable_parameters())
    return TrainerState(step=0, batches_seen=0, rng_key=rng_key()), adapter


def early_stopping(cfg: TrainConfig, checkpoint: Optional[Path], progress: TrainerState) -> Optional[EarlyStopping]:
    """A new watch, or the one a resumed checkpoint saved (counters and best adapter so far)."""
    if cfg.early_stopping_patience is None:
        return None
    if checkpoint and progress.early_stopping:
        return EarlyStopping(cfg.early_stopping_patience, **progress.early_stopping, best_weights=read_best(checkpoint))
    return EarlyStopping(cfg.early_stopping_patience)


def fit(run: Run) -> TrainResult:
    """The steps from where the run starts to its last, then the adapter saved."""
    cfg, model, monitor, stopping = run.cfg, run.base.model, run.monitor, run.stopping
    result = TrainResult(run.out, run.iters)
    model.train()
    run.validate(result, run.progress.step, observe=not cfg.resume)  # a resumed run observed this step already
    mx.reset_peak_memory()
    total_tokens, window_tokens, window_start, window_stats = 0, 0, time.perf_counter(), []
    start = window_start
    batches = iterate_batches(
        run.data["train"],
        cfg.batch_size,
        cfg.seed,
        start=run.progress.batches_seen,
        pack_length=cfg.max_seq_length if cfg.pack else None,
        shard=run.world.shard,
        collate_rows=run.feed.collate,
    )
    if not cfg.pack:
        reads = (run.iters - run.progress.step) * cfg.grad_accumulation_steps
        plan = planned_rows(
            run.data["train"], cfg.batch_size, cfg.seed, run.progress.batches_seen, reads, run.world.shard
        )
        run.feed.read_ahead(run.data["train"], plan)
    it = run.progress.step  # the last step done, also when the loop has none left to do
    with deferred_stop() as stop:
        for it in range(run.progress.step + 1, run.iters + 1):
            loss, finite, ntokens, stats = run.train_step(batches)
            result.losses.append(loss)
            window_stats.append(stats)
            if not (math.isfinite(loss) and finite):
                raise UserError(numerical_fault(it, loss, run.out, run.last_saved))
            monitor.step(loss)
            total_tokens, window_tokens = total_tokens + ntokens, window_tokens + ntokens
            if it % cfg.report_every == 0 or it == run.iters:
                now = time.perf_counter()
                run.report(it, result.losses[-cfg.report_every :], window_stats, window_tokens, now - window_start)
                window_tokens, window_start, window_stats = 0, now, []
            if cfg.val_every and it % cfg.val_every == 0 and it != run.iters:
                run.validate(result, it)
            run.save_or_stop(it, stop.signum)
            if stopping and stopping.exhausted:
                run.log(f"early stopping at step {it}: no better val loss in the last {stopping.patience} validations")
                break
    run.finish(result, it, start)
    result.tokens_per_second = total_tokens / result.seconds
    return result


def fit_grpo(run: Run) -> TrainResult:
    """fit() for --objective grpo: each step samples, scores and updates (training/grpo_step.py) on
    --grad-accumulation-steps batches of prompts, in data/batches.batch_plan's order from where
    the run starts, so a resumed run reads what an uninterrupted one would; in a group each rank
    its share of each batch's prompts."""
    cfg, prompts = run.cfg, run.data["train"]
    result = TrainResult(run.out, run.iters)
    run.validate(result, run.progress.step)
    mx.reset_peak_memory()
    start, window = time.perf_counter(), []
    plan = islice(batch_plan(prompts, cfg.batch_size, cfg.seed), run.progress.batches_seen, None)
    it = run.progress.step  # the last step done, also when the loop has none left to do
    with deferred_stop() as stop:
        for it in range(run.progress.step + 1, run.iters + 1):
            batches = [[prompts[i] for i in run.world.shard(next(plan))] for _ in range(cfg.grad_accumulation_steps)]
            stats = run.step.step(batches)
            loss, finite = stats.pop("loss"), stats.pop("finite")
            if not (math.isfinite(loss) and finite):
                raise UserError(numerical_fault(it, loss, run.out, run.last_saved))
            result.losses.append(loss)
            run.monitor.step(loss)
            window.append({"loss": loss, **stats})
            if it % cfg.report_every == 0 or it == run.iters:
                means = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                lr = run.optimizer.learning_rate.item()
                run.monitor.rollout_report(it, means.pop("loss"), mx.get_peak_memory() / 2**30, lr, **means)
                window = []
            if cfg.val_every and it % cfg.val_every == 0 and it != run.iters:
                run.validate(result, it)
            run.save_or_stop(it, stop.signum)
    return run.finish(result, it, start)


def save_result(run: Run, result: TrainResult) -> None:
    """The adapter the run keeps (with early stopping: the best one), with how it was trained."""
    stopping = run.stopping
    if stopping:
        run.base.model.load_weights(list(stopping.best_weights.items()), strict=False)
        result.best_step = stopping.best_step
        run.log(f"keeping the adapter of step {stopping.best_step}, the best val loss ({stopping.best_loss:.3f})")
    run.adapter.training = method_options(run.cfg)
    if stopping:
        run.adapter.training |= {
            "steps": result.steps,
            "best_step": stopping.best_step,
            "best_val_loss": stopping.best_loss,
        }
    if run.world.main:
        save_adapter(run.out, run.base.model, run.adapter)


def interruption(signum: Optional[int], step: int, iters: int, last_saved: Path) -> Interrupted:
    signum = signum or signal.SIGTERM  # in a group: the signal reached another rank
    name = signal.Signals(signum).name
    return Interrupted(
        f"stopped by {name} after step {step}/{iters}; resume with: {resume_command(last_saved)}", signum
    )


def numerical_fault(step: int, loss: float, out: Path, last_saved: Optional[Path]) -> str:
    what = f"the loss is {loss}" if not math.isfinite(loss) else "a gradient is not finite"
    if last_saved is None:
        return (
            f"step {step}: {what}; stopped with nothing saved ({out} left as it was); "
            "lower --learning-rate or check the data, and start again"
        )
    return (
        f"step {step}: {what}; stopped, {out} left as it was; the last good checkpoint is {last_saved}: "
        f"lower --learning-rate and continue with {resume_command(last_saved)} --learning-rate <smaller>"
    )
