import weakref

import numpy as np
import pytest
from conftest import write_jsonl

from mlx_lora.data.batches import collate, epoch_batches
from mlx_lora.data.examples import Example, ExampleSet, load_split
from mlx_lora.data.rows import read_rows
from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base
from mlx_lora.training.feed import loss_fn


@pytest.fixture(scope="module")
def base(llama):
    return load_base(str(llama))


def test_completion_mask_covers_completion_and_eos_only(base, tmp_path):
    tok = base.tokenizer
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q: 1+1?\nA:", "completion": " 2"}])
    [ex] = load_split(path, tok, 2048, train_on_prompt=False)
    prompt = tok.encode("Q: 1+1?\nA:")
    assert list(ex.tokens) == prompt + tok.encode(" 2", add_special_tokens=False) + [tok.eos_token_id]
    assert list(ex.mask) == [False] * len(prompt) + [True, True, True]
    [ex] = load_split(path, tok, 2048, train_on_prompt=True)
    assert list(ex.mask) == [False] + [True] * (len(ex.tokens) - 1)


def test_chat_mask_covers_assistant_turns_only(base, tmp_path):
    tok = base.tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    [ex] = load_split(write_jsonl(tmp_path / "t.jsonl", [{"messages": messages}]), tok, 2048, False)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex.tokens.tolist()) == full
    learned = tok.decode(ex.tokens[ex.mask].tolist())
    assert "Hello" in learned and "4" in learned
    assert "Hi" not in learned and "Be brief" not in learned and "2+2" not in learned


def test_padding_never_counts_in_the_loss(base, tmp_path):
    """A row's loss is the same alone and padded beside a much longer row."""
    rows = [{"prompt": "Q:", "completion": " 5"}, {"prompt": "Q: " + "x" * 40, "completion": " 7 and more"}]
    examples = load_split(write_jsonl(tmp_path / "t.jsonl", rows), base.tokenizer, 2048, False)
    alone, n_alone = loss_fn(base.model, *collate(examples, [0]))
    tokens, mask = collate(examples, [0, 1])
    assert tokens.shape[1] > len(examples[0].tokens)
    _, n_both = loss_fn(base.model, tokens, mask)
    assert n_alone.item() == examples[0].mask.sum()
    assert n_both.item() == examples[0].mask.sum() + examples[1].mask.sum()
    # the padded copy of row 0, scored on its own mask, must give the same loss
    padded, _ = loss_fn(base.model, tokens[:1], mask[:1])
    assert abs(padded.item() - alone.item()) < 1e-5


def test_long_rows_are_truncated_with_one_warning(base, tmp_path):
    rows = [{"text": "a" * 50}, {"text": "b" * 10}, {"text": "c" * 60}]
    logged = []
    examples = load_split(write_jsonl(tmp_path / "t.jsonl", rows), base.tokenizer, 32, False, log=logged.append)
    assert [len(e.tokens) for e in examples] == [32, 12, 32]
    assert len(logged) == 1 and "2 of 3 rows" in logged[0] and "--max-seq-length 32" in logged[0]


def test_rows_all_longer_than_max_seq_length_are_an_error(base, tmp_path):
    rows = [{"prompt": "x" * 50, "completion": "y"}, {"prompt": "x" * 30, "completion": "y"}]
    with pytest.raises(
        UserError,
        match=r"t.jsonl:2: every row is longer than --max-seq-length 16 \(this one, the shortest, has \d+ tokens\)",
    ):
        load_split(write_jsonl(tmp_path / "t.jsonl", rows), base.tokenizer, 16, False)


def test_batches_are_grouped_by_length_and_cover_every_row_once():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 200, size=512)
    examples = [type("E", (), {"tokens": np.zeros(n)})() for n in lengths]
    batches = epoch_batches(examples, 8, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(512))
    padded = sum(8 * max(lengths[b]) for b in batches)
    random_padded = sum(8 * max(lengths[i : i + 8]) for i in range(0, 512, 8))
    assert padded < 0.75 * random_padded
    assert epoch_batches(examples, 8, 0, 1) != batches  # a new order each epoch
    assert epoch_batches(examples, 8, 0, 0) == batches  # and reproducible


