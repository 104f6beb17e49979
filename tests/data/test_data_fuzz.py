"""No input file may crash the data loader: it loads, or it raises the one-line UserError."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlx_lora.data.examples import load_split
from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
# rows that look like the real formats, so the fuzz reaches past the key checks
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "bot"]), "content": json_values}),
    max_size=5,
)
rows = st.one_of(
    json_values,
    st.fixed_dictionaries({"text": json_values}),
    st.fixed_dictionaries({"prompt": st.text(max_size=30), "completion": json_values}),
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries(
        {
            "messages": st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=30)}
                ),
                max_size=4,
            )
        }
    ),
)


@pytest.fixture(scope="module")
def tokenizer(llama):
    return load_base(str(llama)).tokenizer


def _load(tokenizer, content: bytes, max_seq_length: int = 64) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train.jsonl"
        path.write_bytes(content)
        try:
            examples = load_split(path, tokenizer, max_seq_length, False, log=lambda _: None)
        except UserError as e:
            assert str(e).startswith(str(path)) and "\n" not in str(e)
            return
        assert examples and all(len(e.tokens) <= max_seq_length and e.mask.any() for e in examples)


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes(tokenizer, content):
    _load(tokenizer, content)


@FUZZ
@given(st.lists(rows, min_size=1, max_size=5), st.booleans())
def test_arbitrary_json_rows(tokenizer, lines, ascii_only):
    _load(tokenizer, "\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in lines).encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize(
    "content",
    [
        b'{"text": "a\xe2\x80\xa8b"}\n',  # U+2028 inside a string is not a line break in JSONL
        b'\xef\xbb\xbf{"text": "starts with a byte order mark"}\n',
        b"[" * 100_000,
        b'{"text": "\\ud800"}\n',  # a lone surrogate
    ],
)
def test_edge_cases(tokenizer, content):
    _load(tokenizer, content)
