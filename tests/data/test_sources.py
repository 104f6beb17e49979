"""Data from anywhere, offline: a GSM8K-shaped dataset in the hub's own layout, read by path and by
id through a pre-filled hub cache; single files of every type; mapping flags; one-line errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from mlx_lora.config import DataConfig
from mlx_lora.data.examples import load_sets
from mlx_lora.data.mapping import map_rows
from mlx_lora.data.sources import HOLDOUT_SEED, open_source, split_rows, train_valid_rows
from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base

REPO_ID = "openai/gsm8k"
COMMIT = "e53f048856ff4f594e959d75785d2c2d37b678ee"  # any 40 hex digits: the cache names snapshots by commit
CARD = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
  - split: test
    path: socratic/test-*
---
# GSM8K (a small stand-in with the published layout and columns)
"""
TEMPLATES = dict(prompt_template="Q: {question}\\nA:", completion_template=" {answer}")


def gsm8k_rows(n: int, start: int = 0) -> dict[str, list[str]]:
    """GSM8K's columns: a question, and a worked answer ending in `#### N`."""
    numbers = range(start, start + n)
    return {
        "question": [f"Tom has {a} apples and buys {a % 7 + 2} more. How many apples does he have?" for a in numbers],
        "answer": [f"He has {a} + {a % 7 + 2} = <<{a}+{a % 7 + 2}={a + a % 7 + 2}>>{a + a % 7 + 2} apples.\n"
                   f"#### {a + a % 7 + 2}" for a in numbers],
    }  # fmt: skip


def make_gsm8k(root: Path, train: int = 40, test: int = 6) -> Path:
    """The hub repo's files: a dataset card with `configs:` and one parquet shard per split and config."""
    for config in ("main", "socratic"):
        (root / config).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(gsm8k_rows(train)), root / config / "train-00000-of-00001.parquet")
        pq.write_table(pa.table(gsm8k_rows(test, 1000)), root / config / "test-00000-of-00001.parquet")
    (root / "README.md").write_text(CARD)
    return root


