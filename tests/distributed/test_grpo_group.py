"""GRPO in a data-parallel group: each rank holds whole groups of completions, and the update the
group makes is the one-process update on all of them; the rollout metrics count every rank's. The
ranks sample from keys of their own, so 1 and 2 processes draw different completions: the update
is compared on given completions, the sampling step on what the ranks must agree on."""

import json
import re

import mlx.core as mx
import numpy as np
import pytest
from conftest import assert_tensors_close, checksum_reward, fp32_tol
from test_group import end, mlx_launch_train, ring_hostfile, start_rank

from mlx_lora.reporting.metrics import read_metrics
from mlx_lora.training.grpo_step import VALID_ROLLOUTS

# Each rank: the update on its share of 3 groups (rank 0: groups 0 and 2, rank 1: group 1, as
# World.shard strides them) for each case of argv[2]: a loss type, with every group kept ("all")
# or rank 1's skipped ("skip"), so that it adds nothing; rank 0 also makes the one-process update
# on all of them. Gradients go to
# OUT/rank{r}-{case}.npz, one process's to OUT/one-{case}.npz. Then one sampled step on a batch
# whose rank-0 prompts all score 0 (skipped) and whose rank-1 prompts score by text: its metrics
# and the adapter after it, per rank.
UPDATE_SCRIPT = """
import json, sys
from pathlib import Path
import mlx.core as mx, mlx.optimizers as optim, numpy as np
from mlx.utils import tree_flatten
from conftest import Recording
from mlx_lora.config import LoRAConfig
from mlx_lora.data.rows import file_rows
from mlx_lora.distributed.group import SOLO, init
from mlx_lora.model.base import load_base
from mlx_lora.model.lora import apply_lora, lora_layers
from mlx_lora.training.grpo import PolicyLoss
from mlx_lora.training.grpo_step import GrpoStep, Sampling, read_prompts
from mlx_lora.training.rewards import Reward

out = Path(sys.argv[1])
world = init(120)


def make_step(loss_type, world, rewards=(), optimizer=None):
    mx.random.seed(0)
    base = load_base(None)
    apply_lora(base.model, LoRAConfig())
    for layer in lora_layers(base.model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    optimizer = optimizer or Recording()
    optimizer.init(base.model.trainable_parameters())
    loss = PolicyLoss(loss_type, beta=0.04, max_completion_tokens=6)
    sampling = Sampling(group_size=2, max_tokens=6, temperature=1.0, top_p=1.0)
    weights = [1.0] * len(rewards)
    return GrpoStep(base.model, base.tokenizer, optimizer, sampling, loss, list(rewards), weights, world=world)


def grads(step, prompts, completions, advantages, keep, groups):
    rows = [i for g in groups for i in (2 * g, 2 * g + 1)]
    mine = [prompts[g] for g in groups]
    u = step.prepare(mine, [completions[i] for i in rows], advantages[rows], keep[groups])
    result = step.update([u] if u is not None else [])
    return {k: np.array(v) for k, v in tree_flatten(step.optimizer.gradients)}, result


base = load_base(None)
p0, p1 = read_prompts(file_rows("data/train.jsonl")[:2], base.tokenizer)
prompts = [p0, p1, p0]
completions = [p0.tokens[:4], p0.tokens[-3:], p1.tokens[:5], p1.tokens[-6:], p0.tokens[5:7], p0.tokens[9:15]]
advantages = np.array([0.7, -0.7, -0.5, 0.5, 0.7, -0.7], np.float32)
for case in sys.argv[2].split(","):
    loss_type, which = case.split("-")
    keep = np.array([True, which == "all", True])
    mine = list(range(3))[world.rank :: world.size]
    g, result = grads(make_step(loss_type, world), prompts, completions, advantages, keep, mine)
    np.savez(out / f"rank{world.rank}-{case}.npz", loss=result[0], kl=result[1], clip=result[2], **g)
    if world.rank == 0:
        g, result = grads(make_step(loss_type, SOLO), prompts, completions, advantages, keep, [0, 1, 2])
        np.savez(out / f"one-{case}.npz", loss=result[0], kl=result[1], clip=result[2], **g)

score = Reward("text", lambda t, c: 0.0 if t.where == p0.task.where else float(sum(map(ord, c)) % 10007))
step = make_step("dapo", world, [score], optim.SGD(learning_rate=1e-2))
stats = step.step([[p0, p1, p0, p1][world.rank :: world.size]])
adapter = dict(tree_flatten(step.model.trainable_parameters()))
mx.save_safetensors(str(out / f"adapter{world.rank}.safetensors"), adapter)
print(json.dumps({k: v for k, v in stats.items() if not k.endswith("_seconds")}), flush=True)
"""

