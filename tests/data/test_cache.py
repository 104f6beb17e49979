"""--data-cache: a later run with the same data, tokenizer, mapping and encoding reads the tokens
back, memory-mapped, instead of tokenizing; any change to those tokenizes again."""

import json
import os
import shutil
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl
from test_sources import TEMPLATES, make_gsm8k

from mlx_lora.config import DataConfig
from mlx_lora.data.batches import iterate_batches
from mlx_lora.data.cache import StoredArray, entry_path, save, tokenized_sets, tokenized_split, tokenizer_fingerprint
from mlx_lora.data.examples import ExampleSet, encode_rows, load_sets
from mlx_lora.data.mapping import map_rows
from mlx_lora.data.sources import open_source, split_rows
from mlx_lora.distributed.group import World
from mlx_lora.model.base import load_base


@pytest.fixture(scope="module")
def tokenizer(llama):
    return load_base(str(llama)).tokenizer


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.tokens, y.tokens) and np.array_equal(x.mask, y.mask) for x, y in zip(a, b)
    )


def entries(cache):
    return [p for p in cache.iterdir() if not p.name.startswith(".")]


def same_batches(a, b, batch_size: int, steps: int, pack_length=None, start=0, shard=None) -> bool:
    """The batches training reads (rows, token ids, masks, segments, token counts), over more than one epoch."""
    got = islice(iterate_batches(a, batch_size, seed=3, start=start, pack_length=pack_length, shard=shard), steps)
    want = islice(iterate_batches(b, batch_size, seed=3, start=start, pack_length=pack_length, shard=shard), steps)
    for (rows_a, batch_a, count_a), (rows_b, batch_b, count_b) in zip(got, want, strict=True):
        arrays_equal = all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(batch_a, batch_b, strict=True))
        if rows_a != rows_b or count_a != count_b or not arrays_equal:
            return False
    return True


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
    assert len(entries(tmp_path / "c")) == 2 and "saved to the cache" in first_log[-1]
    source = unreadable(open_source(str(data), config))
    second = tokenized_sets(source, cfg, tokenizer, 2048, False, tmp_path / "c", second_log.append)
    assert all(same(want[role], first[role]) and same(want[role], second[role]) for role in ("train", "valid"))
    assert isinstance(second["train"].tokens, StoredArray) and isinstance(second["valid"].mask, StoredArray)
    assert same_batches(second["train"], want["train"], batch_size=3, steps=30)  # 38 rows: three epochs
    assert same_batches(second["train"], want["train"], batch_size=2, steps=8, pack_length=64)
    assert same_batches(second["train"], want["train"], batch_size=3, steps=10, start=11)  # resumed mid-epoch
    for rank in (0, 1):  # each process of a group of two
        assert same_batches(
            second["train"], want["train"], batch_size=3, steps=15, shard=World(rank=rank, size=2).shard
        )
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
    newest = max(entries(cache), key=lambda p: p.stat().st_mtime_ns)  # one of the entries just read
    (newest / "tokens.npy").write_bytes(b"not a npy")  # a damaged entry is rewritten
    assert not run() and run()
    np.save(newest / "tokens.npy", np.load(newest / "tokens.npy")[:-1])  # cut short: offsets disagree
    assert not run() and run()


def swapped_digits(model_dir, out):
    """The same model with '0' and '1' trading token ids: a different tokenizer, the same everything else."""
    shutil.copytree(model_dir, out)
    definition = json.loads((out / "tokenizer.json").read_text())
    vocab = definition["model"]["vocab"]
    vocab["0"], vocab["1"] = vocab["1"], vocab["0"]
    (out / "tokenizer.json").write_text(json.dumps(definition))
    return out