def prefill_hub_cache(cache: Path, repo_id: str = REPO_ID) -> Path:
    """The hub cache as `hf download --repo-type dataset openai/gsm8k` leaves it: refs/main names a
    snapshot directory holding the repo's files."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    make_gsm8k(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty hub cache and datasets cache under tmp_path, offline. huggingface_hub reads its
    environment at import, so the module constants are set as well."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return tmp_path / "hub"


@pytest.fixture(scope="module")
def tokenizer(llama):
    return load_base(str(llama)).tokenizer


def quiet(_):
    pass


def texts(rows) -> list[tuple[str, str]]:
    return [(r.fields["prompt"], r.fields["completion"]) for r in rows]


# --- sources ---------------------------------------------------------------------------------


def test_hub_layout_by_path_holds_out_validation_and_maps_templates(hf_cache, tmp_path, tokenizer):
    data = make_gsm8k(tmp_path / "gsm8k")
    cfg = DataConfig(data_config="main", **TEMPLATES)
    source = open_source(str(data), cfg.data_config, quiet)
    assert source.splits == ["train", "test"] and source.columns("train") == ["question", "answer"]
    logged = []
    train, valid = train_valid_rows(source, cfg, logged.append)
    assert (len(train), len(valid)) == (38, 2)  # 5% of 40
    assert logged == [
        f"{data} has no validation split (validation, valid, val): holding out 2 of 40 train rows for "
        f"validation (--valid-fraction 0.05, seed {HOLDOUT_SEED})"
    ]
    assert sorted(r.number for r in train + valid) == list(range(1, 41))  # disjoint, nothing lost
    assert train_valid_rows(source, cfg, quiet) == (train, valid)  # the same rows every time
    first = gsm8k_rows(40)
    [(prompt, completion)] = texts(map_rows(train[:1], cfg))
    assert (prompt, completion) == (f"Q: {first['question'][0]}\nA:", f" {first['answer'][0]}")
    assert train[0].where == f"{data} train row 1"

    sets = load_sets(source, cfg, tokenizer, 2048, False, quiet)
    assert (len(sets["train"]), len(sets["valid"])) == (38, 2)
    ex = sets["train"][0]
    prompt_ids = tokenizer.encode(prompt)
    assert ex.tokens.tolist() == prompt_ids + tokenizer.encode(completion, add_special_tokens=False) + [2]
    assert not ex.mask[: len(prompt_ids)].any() and ex.mask[len(prompt_ids) :].all()


def test_hub_id_loads_from_a_prefilled_cache_offline(hf_cache, tmp_path):
    """`--data openai/gsm8k` with HF_HUB_OFFLINE=1 reads what the hub cache holds: the same rows as the path."""
    prefill_hub_cache(hf_cache)
    cfg = DataConfig(data_config="main", **TEMPLATES)
    by_id = open_source(REPO_ID, "main", quiet)
    by_path = open_source(str(make_gsm8k(tmp_path / "copy")), "main", quiet)
    assert by_id.name == "openai/gsm8k [main]" and by_id.origin == REPO_ID
    for split in ("train", "valid", "test"):
        assert texts(map_rows(split_rows(by_id, cfg, split, quiet), cfg)) == texts(
            map_rows(split_rows(by_path, cfg, split, quiet), cfg)
        )
    assert split_rows(by_id, cfg, "test", quiet)[0].where == "openai/gsm8k [main] test row 1"


@pytest.mark.parametrize(
    "data, config, message",
    [
        ("openai/gsm8k", "main", "--data openai/gsm8k: not in the local cache (CACHE) and the hub is unreachable"),
        ("someone/nothing", None, "--data someone/nothing: not in the local cache (CACHE) and the hub is unreachable"),
        ("./gsm8k.parquet", None, "--data ./gsm8k.parquet: no such file or directory"),
        (
            "my_dta",
            None,
            "--data my_dta: not in the local cache (CACHE) and the hub is unreachable (HF_HUB_OFFLINE is "
            "set); fetch it once online: hf download --repo-type dataset my_dta; nor is there a file or directory "
            "named my_dta here",
        ),
    ],
)
def test_unavailable_dataset_is_one_line(hf_cache, data, config, message):
    with pytest.raises(UserError) as e:
        open_source(data, config, quiet)
    assert str(e.value).startswith(message.replace("CACHE", str(hf_cache)))
    assert "\n" not in str(e.value)


def test_unreachable_hub_falls_back_to_the_cached_snapshot(hf_cache, monkeypatch):
    """Online but without network: datasets cannot reach the hub; the hub cache's snapshot is read if there."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    real = datasets.load_dataset

    def no_network(path, *args, **kwargs):
        if path == REPO_ID:
            raise ConnectionError(f"Couldn't reach '{path}' on the Hub (ConnectError)")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(UserError, match=r"^--data openai/gsm8k: not in the local cache \(.*\) and the hub is "
                       r"unreachable \(ConnectionError: Couldn't reach 'openai/gsm8k' on the Hub"):  # fmt: skip
        open_source(REPO_ID, "main", quiet)
    prefill_hub_cache(hf_cache)
    logged = []
    source = open_source(REPO_ID, "main", logged.append)
    assert source.splits == ["train", "test"] and len(source.read("train")) == 40
    assert logged == [f"the hub is unreachable (ConnectionError); reading openai/gsm8k from the cache: "
                      f"{hf_cache / 'datasets--openai--gsm8k' / 'snapshots' / COMMIT}"]  # fmt: skip


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("broken.json", '[{"a": 1}, {"a": \n', "broken.json: the datasets library cannot read it (ValueError: "),
        ("broken.csv", 'a,b\n"x\n', "broken.csv: the datasets library cannot read it (ParserError: "),
        ("broken.arrow", "x", "broken.arrow: the datasets library cannot read it (ArrowInvalid: "),
        ("empty", None, "empty: found no data to read (EmptyDatasetError: "),
        ("data.txt", "x", "data.txt: unknown file type '.txt'; use .jsonl, .json, .parquet, .csv, .arrow"),
    ],
)
def test_unreadable_files_are_one_line(hf_cache, tmp_path, name, content, message):
    path = tmp_path / name
    path.mkdir() if content is None else path.write_text(content)
    with pytest.raises(UserError) as e:
        open_source(str(path), None, quiet)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_configuration_errors_list_the_configurations(hf_cache):
    prefill_hub_cache(hf_cache)
    with pytest.raises(UserError, match=r"--data-config mian: openai/gsm8k has no such configuration; it has: main, "):
        open_source(REPO_ID, "mian", quiet)
    with pytest.raises(UserError, match="several configurations; pick one with --data-config: main, socratic"):
        open_source(REPO_ID, None, quiet)


