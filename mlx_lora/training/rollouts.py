"""GRPO's rollouts: G sampled completions per prompt, and their per-token log-probs read back.

Sampling goes through mlx-lm's BatchGenerator (left-padded KV caches, as eval generates: its
`Generator`, model/batch_generator.py) with its `Draw` sampler (--temperature, --top-p: mlx-lm's
distribution, drawn in numba on the CPU without MLX's per-step log-softmax); a prompt's prefix is
run once and its KV cache shared by its G completions. A run puts the model's one-token steps on
model/decoder.py (training/loop.py), which decodes the batch outside MLX as eval does. A completion
keeps the EOS that ended it, as TRL's completion_ids do, so the policy also learns where to stop.
The log-probs the loss reads are computed teacher-forced over prompt + completion, right-padded, in
one forward, and the output projection (576 x 49k for SmolLM2) runs only where a completion token is
predicted: those of the policy that sampled (`old`), of the reference (adapter off) and of the
policy being updated.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from mlx_lora.model.batch_generator import Draw, Generator
from mlx_lora.model.cpu_kernels import cross_entropy
from mlx_lora.training.cut import Cut


def prompt_cache(model: nn.Module, prompt: list[int]) -> list | None:
    """The KV cache of all but the prompt's last token, which its G completions share (BatchGenerator
    merges it into the batch's cache and does not write to it); None for a one-token prompt."""
    if len(prompt) < 2:
        return None
    cache = make_prompt_cache(model)
    model(mx.array([prompt[:-1]]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def sample(
    model: nn.Module,
    tokenizer,
    prompts: list[list[int]],
    group_size: int,
    max_tokens: int,
    temperature: float,
    top_p: float,
) -> tuple[list[list[int]], list[list[float]]]:
    """`group_size` completions of each prompt, prompt i's at [i*G, (i+1)*G): token lists ending at
    EOS (kept) or after `max_tokens`, and each token's log-prob as it was sampled (the model's,
    before temperature). Seeded by mx.random's state."""
    shared = [prompt_cache(model, p) for p in prompts]  # each prompt's prefix once, for all its G rows
    caches = [c for c in shared for _ in range(group_size)]
    rows = [p for p in prompts for _ in range(group_size)]
    generator = Generator(
        model,
        max_tokens=max_tokens,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        sampler=Draw(temperature, top_p),
        completion_batch_size=len(rows),
        prefill_batch_size=len(rows),
    )
    uids = generator.insert(
        [p if c is None else p[-1:] for p, c in zip(rows, caches)],
        caches=caches,
        all_tokens=[[] if c is None else p[:-1] for p, c in zip(rows, caches)],
    )
    index = dict(zip(uids, range(len(rows))))
    completions: list[list[int]] = [[] for _ in rows]
    logps: list[list[float]] = [[] for _ in rows]
    try:
        while responses := generator.next_generated():
            for r in responses:
                completions[index[r.uid]].append(r.token)
                logps[index[r.uid]].append(r.logprobs.item())  # Draw's: the token's own
    finally:
        generator.close()
    return completions, logps


@dataclass(frozen=True)
class Sequences:
    """Prompt + completion rows as the log-probs read them: tokens (N, L) right-padded with 0, and
    for each completion token j of row i the input position index[i, j] that predicts it, the
    token targets[i, j] and mask[i, j] = 1; (N, C) for C the longest completion, padded with 0."""

    tokens: mx.array
    index: mx.array
    targets: mx.array
    mask: mx.array


def sequences(prompts: list[list[int]], completions: list[list[int]], group_size: int) -> Sequences:
    """The Sequences of `completions`, completion i following prompts[i // group_size]."""
    rows = [prompts[i // group_size] + c for i, c in enumerate(completions)]
    tokens = np.zeros((len(rows), max(len(r) for r in rows)), np.int32)
    width = max(len(c) for c in completions)
    index, targets, mask = (np.zeros((len(rows), width), t) for t in (np.int32, np.int32, np.float32))
    for i, (row, c) in enumerate(zip(rows, completions)):
        tokens[i, : len(row)] = row
        index[i, : len(c)] = np.arange(len(row) - len(c) - 1, len(row) - 1)  # position t predicts token t + 1
        targets[i, : len(c)], mask[i, : len(c)] = c, 1
    return Sequences(*map(mx.array, (tokens, index, targets, mask)))


def completion_logps(model: nn.Module, s: Sequences, cut: Cut | None = None, states: mx.array | None = None):
    """log p(completion token | everything before it), (N, C) laid out as s.mask. With a `cut`
    (training/cut.py) the output projection runs on the completion positions alone, and `states`
    (N, L-1, D), the hidden states entering its first trained block, stand in for the blocks before."""
    inputs, at = s.tokens[:, :-1], s.index[..., None]  # (N, L-1), (N, C, 1)
    if cut is None:
        logits = mx.take_along_axis(model(inputs), at, axis=1)  # (N, C, V)
    else:
        logits = cut.logits(mx.take_along_axis(cut.hidden(inputs, states), at, axis=1))  # (N, C, V)
    return -cross_entropy(logits.astype(mx.float32), s.targets)
