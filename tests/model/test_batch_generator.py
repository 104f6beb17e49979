"""model/batch_generator.py against mlx-lm's own BatchGenerator, on the llama test base."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import fp32_tol
from mlx_lm.generate import BatchGenerator, stream_generate
from mlx_lm.sample_utils import apply_top_p, greedy_sampler

from mlx_lora.model import batch_generator
from mlx_lora.model.base import load_base
from mlx_lora.model.batch_generator import Argmax, Draw, Generator, stream_sampler

PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 6], [11], [3, 3, 12, 9, 40]]


@pytest.fixture(scope="module")
def model(llama):
    return load_base(str(llama)).model


def run(generator_class, model, samplers=None, **options) -> dict[int, list]:
    """Each prompt's responses (token, logprobs), in insertion order, 12 tokens each."""
    generator = generator_class(model, max_tokens=12, completion_batch_size=4, prefill_batch_size=2, **options)
    uids = generator.insert(PROMPTS, samplers=samplers)
    responses = {uid: [] for uid in uids}
    try:
        while batch := generator.next_generated():
            for r in batch:
                responses[r.uid].append((r.token, r.logprobs))
    finally:
        generator.close()
    return [responses[uid] for uid in uids]


def tokens(responses) -> list[list[int]]:
    return [[token for token, _ in row] for row in responses]


def test_greedy_rows_give_mlx_lms_tokens_without_log_probabilities(model):
    theirs, ours = run(BatchGenerator, model), run(Generator, model)
    assert tokens(ours) == tokens(theirs)
    assert all(len(row) == 12 for row in ours)  # two prompt batches joined the steps: each step is ours
    assert all(logprobs is None for row in ours for _, logprobs in row)  # no step took the log-softmax
    assert all(logprobs is not None for row in theirs for _, logprobs in row)
    assert run(Generator, model, samplers=[Argmax()] * len(PROMPTS)) == ours


def test_a_row_that_samples_gets_log_probabilities_and_the_greedy_rows_keep_their_tokens(model):
    def first_of_log_probabilities(logprobs: mx.array) -> mx.array:
        """A sampler that reads log-probabilities (their argmax, so its tokens are the greedy ones)."""
        return mx.argmax(logprobs, axis=-1)

    greedy = tokens(run(Generator, model))
    mixed = run(Generator, model, samplers=[Argmax(), first_of_log_probabilities, None, Argmax()])
    assert tokens(mixed) == greedy
    # a step with the sampling row in it normalizes for every row; one without it (the second prompt
    # batch's first step, its last steps after the first batch ended) for none
    assert all(logprobs is not None for _, logprobs in mixed[1])
    given = [logprobs for row in mixed for _, logprobs in row if logprobs is not None]
    assert len(given) < sum(map(len, mixed))
    # logsumexp of a log-softmax is 0 up to float32 rounding of values near the logits' own logsumexp (~10)
    assert np.allclose([float(mx.logsumexp(lp)) for lp in given], 0.0, atol=1e-5)


def inverse(logits: np.ndarray, temperature: float, top_p: float, uniforms: np.ndarray):
    """What Draw should pick, in float64: mlx-lm's kept ids (its own apply_top_p on the log-softmax),
    their weights at `temperature`, the first id whose running share passes each uniform; and each
    uniform's distance to the nearest edge of its bin."""
    logprobs = mx.array(logits) - mx.logsumexp(mx.array(logits), axis=-1, keepdims=True)
    kept = np.array(apply_top_p(logprobs, top_p)) > -np.inf if top_p < 1 else np.ones(logits.shape, bool)
    x = logits.astype(np.float64)
    weights = np.exp((x - x.max(axis=-1, keepdims=True)) / temperature) * kept
    shares = np.cumsum(weights, axis=-1) / weights.sum(axis=-1, keepdims=True)
    ids = np.array([np.searchsorted(s, u, side="right") for s, u in zip(shares, uniforms)])
    edges = np.abs(shares - uniforms[:, None]).min(axis=-1)
    return ids, edges


