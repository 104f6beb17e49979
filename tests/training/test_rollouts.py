"""Rollouts on the shipped model: G completions per prompt, seeded, and the log-probs the loss
reads (teacher-forced, right-padded, one forward) equal those the tokens were sampled with
(incremental, left-padded KV caches, each prompt's prefix run once in a call of one row). The two
run the same fp32 sums in different orders and shapes, so they agree to fp32_tol of the longest
chain of sums a logit goes through (each block's MLP over the intermediate size, then the head over
the hidden size) times the logits' size; a log-prob (logit minus log-sum-exp) to twice that.
Measured: ~1e-5 for most tokens, isolated tokens 1.0e-4 through OpenBLAS."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import fp32_tol

from mlx_lora.model import decoder
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import use_cpu_kernels
from mlx_lora.training import rollouts

G, MAX_TOKENS = 3, 12


@pytest.fixture(scope="module")
def base():
    return load_base(None)


@pytest.fixture(scope="module")
def decoded():
    """The base as GRPO's run gets it: the training kernels, and its one-token steps on model/decoder.py."""
    base = load_base(None)
    assert use_cpu_kernels(base.model, training=True, decoding=True)
    return base


@pytest.mark.parametrize("on_decoder", [False, True])
def test_rollouts_and_their_log_probs(base, decoded, on_decoder, monkeypatch):
    """Sampled through MLX's forward, or (GRPO's run) through model/decoder.py, whose batch steps are
    counted: the log-probs the loss reads agree with those the tokens were sampled with either way."""
    steps = []
    if on_decoder:
        base, original = decoded, decoder.Decoder.batch
        monkeypatch.setattr(decoder.Decoder, "batch", lambda self, *a: steps.append(len(a[0])) or original(self, *a))
    tok = base.tokenizer
    prompts = [
        tok.encode("Q: Ruby had 10 apples. She lost 9 of them. How many apples are left?\nA:"),
        tok.encode("Q: 2 + 3?\nA:"),
    ]
    mx.random.seed(0)
    completions, sampled = rollouts.sample(base.model, tok, prompts, G, MAX_TOKENS, 1.0, 1.0)
    assert len(completions) == 2 * G and all(1 <= len(c) <= MAX_TOKENS for c in completions)
    eos = set(tok.eos_token_ids)
    assert all(c[-1] in eos or len(c) == MAX_TOKENS for c in completions)  # EOS kept where it ended one
    assert len({tuple(c) for c in completions}) > 1  # sampled, not greedy
    mx.random.seed(0)
    assert rollouts.sample(base.model, tok, prompts, G, MAX_TOKENS, 1.0, 1.0)[0] == completions

    seqs = rollouts.sequences(prompts, completions, G)
    logps = rollouts.completion_logps(base.model, seqs)
    assert seqs.mask.sum(axis=1).tolist() == [len(c) for c in completions]
    a = base.model.args
    size = mx.abs(base.model(seqs.tokens)).max().item()
    tol = 2 * fp32_tol(a.num_hidden_layers * a.intermediate_size + a.hidden_size) * size
    masked = np.array((logps * seqs.mask).sum(axis=1))  # what the loss reads: the mask on the completion's tokens
    np.testing.assert_allclose(masked, [sum(s) for s in sampled], atol=MAX_TOKENS * tol)
    for i, c in enumerate(completions):
        start = len(prompts[i // G]) - 1
        np.testing.assert_array_equal(np.array(seqs.tokens[i, start + 1 : start + 1 + len(c)]), c)
        np.testing.assert_array_equal(np.array(seqs.index[i, : len(c)]), np.arange(start, start + len(c)))
        np.testing.assert_array_equal(np.array(seqs.targets[i, : len(c)]), c)
        np.testing.assert_allclose(np.array(logps[i, : len(c)]), sampled[i], atol=tol)
    longest = max(len(c) for c in completions)  # each of the two samplings stepped at least this often
    assert (steps[0] == 2 * G and len(steps) >= 2 * longest) if on_decoder else not steps


class Counting:
    """The model, counting the positions each call runs: (rows, length) of every call."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, inputs, *args, **kwargs):
        self.calls.append(inputs.shape)
        return self.model(inputs, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_a_prompts_prefix_runs_once_for_its_group(base):
    """The G completions of a prompt share its KV cache: the prompts' tokens but the last are run
    once each, in calls of one row; every other call is one new token per row."""
    tok = base.tokenizer
    prompts = [tok.encode("Q: Ruby had 10 apples. She lost 9 of them?\nA:"), tok.encode("Q: 2 + 3?\nA:"), [7]]
    model = Counting(base.model)
    mx.random.seed(0)
    completions, _ = rollouts.sample(model, tok, prompts, G, 4, 1.0, 1.0)
    prefill = [shape for shape in model.calls if shape[1] > 1]
    assert prefill == [(1, len(prompts[0]) - 1), (1, len(prompts[1]) - 1)]  # the one-token prompt has no prefix
    assert all(shape[1] == 1 for shape in model.calls[len(prefill) :]) and len(completions) == 3 * G
