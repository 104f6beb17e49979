"""GRPO's step and loop on the shipped tiny model and the bundled data: one update moves each
completion's log-prob with its advantage's sign, the reference is the base with the adapter off,
groups with equal rewards are skipped and counted, and `train --objective grpo` runs end to end."""

import itertools
import json
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from conftest import Recording, assert_tensors_close, checksum_reward, fp32_tol
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.config import LoRAConfig, TrainConfig
from mlx_lora.data.rows import file_rows
from mlx_lora.formats.native import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from mlx_lora.model import decoder
from mlx_lora.model.base import load_base
from mlx_lora.model.cpu_kernels import cross_entropy
from mlx_lora.model.lora import adapter_off, apply_lora, lora_layers
from mlx_lora.reporting.metrics import GRPO_KEYS, METRICS, read_metrics
from mlx_lora.training import rollouts
from mlx_lora.training.grpo import PolicyLoss, policy_loss
from mlx_lora.training.grpo_step import VALID_ROLLOUTS, GrpoStep, Sampling, grpo_cut, read_prompts
from mlx_lora.training.loop import train
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
    return np.array((rollouts.completion_logps(model, u.seqs) * u.seqs.mask).sum(axis=1))


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
        l_j = nn.value_and_grad(model, lambda m, j=j: (rollouts.completion_logps(m, u.seqs)[j] * u.seqs.mask[j]).sum())
        flat.append(mx.concatenate([g.reshape(-1) for _, g in tree_flatten(l_j(model)[1])]))
    lengths = np.array(u.seqs.mask.sum(axis=1))
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
    expected = np.array(rollouts.completion_logps(base, u.seqs))
    np.testing.assert_array_equal(np.array(u.reference), expected)
    policy = np.array(rollouts.completion_logps(step.model, u.seqs))
    assert not np.allclose(policy, expected, atol=1e-2)  # the adapter does change the model
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
    assert kept.seqs.tokens.shape[0] == G  # the update reads the kept group alone
    assert step.prepare(prompts, completions, np.ones(4, np.float32), np.array([False, False])) is None

    step = grpo_step(optim.SGD(learning_rate=1e-2), adapter_scale=0.05)  # every reward 0
    before = [np.array(v) for _, v in tree_flatten(step.model.trainable_parameters())]
    stats = step.step([prompts, prompts])  # two accumulated batches
    assert stats["skipped_groups"] == 1.0 and stats["loss"] == 0.0
    after = [np.array(v) for _, v in tree_flatten(step.model.trainable_parameters())]
    assert all(np.array_equal(a, b) for a, b in zip(after, before))


def test_train_grpo_writes_an_adapter_that_generate_loads(tmp_path, monkeypatch):
    """...and samples its rollouts through model/decoder.py (its batch steps counted)."""
    steps, original = [], decoder.Decoder.batch
    monkeypatch.setattr(decoder.Decoder, "batch", lambda self, *a: steps.append(len(a[0])) or original(self, *a))
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
    assert "decoding steps by model/decoder.py" in result.output and 2 * G in steps  # a step of every rollout row

    generated = CliRunner().invoke(app, ["generate", "--adapter-path", str(out), "--prompt", "Q: 2 + 3?\nA:"])
    assert generated.exit_code == 0 and generated.stdout.strip(), generated.output


def full_forward_loss(model, u, p: PolicyLoss):
    """The update's loss as the step computed it before it was cut: every position's log-prob from
    the whole model, right-padded (n, L-1), the old policy's from a forward of their own."""
    n, width = u.seqs.tokens.shape[0], u.seqs.tokens.shape[1] - 1
    mask = np.zeros((n, width), np.float32)  # (n, L-1): 1 where the next token is a completion token
    for i, (at, m) in enumerate(zip(np.array(u.seqs.index), np.array(u.seqs.mask))):
        mask[i, at[m > 0]] = 1

    def logps(m):
        return -cross_entropy(m(u.seqs.tokens[:, :-1]).astype(mx.float32), u.seqs.tokens[:, 1:])  # (n, L-1)

    model.eval()
    old = mx.stop_gradient(logps(model))
    with adapter_off(model):
        reference = mx.stop_gradient(logps(model)) if p.beta else None
    model.train()
    return nn.value_and_grad(model, lambda m: policy_loss(logps(m), old, reference, u.advantages, mx.array(mask), p)[0])