def test_a_missing_split_lists_those_that_exist(hf_cache, tmp_path):
    source = open_source(str(make_gsm8k(tmp_path / "g")), "main", quiet)
    for cfg, wanted, flag in (
        (DataConfig(train_split="training"), "train", "--train-split training"),
        (DataConfig(valid_split="dev"), "valid", "--valid-split dev"),
        (DataConfig(test_split="eval"), "test", "--test-split eval"),
        (DataConfig(), "other", "--split other"),
    ):
        with pytest.raises(UserError, match=f"^{flag}: {tmp_path / 'g'} has no such split; it has: train, test$"):
            split_rows(source, cfg, wanted, quiet)


def test_every_single_file_type_gives_the_same_rows(hf_cache, tmp_path):
    """A single file is the training split; its validation rows are held out of it."""
    columns = gsm8k_rows(20)
    table = pa.table(columns)
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    files = {
        "jsonl": write_jsonl(tmp_path / "g.jsonl", rows),
        "json": tmp_path / "g.json",
        "parquet": tmp_path / "g.parquet",
        "csv": tmp_path / "g.csv",
        "arrow": tmp_path / "g.arrow",
    }
    files["json"].write_text(json.dumps(rows))
    pq.write_table(table, files["parquet"])
    pa.csv.write_csv(table, files["csv"])
    with pa.OSFile(str(files["arrow"]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    cfg = DataConfig(prompt_field="question", completion_field="answer")
    for kind, path in files.items():
        source = open_source(str(path), None, quiet)
        assert source.splits == ["train"], kind
        train, valid = train_valid_rows(source, cfg, quiet)
        assert (len(train), len(valid)) == (19, 1), kind
        got = [(r["prompt"], r["completion"]) for r in (row.fields for row in map_rows(train + valid, cfg))]
        assert sorted(got) == sorted((r["question"], r["answer"]) for r in rows), kind


def test_jsonl_directory_keeps_its_splits_and_needs_no_datasets(tmp_path, monkeypatch):
    data = tmp_path / "d"
    write_jsonl(data / "train.jsonl", [{"text": f"row {i}"} for i in range(10)])
    write_jsonl(data / "val.jsonl", [{"text": "v"}])
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets fails
    source = open_source(str(data), None, quiet)
    train, valid = train_valid_rows(source, DataConfig(), quiet)
    assert len(train) == 10 and [r.fields for r in valid] == [{"text": "v"}]  # val.jsonl is the validation split
    assert valid[0].where == f"{data / 'val.jsonl'}:1"
    pq.write_table(pa.table(gsm8k_rows(2)), tmp_path / "g.parquet")
    with pytest.raises(
        UserError, match=r'g.parquet: reading it needs the datasets library: pip install "mlx-lora\[datasets\]"'
    ):
        open_source(str(tmp_path / "g.parquet"), None, quiet)


# --- mapping ---------------------------------------------------------------------------------


def test_a_missing_column_names_the_columns_that_exist(hf_cache, tmp_path):
    source = open_source(str(make_gsm8k(tmp_path / "g")), "main", quiet)
    cfg = DataConfig(prompt_field="question", completion_template=" {answr}")
    with pytest.raises(UserError, match=r"^--completion-template \{answr\}: no such column in .* train; its columns: "
                       r"question, answer$"):  # fmt: skip
        train_valid_rows(source, cfg, quiet)


def test_a_template_field_a_row_lacks_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"q": "1+1?", "a": "2"}, {"q": "2+2?"}])
    source = open_source(str(path), None, quiet)
    cfg = DataConfig(prompt_template="Q: {q}", completion_template=" {a}")
    with pytest.raises(
        UserError, match=r"t.jsonl:2: --completion-template reads \{a\}, which this row lacks \(it has: q\)"
    ):
        map_rows(source.read("train"), cfg)
    with pytest.raises(
        UserError, match=r"t.jsonl:1: --prompt-field: the row has no column 'question' \(it has: q, a\)"
    ):
        map_rows(source.read("train"), DataConfig(prompt_field="question", completion_field="a"))


