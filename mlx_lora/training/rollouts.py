"""GRPO's rollouts: G sampled completions per prompt, and their per-token log-probs read back.

Sampling goes through mlx-lm's BatchGenerator (left-padded KV caches, as eval generates) with
mlx-lm's sampler (--temperature, --top-p). A completion keeps the EOS that ended it, as TRL's
completion_ids do, so the policy also learns where to stop. The log-probs the loss reads are
computed teacher-forced over prompt + completion, right-padded, in one forward: those of the
policy that sampled (`old`), of the reference (adapter off) and of the policy being updated.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from mlx_lora.model.cpu_kernels import cross_entropy


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
    rows = [p for p in prompts for _ in range(group_size)]
    generator = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=[[t] for t in tokenizer.eos_token_ids],
        sampler=make_sampler(temp=temperature, top_p=top_p),
        completion_batch_size=len(rows),
        prefill_batch_size=len(rows),
    )
    uids = generator.insert(rows)
    index = dict(zip(uids, range(len(rows))))
    completions: list[list[int]] = [[] for _ in rows]
    logps: list[list[float]] = [[] for _ in rows]
    try:
        while responses := generator.next_generated():
            for r in responses:
                completions[index[r.uid]].append(r.token)
                logps[index[r.uid]].append(r.logprobs[r.token].item())
    finally:
        generator.close()
    return completions, logps


def sequences(prompts: list[list[int]], completions: list[list[int]], group_size: int) -> tuple[mx.array, mx.array]:
    """(tokens (N, L) prompt + completion right-padded with 0, mask (N, L-1) 1 where the next
    token is a completion token): what per_token_logps reads and the loss masks with."""
    rows = [prompts[i // group_size] + c for i, c in enumerate(completions)]
    length = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length - 1), np.float32)
    for i, (row, c) in enumerate(zip(rows, completions)):
        tokens[i, : len(row)] = row
        mask[i, len(row) - len(c) - 1 : len(row) - 1] = 1  # position t predicts token t + 1
    return mx.array(tokens), mx.array(mask)


def per_token_logps(model: nn.Module, tokens: mx.array) -> mx.array:
    """log p(token t+1 | tokens ..t) at every position, (N, L-1)."""
    logits = model(tokens[:, :-1]).astype(mx.float32)  # (N, L-1, V)
    return -cross_entropy(logits, tokens[:, 1:])
