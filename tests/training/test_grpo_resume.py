"""A GRPO run resumed from its checkpoint samples the rollouts the uninterrupted run sampled and
ends with its adapter, bit for bit: with one batch a step, with --grad-accumulation-steps 2, and on
a 4-bit base (QLoRA) with a KL term, whose reference is the quantized base with the adapter off."""

from dataclasses import replace

import mlx.core as mx
import pytest
from conftest import checksum_reward
from mlx_lm.convert import convert

from mlx_lora.config import TrainConfig
from mlx_lora.formats.native import ADAPTER_WEIGHTS
from mlx_lora.reporting.metrics import read_metrics
from mlx_lora.training.checkpoint import checkpoint_dir
from mlx_lora.training.loop import train

# what a step's rollouts were: another draw gives other completions, so other rewards and loss
ROLLOUT_KEYS = ("loss", "reward", "reward_std", "completion_length", "skipped_groups", "clip_ratio", "kl")


def grpo_config(llama, data, out, reward, **kw) -> TrainConfig:
    """4 steps of 2 prompts x 2 completions on the tiny model, rewarded by a checksum of the
    completion's text (so a group's rewards differ), at a learning rate that moves the adapter."""
    options = dict(
        model=str(llama),
        data=str(data),
        adapter_path=str(out),
        objective="grpo",
        rewards=reward,
        iters=4,
        batch_size=2,
        group_size=2,
        max_completion_tokens=8,
        num_layers=2,
        rank=4,
        learning_rate=1e-2,
        val_batches=1,
        val_every=0,
        report_every=1,
        save_every=2,
    )
    return TrainConfig(**options | kw)


def step_records(out) -> dict[int, dict]:
    return {r["step"]: {k: r[k] for k in ROLLOUT_KEYS} for r in read_metrics(out) if r["loss"] is not None}


@pytest.mark.parametrize(
    "variant",
    [{}, dict(grad_accumulation_steps=2), dict(quantized=4, beta=0.04)],
    ids=["plain", "accumulated", "qlora"],
)
def test_a_resumed_grpo_run_samples_and_ends_as_the_uninterrupted_run(llama, tiny_data, tmp_path, variant):
    """Steps 3-4 after the resume run the same prompts in the same shapes as in the straight run, so
    equal to the bit when the random key, the prompt position, the adapter and AdamW's moments all
    came back. (With load_checkpoint's restore_rng removed, steps 3-4 sample other completions: their
    rewards differ and this fails.)"""
    options = dict(variant)
    bits = options.pop("quantized", None)
    model = llama
    if bits:
        model = tmp_path / f"q{bits}"
        convert(str(llama), str(model), quantize=True, q_bits=bits, q_group_size=32)
    cfg = grpo_config(model, tiny_data, tmp_path / "straight", checksum_reward(tmp_path), **options)
    straight = train(cfg, log=lambda _: None)
    checkpoint = checkpoint_dir(cfg.adapter_path, 2)
    resumed = train(replace(cfg, resume=str(checkpoint), adapter_path=str(tmp_path / "resumed")), log=lambda _: None)

    want, got = step_records(tmp_path / "straight"), step_records(tmp_path / "resumed")
    assert list(want) == [1, 2, 3, 4] and list(got) == [3, 4]
    assert got == {s: want[s] for s in (3, 4)}  # the rollouts after the resume are the straight run's
    assert len({want[s]["reward"] for s in want}) == 4 and all(w["skipped_groups"] == 0 for w in want.values())
    assert resumed.losses == straight.losses[2:]
    # with beta the reference pass ran: kl > 0 once the adapter has moved (at step 1 it is still B = 0)
    assert [w["kl"] > 0 for w in want.values()] == [False] + [bool(cfg.beta)] * 3

    final = mx.load(str(tmp_path / "resumed" / ADAPTER_WEIGHTS))
    expected = mx.load(str(tmp_path / "straight" / ADAPTER_WEIGHTS))
    at_resume = mx.load(str(checkpoint / ADAPTER_WEIGHTS))
    assert final.keys() == expected.keys() == at_resume.keys()
    assert all(mx.array_equal(final[k], expected[k]) for k in expected)
    assert not all(mx.array_equal(at_resume[k], expected[k]) for k in expected)  # steps 3-4 did update it
