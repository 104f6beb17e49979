"""Preference rows: pairs of Examples sharing the prompt, the loss on completions only, and
one-line errors for the rows that cannot be compared."""

import numpy as np
import pytest

from mlx_lora.data.examples import load_split
from mlx_lora.data.preference import collate_pairs, load_pairs
from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base
from tests.conftest import write_jsonl

ROWS = [
    {"prompt": "Q: What is 2 + 3?\nA:", "chosen": " 2 + 3 = 5. #### 5", "rejected": " 2 + 3 = 6. #### 6"},
    {"prompt": "Q: What is 7 - 4?\nA:", "chosen": " 7 - 4 = 3. #### 3", "rejected": " 7 + 4 = 11. #### 11"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_base(None).tokenizer  # the shipped model's, which has a chat template


def _pairs(tmp_path, rows, tokenizer, max_seq_length=2048):
    return load_pairs(write_jsonl(tmp_path / "train.jsonl", rows), tokenizer, max_seq_length)


def test_a_row_is_a_pair_sharing_the_prompt_with_the_loss_on_each_completion(tmp_path, tokenizer):
    pairs = _pairs(tmp_path, ROWS, tokenizer)
    prompt = tokenizer.encode(ROWS[0]["prompt"])
    for pair, row in zip(pairs, ROWS):
        for side, text in ((pair.chosen, row["chosen"]), (pair.rejected, row["rejected"])):
            completion = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
            prompt = tokenizer.encode(row["prompt"])
            assert side.tokens.tolist() == prompt + completion
            assert side.mask.tolist() == [False] * len(prompt) + [True] * len(completion)
    assert len(pairs[0].tokens) == len(pairs[0].chosen.tokens) + len(pairs[0].rejected.tokens)


def test_conversational_rows_render_with_the_chat_template_and_learn_the_reply_only(tmp_path, tokenizer):
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "6"}],
    }
    (pair,) = _pairs(tmp_path, [row], tokenizer)
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + row["chosen"], tokenize=False)
    n = len(tokenizer.encode(head, add_special_tokens=False))
    assert pair.chosen.tokens.tolist() == tokenizer.encode(full, add_special_tokens=False)
    assert not pair.chosen.mask[:n].any() and pair.chosen.mask[n:].all()
    assert pair.chosen.tokens[:n].tolist() == pair.rejected.tokens[:n].tolist()
    learned = tokenizer.decode(pair.chosen.tokens[pair.chosen.mask].tolist())
    assert learned.startswith("5")


def test_collated_pairs_put_the_chosen_sides_first(tmp_path, tokenizer):
    pairs = _pairs(tmp_path, ROWS, tokenizer)
    tokens, mask = collate_pairs(pairs, [1, 0])
    assert tokens.shape[0] == 4
    rows = [pairs[1].chosen, pairs[0].chosen, pairs[1].rejected, pairs[0].rejected]
    for i, ex in enumerate(rows):
        assert np.array(tokens[i, : len(ex.tokens)]).tolist() == ex.tokens.tolist()
        assert np.array(mask[i]).sum() == ex.mask.sum()


P = "Q: 1 + 1?\nA:"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": P, "chosen": " 2"}, "key 'rejected' missing; a preference row needs prompt, chosen and rejected"),
        ({"chosen": " 2", "rejected": " 3"}, "key 'prompt' missing"),
        ({"prompt": P, "chosen": " 2", "rejected": " 2"}, "'chosen' and 'rejected' are the same"),
        ({"prompt": P, "chosen": " ", "rejected": " 3"}, "'chosen' is empty"),
        ({"prompt": P, "chosen": 2, "rejected": " 3"}, "'chosen' must be a string like the prompt, got int"),
        ({"prompt": P, "chosen": " 2", "rejected": " 3", "completion": " 2"}, "row mixes formats"),
        (
            {"prompt": [{"role": "user", "content": "1 + 1?"}], "chosen": "2", "rejected": "3"},
            "'chosen' must be a non-empty list of",
        ),
        (
            {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": [], "rejected": []},
            "messages[0] has role 'assistant' where 'user' belongs",
        ),
    ],
)
def test_bad_rows_are_one_line_errors_naming_file_and_line(tmp_path, tokenizer, row, message):
    with pytest.raises(UserError) as e:
        _pairs(tmp_path, [ROWS[0], row], tokenizer)
    assert "train.jsonl:2: " in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_over_long_pairs_are_refused_not_truncated(tmp_path, tokenizer):
    rows = ROWS + [{"prompt": P, "chosen": " 2" * 60, "rejected": " 3"}]
    with pytest.raises(UserError, match=r"train.jsonl:3: a side has \d+ tokens, more than --max-seq-length 60; raise"):
        _pairs(tmp_path, rows, tokenizer, max_seq_length=60)


def test_text_and_conversational_rows_do_not_mix(tmp_path, tokenizer):
    chat = {
        "prompt": [{"role": "user", "content": "1 + 1?"}],
        "chosen": [{"role": "assistant", "content": "2"}],
        "rejected": [{"role": "assistant", "content": "3"}],
    }
    with pytest.raises(UserError, match="train.jsonl:3: conversational row, but line 1 is text; use one format"):
        _pairs(tmp_path, ROWS + [chat], tokenizer)


def test_sft_loading_points_preference_rows_to_the_objectives(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(UserError, match="train.jsonl:1: a preference row .* --objective dpo, ipo, orpo or simpo"):
        load_split(path, tokenizer, 2048, train_on_prompt=False)


def test_preference_loading_refuses_sft_rows(tmp_path, tokenizer):
    with pytest.raises(UserError, match="train.jsonl:1: not a preference row"):
        _pairs(tmp_path, [{"prompt": P, "completion": " 2"}], tokenizer)