@pytest.mark.parametrize("kernels", ["on", "off"])
@pytest.mark.parametrize(("temperature", "top_p", "spread"), [(1.0, 1.0, 3.0), (0.7, 0.9, 3.0), (1.3, 0.5, 0.2)])
def test_draw_picks_the_inverse_of_mlx_lms_distribution(kernels, temperature, top_p, spread, monkeypatch):
    """Draw against its definition on mlx-lm's own top-p, for uniforms across [0, 1): numba's loops on the
    CPU, MLX's operations with MLX_LORA_CPU_KERNELS=off. A spread of 0.2 makes top-p 0.5 keep ~half of
    the 300 ids. Where a uniform lies within fp32_tol(V) of a bin's edge either side is right (the
    float32 running sums, V terms); all but a few uniforms are checked."""
    monkeypatch.setenv("MLX_LORA_CPU_KERNELS", kernels)
    assert (batch_generator._kernels() is None) == (kernels == "off")
    n, vocab = 4000, 300
    logits = np.repeat(np.random.default_rng(3).normal(0, spread, (1, vocab)).astype(np.float32), n, axis=0)
    uniforms = ((np.arange(n) + 0.5) / n).astype(np.float32)
    monkeypatch.setattr(mx.random, "uniform", lambda shape: mx.array(uniforms))
    ids, logps = Draw(temperature, top_p)(mx.array(logits))
    want, edges = inverse(logits, temperature, top_p, uniforms)
    clear = edges > fp32_tol(vocab)
    assert clear.mean() > 0.98
    assert (np.array(ids)[clear] == want[clear]).all()
    assert len(set(want.tolist())) >= 10  # many bins crossed
    exact = logits[0] - np.log(np.exp(logits[0].astype(np.float64)).sum())
    assert np.allclose(np.array(logps), exact[np.array(ids)], atol=fp32_tol(vocab))


def test_draw_on_numba_and_in_mlx_agree_at_a_real_vocabulary(monkeypatch):
    """The two ways of drawing, same uniforms (mx.random's seed), 16 rows of 49152 logits: the same ids
    (up to rounding at a bin's edge: none expected among 16 draws, one allowed) and log-probabilities."""
    logits = mx.array(np.random.default_rng(4).normal(0, 4, (16, 49152)).astype(np.float32))
    drawn = {}
    for kernels in ("on", "off"):
        monkeypatch.setenv("MLX_LORA_CPU_KERNELS", kernels)
        mx.random.seed(7)
        drawn[kernels] = [np.array(a) for a in Draw(0.8, 0.95)(logits)]
    (ids, logps), (mlx_ids, mlx_logps) = drawn["on"], drawn["off"]
    assert (ids != mlx_ids).sum() <= 1
    same = ids == mlx_ids
    assert np.allclose(logps[same], mlx_logps[same], atol=fp32_tol(49152))


def test_draw_rows_in_a_mixed_batch_carry_their_tokens_log_probability(model):
    """A Draw among other samplers (one per row): the greedy rows keep their tokens; each Draw row's
    response carries its token's log-probability under the model, which mlx-lm's step gives too."""
    mx.random.seed(0)
    mixed = run(Generator, model, samplers=[Argmax(), Draw(1.0), None, Draw(0.7, 0.9)])
    greedy = tokens(run(Generator, model))
    assert tokens(mixed)[0] == greedy[0] and tokens(mixed)[2] == greedy[2]
    for row in (1, 3):
        assert all(lp.shape == () and float(lp) <= 0 for _, lp in mixed[row])
    # teacher-forced by mlx-lm's BatchGenerator, a sampler replaying row 1's tokens (then 0: it samples ahead)
    replay = iter(tokens(mixed)[1])
    theirs = run(BatchGenerator, model, samplers=[None, lambda lp: mx.array([next(replay, 0)]), None, None])
    assert tokens(theirs)[1] == tokens(mixed)[1]
    want = [float(lp[t]) for t, lp in theirs[1]]
    assert np.allclose([float(lp) for _, lp in mixed[1]], want, atol=1e-5)


def test_one_streams_sampler_draws_from_log_probabilities_as_from_logits_and_keeps_to_top_p(model, llama):
    """stream_sampler, as mlx-lm's stream_generate calls it (log-probabilities): Draw's ids for the
    logits themselves, seeded; through stream_generate every token lies in the set mlx-lm's own
    apply_top_p keeps at its position (the model run again over the prompt and the tokens before)."""
    logits = mx.array(np.random.default_rng(5).normal(0, 3, (1, 500)).astype(np.float32))
    drawn = []
    for scores in (logits, logits - mx.logsumexp(logits, axis=-1, keepdims=True)):
        mx.random.seed(2)
        drawn.append([stream_sampler(0.9, 0.8)(scores).item() for _ in range(20)])
    assert drawn[0] == drawn[1] and len(set(drawn[0])) > 2
    assert stream_sampler(0.0, 0.8) is greedy_sampler

    tokenizer = load_base(str(llama)).tokenizer
    prompt = PROMPTS[1]
    mx.random.seed(3)
    sampled = [
        r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=10, sampler=stream_sampler(1.5, 0.6))
    ]
    mx.random.seed(3)
    again = [
        r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=10, sampler=stream_sampler(1.5, 0.6))
    ]
    assert sampled == again and len(set(sampled)) > 1
    logits = model(mx.array([prompt + sampled[:-1]]))[0, len(prompt) - 1 :]  # (10, V): what predicts each
    kept = apply_top_p(logits - mx.logsumexp(logits, axis=-1, keepdims=True), 0.6)
    assert all(kept[i, t].item() > -np.inf for i, t in enumerate(sampled))
    assert (np.array(kept) == -np.inf).any(axis=-1).all()  # top-p 0.6 cut something at every position
