"""GRPO's step and loop on the shipped tiny model and the bundled data: one update moves each
completion's log-prob with its advantage's sign, the reference is the base with the adapter off,
groups with equal rewards are skipped and counted, and `train --objective grpo` runs end to end."""

import itertools
import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.config import LoRAConfig
from mlx_lora.data.rows import file_rows
from mlx_lora.formats.native import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mlx_lora.model.base import load_base
from mlx_lora.model.lora import apply_lora, lora_layers
from mlx_lora.reporting.metrics import GRPO_KEYS, METRICS
from mlx_lora.training import rollouts
from mlx_lora.training.grpo import PolicyLoss
from mlx_lora.training.grpo_step import VALID_ROLLOUTS, GrpoStep, Sampling, read_prompts
from mlx_lora.training.rewards import Reward

G = 2
SAMPLING = Sampling(group_size=G, max_tokens=6, temperature=1.0, top_p=1.0)


def grpo_step(optimizer, beta=0.0, rewards=(Reward("zero", lambda t, c: 0.0),), adapter_scale=0.0) -> GrpoStep:
    """A GrpoStep on the tiny model with a fresh adapter (B scaled to `adapter_scale`, so the
    adapter changes the model when it is not 0)."""
    mx.random.seed(0)
    base = load_base(None)
    apply_lora(base.model, LoRAConfig())
    for layer in lora_layers(base.model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * adapter_scale
    optimizer.init(base.model.trainable_parameters())
    loss = PolicyLoss("grpo", beta=beta, max_completion_tokens=SAMPLING.max_tokens)
    return GrpoStep(base.model, base.tokenizer, optimizer, SAMPLING, loss, list(rewards), [1.0] * len(rewards))


@pytest.fixture(scope="module")
def prompts():
    base = load_base(None)
    return read_prompts(file_rows("data/train.jsonl")[:2], base.tokenizer)


def completion_logps(model, u) -> np.ndarray:
    """Each completion's summed log-prob, (n,)."""
    return np.array((rollouts.per_token_logps(model, u.tokens) * u.mask).sum(axis=1))


def test_one_update_moves_each_completion_with_its_advantage(prompts):
    """At the first update the policy is the one that sampled, so every ratio is 1, inside the
    clip range, and with beta 0 the grpo loss is L = -(1/n) sum_i A_i l_i / T_i (l_i: completion
    i's summed log-prob, T_i its length). An SGD step theta' = theta - lr grad L changes l_j by
    -lr grad L . grad l_j = (lr/n) sum_i (A_i / T_i) grad l_i . grad l_j, up to O(lr^2): the
    term i = j, (lr/n) (A_j / T_j) |grad l_j|^2, has A_j's sign, and the completions here are
    different token strings whose gradients are not aligned, so with a small lr each l_j moves with
    A_j's sign. That first-order change is also checked, grad l_j from nn.value_and_grad."""
    lr = 1e-4
    step = grpo_step(optim.SGD(learning_rate=lr), adapter_scale=0.05)  # B != 0: A's gradient is not 0 either
    completions = [prompts[0].tokens[:4], prompts[1].tokens[-3:], prompts[1].tokens[:5], prompts[0].tokens[-6:]]
    advantages = np.array([0.7, -0.7, -0.7, 0.7], np.float32)  # group 1: +, -; group 2: -, +
    u = step.prepare(prompts, completions, advantages, np.array([True, True]))
    model = step.model
    before = completion_logps(model, u)
    flat = []  # grad l_j, flattened over the adapter's parameters
    for j in range(len(completions)):
        l_j = nn.value_and_grad(model, lambda m, j=j: (rollouts.per_token_logps(m, u.tokens)[j] * u.mask[j]).sum())
        flat.append(mx.concatenate([g.reshape(-1) for _, g in tree_flatten(l_j(model)[1])]))
    lengths = np.array(u.mask.sum(axis=1))
    loss_grad = -sum(float(a / t) * g for a, t, g in zip(advantages, lengths, flat)) / len(flat)
    predicted = np.array([-lr * (loss_grad * g).sum().item() for g in flat])

    step.update([u])
    after = completion_logps(model, u)
    change = after - before
    assert np.all(np.sign(change) == np.sign(advantages)), (change, advantages)
    # rtol: the O(lr^2) remainder, 2.7% of the largest change here (linear in lr: at lr 1e-5 it was
    # 0.3%, but then float rounding of the log-probs through MLX's bundled BLAS, ~4.5e-5, was 3% of
    # the smallest change); a wrong factor in the loss (1/T, 1/n, the sign) is off by 50% or more.
    np.testing.assert_allclose(change, predicted, rtol=1e-1)


def test_the_reference_is_the_base_with_the_adapter_off(prompts):
    """beta > 0: the reference log-probs are those of the base model alone (a fresh load, no
    adapter), while `old` are the adapted policy's. The same weights and ops, so exact."""
    step = grpo_step(optim.SGD(learning_rate=1e-3), beta=0.04, adapter_scale=0.5)
    completions = [prompts[0].tokens[:4], prompts[0].tokens[-3:], prompts[1].tokens[:5], prompts[1].tokens[-6:]]
    u = step.prepare(prompts, completions, np.ones(4, np.float32), np.array([True, True]))
    base = load_base(None).model
    base.eval()
    expected = np.array(rollouts.per_token_logps(base, u.tokens))
    np.testing.assert_array_equal(np.array(u.reference), expected)
    assert not np.allclose(np.array(u.old), expected, atol=1e-2)  # the adapter does change the model
    assert (
        grpo_step(optim.SGD(learning_rate=1e-3)).prepare(prompts, completions, np.ones(4), np.ones(2, bool)).reference
        is None
    )


def test_a_group_with_equal_rewards_is_skipped_and_counted(prompts):
    """Prompt 0's completions all score 0, prompt 1's each a new number: half the groups are
    skipped, and the update still runs on the other; when every group is equal nothing is updated."""
    counter = itertools.count(1)
    varied = Reward("varied", lambda t, c: 0.0 if t.where == prompts[0].task.where else float(next(counter)))
    step = grpo_step(optim.SGD(learning_rate=1e-2), rewards=[varied], adapter_scale=0.05)
    before = [np.array(v) for _, v in tree_flatten(step.model.trainable_parameters())]
    stats = step.step([prompts])
    assert stats["skipped_groups"] == 0.5 and stats["reward_std"] > 0
    after = [np.array(v) for _, v in tree_flatten(step.model.trainable_parameters())]
    assert any(not np.array_equal(a, b) for a, b in zip(after, before))

    completions = [prompts[0].tokens[:4], prompts[0].tokens[-3:], prompts[1].tokens[:5], prompts[1].tokens[-6:]]
    kept = step.prepare(prompts, completions, np.ones(4, np.float32), np.array([False, True]))
    assert kept.tokens.shape[0] == G  # the update reads the kept group alone
    assert step.prepare(prompts, completions, np.ones(4, np.float32), np.array([False, False])) is None

    step = grpo_step(optim.SGD(learning_rate=1e-2), adapter_scale=0.05)  # every reward 0
    before = [np.array(v) for _, v in tree_flatten(step.model.trainable_parameters())]
    stats = step.step([prompts, prompts])  # two accumulated batches
    assert stats["skipped_groups"] == 1.0 and stats["loss"] == 0.0
    after = [np.array(v) for _, v in tree_flatten(step.model.trainable_parameters())]
    assert all(np.array_equal(a, b) for a, b in zip(after, before))


def test_train_grpo_writes_an_adapter_that_generate_loads(tmp_path):
    out = tmp_path / "grpo"
    flags = ["--iters", "2", "--group-size", "2", "--batch-size", "2", "--max-completion-tokens", "8"]
    result = CliRunner().invoke(
        app,
        ["train", "--objective", "grpo", *flags, "--rewards", "format", "--val-batches", "1", "--adapter-path", out],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert (out / ADAPTER_WEIGHTS).is_file() and (out / ADAPTER_CONFIG).is_file()
    records = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    step = next(r for r in records if r["loss"] is not None)
    assert step["step"] == 2
    for key in (*GRPO_KEYS[:-1], "rewards/format/mean", "loss", "lr"):
        assert step[key] is not None, key
    # no --learning-rate: grpo's default, not sft's 1e-3 (the optimizer holds it in float32)
    assert step["lr"] == pytest.approx(1e-5, rel=2**-24) and "learning rate 1e-05 (grpo's default)" in result.output
    assert [r["step"] for r in records if r["val_reward"] is not None] == [0, 2]
    rollouts_written = [json.loads(line) for line in (out / VALID_ROLLOUTS).read_text().splitlines()]
    assert len(rollouts_written) == 2 * 2 * G and {r["step"] for r in rollouts_written} == {0, 2}
    training = json.loads((out / ADAPTER_CONFIG).read_text())["training"]
    assert training["objective"] == "grpo" and training["rewards"] == "format" and training["learning_rate"] == 1e-5

    generated = CliRunner().invoke(app, ["generate", "--adapter-path", str(out), "--prompt", "Q: 2 + 3?\nA:"])
    assert generated.exit_code == 0 and generated.stdout.strip(), generated.output
