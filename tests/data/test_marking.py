"""`train --show-mask N`: the trained tokens marked, the counts, and nothing trained or written."""

from conftest import write_jsonl
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.data.examples import encode_row
from mlx_lora.data.marking import marked
from mlx_lora.model.base import load_base

ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]


def test_brackets_wrap_exactly_the_trained_tokens(llama):
    tok = load_base(str(llama)).tokenizer
    ex = encode_row("t.jsonl:1", tok, "chat", ROWS[0], False)
    text = marked(tok, ex, colour=False)
    assert text.replace("[[", "").replace("]]", "") == tok.decode(ex.tokens.tolist())
    inside = text[text.index("[[") + 2 : text.index("]]")]
    assert text.count("[[") == 1 and inside == tok.decode(ex.tokens[ex.mask].tolist())
    assert "\033[" in marked(tok, ex, colour=True) and "[[" not in marked(tok, ex, colour=True)


def test_show_mask_prints_rows_and_counts_then_exits(llama, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    write_jsonl(data / "train.jsonl", ROWS)
    write_jsonl(data / "valid.jsonl", ROWS)
    out = tmp_path / "adapter"
    args = ["train", "--model", str(llama), "--data", str(data), "--adapter-path", str(out), "--show-mask", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    tok = load_base(str(llama)).tokenizer
    first, second = (encode_row("t", tok, "chat", row, False) for row in ROWS)
    assert f"--- row 1: {first.mask.sum()} of {len(first.tokens)} tokens trained" in result.output
    assert "--- row 2" not in result.output and "[[" in result.output
    total = first.mask.sum() + second.mask.sum()
    assert f"--- 2 rows: {total} of {len(first.tokens) + len(second.tokens)} tokens trained" in result.output
    assert not out.exists()
