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
A row that samples with `Draw` (GRPO's rollouts, serve's sampled rows) also reads the logits: it
normalizes its own rows, in numba on the CPU (~3 ms for 16 rows against mlx-lm's ~27, 12 against
113 with top-p), and its responses carry their token's log-probability, not the vocabulary's.
The rest (prompt batches, continuous insertion, stops, caches) is mlx-lm's, whose version
pyproject.toml pins to one minor series.
"""

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch
from mlx_lm.sample_utils import apply_top_p, greedy_sampler

from mlx_lora.model import cpu_kernels


@dataclass(frozen=True)
class Argmax:
    """A greedy sampler: logits (R, V) -> each row's top id (R,), plus `offset` (serve's row slot · V)."""

    offset: int = 0

    def __call__(self, logits: mx.array) -> mx.array:
        return mx.argmax(logits, axis=-1) + self.offset


@dataclass(frozen=True)
class Draw:
    """A sampler at `temperature` (> 0) over the tokens top-p keeps, as mlx-lm's make_sampler: logits
    (R, V) -> each row's id (R,) and that id's log-probability at temperature 1 (R,). It draws by the
    inverse of the distribution at one mx.random uniform a row (mlx-lm draws a Gumbel sample: the
    same distribution, other tokens for a seed): the first id whose running weight passes the
    uniform's share of the kept weights. On the CPU with numba that is decode_kernels.draw, one pass
    of a row outside MLX; else (the GPU, MLX_LORA_CPU_KERNELS=off) the same inverse in MLX, the two
    apart only where float32 rounding moves a bin's edge across a uniform. `offset` is added to the
    ids (serve's row slot · V); `uniforms` (rows -> (rows,) in [0, 1)) gives a row its own seeded
    key (serve), else mx.random's state draws them."""

    temperature: float
    top_p: float = 1.0
    offset: int = 0
    uniforms: Callable[[int], mx.array] | None = None

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array]:
        logits, rows = logits.astype(mx.float32), logits.shape[0]
        uniforms = mx.random.uniform(shape=(rows,)) if self.uniforms is None else self.uniforms(rows)
        kernels = _kernels()
        if kernels is None:
            ids, logps = self._in_mlx(logits, uniforms)
            return ids + self.offset, logps
        ids, logps = np.empty(rows, np.uint32), np.empty(rows, np.float32)
        t, p = np.float32(self.temperature), np.float32(self.top_p)
        kernels.draw(np.ascontiguousarray(logits), t, p, np.asarray(uniforms), ids, logps)
        return mx.array(ids) + self.offset, mx.array(logps)

    def _in_mlx(self, logits: mx.array, uniforms: mx.array) -> tuple[mx.array, mx.array]:
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # (R, V)
        kept = apply_top_p(logprobs, self.top_p) if self.top_p < 1 else logprobs
        weights = mx.softmax(kept * (1 / self.temperature), axis=-1)
        running = mx.cumsum(weights, axis=-1)
        passed = mx.sum(running <= uniforms[:, None] * running[:, -1:], axis=-1)  # ids before the one drawn
        last = logits.shape[-1] - 1 - mx.argmax(weights[:, ::-1] > 0, axis=-1)  # where rounding passes none
        ids = mx.minimum(passed, last).astype(mx.uint32)
        return ids, mx.take_along_axis(logprobs, ids[:, None], axis=-1)[:, 0]


def stream_sampler(temperature: float, top_p: float) -> Callable[[mx.array], mx.array]:
    """One stream's sampler for mlx-lm's generate_step (generate, chat): greedy at temperature 0,
    else Draw's ids. generate_step hands it log-probabilities, which draw as their logits do (a row
    shifted by a constant); Draw spares it mlx-lm's sort of the vocabulary for top-p (~7 ms a token
    on SmolLM2's 49152, against an ~11 ms step) and its Gumbel draw."""
    if temperature == 0:
        return greedy_sampler
    draw = Draw(temperature, top_p)
    return lambda logprobs: draw(logprobs)[0]


def _kernels():
    """decode_kernels where Draw runs on them: on the CPU, kernels not turned off, numba installed."""
    if not cpu_kernels.wanted():
        return None
    try:
        from mlx_lora.model import decode_kernels
    except ImportError:
        return None
    return decode_kernels


def reads_logits(sampler) -> bool:
    """Whether `sampler` reads logits rather than their log-softmax (a greedy one, or a Draw)."""
    return sampler is greedy_sampler or isinstance(sampler, (Argmax, Draw))


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

        carried = list(logprobs) if logprobs is not None else [None] * len(self.uids)  # the responses' logprobs

        def sample(sampler, start: int, stop: int) -> mx.array:
            if isinstance(sampler, Draw):
                ids, carried[start:stop] = sampler(logits[start:stop])
                return ids
            return sampler((logits if reads_logits(sampler) else logprobs)[start:stop])

        if not samplers or all(s is samplers[0] for s in samplers):  # one batched call, as mlx-lm's
            sampled = sample(samplers[0] if samplers else self.fallback_sampler, 0, len(self.uids))
        else:
            sampled = mx.concatenate([sample(s, e, e + 1) for e, s in enumerate(samplers)], axis=0)
        self._next_tokens = sampled
        self._next_logprobs = carried
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
