"""Our preference losses equal TRL's on identical per-sequence log-probs: loss, rewards and the
gradient with respect to the policy log-probs (torch autograd on TRL's code vs mx.grad on ours).

TRL's code runs as written: DPOTrainer._compute_loss (DPO, IPO) with a stub trainer and a stub
model whose per-token log-probs carry each sequence's log-prob on its first completion token;
ORPOTrainer.odds_ratio_loss and CPOTrainer.cpo_loss (SimPO) with a stub holding the attributes
they read. Both sides compute in float32 from the same float32 inputs; only the order of
operations and the log-sigmoid formula differ, a few ulps on O(1) values, so rtol 1e-5 (about
80 ulps) with atol 1e-6 for values near zero.
"""

from collections import defaultdict
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_lora.training import objectives

RTOL, ATOL = 1e-5, 1e-6
B, T = 6, 12


def inputs(seed: int = 0):
    """Per-sequence summed log-probs (policy and reference, chosen and rejected), completion lengths."""
    rng = np.random.default_rng(seed)
    nc = rng.integers(1, T - 2, B).astype(np.float32)
    nr = rng.integers(1, T - 2, B).astype(np.float32)
    pc = (-rng.uniform(0.05, 3.0, B) * nc).astype(np.float32)
    pr = (-rng.uniform(0.05, 3.0, B) * nr).astype(np.float32)
    rc = (pc + rng.normal(0, 1.0, B)).astype(np.float32)
    rr = (pr + rng.normal(0, 1.0, B)).astype(np.float32)
    return pc, pr, rc, rr, nc, nr


def close(ours, theirs):
    np.testing.assert_allclose(np.array(ours), theirs.detach().numpy(), rtol=RTOL, atol=ATOL)


# --- TRL's DPOTrainer._compute_loss, run on stubs ----------------------------------------------