@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.04), ("dapo", 0.0), ("gspo", 0.04)])
def test_the_cut_one_update_equals_the_full_forward_with_old_log_probs(prompts, loss_type, beta):
    """LoRA on the last 2 of 4 blocks, one update (--grpo-iterations 1): the step runs blocks 0-1
    once per batch, the output projection on completion positions only, and takes the old log-probs
    as its own, stopped (TRL's per_token_logps.detach()). Its loss and gradient equal the full
    forward's with `old` from a pass of its own. The two differ only in rounding: the cut's pieces
    are the model's own ops, the head's matmul over fewer rows (test_rollouts: 1e-4 per log-prob
    at most); the ratio exp(logp - old) is then 1 within 1e-4, so loss and each gradient entry, sums
    of per-token terms times ratio (or exp(ref - logp), near 1 at this adapter scale), move by that
    relative amount: rtol 1e-3 leaves 10x."""
    mx.random.seed(0)
    base = load_base(None)
    apply_lora(base.model, LoRAConfig(num_layers=2))
    for layer in lora_layers(base.model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    p = PolicyLoss(loss_type, beta=beta, max_completion_tokens=SAMPLING.max_tokens)
    cut = grpo_cut(base.model, 2, prompts, log=lambda _: None)
    assert cut is not None and cut.k == 2
    step = GrpoStep(base.model, base.tokenizer, optim.SGD(learning_rate=0.0), SAMPLING, p, [], [], cut=cut)
    completions = [prompts[0].tokens[:4], prompts[0].tokens[-3:], prompts[1].tokens[:5], prompts[1].tokens[-6:]]
    u = step.prepare(prompts, completions, np.array([0.7, -0.7, -0.5, 0.5], np.float32), np.array([True, True]))
    assert u.old is None and u.states.shape[:2] == (4, u.seqs.tokens.shape[1] - 1)

    expected, expected_grads = full_forward_loss(base.model, u, p)(base.model)
    (loss, count, _, clip, *_), grads = step.loss_and_grad(base.model, u)
    assert clip.item() == 0.0
    np.testing.assert_allclose((loss / count).item(), expected.item(), rtol=1e-3)
    got, want = tree_flatten(grads), tree_flatten(expected_grads)
    assert [k for k, _ in got] == [k for k, _ in want] and len(got) == 8  # A and B of q_proj, v_proj in blocks 2, 3
    for (name, g), (_, e) in zip(got, want):
        assert np.abs(np.array(e)).max() > 0, name
        g = np.array(g) / count.item()  # summed_loss is the loss times its count
        np.testing.assert_allclose(g, np.array(e), rtol=1e-3, atol=1e-3 * np.abs(np.array(e)).max())


def test_more_iterations_keep_the_sampling_policys_log_probs(prompts):
    """--grpo-iterations 2: the second update's ratios are against the policy that sampled, so its
    log-probs are computed before the first update and kept: those of the adapted model (the same
    pass, so exact)."""
    base = grpo_step(optim.SGD(learning_rate=1e-3), adapter_scale=0.5)
    step = GrpoStep(base.model, base.tokenizer, base.optimizer, SAMPLING, base.loss, base.rewards, [1.0], iterations=2)
    completions = [prompts[0].tokens[:4], prompts[0].tokens[-3:], prompts[1].tokens[:5], prompts[1].tokens[-6:]]
    u = step.prepare(prompts, completions, np.array([1, -1, 1, -1], np.float32), np.array([True, True]))
    np.testing.assert_array_equal(np.array(u.old), np.array(rollouts.completion_logps(step.model, u.seqs)))


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_accumulated_batches_update_as_the_one_batch_they_make(prompts, loss_type):
    """--grad-accumulation-steps: a batch of one group and a batch of two give the loss and
    gradient of the one batch of all three, for every normaliser (dapo's token count, dr_grpo's
    completions x --max-completion-tokens, grpo's and gspo's sequence means); batches of unequal
    sizes, so a mean of the batches' means would differ. The union pads every row to the longest
    (prompt + completion: 92 tokens): the same terms plus zeros, summed in other shapes: the
    gradients' sums over 6 rows x 91 positions, and, for block 0's, the backward pass's through the
    4 blocks above it, each over its MLP's 384 products in shapes that change with the rows (on an
    AMD EPYC block 0's lora_b was off by 7.0e-5 of its size, past 546 x 2^-23). A mean of the
    batches' means is off by tens of percent."""
    step = grpo_step(Recording(), beta=0.04, adapter_scale=0.05)
    step.loss = PolicyLoss(loss_type, beta=0.04, max_completion_tokens=SAMPLING.max_tokens)
    p0, p1 = prompts
    completions = [p0.tokens[:4], p0.tokens[-3:], p1.tokens[:5], p1.tokens[-6:], p0.tokens[5:7], p0.tokens[9:15]]
    advantages = np.array([0.7, -0.7, -0.5, 0.5, 0.7, -0.7], np.float32)
    ones = np.ones(1, bool), np.ones(2, bool)
    parts = [
        step.prepare([p0], completions[:2], advantages[:2], ones[0]),
        step.prepare([p1, p0], completions[2:], advantages[2:], ones[1]),
    ]
    whole = step.prepare([p0, p1, p0], completions, advantages, np.ones(3, bool))

    accumulated = step.update(parts)
    got = dict(tree_flatten(step.optimizer.gradients))
    one = step.update([whole])
    want = dict(tree_flatten(step.optimizer.gradients))
    tol = fp32_tol(6 * 91 + 4 * 384)
    assert accumulated[0] == pytest.approx(one[0], rel=tol, abs=tol)
    assert max(np.abs(np.array(g)).max() for g in want.values()) > 0
    assert_tensors_close(got, want, tol)


@pytest.mark.once
@pytest.mark.slow
def test_grpo_trains_an_adapter_on_a_gguf_base(smollm2_gguf, tmp_path):
    """The real SmolLM2 Q4_1 file: rollouts, rewards and an update through its quantized blocks;
    one step moves every B from 0 (a completion's checksum as reward, so the groups differ)."""
    out = tmp_path / "out"
    options = dict(iters=1, batch_size=2, group_size=2, max_completion_tokens=4, val_batches=1, learning_rate=1e-3)
    cfg = TrainConfig(
        model=str(smollm2_gguf),
        data="data",
        adapter_path=str(out),
        objective="grpo",
        rewards=checksum_reward(tmp_path),
    )
    result = train(replace(cfg, **options), log=lambda _: None)
    (step,) = [r for r in read_metrics(out) if r["loss"] is not None]
    assert np.isfinite(result.losses).all() and step["skipped_groups"] < 1
    weights = mx.load(str(out / ADAPTER_WEIGHTS))
    assert all(np.abs(np.array(w)).max() > 0 for k, w in weights.items() if k.endswith("lora_b"))
