"""Preference runs: the reference is the base with the adapter off (so step 1 of DPO is exactly
ln 2), rewards are reported, accumulation and resume hold, and what cannot run is refused in one line."""

import json
import math
from dataclasses import replace

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.config import LoRAConfig, TrainConfig
from mlx_lora.data.preference import collate_pairs, load_pairs
from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base
from mlx_lora.model.lora import apply_lora, first_adapted_block, lora_layers
from mlx_lora.reporting.metrics import read_metrics
from mlx_lora.training.checkpoint import checkpoint_dir
from mlx_lora.training.loop import train
from mlx_lora.training.objectives import Objective
from mlx_lora.training.preference import PreferenceFeed, make_preference_feed, sequence_logps
from mlx_lora.training.step import make_step
from tests.conftest import preference_rows, write_jsonl


@pytest.fixture
def pref_data(tmp_path):
    write_jsonl(tmp_path / "pref" / "train.jsonl", preference_rows(8))
    write_jsonl(tmp_path / "pref" / "valid.jsonl", preference_rows(4, 20))
    return tmp_path / "pref"


def _config(llama, data, out, **kw) -> TrainConfig:
    base = dict(
        model=str(llama),
        data=str(data),
        adapter_path=str(out),
        objective="dpo",
        iters=4,
        batch_size=2,
        rank=4,
        num_layers=2,
        learning_rate=1e-2,
        val_every=0,
        report_every=1,
        save_every=0,
    )
    return TrainConfig(**{**base, **kw})


def test_dpo_starts_at_ln2_and_reports_rewards(llama, pref_data, tmp_path):
    """At step 1 the policy is the base (B = 0) and so is the reference: every pair's log-ratio
    margin is 0 and the loss is ln 2, up to the float noise of different batch shapes."""
    lines = []
    result = train(_config(llama, pref_data, tmp_path / "out"), log=lines.append)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert result.val_losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert any(line.startswith("reference: log-probs of 12 pairs") for line in lines)
    assert any(line.startswith("step 4/4  loss") and "  acc " in line and "  margin " in line for line in lines)
    steps = [r for r in read_metrics(tmp_path / "out") if r["loss"] is not None]
    assert len(steps) == 4
    for r in steps:
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"])
        assert 0 <= r["rewards/accuracies"] <= 1 and r["log_odds_chosen"] is None
    assert steps[0]["rewards/chosen"] == pytest.approx(0, abs=1e-5)  # beta * (policy - reference) at step 1
    first, last = [r for r in read_metrics(tmp_path / "out") if r["val_loss"] is not None]
    assert first["val_rewards/margins"] == pytest.approx(0, abs=1e-5)  # the valid pairs, before any step
    assert 0 <= last["val_rewards/accuracies"] <= 1 and last["rewards/chosen"] is None
    assert any(line.startswith("step 0/4  val loss 0.693  acc ") for line in lines)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["training"]["objective"] == "dpo"


@pytest.mark.parametrize("objective", ["ipo", "orpo", "simpo"])
def test_other_objectives_train(llama, pref_data, tmp_path, objective):
    lines = []
    result = train(_config(llama, pref_data, tmp_path / "out", objective=objective, iters=3), log=lines.append)
    assert all(math.isfinite(x) for x in result.losses)
    assert result.losses[-1] < result.losses[0]
    assert any(line.startswith("reference:") for line in lines) == (objective == "ipo")
    record = [r for r in read_metrics(tmp_path / "out") if r["loss"] is not None][-1]
    assert (record["log_odds_chosen"] is not None) == (objective == "orpo")


