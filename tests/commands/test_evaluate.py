import json
import math
from dataclasses import replace

import mlx.core as mx
import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.commands.evaluate import Item, generation_items, run
from mlx_lora.config import EvalConfig, LoRAConfig
from mlx_lora.data.answers import final_answer, is_correct, normalize
from mlx_lora.data.examples import encode_row
from mlx_lora.data.rows import file_rows, row_format
from mlx_lora.formats.loader import load_for_inference
from mlx_lora.formats.native import describe, save_adapter
from mlx_lora.model.base import load_base
from mlx_lora.model.lora import apply_lora, lora_layers
from mlx_lora.reporting.results import table

# Prompts of different lengths, so batches are left-padded.
PROMPTS = [
    "Q: Tom has 3 apples.\nA:",
    "Q: Eva buys 5 bags of coins. Each bag has 5 coins. How many coins?\nA:",
    "Q: 1?\nA:",
    "Q: Ben has 8 rocks. He buys 4 more and then gives 2 to Leo. How many rocks does he have now?\nA:",
    "Q: Mia has 5 boxes.\nA:",
    "Q: Zoe had 23 marbles. She lost 13 of them.\nA:",
    "Q: Max has 7 flowers and buys 11 more.\nA:",
]
MAX_TOKENS = 12


@pytest.mark.parametrize(
    "text, answer",
    [
        (" 3 + 4 = 7. #### 7", "7"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72\nQ: next question", "72"),
        ("####1,072", "1,072"),
        ("#### 7 #### 8", "7 #### 8"),
        ("#### ", ""),
        ("3 + 4 = 7", None),
        ("### 7", None),
    ],
)
def test_final_answer_is_the_rest_of_the_line_after_the_mark(text, answer):
    assert final_answer(text) == answer


@pytest.mark.parametrize(
    "answer, normal",
    [
        ("72", "72"),
        ("72.0", "72"),
        ("$72", "72"),
        ("1,072", "1072"),
        ("-3", "-3"),
        ("72.50", "72.5"),
        ("72.", "72"),
        (" 72 ", "72"),
        ("$1,072.50", "1072.5"),
        ("-$3", "-3"),
        ("$-3", "-3"),
        ("+5", "5"),
        ("-0", "0"),
        ("0.000", "0"),
        (".5", "0.5"),
        ("007", "7"),
        ("1000", "1000"),
        ("50%", "50"),
        ("1,07", "1,07"),
        ("1e3", "1e3"),
        ("12,345,678", "12345678"),
        (" Paris. ", "paris"),
        ("New   York", "new york"),
        ("ÉCOLE", "école"),
    ],
)
def test_normalize(answer, normal):
    assert normalize(answer) == normal


@pytest.mark.parametrize(
    "predicted, reference, correct",
    [
        ("72", "72", True),
        ("72.0", "72", True),
        ("$72", "72", True),
        ("1,072", "1072", True),
        ("1072", "1,072", True),
        ("-3", "-3", True),
        ("3", "-3", False),
        ("72.50", "72.5", True),
        ("72.", "72", True),
        ("72 apples.", "72", True),
        ("$72.00 in total", "72", True),
        ("apples: 72", "72", False),
        ("720", "72", False),
        ("7", "72", False),
        ("72.5", "72", False),
        ("1,0725", "1072", False),
        ("", "72", False),
        (None, "72", False),
        ("PARIS.", "Paris", True),
        ("Paris, France", "Paris", False),
        ("72", "seventy-two", False),
    ],
)
def test_is_correct(predicted, reference, correct):
    assert is_correct(predicted, reference) is correct


@pytest.mark.parametrize(
    "reference, text, cut",
    [
        (" 7 #### 7", " 3 + 4 = 7. #### 7\nQ: next", (" 3 + 4 = 7. #### 7", True)),
        (" 7 #### 7", " 3 + 4\n= 7. #### 7", (" 3 + 4\n= 7. #### 7", False)),  # newline before the mark
        (" Paris", "\n Paris\nQ: more", ("\n Paris", True)),  # single line: first newline after text
        (" Paris", " Par", (" Par", False)),
        ("line one\nline two", "line one\nline two\nmore", ("line one\nline two\nmore", False)),  # multi-line: EOS only
    ],
)
def test_generation_stops_at_the_end_of_the_answer_line(reference, text, cut):
    item = Item(1, "", [], reference, final_answer(reference) is not None)
    assert item.cut(text) == cut


def test_prompt_is_exactly_the_context_training_gives_the_answer(llama, tmp_path):
    """Generation starts from the tokens that precede the first loss token in training."""
    rows = [
        {"prompt": "Q: 3 + 4?\nA:", "completion": " 7. #### 7"},
        {
            "messages": [
                {"role": "user", "content": "3 + 4?"},
                {"role": "assistant", "content": "7 #### 7"},
                {"role": "user", "content": "and 5 + 1?"},
                {"role": "assistant", "content": "6 #### 6"},
            ]
        },
    ]
    tokenizer = load_base(str(llama)).tokenizer
    for i, row in enumerate(rows):
        path = write_jsonl(tmp_path / f"{i}.jsonl", [row])
        [item] = generation_items(file_rows(path), tokenizer, "auto")
        example = encode_row("x", tokenizer, row_format("x", row), row, False)
        answer_start = len(example.mask) - list(example.mask[::-1]).index(False)  # where the last reply starts
        assert example.tokens[:answer_start].tolist() == item.tokens
        assert item.reference == (row["completion"] if i == 0 else "6 #### 6")


def test_text_rows_get_loss_only_and_refuse_exact_match(llama, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "Q: 3 + 4? A: 7 #### 7"}])
    tokenizer = load_base(str(llama)).tokenizer
    assert generation_items(file_rows(path), tokenizer, "auto") == []
    with pytest.raises(Exception, match=r"t.jsonl:1: text rows have no prompt"):
        generation_items(file_rows(path), tokenizer, "exact-match")