def test_another_tokenizer_tokenizes_again(llama, tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d" / "train.jsonl", [{"text": f"{a} and {a + 10}"} for a in range(20)])
    other = load_base(str(swapped_digits(llama, tmp_path / "swapped"))).tokenizer
    copy = load_base(str(shutil.copytree(llama, tmp_path / "copy"))).tokenizer  # same definition elsewhere
    said = []
    run = lambda tok: tokenized_sets(
        open_source(str(path.parent)), DataConfig(), tok, 2048, False, tmp_path / "c", said.append
    )
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(copy)
    run(tokenizer)
    swapped = run(other)
    assert "saved to the cache" in said[-1] and len(entries(tmp_path / "c")) == 4
    want = load_sets(open_source(str(path.parent)), DataConfig(), other, 2048, False, lambda _: None)
    assert same(swapped["train"], want["train"]) and not same(swapped["train"], run(copy)["train"])
    assert "read from the cache" in said[-1]


def test_eval_reads_the_entries_training_wrote(tokenizer, tmp_path, monkeypatch):
    """eval's split, read the way training read it (its validation rows), is the same entry; its
    test split gets an entry of its own."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    data, cache = str(make_gsm8k(tmp_path / "g")), tmp_path / "c"
    cfg = DataConfig(data_config="main", **TEMPLATES)
    train = tokenized_sets(open_source(data, "main"), cfg, tokenizer, 2048, False, cache, lambda _: None)
    encoding = dict(max_seq_length=2048, train_on_prompt=False)

    def split(wanted: str) -> tuple[ExampleSet, bool]:
        """The set, and whether it was tokenized (as eval tokenizes: split_rows, map_rows, encode_rows)."""
        tokenized = []

        def tokenize(log):
            tokenized.append(True)
            rows = map_rows(split_rows(open_source(data, "main"), cfg, wanted, log), cfg)
            return encode_rows(wanted, rows, tokenizer, 2048, False, log)

        examples = tokenized_split(open_source(data, "main"), cfg, wanted, tokenizer, cache, tokenize, **encoding)
        return examples, bool(tokenized)

    valid, tokenized = split("valid")
    assert same(valid, train["valid"]) and not tokenized
    test, tokenized = split("test")
    assert tokenized and len(test) == 6
    again, tokenized = split("test")
    assert same(again, test) and not tokenized


ROWS_BIG, ROWS_SMALL, TOKENS_PER_ROW = 200_000, 20_000, 128
MEASURE = """
import gc, sys
from itertools import islice
from pathlib import Path
from pathlib import Path
from mlx_lora.config import DataConfig
from mlx_lora.data.batches import iterate_batches
from mlx_lora.data.cache import tokenized_sets
from mlx_lora.data.sources import open_source

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

class Tokenizer:  # the cache keys on the definition alone; a hit tokenizes nothing
    eos_token_id = 2
    def get_vocab(self):
        return {"a": 0}

data, cache = sys.argv[1:]
gc.collect()
before = rss()
sets = tokenized_sets(open_source(data), DataConfig(), Tokenizer(), 2048, False, Path(cache), lambda _: None)
for _ in islice(iterate_batches(sets["train"], 4, seed=0), 10):
    pass
print(rss() - before)
"""


def cached_start_growth(tmp_path, rows: int) -> int:
    """RSS a fresh process gains from a cache hit of `rows` rows and its first ten batches."""
    data = write_jsonl(tmp_path / f"d{rows}" / "train.jsonl", [{"text": "x"}]).parent
    (data / "valid.jsonl").write_text((data / "train.jsonl").read_text())
    source, cache = open_source(str(data)), tmp_path / f"c{rows}"
    tokenizer_id = tokenizer_fingerprint(type("T", (), {"eos_token_id": 2, "get_vocab": lambda self: {"a": 0}})())
    offsets = np.arange(rows + 1, dtype=np.int64) * TOKENS_PER_ROW
    examples = ExampleSet(np.ones(offsets[-1], np.int32), np.ones(offsets[-1], bool), offsets)
    for role in ("train", "valid"):
        save(
            entry_path(source, DataConfig(), role, tokenizer_id, cache, max_seq_length=2048, train_on_prompt=False),
            examples,
            [],
        )
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(data), str(cache)], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_a_cached_start_does_not_hold_the_rows(tmp_path):
    """Rows stay on disk: what a start keeps per row is its index, the offsets of both sets (16
    bytes) and the training lengths (8), and the epoch's plan (batches.epoch_plan: the rows in
    batch order, 8, and the order of the batches, 2 at 4 rows a batch), 34 bytes; the rows
    themselves are 5 bytes a token (int32 token, bool mask), 640 at 128 tokens. Bound: 64 bytes a
    row, the rest for the allocator and transients (measured here: about 37)."""
    small, big = cached_start_growth(tmp_path, ROWS_SMALL), cached_start_growth(tmp_path, ROWS_BIG)
    assert big - small < 64 * (ROWS_BIG - ROWS_SMALL), (small, big)  # holding the rows would add 640 a row


def _train(data, out, *flags):
    from typer.testing import CliRunner

    from mlx_lora.cli import app

    args = ["train", "--data", data, "--iters", "1", "--save-every", "0", "--val-batches", "1", "--adapter-path", out]
    return CliRunner().invoke(app, [str(a) for a in [*args, *flags]])


def test_a_second_run_reads_the_cache_without_a_flag(tiny_data, tmp_path, monkeypatch):
    """On by default, in $MLX_LORA_CACHE/tokenized (conftest gives each test its own); the line that
    says it was written names the place and the size; --no-data-cache writes and reads nothing."""
    cache = tmp_path / "home-cache"
    monkeypatch.setenv("MLX_LORA_CACHE", str(cache))
    off = _train(tiny_data, tmp_path / "a0", "--no-data-cache")
    assert off.exit_code == 0, off.output
    assert not (cache / "tokenized").exists() and "cache" not in off.output
    first = _train(tiny_data, tmp_path / "a1")
    assert first.exit_code == 0, first.output
    size = sum(f.stat().st_size for f in (cache / "tokenized").rglob("*") if f.is_file())
    assert len(entries(cache / "tokenized")) == 2
    assert f"saved to the cache {cache / 'tokenized'}" in first.output and f"{size / 2**20:.1f} MB in 2 entries" in (
        first.output
    )
    second = _train(tiny_data, tmp_path / "a2")
    assert second.exit_code == 0 and "read from the cache" in second.output, second.output


def test_platform_cache_directory(monkeypatch, tmp_path):
    from mlx_lora.machine import platform_cache

    monkeypatch.delenv("MLX_LORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(sys, "platform", "linux")
    assert platform_cache() == tmp_path / "xdg" / "mlx-lora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert platform_cache() == Path.home() / ".cache" / "mlx-lora"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert platform_cache() == Path.home() / "Library" / "Caches" / "mlx-lora"


def test_the_cap_removes_least_recently_used_entries_it_wrote_and_nothing_else(tokenizer, tmp_path):
    from mlx_lora.data.cache import load, trim

    cache = tmp_path / "c"
    examples = ExampleSet(np.arange(1000, dtype=np.int32), np.ones(1000, bool), np.array([0, 1000]))
    for i, name in enumerate(["old", "mid", "new"]):
        save(cache / name, examples, [])
        os.utime(cache / name, (1000 + i, 1000 + i))
    (cache / "mine").mkdir()  # not written by the cache: never removed, never counted
    (cache / "mine" / "big.bin").write_bytes(b"x" * 100_000)
    assert load(cache / "old") is not None  # a hit: "old" is now the most recently used
    one = sum(f.stat().st_size for f in (cache / "mid").rglob("*") if f.is_file())
    assert trim(cache, keep=[cache / "new"], cap=2 * one) == (2 * one, 2)
    assert sorted(p.name for p in cache.iterdir()) == ["mine", "new", "old"]
    assert trim(cache, keep=[cache / "new"], cap=0) == (one, 1)  # the entry being written stays
    assert sorted(p.name for p in cache.iterdir()) == ["mine", "new"] and (cache / "mine" / "big.bin").is_file()


def test_two_writers_of_one_entry_at_once_each_leave_it_whole(tmp_path, monkeypatch):
    """Each rank of a group tokenizes and saves the same entries at the same moment (seen in CI: a
    traceback). One writer's trim must not touch the other's temporary directory, and a writer
    whose swap loses to the other's published entry keeps that one."""
    from mlx_lora import atomic
    from mlx_lora.data.cache import WRITER, load, trim

    cache = tmp_path / "c"
    examples = ExampleSet(np.arange(1000, dtype=np.int32), np.ones(1000, bool), np.array([0, 1000]))
    save(cache / "done", examples, [])
    theirs = cache / ".k.abc123.tmp"  # the other writer's entry, written and marked, before its rename
    shutil.copytree(cache / "done", theirs)
    atomic.write_json(theirs / atomic.OWNER, {"written_by": WRITER, "files": []})
    assert trim(cache, keep=[], cap=0) == (0, 0) and theirs.is_dir()  # neither counted nor removed

    swap = atomic._swap

    def beaten(tmp, path):  # the other writer renames its entry in first; ours then finds it there
        swap(theirs, path)
        raise OSError(39, "Directory not empty", str(path))

    monkeypatch.setattr(atomic, "_swap", beaten)
    save(cache / "k", examples, [])
    assert np.array_equal(load(cache / "k")[0].tokens[:], examples.tokens[:])
    assert sorted(p.name for p in cache.iterdir()) == ["k"]  # our temporary directory is gone


def test_a_cache_place_that_cannot_be_made(tiny_data, tmp_path, monkeypatch):
    """Named by the user (--data-cache, MLX_LORA_CACHE): refused in one line. The default place:
    said, and the run goes on uncached."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MLX_LORA_CACHE", str(blocker))
    env = _train(tiny_data, tmp_path / "a1")
    assert env.exit_code == 2 and f"MLX_LORA_CACHE={blocker}: cannot make {blocker}/tokenized" in env.output
    flag = _train(tiny_data, tmp_path / "a2", "--data-cache", blocker / "x")
    assert flag.exit_code == 2 and f"--data-cache {blocker / 'x'}: cannot make" in flag.output
    monkeypatch.delenv("MLX_LORA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    default = _train(tiny_data, tmp_path / "a3")
    assert default.exit_code == 0 and "tokenized rows not cached: cannot make" in default.output, default.output
