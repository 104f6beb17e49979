"""One GRPO step: rollouts sampled and scored, then the adapter updated on them.

A step reads --grad-accumulation-steps batches of --batch-size prompts. Each batch's prompts get G
completions each from the current adapter (rollouts.sample, in eval mode), scored by the rewards
(their weighted sum); a group whose rewards are all equal has advantage 0 everywhere, teaches
nothing, and is left out of the update (and counted). The kept completions' log-probs under the
policy that sampled them (`old`, with more than one iteration) and, with beta > 0, under the base
with the adapter off (the reference: no second model) are computed once; then --grpo-iterations
optimizer updates each sum the gradients of all the step's batches and divide by their total
count, so accumulated batches give the gradient of the one batch they make together, as
training/step.py does for SFT.

In a group under mlx.launch each rank gets a share of every batch's prompts (whole groups, so
advantages stay per group), samples and scores them, and the update sums the gradients, the
normalisers (dapo's completion tokens, the completions of the others) and the metrics' sums over
the ranks before dividing: the one-process update on the whole batch up to fp32 summation order.
Each rank samples from its own key, split by rank from the group's (own_draws).

Validation samples the valid prompts the same way, from a fixed seed (so validations compare
like with like and the training draws are left as they were), and appends every completion with
its rewards to valid_rollouts.jsonl beside the adapter. In a group every rank samples them all,
from the same seed, and rank 0 writes them.
"""

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlx_lora.data.rows import Row
from mlx_lora.distributed.group import SOLO, World, sum_over
from mlx_lora.model.lora import adapter_off
from mlx_lora.training import rollouts
from mlx_lora.training.checkpoint import restore_rng, rng_key
from mlx_lora.training.cut import Cut, find_cut
from mlx_lora.training.grpo import PolicyLoss, group_advantages, policy_loss
from mlx_lora.training.rewards import Reward, Task, score_all, task
from mlx_lora.training.step import grads_finite

VALID_ROLLOUTS = "valid_rollouts.jsonl"


@dataclass(frozen=True)
class Prompt:
    """A prompt row: its task (prompt text, reference, fields) and the prompt's tokens, which
    data/batches.batch_plan reads as an example's."""

    task: Task
    tokens: list[int]

    def __bytes__(self) -> bytes:
        """What ranks of a group compare (distributed.group.checksum): the tokens and the reference."""
        return np.array(self.tokens, np.int64).tobytes() + self.task.reference.encode()


def read_prompts(rows: list[Row], tokenizer) -> list[Prompt]:
    return [Prompt(*task(row, tokenizer)) for row in rows]


def grpo_cut(model: nn.Module, first_trained: int, prompts: list[Prompt], log: Callable = print) -> Cut | None:
    """The model cut before its first trained block, checked on the shortest prompt (cut.find_cut)."""
    cut = find_cut(model, first_trained, mx.array([min((p.tokens for p in prompts), key=len)]), log)
    if cut is not None and cut.k:
        log(f"speed: blocks 0-{first_trained - 1} are frozen; their output is computed once per batch of rollouts")
    return cut


@contextmanager
def own_draws(world: World):
    """In a group, this rank samples from its own key, split by rank from the group's key, which
    then moves on to a key of its own, the same on every rank (so rank 0's checkpoint serves all).
    Alone, the draws are mx.random's as they are."""
    if world.size == 1:
        yield
        return
    keys = mx.random.split(mx.random.state[0], world.size + 1)  # (size + 1, 2)
    restore_rng(keys[world.rank + 1].tolist())
    try:
        yield
    finally:
        restore_rng(keys[0].tolist())


@dataclass(frozen=True)
class Sampling:
    group_size: int
    max_tokens: int
    temperature: float
    top_p: float


@dataclass(frozen=True)
class Scored:
    """A batch's rollouts: completions (N = prompts x G) as tokens and text, and each reward's score (N, R)."""

    completions: list[list[int]]
    texts: list[str]
    scores: np.ndarray


@dataclass(frozen=True)
class Update:
    """What the updates read of the kept groups: their Sequences (n rows, C completion positions),
    the states entering the cut's first trained block (n, L-1, D) or None, advantages (n,), and
    the per-token log-probs (n, C) of the policy that sampled (`old`; None with one update, which
    that policy makes itself) and of the reference (None without beta)."""

    seqs: rollouts.Sequences
    states: mx.array | None
    advantages: mx.array
    old: mx.array | None
    reference: mx.array | None


