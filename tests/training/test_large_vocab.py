"""Gemma 3's 262,144-token vocabulary: the head is the largest thing a step computes, so the loss
must score only the learned tokens, a chunk at a time, as the memory estimate assumes."""

import pytest
from conftest import PEAK_RATIO, make_hf_model, training_peak, write_jsonl

GEMMA3_VOCAB = 262144


@pytest.mark.slow
def test_a_262k_vocabulary_trains_within_the_memory_estimate(tmp_path):
    # hidden 64: the tied embedding/head is 262144 x 64 fp32 = 64 MB. Each row learns 2-3 of its ~195
    # tokens, so the estimate counts 32 rows of logits: 0.25 GB against a measured peak of 0.23 GB
    # (2026-12-05). Training on the whole (B, T, 262144) logits (feed.loss_fn) peaked at 2.6 GB.
    model = make_hf_model(tmp_path / "model", "gemma3", vocab_size=GEMMA3_VOCAB)
    rows = [{"prompt": " ".join(["Q: What is 3 + 4? A: 7."] * 8), "completion": f" {i}"} for i in range(8)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "valid.jsonl", rows[:4])
    cfg = dict(model=str(model), data=str(tmp_path / "data"), adapter_path=str(tmp_path / "run"), iters=3,
               batch_size=4, num_layers=16, val_every=0, val_batches=1, save_every=0)  # fmt: skip
    estimate, peak, rss = training_peak(cfg)
    low, high = PEAK_RATIO
    assert low * peak <= estimate <= high * peak, f"estimate {estimate:,} B, MLX peak {peak:,} B, max RSS {rss:,} B"