def test_sharegpt_conversations_become_messages(tmp_path, tokenizer):
    turns = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "2+2?"},
        {"from": "gpt", "value": "4"},
    ]
    path = write_jsonl(tmp_path / "train.jsonl", [{"conversations": turns}] * 3)
    cfg = DataConfig(messages_field="conversations")
    [row] = map_rows(open_source(str(path), None, quiet).read("train")[:1], cfg)
    assert row.fields == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]
    }
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(UserError, match="bad.jsonl:1: turn 0 is from 'bot'; ShareGPT turns are from"):
        map_rows(open_source(str(bad), None, quiet).read("train"), cfg)


def test_text_field_and_numbers(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "hello", "n": 7}])
    rows = open_source(str(path), None, quiet).read("train")
    assert map_rows(rows, DataConfig(text_field="body"))[0].fields == {"text": "hello"}
    cfg = DataConfig(prompt_template="{body}{{x}}\\t=", completion_field="n")
    assert map_rows(rows, cfg)[0].fields == {"prompt": "hello{x}\t=", "completion": "7"}


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_trains_and_evaluates_gsm8k_by_id_offline(llama, tmp_path):
    """`mlx-lora train --data openai/gsm8k --data-config main` with templates, then `mlx-lora eval`,
    as separate processes with HF_HUB_OFFLINE=1 and a pre-filled hub cache."""
    prefill_hub_cache(tmp_path / "hub")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
    }
    common = ["--model", str(llama), "--data", REPO_ID, "--data-config", "main"]
    common += ["--prompt-template", TEMPLATES["prompt_template"], "--completion-template", " {answer}"]
    cli = [sys.executable, "-m", "mlx_lora.cli"]
    out = tmp_path / "adapters"
    train = subprocess.run(
        [*cli, "train", *common, "--adapter-path", str(out), "--iters", "4", "--batch-size", "4",
         "--num-layers", "2", "--rank", "4", "--val-every", "2", "--report-every", "2", "--save-every", "0"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr + train.stdout
    log = train.stdout + train.stderr
    assert "openai/gsm8k [main] has no validation split (validation, valid, val): holding out 2 of 40" in log
    assert "val loss" in log and (out / "adapters.safetensors").is_file()
    evaluate = subprocess.run(
        [*cli, "eval", *common, "--adapter-path", str(out), "--split", "test", "--max-tokens", "8",
         "--output", str(tmp_path / "eval.json")],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr + evaluate.stdout
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["data"] == "openai/gsm8k [main] test" and result["rows"] == 6
    assert result["adapter"]["answered"] == 6  # every `#### N` reference is scored by exact match
    assert result["predictions"][0]["prompt"] == f"Q: {gsm8k_rows(1, 1000)['question'][0]}\nA:"
    held_out = subprocess.run(
        [*cli, "eval", *common, "--adapter-path", str(out), "--split", "valid", "--task", "loss",
         "--output", str(tmp_path / "valid.json")],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert held_out.returncode == 0, held_out.stderr + held_out.stdout
    last_val_loss = float(re.search(r"val loss [\d.]+ -> ([\d.]+)", log)[1])  # "done in …: val loss a -> b"
    valid = json.loads((tmp_path / "valid.json").read_text())
    assert valid["rows"] == 2 and abs(valid["adapter"]["loss"] - last_val_loss) <= 6e-4  # the same held-out rows
    missing = subprocess.run([*cli, "train", *common[:4], "--data-config", "nope", "--adapter-path", str(out)],
                             env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # fmt: skip
    assert missing.returncode == 2 and missing.stderr.strip().splitlines()[-1].startswith("error: --data-config nope:")
