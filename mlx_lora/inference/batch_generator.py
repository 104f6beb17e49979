"""mlx-lm's BatchGenerator, with each step's log-softmax taken only where a row's sampler reads it.

mlx-lm's GenerationBatch turns every step's logits into log-probabilities (logits − logsumexp)
before it samples, for every row, greedy or not. On the CPU MLX's exp costs ~14 ns a value: 1.2 ms
a row of SmolLM2's 49152 logits, 15 ms of a 16-row step of ~50 ms, 68 ms of a 64-row step
(bench/RESULTS.md), on the critical path (the next step's input is the argmax of that normalized
array). A greedy row's token is the argmax of its logits either way, so here a sampler marked
`Argmax` (and mlx-lm's own greedy_sampler, the default) reads the logits as they come, and the
log-softmax is taken only for a step where some row's sampler needs it; a response of a step
that took none carries `logprobs=None`. Every step of a batch, its first included, goes through
`_step` below (mlx-lm's own, that line made conditional); rows with logits processors take
mlx-lm's step whole.
The rest (prompt batches, continuous insertion, stops, caches) is mlx-lm's, whose version
pyproject.toml pins to one minor series.
"""

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch
from mlx_lm.sample_utils import greedy_sampler


@dataclass(frozen=True)
class Argmax:
    """A greedy sampler: logits (R, V) -> each row's top id (R,), plus `offset` (serve's row slot · V)."""

    offset: int = 0

    def __call__(self, logits: mx.array) -> mx.array:
        return mx.argmax(logits, axis=-1) + self.offset


def reads_logits(sampler) -> bool:
    """Whether `sampler` picks the same token from logits as from their log-softmax (a greedy one)."""
    return sampler is greedy_sampler or isinstance(sampler, Argmax)


class Steps(GenerationBatch):
    """mlx-lm's GenerationBatch whose step normalizes the logits only where a row's sampler reads
    log-probabilities."""

    def _step(self) -> tuple[list[int], list]:
        if any(self.logits_processors):
            return super()._step()
        self._current_tokens, self._current_logprobs = self._next_tokens, self._next_logprobs
        inputs = self._current_tokens
        logits = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]  # (R, V)
        samplers = [self.fallback_sampler if s is None else s for s in (self.samplers or [None] * len(self.uids))]
        logprobs = None
        if not all(reads_logits(s) for s in samplers):
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)

        def scores(sampler, rows: slice) -> mx.array:
            return (logits if reads_logits(sampler) else logprobs)[rows]

        if not samplers or all(s is samplers[0] for s in samplers):  # one batched call, as mlx-lm's
            sampler = samplers[0] if samplers else self.fallback_sampler
            sampled = sampler(scores(sampler, slice(None)))
        else:
            sampled = mx.concatenate([s(scores(s, slice(e, e + 1))) for e, s in enumerate(samplers)], axis=0)
        self._next_tokens = sampled
        self._next_logprobs = list(logprobs) if logprobs is not None else [None] * len(self.uids)
        mx.async_eval(self._next_tokens, self._next_logprobs)
        mx.eval(inputs, self._current_logprobs)
        inputs = inputs.tolist()
        for tokens, token in zip(self.tokens, inputs):
            tokens.append(token)
        return inputs, self._current_logprobs


class Prompts(PromptProcessingBatch):
    """mlx-lm's PromptProcessingBatch handing its rows on to `Steps` (split() keeps the class)."""

    def generate(self, tokens: list[list[int]]) -> Steps:
        if any(len(t) > 1 for t in tokens):
            self.prompt([t[:-1] for t in tokens])
        generation = Steps(
            self.model,
            self.uids,
            mx.array([t[-1] for t in tokens]),
            self.prompt_cache,
            self.tokens,
            self.samplers,
            self.fallback_sampler,
            self.logits_processors,
            self.stop_sequences,
            self.max_tokens,
        )
        self.uids, self.prompt_cache, self.tokens = [], [], []
        self.samplers, self.logits_processors, self.max_tokens = [], [], []
        return generation


class Generator(BatchGenerator):
    """mlx-lm's BatchGenerator whose prompts and steps are `Prompts` and `Steps` (same arguments)."""

    def __init__(self, model, **options):
        super().__init__(model, **options)
        self._prompt_batch = Prompts.empty(self.model, self.sampler, prefill_step_size=self.prefill_step_size)
        self._generation_batch = Steps.empty(self.model, self.sampler)
