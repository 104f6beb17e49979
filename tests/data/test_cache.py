"""--data-cache: a later run with the same data, tokenizer, mapping and encoding reads the tokens
back instead of tokenizing; any change to those tokenizes again."""

import os

import numpy as np
import pytest
from conftest import write_jsonl
from test_sources import TEMPLATES, make_gsm8k

from mlx_lora.config import DataConfig
from mlx_lora.data.cache import tokenized_sets
from mlx_lora.data.examples import load_sets
from mlx_lora.data.sources import open_source
from mlx_lora.model.base import load_base


@pytest.fixture(scope="module")
def tokenizer(llama):
    return load_base(str(llama)).tokenizer


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.tokens, y.tokens) and np.array_equal(x.mask, y.mask) for x, y in zip(a, b)
    )


def unreadable(source):
    def read(split):
        raise AssertionError(f"read {split} although the cache holds it")

    source.read = read
    return source


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_second_run_reads_the_tokens_back(tokenizer, tmp_path, kind, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    if kind == "jsonl":
        rows = [{"question": f"{a} + 1?", "answer": f"{a + 1} #### {a + 1}"} for a in range(40)]
        data, config = write_jsonl(tmp_path / "d" / "train.jsonl", rows).parent, None
    else:
        data, config = make_gsm8k(tmp_path / "g"), "main"
    cfg = DataConfig(data_config=config, **TEMPLATES)
    first_log, second_log = [], []
    want = load_sets(open_source(str(data), config), cfg, tokenizer, 2048, False, lambda _: None)
    first = tokenized_sets(
        open_source(str(data), config), cfg, tokenizer, 2048, False, tmp_path / "c", first_log.append
    )
    assert len(list((tmp_path / "c").glob("*.npz"))) == 2 and "saved to the cache" in first_log[-1]
    source = unreadable(open_source(str(data), config))
    second = tokenized_sets(source, cfg, tokenizer, 2048, False, tmp_path / "c", second_log.append)
    assert all(same(want[role], first[role]) and same(want[role], second[role]) for role in ("train", "valid"))
    assert second_log[0] == first_log[0] and "holding out 2 of 40" in second_log[0]  # said again
    assert "read from the cache" in second_log[-1]


def test_any_change_tokenizes_again(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d" / "train.jsonl", [{"q": f"{a}?", "a": f" {a}"} for a in range(20)])
    cfg = DataConfig(prompt_template="Q: {q}", completion_field="a")
    cache = tmp_path / "c"

    def run(cfg=cfg, max_seq_length=2048, train_on_prompt=False) -> bool:
        """Whether the run read the cache."""
        said = []
        tokenized_sets(
            open_source(str(path.parent)), cfg, tokenizer, max_seq_length, train_on_prompt, cache, said.append
        )
        return "read from the cache" in said[-1]

    assert not run() and run()
    assert not run(cfg=DataConfig(prompt_template="Question: {q}", completion_field="a"))
    assert not run(cfg=DataConfig(prompt_template="Q: {q}", completion_field="a", valid_fraction=0.2))
    assert not run(max_seq_length=9) and not run(train_on_prompt=True)
    assert run()
    write_jsonl(path, [{"q": f"{a}?", "a": f" {a}!"} for a in range(20)])  # new contents
    os.utime(path, ns=(1, 1))
    assert not run() and run()
    newest = max(cache.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns)  # one of the entries just read
    newest.write_bytes(b"not a npz")  # a damaged entry is rewritten
    assert not run() and run()