# every loss type with all groups kept; dapo (the token normaliser) also with rank 1's skipped
CASES = ["grpo-all", "dr_grpo-all", "dapo-all", "gspo-all", "dapo-skip"]


def test_a_group_updates_as_one_process_on_the_same_completions(tmp_path):
    """Two ranks, each with its share of the groups, make the update one process makes on all of
    them, for every loss type: dapo's normaliser is the tokens of every rank, dr_grpo's the
    completions of every rank, and a rank whose groups were all skipped adds nothing but still
    takes part. The halves are summed apart then added (other shapes, so sums in another order):
    the longest sums, the gradients' over 6 rows x 91 positions, round apart by 546 x 2^-23; a
    normaliser of one rank's alone is off by a factor of 2 or more."""
    hostfile = ring_hostfile(tmp_path, 2)
    ranks = [start_rank(r, hostfile, ["-c", UPDATE_SCRIPT, str(tmp_path), ",".join(CASES)]) for r in range(2)]
    outputs = [end(proc, timeout=600) for proc in ranks]
    for proc, (_, err) in zip(ranks, outputs):
        assert proc.returncode == 0, err
    tol = fp32_tol(6 * 91)
    for case in CASES:
        one = dict(np.load(tmp_path / f"one-{case}.npz"))
        assert max(np.abs(v).max() for k, v in one.items() if "lora" in k) > 0, case
        for r in range(2):
            got = dict(np.load(tmp_path / f"rank{r}-{case}.npz"))
            for key in ("loss", "kl", "clip"):
                assert got.pop(key) == pytest.approx(float(one[key]), rel=tol, abs=tol), (case, r, key)
            assert_tensors_close(got, {k: v for k, v in one.items() if k not in ("loss", "kl", "clip")}, tol)

    # the sampled step: rank 0's two groups are skipped, rank 1's kept; both report the group's
    stats = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert stats[0] == stats[1]
    assert 0.5 <= stats[0]["skipped_groups"] < 1  # rank 0's 2 of the 4 groups: rank 0 alone would say 1.0
    assert stats[0]["reward"] > 0 and stats[0]["loss"] != 0  # rank 1's rewards and update, seen by rank 0
    adapters = [mx.load(str(tmp_path / f"adapter{r}.safetensors")) for r in range(2)]
    assert all(mx.array_equal(adapters[0][k], adapters[1][k]) for k in adapters[0])  # one update, on every rank


@pytest.mark.once
@pytest.mark.slow
def test_train_grpo_under_mlx_launch(tmp_path):
    """`mlx.launch -n 2 -- mlx-lora train --objective grpo`: one voice, rank 0 writes the adapter,
    the metrics and every valid completion (each rank samples all valid prompts from --seed); a
    group resumed from rank 0's checkpoint draws what the uninterrupted group drew (every rank's
    key comes back from the one saved) and ends with its adapter, bit for bit (same shapes)."""
    options = dict(
        objective="grpo",
        rewards=checksum_reward(tmp_path),
        iters=2,
        batch_size=4,
        group_size=2,
        max_completion_tokens=6,
        val_batches=1,
        report_every=1,
        save_every=1,
        learning_rate=1e-2,
        adapter_path=tmp_path / "two",
    )
    out = mlx_launch_train(options)
    assert out.count("group of 2 processes") == 1
    assert len(re.findall(r"^step \d+/2  loss ", out, re.M)) == 2
    steps = [r for r in read_metrics(tmp_path / "two") if r["loss"] is not None]
    assert [r["step"] for r in steps] == [1, 2] and all(r["reward"] is not None for r in steps)
    rollouts = [json.loads(line) for line in (tmp_path / "two" / VALID_ROLLOUTS).read_text().splitlines()]
    assert len(rollouts) == 2 * 4 * 2  # validations at steps 0 and 2, 4 prompts x 2 completions, once each
    assert (tmp_path / "two" / "adapters.safetensors").is_file()
    checkpoint = tmp_path / "two" / "checkpoints" / "step-0000001"
    assert (checkpoint / "adapters.safetensors").is_file()

    mlx_launch_train(dict(resume=checkpoint, adapter_path=tmp_path / "three"))
    resumed = [r for r in read_metrics(tmp_path / "three") if r["loss"] is not None]
    assert [(r["step"], r["reward"], r["loss"]) for r in resumed] == [(2, steps[1]["reward"], steps[1]["loss"])]
    two, three = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("two", "three"))
    assert all(mx.array_equal(two[k], three[k]) for k in two)