class GrpoStep:
    """The step and the validation of a GRPO run on `model` (its adapter applied). With a `cut`
    (training/cut.py) the frozen blocks run once per batch of rollouts, for every pass over it,
    and the output projection only on completion positions."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        optimizer: optim.Optimizer,
        sampling: Sampling,
        loss: PolicyLoss,
        rewards: list[Reward],
        weights: list[float],
        iterations: int = 1,
        cut: Cut | None = None,
        world: World = SOLO,
    ):
        self.model, self.tokenizer, self.optimizer = model, tokenizer, optimizer
        self.sampling, self.loss, self.rewards, self.iterations = sampling, loss, rewards, iterations
        self.cut, self.world = cut, world
        self.weights = np.array(weights, np.float32)  # (R,)
        self.loss_and_grad = nn.value_and_grad(model, self.summed_loss)

    def roll_out(self, prompts: list[Prompt]) -> Scored:
        """G completions of each prompt from the current adapter, decoded (EOS dropped) and scored."""
        s, tok = self.sampling, self.tokenizer
        self.model.eval()
        completions, _ = rollouts.sample(
            self.model, tok, [p.tokens for p in prompts], s.group_size, s.max_tokens, s.temperature, s.top_p
        )
        eos = set(tok.eos_token_ids)
        texts = [tok.decode(c[:-1] if c[-1] in eos else c) for c in completions]
        scores = [score_all(self.rewards, prompts[i // s.group_size].task, t) for i, t in enumerate(texts)]
        return Scored(completions, texts, np.array(scores, np.float32).reshape(len(texts), len(self.rewards)))

    def prepare(self, prompts: list[Prompt], completions: list[list[int]], advantages: np.ndarray, keep: np.ndarray):
        """The Update of the kept groups (`keep` (prompts,)), or None when none is kept."""
        g = self.sampling.group_size
        rows = [i for i in range(len(completions)) if keep[i // g]]
        if not rows:
            return None
        kept = [p.tokens for p, k in zip(prompts, keep) if k]
        seqs = rollouts.sequences(kept, [completions[i] for i in rows], g)
        self.model.eval()
        cut = self.cut
        states = cut.prefix(seqs.tokens[:, :-1]) if cut is not None and cut.k else None  # (n, L-1, D)
        # one update is made by the policy that sampled (every rollout comes before it): its log-probs
        # are the update's own, as TRL's per_token_logps.detach() when num_iterations == 1
        old = self.logps(self.model, seqs, states) if self.iterations > 1 else None  # (n, C)
        reference = None
        if self.loss.beta:
            with adapter_off(self.model):
                reference = self.logps(self.model, seqs, states)
        mx.eval(states, old, reference)
        return Update(seqs, states, mx.array(advantages[rows]), old, reference)

    def logps(self, model: nn.Module, seqs: rollouts.Sequences, states: mx.array | None) -> mx.array:
        """The completions' per-token log-probs under `model` as it is now, (n, C)."""
        return rollouts.completion_logps(model, seqs, self.cut, states)

    def summed_loss(self, model: nn.Module, u: Update):
        """policy_loss times its count (completion tokens for dapo, completions for the others), so
        the sum over batches (and ranks) divided by the total count is the loss of their union;
        then kl and clip_ratio times what they are means over (completion tokens; gspo's clip:
        completions), and those two counts."""
        logps = self.logps(model, u.seqs, u.states)
        old = mx.stop_gradient(logps) if u.old is None else u.old
        mask = u.seqs.mask
        loss, kl, clip = policy_loss(logps, old, u.reference, u.advantages, mask, self.loss)
        tokens, completions = mask.sum(), mx.array(mask.shape[0], mx.float32)
        count = tokens if self.loss.loss_type == "dapo" else completions
        clipped_over = completions if self.loss.loss_type == "gspo" else tokens
        return loss * count, count, kl * tokens, clip * clipped_over, tokens, clipped_over

    def update(self, updates: list[Update]) -> tuple[float, float, float, bool]:
        """One optimizer update over all the step's batches, and in a group over every rank's (a
        rank with none adds zeros): (loss, kl, clip_ratio, gradients finite)."""
        self.model.train()
        grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        totals = mx.zeros((6,))  # loss x count, count, kl x tokens, clip x its count, tokens, clip's count
        for u in updates:
            sums, g = self.loss_and_grad(self.model, u)
            grads = tree_map(mx.add, grads, g)
            totals = totals + mx.stack(sums)
            mx.eval(grads, totals)
        loss, count, grads, (rest,) = sum_over(self.world, totals[0], totals[1], grads, [totals[2:]])
        grads = tree_map(lambda x: x / count, grads)
        finite = grads_finite(grads)
        self.optimizer.update(self.model, grads)
        with self.world.waiting("in a step"):
            mx.eval(self.model.parameters(), self.optimizer.state, finite, loss, rest)
        kl, clip, tokens, clipped_over = rest.tolist()
        return loss.item() / count.item(), kl / tokens, clip / clipped_over, finite.item()

    def step(self, batches: list[list[Prompt]]) -> dict[str, float]:
        """Rollouts of every batch (in a group: this rank's share of it), then --grpo-iterations
        updates on the kept groups: the step's metrics, over every rank's rollouts. In a group the
        step draws from this rank's own key (--dropout's masks too)."""
        with own_draws(self.world):
            return self.own_step(batches)

    def own_step(self, batches: list[list[Prompt]]) -> dict[str, float]:
        start, g = time.perf_counter(), self.sampling.group_size
        updates, scored, skipped = [], [], 0
        for prompts in filter(None, batches):  # a rank's share of a short last batch may be empty
            s = self.roll_out(prompts)
            advantages, equal = group_advantages(s.scores @ self.weights, g)
            skipped += int(equal.sum())
            u = self.prepare(prompts, s.completions, advantages, ~equal)
            updates += [u] if u is not None else []
            scored.append(s)
        sums = self.rollout_sums(scored, skipped)
        if self.world.size > 1:  # every rank's rollouts, and whether any rank kept a group
            with self.world.waiting("in a step"):
                sums = np.array(self.world.sum(mx.array(sums)))
        rolled = time.perf_counter()
        groups, skipped = sums[-2:].tolist()
        results = [self.update(updates) for _ in range(self.iterations)] if skipped < groups else []
        loss, kl, clip, finite = np.mean(results, axis=0).tolist() if results else (0.0, 0.0, 0.0, 1.0)
        return {
            "loss": loss,
            "finite": float(finite == 1.0),
            "kl": kl,
            "clip_ratio": clip,
            **self.reward_stats(sums),
            "skipped_groups": skipped / groups,
            "rollout_seconds": rolled - start,
            "update_seconds": time.perf_counter() - rolled,
        }

    def rollout_sums(self, scored: list[Scored], skipped: int = 0) -> np.ndarray:
        """What the rollout metrics are ratios of, summed over completions (N) and groups, so that
        a group's ranks can add theirs: the weighted reward, each reward (R), the completion
        length, N; the within-group std, the groups and those skipped. (R + 6,)"""
        scores = np.concatenate([s.scores for s in scored]) if scored else np.zeros((0, len(self.rewards)), np.float32)
        total = scores @ self.weights  # (N,)
        std = total.reshape(-1, self.sampling.group_size).std(axis=1, ddof=1)  # (N / G,)
        length = sum(len(c) for s in scored for c in s.completions)
        return np.array(
            [total.sum(), *scores.sum(axis=0), length, len(total), std.sum(), len(std), skipped], np.float32
        )

    def reward_stats(self, sums: np.ndarray) -> dict[str, float]:
        """From rollout_sums: reward (the weighted sum's mean), reward_std (its std within groups,
        TRL's), each reward's mean and the completion length."""
        reward, *each, length, n, std, groups, _ = sums.tolist()
        means = {f"rewards/{r.name}/mean": m / n for r, m in zip(self.rewards, each)}
        return {"reward": reward / n, "reward_std": std / groups, **means, "completion_length": length / n}

    def validate(self, batches: list[list[Prompt]], seed: int, out: Path, step: int, append: bool) -> dict[str, float]:
        """reward_stats of rollouts of the valid batches, sampled from `seed`; the completions are
        appended to out/VALID_ROLLOUTS (started afresh unless `append`). mx.random's key is put
        back afterwards, so the training draws are those of a run without validation."""
        key = rng_key()
        mx.random.seed(seed)
        scored = [self.roll_out(prompts) for prompts in batches]
        restore_rng(key)
        if self.world.main:
            self.write_rollouts(batches, scored, out / VALID_ROLLOUTS, step, append)
        return self.reward_stats(self.rollout_sums(scored))

    def write_rollouts(self, batches: list[list[Prompt]], scored: list[Scored], path: Path, step: int, append: bool):
        with open(path, "a" if append else "w") as f:
            for prompts, s in zip(batches, scored):
                for i, (text, row) in enumerate(zip(s.texts, s.scores)):
                    t = prompts[i // self.sampling.group_size].task
                    rewards = dict(zip((r.name for r in self.rewards), row.tolist()))
                    record = {"step": step, "where": t.where, "prompt": t.prompt, "completion": text}
                    record |= {"reward": float(row @ self.weights), "rewards": rewards}
                    f.write(json.dumps(record) + "\n")