# --- end to end: figures recomputed independently ---------------------------------------------


def greedy(model, tokenizer, prompt: str) -> str:
    """Token by token with the full sequence each step: no cache, no batch, no padding."""
    tokens, out = tokenizer.encode(prompt), []
    for _ in range(MAX_TOKENS):
        token = mx.argmax(model(mx.array([tokens + out]))[0, -1]).item()
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
        text = tokenizer.decode(out)
        if "\n" in text.lstrip():  # single-line reference: stop at the first newline after text
            return text[: text.index("\n", len(text) - len(text.lstrip()))]
    return tokenizer.decode(out)


def cross_entropy(model, tokenizer, rows) -> float:
    """Mean negative log-likelihood of completion + EOS given the prompt, row by row."""
    total, count = 0.0, 0
    for row in rows:
        prompt = tokenizer.encode(row["prompt"])
        tokens = prompt + tokenizer.encode(row["completion"], add_special_tokens=False) + [tokenizer.eos_token_id]
        logits = model(mx.array([tokens[:-1]]))[0].astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        for t in range(len(prompt), len(tokens)):
            total -= logp[t - 1, tokens[t]].item()
            count += 1
    return total / count


@pytest.fixture(scope="module")
def adapter(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapter")
    base = load_base(str(llama))
    cfg = LoRAConfig(targets="q_proj,v_proj", num_layers=2, rank=4, alpha=8)
    mx.random.seed(1)
    modules = apply_lora(base.model, cfg)
    for layer in lora_layers(base.model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.5
    save_adapter(out, base.model, describe(base, cfg, modules))
    return out


@pytest.fixture(scope="module")
def case(llama, adapter, tmp_path_factory):
    """A test split whose references are the adapter's own greedy answers on even rows and the
    base's on odd rows, so both models score something and the scores are known in advance."""
    adapted = load_for_inference(str(llama), str(adapter))
    base = load_base(str(llama))
    tokenizer = base.tokenizer
    answers = {
        "adapter": [greedy(adapted.model, tokenizer, p) for p in PROMPTS],
        "base": [greedy(base.model, tokenizer, p) for p in PROMPTS],
    }
    rows = [
        {"prompt": p, "completion": answers["adapter" if i % 2 == 0 else "base"][i].strip()}
        for i, p in enumerate(PROMPTS)
    ]
    data = tmp_path_factory.mktemp("data")
    write_jsonl(data / "test.jsonl", rows)
    expected = {
        name: {
            "answers": answers[name],
            "correct": sum(a.strip() == r["completion"] for a, r in zip(answers[name], rows)),
            "loss": cross_entropy(model, tokenizer, rows),
        }
        for name, model in (("adapter", adapted.model), ("base", base.model))
    }
    return data, expected


def test_compare_base_equals_independent_greedy_decoding_and_cross_entropy(llama, adapter, case, tmp_path):
    data, expected = case
    cfg = EvalConfig(
        model=str(llama),
        adapter_path=str(adapter),
        data=str(data),
        task="exact-match",
        compare_base=True,
        batch_size=3,
        generation_batch_size=3,
        max_tokens=MAX_TOKENS,
        output=str(tmp_path / "r.json"),
    )
    result = run(cfg, log=lambda _: None)
    assert expected["adapter"]["answers"] != expected["base"]["answers"]  # the adapter changes something
    for name in ("base", "adapter"):
        want = expected[name]
        assert [p[name]["prediction"] for p in result["predictions"]] == want["answers"]  # batched == unbatched
        assert result[name]["correct"] == want["correct"] and result[name]["answered"] == len(PROMPTS)
        assert result[name]["exact_match"] == want["correct"] / len(PROMPTS)
        assert result[name]["loss"] == pytest.approx(want["loss"], rel=1e-5)
        assert result[name]["perplexity"] == pytest.approx(math.exp(want["loss"]), rel=1e-5)
    assert result["adapter"]["correct"] >= 4 and result["base"]["correct"] >= 3  # even / odd rows at least
    diff = result["difference"]
    assert diff["loss"] == result["adapter"]["loss"] - result["base"]["loss"]
    assert diff["exact_match"] == result["adapter"]["exact_match"] - result["base"]["exact_match"]
    assert json.loads((tmp_path / "r.json").read_text()) == result
    first = result["predictions"][0]
    assert first["prompt"] == PROMPTS[0] and first["line"] == 1
    assert first["reference_answer"] == expected["adapter"]["answers"][0].strip()
    assert first["adapter"]["correct"] is True
    assert set(first["base"]) == {"prediction", "predicted_answer", "correct"}

    lines = table(result).splitlines()
    assert lines[0].split() == ["base", "adapter", "change"]
    assert [line.split()[0] for line in lines[1:]] == ["loss", "perplexity", "exact"]
    em = lines[3].split()
    assert em[2:] == [
        f"{result['base']['exact_match']:.3f}",
        f"({result['base']['correct']}/{len(PROMPTS)})",
        f"{result['adapter']['exact_match']:.3f}",
        f"({result['adapter']['correct']}/{len(PROMPTS)})",
        f"{diff['exact_match']:+.3f}",
    ]


def test_batch_size_does_not_change_predictions(llama, adapter, case):
    data, expected = case
    cfg = EvalConfig(
        model=str(llama),
        adapter_path=str(adapter),
        data=str(data),
        task="exact-match",
        generation_batch_size=len(PROMPTS),
        max_tokens=MAX_TOKENS,
        max_examples=5,
    )
    result = run(cfg, log=lambda _: None)
    assert "base" not in result and result["rows"] == 5
    assert [p["adapter"]["prediction"] for p in result["predictions"]] == expected["adapter"]["answers"][:5]


def test_cli_eval_prints_the_table_and_rejects_bad_input(llama, adapter, case, tmp_path, monkeypatch):
    data, _ = case
    runner = CliRunner()
    args = ["eval", "--model", str(llama), "--data", str(data), "--max-tokens", "4"]
    ok = runner.invoke(app, args + ["--adapter-path", str(adapter), "--compare-base", "--task", "loss"])
    assert ok.exit_code == 0, ok.output
    assert [line.split()[0] for line in ok.stdout.splitlines()] == ["base", "loss", "perplexity"]  # results alone
    assert ok.stderr.startswith("eval ") or "\neval " in ok.stderr  # progress goes to stderr
    generated = runner.invoke(
        app, [*args, "--adapter-path", str(adapter), "--max-examples", "2", "--task", "exact-match"]
    )
    assert generated.exit_code == 0, generated.output
    assert [line.split()[0] for line in generated.stdout.splitlines()] == ["adapter", "loss", "perplexity", "exact"]
    assert "generating (adapter): 2/2" in generated.stderr
    monkeypatch.chdir(tmp_path)  # no ./adapters here
    alone = runner.invoke(app, args)
    assert alone.exit_code == 0 and alone.stdout.splitlines()[0].split() == ["base"]
    bad = runner.invoke(app, args + ["--compare-base"])
    assert bad.exit_code == 2 and "--compare-base needs an adapter" in bad.output
    bad = runner.invoke(app, args + ["--task", "bleu", "--batch-size", "0"])
    assert bad.exit_code == 2
    assert "--task must be one of auto, exact-match, loss, preference, got 'bleu'" in bad.output
    assert "--batch-size must be at least 1, got 0" in bad.output
    (tmp_path / "results.json").mkdir()
    bad = runner.invoke(app, args + ["--output", "results.json"])
    assert bad.exit_code == 2 and "--output results.json: is a directory" in bad.output
    missing = runner.invoke(app, args + ["--split", "dev"])
    assert missing.exit_code == 2 and f"--split dev: {data} has no such split; it has: test" in missing.output


def test_data_cache_gives_the_same_figures_without_reading_the_rows(llama, adapter, case, tmp_path, monkeypatch):
    from mlx_lora.data import dataset

    data, _ = case
    cfg = EvalConfig(model=str(llama), adapter_path=str(adapter), data=str(data), task="loss", batch_size=3)
    want = run(cfg, log=lambda _: None)
    first, second = [], []
    cached = replace(cfg, data_cache=str(tmp_path / "c"))
    assert run(cached, log=first.append) == want and any("saved to the cache" in line for line in first)

    def unread(*args):
        raise AssertionError("rows read although the cache holds their tokens")

    monkeypatch.setattr(dataset, "split_rows", unread)
    assert run(cached, log=second.append) == want and any("read from the cache" in line for line in second)


@pytest.mark.parametrize("fmt", ["peft", "mlx-lm"])
def test_other_adapter_formats_give_the_same_figures(llama, adapter, case, tmp_path, fmt):
    from mlx_lora.commands.convert import convert
    from mlx_lora.config import ConvertConfig

    data, expected = case
    converted = convert(
        ConvertConfig(adapter_dir=str(adapter), out_dir=str(tmp_path / fmt), to=fmt, model=str(llama)),
        log=lambda _: None,
    )
    cfg = EvalConfig(
        model=str(llama),
        adapter_path=str(converted),
        data=str(data),
        task="exact-match",
        compare_base=True,
        batch_size=4,
        max_tokens=MAX_TOKENS,
    )
    result = run(cfg, log=lambda _: None)
    for name in ("base", "adapter"):
        assert [p[name]["prediction"] for p in result["predictions"]] == expected[name]["answers"]
        assert result[name]["loss"] == pytest.approx(expected[name]["loss"], rel=1e-5)