def sorted_plan(examples, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """epoch_batches as it was written before ExampleSet, with sorted() over a key per row."""
    rng = np.random.default_rng([seed, epoch])
    order, window, batches = rng.permutation(len(examples)), batch_size * 16, []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i].tokens))
        batches += [[int(i) for i in chunk[j : j + batch_size]] for j in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def test_the_plan_from_the_lengths_array_is_the_one_checkpoints_were_made_with():
    """Lengths with many ties (1-11 tokens over 1,000 rows): the stable argsort keeps sorted()'s
    order, so a checkpoint written before resumes on the same rows, from a list or an ExampleSet."""
    rng = np.random.default_rng(1)
    examples = [Example(np.zeros(n, np.int32), np.ones(n, bool)) for n in rng.integers(1, 12, 1000)]
    stored = ExampleSet.of(examples)
    for batch_size, epoch in [(1, 0), (3, 1), (4, 2), (7, 0)]:
        want = sorted_plan(examples, batch_size, 5, epoch)
        assert epoch_batches(stored, batch_size, 5, epoch) == want == epoch_batches(examples, batch_size, 5, epoch)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', "t.jsonl:2: not valid JSON"),
        ("[1, 2]", "t.jsonl:2: expected a JSON object"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(UserError, match=message):
        read_rows(path)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"question": "q"}], "t.jsonl:1: row has none of the keys"),
        ([{"text": "a", "prompt": "b", "completion": "c"}], "t.jsonl:1: row mixes formats"),
        ([{"text": "a"}, {"prompt": "b", "completion": "c"}], "t.jsonl:2: completion row, but line 1 is a text row"),
        ([{"prompt": "b"}], "t.jsonl:1: key 'completion' missing"),
        ([{"messages": [{"role": "assistant", "content": "a"}]}], r"t.jsonl:1: messages\[0\] has role 'assistant'"),
        ([{"messages": [{"role": "user", "content": "a"}]}], "t.jsonl:1: 'messages' has no assistant turn"),
        ([{"messages": [{"role": "bot", "content": "a"}]}], r"t.jsonl:1: messages\[0\] must be"),
    ],
)
def test_bad_rows_name_file_line_and_key(base, tmp_path, rows, message):
    with pytest.raises(UserError, match=message):
        load_split(write_jsonl(tmp_path / "t.jsonl", rows), base.tokenizer, 2048, False)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n")
    with pytest.raises(UserError, match="no rows"):
        read_rows(path)


class Fields(dict):
    """A row's fields that a weak reference can watch."""


@pytest.mark.parametrize("valid_split", [True, False])
def test_tokenizing_a_set_holds_one_row_at_a_time(base, valid_split):
    """load_sets reads each row as it tokenizes it: as the source yields row after row, all but a
    few of the earlier ones are gone: the first (kept to name it in a format error), the one being
    tokenized, and, holding out, the one the filter last passed over. 200 if rows were kept."""
    from mlx_lora.config import DataConfig
    from mlx_lora.data.examples import load_sets
    from mlx_lora.data.rows import Row

    alive, most = [], []

    class Source:
        name, splits = "s", ["train", "valid"] if valid_split else ["train"]

        def stream(self, split):
            for i in range(1, 201):
                fields = Fields(prompt=f"{i} + 1 =", completion=f" {i + 1}")
                alive.append(weakref.ref(fields))
                most.append(sum(ref() is not None for ref in alive))
                yield Row(f"{split} row {i}", i, fields)

        count = lambda self, split: 200
        columns = lambda self, split: None
        label = lambda self, split: split

    sets = load_sets(Source(), DataConfig(), base.tokenizer, 2048, False, lambda _: None)
    assert len(sets["train"]) == (200 if valid_split else 190) and max(most) <= 4


class _Recording:
    """The tokenizer, with the length of every text it is asked to encode recorded."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []

    def encode(self, text, **kwargs):
        self.seen.append(len(text))
        return self.tokenizer.encode(text, **kwargs)

    def __call__(self, text, **kwargs):  # chat rows: the whole rendering at once, with offsets
        self.seen.append(len(text))
        return self.tokenizer._tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


LONG_TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. " * 4000,
    "one long word": "a" * 100_000,
    "spaces": "x" + " " * 100_000 + "y",
    "digits": "3141592653589793" * 6000,
    "unicode": "héllo wörld 漢字テスト 🙂 " * 5000,
    "code": "def f(x):\n        return x  # ok\n" * 3000,
}


@pytest.mark.parametrize("limit", [1, 16, 200])
@pytest.mark.parametrize("kind", LONG_TEXTS)
def test_a_long_row_keeps_the_tokens_of_its_full_tokenization(base, kind, limit):
    from mlx_lora.data.examples import encode_row

    text, tok = LONG_TEXTS[kind], base.tokenizer
    rows = [
        ("text", {"text": text}),
        ("completion", {"prompt": text, "completion": " done"}),
        ("completion", {"prompt": "Q:", "completion": text}),
        ("chat", {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]}),
    ]
    for fmt, row in rows:
        full = encode_row("t", tok, fmt, row, False)
        recording = _Recording(tok)
        cut = encode_row("t", recording, fmt, row, False, limit=limit)
        assert len(cut.tokens) > limit and max(recording.seen) < len(text) / 2, (fmt, recording.seen)
        assert list(cut.tokens[:limit]) == list(full.tokens[:limit]), fmt
        assert list(cut.mask[:limit]) == list(full.mask[:limit]), fmt


def test_reading_a_10_mb_line_encodes_no_more_text_than_a_1_mb_one(base, tmp_path):
    seen = {}
    for size in (10**6, 10**7):
        recording = _Recording(base.tokenizer)
        path = write_jsonl(tmp_path / f"{size}.jsonl", [{"text": "word " * (size // 5)}, {"text": "short"}])
        examples = load_split(path, recording, 64, False, log=lambda _: None)
        assert [len(ex.tokens) for ex in examples] == [64, len(base.tokenizer.encode("short")) + 1]
        assert list(examples[0].tokens) == base.tokenizer.encode("word " * 200)[:64]
        seen[size] = max(recording.seen)
    assert seen[10**6] == seen[10**7] <= 4 * 8 * 65, seen
