import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import ARCHS, write_jsonl
from mlx.utils import tree_flatten

from mlx_lora.config import LoRAConfig
from mlx_lora.data.batches import collate, collate_packs, epoch_packs
from mlx_lora.data.examples import load_split
from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base
from mlx_lora.model.lora import apply_lora, lora_layers
from mlx_lora.training.feed import loss_fn
from mlx_lora.training.packing import PackedRows, _per_token, enable_packing


@pytest.fixture(scope="module")
def examples(llama, tmp_path_factory):
    rows = [
        {"prompt": f"Q: What is {a} + {b}?\nA:", "completion": f" {a + b}" * (1 + a % 3)}
        for a in range(5)
        for b in range(2)
    ]
    path = write_jsonl(tmp_path_factory.mktemp("pack") / "train.jsonl", rows)
    return load_split(path, load_base(str(llama)).tokenizer, 2048, train_on_prompt=False)


def _adapted(path):
    """A base with a non-zero LoRA adapter on every linear, packing enabled."""
    mx.random.seed(0)
    base = load_base(str(path))
    apply_lora(base.model, LoRAConfig(targets="all-linear", num_layers=-1))
    for layer in lora_layers(base.model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.05
    enable_packing(base.model, base.config["model_type"])
    return base.model


def test_packs_hold_every_row_once_within_the_length(examples):
    lengths = [len(ex.tokens) for ex in examples]
    batches = epoch_packs(examples, batch_size=2, length=40, seed=0, epoch=0)
    packs = [pack for batch in batches for pack in batch]
    assert sorted(i for pack in packs for i in pack) == list(range(len(examples)))
    assert all(sum(lengths[i] for i in pack) <= 40 for pack in packs)
    assert all(len(batch) == 2 for batch in batches[:-1])
    # next fit: a pack is closed only when the following row would not fit
    order = [i for pack in packs for i in pack]
    assert order == list(np.random.default_rng([0, 0]).permutation(len(examples)))
    assert all(sum(lengths[i] for i in a) + lengths[b[0]] > 40 for a, b in zip(packs, packs[1:]))


def test_collated_pack_marks_rows_and_restarts_positions(examples):
    tokens, mask, segments = collate_packs(examples, [[0, 1], [2]])
    n0, n1, n2 = (len(examples[i].tokens) for i in range(3))
    assert segments[0].tolist() == [0] * n0 + [1] * n1 + [2] * (tokens.shape[1] - n0 - n1)  # padding: own segment
    assert tokens[0, n0 : n0 + n1].tolist() == examples[1].tokens.tolist()
    assert not mask[0, n0].item()  # a row's first token is never a target
    rows = PackedRows(segments)
    assert rows.offset[0].tolist() == list(range(n0)) + list(range(n1)) + list(range(tokens.shape[1] - n0 - n1))
    m = np.array(rows.make_mask(tokens.shape[1]))[0, 0]
    assert m[n0 + 2, n0 : n0 + 3].all() and not m[n0 + 2, :n0].any()  # sees its own row only, causally
    assert not m[n0 + 2, n0 + 3 :].any()


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_losses_equal_unpacked(hf_models, examples, arch):
    model = _adapted(hf_models[arch])
    rows = list(range(6))
    tokens, mask, segments = collate_packs(examples, [rows[:4], rows[4:]])
    packed_total, packed_count = loss_fn(model, tokens, mask, segments)
    alone = []
    for r in rows:  # each row alone, unpadded
        ex = examples[r]
        alone.append(loss_fn(model, mx.array(ex.tokens)[None], mx.array(ex.mask)[None]))
    for r in rows:  # the same row's loss read from the packed batch
        b, s = (0, r) if r < 4 else (1, r - 4)
        only = mask & (segments == s) & (mx.arange(2)[:, None] == b)
        assert loss_fn(model, tokens, only, segments)[0].item() == pytest.approx(alone[r][0].item(), rel=1e-5)
    unpacked_total = sum(l.item() * n.item() for l, n in alone) / sum(n.item() for _, n in alone)
    assert packed_count.item() == sum(n.item() for _, n in alone)
    assert packed_total.item() == pytest.approx(unpacked_total, rel=1e-5)
    # and the padded, unpacked batch agrees too
    assert loss_fn(model, *collate(examples, rows))[0].item() == pytest.approx(unpacked_total, rel=1e-5)


def test_packed_gradients_equal_unpacked(llama, examples):
    model = _adapted(llama)
    grad = nn.value_and_grad(model, lambda m, *b: loss_fn(m, *b)[0])
    _, packed = grad(model, *collate_packs(examples, [[0, 1, 2, 3]]))
    _, unpacked = grad(model, *collate(examples, [0, 1, 2, 3]))
    for (name, a), (_, b) in zip(tree_flatten(packed), tree_flatten(unpacked)):
        assert mx.allclose(a, b, rtol=1e-4, atol=1e-6).item(), name


def test_architecture_without_cache_positions_is_refused():
    """gpt2 adds learned absolute position embeddings computed from `cache.offset` itself."""
    from mlx_lm.models import gpt2

    args = gpt2.ModelArgs(
        model_type="gpt2",
        n_ctx=64,
        n_embd=32,
        n_head=2,
        n_layer=2,
        n_positions=64,
        layer_norm_epsilon=1e-5,
        vocab_size=50,
    )
    with pytest.raises(UserError, match="--pack is not supported for model type 'gpt2'"):
        enable_packing(gpt2.Model(args), "gpt2")


def test_rope_takes_one_position_per_token():
    from mlx_lm.models.rope_utils import initialize_rope

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    for rope in (nn.RoPE(8), initialize_rope(8, 10000.0, False, scaling, 64)):
        x = mx.random.normal((1, 2, 7, 8))  # (B, H, L, D)
        expected = mx.concatenate([rope(x[:, :, :3]), rope(x[:, :, 3:])], axis=2)  # rows of 3 and 4 tokens
        shifted = rope(x, offset=2)
        rope.__class__ = _per_token(type(rope))
        positions = mx.array([[0, 1, 2, 0, 1, 2, 3]])
        assert mx.allclose(rope(x, offset=positions), expected, atol=1e-6).item()
        assert mx.array_equal(rope(x, offset=2), shifted).item()  # a plain offset works as before