def trl_dpo(loss_type: str, beta: float, pc, pr, rc, rr, nc, nr):
    """TRL's loss and d loss / d (pc, pr), through its own _compute_loss."""
    from trl import DPOTrainer

    policy = torch.tensor(np.concatenate([pc, pr]), requires_grad=True)  # (2B,)
    lengths = np.concatenate([nc, nr]).astype(int)
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        completion_mask[i, 1 : 1 + n] = 1  # token 0 is the prompt
    per_token = torch.zeros(2 * B, T - 1)
    per_token = per_token.index_put((torch.arange(2 * B), torch.zeros(2 * B, dtype=torch.long)), policy)

    def model(**kwargs):
        zeros = torch.zeros(2 * B, T - 1)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model.training = True
    accelerator = SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(
        model=model,
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    batch = {
        "input_ids": torch.zeros(2 * B, T, dtype=torch.long),
        "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor(rc),
        "ref_rejected_logps": torch.tensor(rr),
    }
    loss = DPOTrainer._compute_loss(stub, model, batch, return_outputs=False)
    loss.backward()
    metrics = {k: v[0] for k, v in stub._metrics["train"].items()}
    return loss, policy.grad[:B], policy.grad[B:], metrics


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_equals_trl(beta):
    pc, pr, rc, rr, nc, nr = inputs()
    loss, gc, gr, metrics = trl_dpo("sigmoid", beta, pc, pr, rc, rr, nc, nr)

    def ours(pc, pr):
        return objectives.dpo(pc, pr, mx.array(rc), mx.array(rr), beta)[0]

    close(ours(mx.array(pc), mx.array(pr)), loss)
    ours_gc, ours_gr = mx.grad(ours, argnums=(0, 1))(mx.array(pc), mx.array(pr))
    close(ours_gc, gc)
    close(ours_gr, gr)
    _, chosen, rejected, _ = objectives.dpo(mx.array(pc), mx.array(pr), mx.array(rc), mx.array(rr), beta)
    assert abs(chosen.mean().item() - metrics["rewards/chosen"]) < 1e-5
    assert abs(rejected.mean().item() - metrics["rewards/rejected"]) < 1e-5
    assert (chosen > rejected).astype(mx.float32).mean().item() == pytest.approx(metrics["rewards/accuracies"])


@pytest.mark.parametrize("beta", [0.1, 0.05])
def test_ipo_equals_trl(beta):
    pc, pr, rc, rr, nc, nr = inputs(1)
    loss, gc, gr, _ = trl_dpo("ipo", beta, pc, pr, rc, rr, nc, nr)

    def ours(pc, pr):
        return objectives.ipo(pc, pr, mx.array(rc), mx.array(rr), mx.array(nc), mx.array(nr), beta)[0]

    close(ours(mx.array(pc), mx.array(pr)), loss)
    ours_gc, ours_gr = mx.grad(ours, argnums=(0, 1))(mx.array(pc), mx.array(pr))
    close(ours_gc, gc)
    close(ours_gr, gr)


# --- TRL's ORPO and CPO (SimPO) loss methods ---------------------------------------------------


def torch_nll(pc, nc):
    return -pc.sum() / nc.sum()


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_equals_trl(beta):
    """ORPO = NLL of the chosen - mean(beta * odds_ratio_loss) on average log-probs; the NLL term is
    fed the same way to both sides (TRL's own NLL also counts prompt tokens, ours completions only)."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    pc, pr, _, _, nc, nr = inputs(2)
    tc, tr = torch.tensor(pc, requires_grad=True), torch.tensor(pr, requires_grad=True)
    stub = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_r, rejected_r, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
        stub, tc / torch.tensor(nc), tr / torch.tensor(nr)
    )
    loss = torch_nll(tc, torch.tensor(nc)) - losses.mean()
    loss.backward()

    def ours(pc, pr):
        return objectives.orpo(pc, pr, mx.array(nc), mx.array(nr), beta)

    out = ours(mx.array(pc), mx.array(pr))
    close(out[0], loss)
    close(out[1], chosen_r)
    close(out[2], rejected_r)
    close(out[3].mean(), log_odds)
    ours_gc, ours_gr = mx.grad(lambda a, b: ours(a, b)[0], argnums=(0, 1))(mx.array(pc), mx.array(pr))
    close(ours_gc, tc.grad)
    close(ours_gr, tr.grad)


def trl_cpo(loss_type: str, beta: float, label_smoothing: float, gamma: float, chosen, rejected):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    stub = SimpleNamespace(
        beta=beta,
        label_smoothing=label_smoothing,
        loss_type=loss_type,
        simpo_gamma=gamma,
        alpha=0.0,
        accelerator=SimpleNamespace(device="cpu"),
    )
    return CPOTrainer.cpo_loss(stub, chosen, rejected)


@pytest.mark.parametrize(("beta", "gamma", "smoothing", "cpo_alpha"), [(2.0, 0.5, 0.0, 0.0), (2.5, 1.0, 0.1, 0.5)])
def test_simpo_equals_trl(beta, gamma, smoothing, cpo_alpha):
    pc, pr, _, _, nc, nr = inputs(3)
    tc, tr = torch.tensor(pc, requires_grad=True), torch.tensor(pr, requires_grad=True)
    losses, chosen_r, rejected_r = trl_cpo(
        "simpo", beta, smoothing, gamma, tc / torch.tensor(nc), tr / torch.tensor(nr)
    )
    loss = losses.mean() + cpo_alpha * torch_nll(tc, torch.tensor(nc))  # CPOTrainer.get_batch_loss_metrics
    loss.backward()

    def ours(pc, pr):
        return objectives.simpo(pc, pr, mx.array(nc), mx.array(nr), beta, gamma, smoothing, cpo_alpha)

    out = ours(mx.array(pc), mx.array(pr))
    close(out[0], loss)
    close(out[1], chosen_r)
    close(out[2], rejected_r)
    ours_gc, ours_gr = mx.grad(lambda a, b: ours(a, b)[0], argnums=(0, 1))(mx.array(pc), mx.array(pr))
    close(ours_gc, tc.grad)
    close(ours_gr, tr.grad)


def test_dpo_label_smoothing_is_the_conservative_sigmoid_loss():
    """TRL 1.x's DPO sigmoid loss has no label smoothing; ours is cDPO's, the formula TRL's CPO
    sigmoid loss uses, which on the log-ratios (policy - reference) is exactly conservative DPO."""
    pc, pr, rc, rr, _, _ = inputs(4)
    chosen = torch.tensor(pc - rc, requires_grad=True)
    rejected = torch.tensor(pr - rr, requires_grad=True)
    losses, _, _ = trl_cpo("sigmoid", 0.1, 0.2, 0.0, chosen, rejected)
    loss = losses.mean()
    loss.backward()

    def ours(pc, pr):
        return objectives.dpo(pc, pr, mx.array(rc), mx.array(rr), 0.1, 0.2)[0]

    close(ours(mx.array(pc), mx.array(pr)), loss)
    ours_gc, _ = mx.grad(ours, argnums=(0, 1))(mx.array(pc), mx.array(pr))
    close(ours_gc, chosen.grad)


def test_log1mexp_is_accurate_on_both_branches():
    x = np.array([-1e-6, -0.1, -0.69, -0.7, -5.0, -40.0], np.float64)
    np.testing.assert_allclose(
        np.array(objectives.log1mexp(mx.array(x.astype(np.float32)))), np.log(-np.expm1(x)), rtol=1e-5, atol=1e-12
    )