def adapted_feed(llama, pref_data, seed: int, scale: float, batch_size: int):
    """The base with a random LoRA (B ~ N(0, scale)) on q, v of 2 blocks, the train pairs, the first
    adapted block and a DPO feed over them (its reference pass run): (base, pairs, first, feed)."""
    base = load_base(str(llama))
    mx.random.seed(seed)
    apply_lora(base.model, LoRAConfig(targets="q_proj,v_proj", num_layers=2, rank=4))
    for layer in lora_layers(base.model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * scale
    pairs = load_pairs(pref_data / "train.jsonl", base.tokenizer, 2048)
    first = first_adapted_block(base.model)
    objective = Objective("dpo", 0.1)
    return (
        base,
        pairs,
        first,
        make_preference_feed(base.model, first, {"train": pairs}, objective, batch_size, log=lambda _: None),
    )


def test_accumulated_pairs_give_the_update_of_the_big_batch(llama, pref_data):
    """DPO's loss is a mean over pairs, so two accumulated batches of 2 pairs step exactly as one of 4."""
    base, pairs, first, feed = adapted_feed(llama, pref_data, seed=0, scale=0.1, batch_size=2)

    def update(batches):
        w0 = base.model.trainable_parameters()
        step, state = make_step(base.model, optim.SGD(learning_rate=1.0), feed=feed)
        acc = None
        for i, rows in enumerate(batches):
            acc = step(feed.inputs(pairs, rows, collate_pairs(pairs, rows)), acc, i == len(batches) - 1)
        mx.eval(state, acc)
        after = base.model.trainable_parameters()
        base.model.update(w0)
        return after, (acc[0] / acc[1]).item(), (acc[3] / acc[1]).tolist()

    small, small_loss, small_stats = update([[0, 5], [2, 7]])
    big, big_loss, big_stats = update([[0, 5, 2, 7]])
    assert small_loss == pytest.approx(big_loss, rel=1e-5)
    assert small_stats == pytest.approx(big_stats, rel=1e-5, abs=1e-6)
    for (name, a), (_, b) in zip(tree_flatten(small), tree_flatten(big)):
        assert mx.allclose(a, b, rtol=1e-4, atol=1e-6).item(), name


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_a_rank_without_pairs_adds_nothing(llama, pref_data, objective):
    """A group's rank left without pairs of a batch gets one with nothing learned (batches.py): its
    loss, pair count, statistics and gradients must all be 0 and finite (ORPO's log(1 - p) of an
    empty completion would be -inf), so the group's sums are those of the other ranks."""
    base = load_base(str(llama))
    apply_lora(base.model, LoRAConfig(targets="q_proj,v_proj", num_layers=2, rank=4))
    pairs = load_pairs(pref_data / "train.jsonl", base.tokenizer, 2048)
    feed = make_preference_feed(
        base.model, first_adapted_block(base.model), {"train": pairs}, Objective(objective, 0.1), 2, log=lambda _: None
    )
    step, state = make_step(base.model, optim.SGD(learning_rate=1.0), feed=feed)
    tokens, mask = collate_pairs(pairs, [3])
    loss, count, grads, stats = step(feed.inputs(pairs, [3], (tokens, mx.zeros_like(mask))), None, False)
    assert loss.item() == 0 and count.item() == 0 and not mx.any(stats).item()
    assert all(not mx.any(g).item() for _, g in tree_flatten(grads))
    loss, count, _, stats = step(feed.inputs(pairs, [3], (tokens, mask)), None, False)  # the same pair, real
    assert count.item() == 1 and mx.isfinite(loss).item() and loss.item() != 0


def _transformers_logps(model_dir, pairs) -> np.ndarray:
    """(N, 2) summed completion log-probs of every pair's sides by transformers' own forward, as
    TRL's concatenated forward takes them: log_softmax of the logits at each masked next token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = np.zeros((len(pairs), 2))
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            for j, side in enumerate((pair.chosen, pair.rejected)):
                tokens = torch.tensor(side.tokens[None].astype(np.int64))
                logps = torch.log_softmax(model(tokens).logits[0, :-1].float(), -1)  # (L-1, V)
                picked = logps.gather(-1, tokens[0, 1:, None])[:, 0]
                out[i, j] = float((picked * torch.tensor(side.mask[1:])).sum())
    return out


def test_log_probs_equal_transformers_and_the_whole_forward_with_the_prefix_cached(llama, pref_data):
    """The reference pass scores only completion tokens through the cut, and fills the prefix cache
    the later passes read: its log-probs equal transformers' on the base, and the policy's (adapter
    on, frozen blocks from the cache) equal our own whole-model forward."""
    base, pairs, first, feed = adapted_feed(llama, pref_data, seed=1, scale=0.5, batch_size=3)
    assert first > 0 and feed.cache_prefix  # the path under test: cut, and the frozen blocks cached
    assert all(cache.done.all() for cache in feed.caches.values())  # filled by the reference pass
    # Summed over <= 12 tokens of a 1e-5-accurate fp32 log-softmax (different matmul orders)
    reference = feed.reference[id(pairs)]
    np.testing.assert_allclose(reference, _transformers_logps(llama, pairs), rtol=1e-5, atol=2e-4)
    uncut = PreferenceFeed(Objective("dpo", 0.1), None, cache_prefix=False)  # a model that cannot be cut
    np.testing.assert_allclose(uncut.reference_logps(base.model, pairs, 3), reference, rtol=1e-5, atol=2e-4)
    policy = feed.pair_logps(base.model, pairs, 5)  # other batches than the reference pass's
    base.model.eval()
    whole, _ = sequence_logps(base.model, *collate_pairs(pairs, list(range(len(pairs)))))  # (2N,)
    np.testing.assert_allclose(policy, np.array(whole).reshape(2, -1).T, rtol=1e-5, atol=2e-4)
    assert np.abs(policy - reference).min() > 1e-2  # the adapter changed every score


def test_resumed_run_recomputes_the_reference_and_equals_the_uninterrupted_run(llama, pref_data, tmp_path):
    cfg = _config(llama, pref_data, tmp_path / "out", save_every=2, dropout=0.1)
    straight = train(cfg, log=lambda _: None)
    resumed = train(replace(cfg, resume=str(checkpoint_dir(cfg.adapter_path, 2))), log=lambda _: None)
    assert resumed.losses == straight.losses[2:]


def test_dora_with_early_stopping_and_accumulation(llama, pref_data, tmp_path):
    cfg = _config(
        llama,
        pref_data,
        tmp_path / "out",
        dora=True,
        grad_accumulation_steps=2,
        lr_schedule="cosine",
        warmup_steps=1,
        val_every=1,
        early_stopping_patience=1,
    )
    result = train(cfg, log=lambda _: None)
    assert result.best_step is not None and result.val_losses[0] == pytest.approx(math.log(2), abs=1e-5)


def test_qlora_ipo_with_grad_checkpointing(llama, pref_data, tmp_path):
    """A 4-bit base: the reference is the quantized base with the adapter off."""
    from mlx_lm.convert import convert

    convert(str(llama), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=32)
    cfg = _config(tmp_path / "q4", pref_data, tmp_path / "out", objective="ipo", grad_checkpoint=True, iters=2)
    result = train(cfg, log=lambda _: None)
    assert all(math.isfinite(x) for x in result.losses)
    ipo_at_start = (1 / (2 * 0.1)) ** 2  # no margin yet: (0 - 1/(2 tau))^2
    assert result.val_losses[0] == pytest.approx(ipo_at_start, rel=1e-5)


def test_sft_on_preference_rows_is_refused(llama, pref_data, tmp_path):
    with pytest.raises(UserError, match="train.jsonl:1: a preference row"):
        train(_config(llama, pref_data, tmp_path / "out", objective="sft"), log=lambda _: None)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--objective", "kto"], "--objective must be one of sft, dpo, ipo, orpo, simpo, grpo, got 'kto'"),
        (["--objective", "dpo", "--pack"], "--pack does not apply to --objective dpo"),
        (["--objective", "orpo", "--train-on-prompt"], "--train-on-prompt does not apply to --objective orpo"),
        (["--objective", "dpo", "--init", "pissa"], "--init pissa moves part of the base into the adapter"),
        (["--objective", "dpo", "--beta", "0"], "--beta must be positive, got 0.0"),
        (["--objective", "simpo", "--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5), got 0.5"),
        (["--beta", "0.2"], "--beta applies to --objective dpo or ipo or orpo or simpo or grpo, not sft"),
        (["--objective", "dpo", "--simpo-gamma", "1"], "--simpo-gamma applies to --objective simpo, not dpo"),
    ],
)
def test_bad_preference_options_exit_2_with_one_line(flags, message):
    result = CliRunner().invoke(app, ["train", *flags])
    assert result.exit_code == 2 and message in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_conversational_rows_train(llama, tmp_path):
    """Rows of messages, rendered with the chat template (the shipped tokenizer's, copied into
    the test model): DPO starts at ln 2 on them too."""

    def chat(rows):
        return [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]

    write_jsonl(tmp_path / "chat" / "train.jsonl", chat(preference_rows(6)))
    write_jsonl(tmp_path / "chat" / "valid.jsonl", chat(preference_rows(2, 20)))
    result = train(_config(llama, tmp_path / "chat", tmp_path / "out", iters=2), log=lambda _: None)
    assert result.losses[0] == pytest.approx(math.log(2), abs=1e-5)
