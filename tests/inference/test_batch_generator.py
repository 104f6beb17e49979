"""inference/batch_generator.py against mlx-lm's own BatchGenerator, on the llama test base."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator

from mlx_lora.inference.batch_generator import Argmax, Generator
from mlx_lora.model.base import load_base

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
