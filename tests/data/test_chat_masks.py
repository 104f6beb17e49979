"""Chat masks against the reference on real chat templates (tests/data/chat_templates/, SOURCES.md there).

The reference is transformers' `apply_chat_template(..., return_assistant_tokens_mask=True)` over the
training template TRL's `assistant_only_loss` swaps in (`get_training_chat_template`), on the same
tokenizer: SmolLM2's real byte-level BPE with each family's special tokens added.
"""

from pathlib import Path

import numpy as np
import pytest
from conftest import SMOLVLM_TEMPLATE
from transformers import AutoTokenizer
from trl.chat_template_utils import get_training_chat_template

from mlx_lora.data.examples import encode_row
from mlx_lora.errors import UserError

TEMPLATES = Path(__file__).parent / "chat_templates"
# each family's special tokens: (bos, eos, others)
FAMILIES = {
    "smollm2": ("<|im_start|>", "<|im_end|>", []),
    "qwen2_5": ("<|im_start|>", "<|im_end|>", []),
    "qwen3": ("<|im_start|>", "<|im_end|>", []),
    "llama3": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"]),
    "llama3_1": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"]),
    "llama3_2": ("<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>"]),
    "gemma": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "gemma3": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": ("<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "phi3_5": ("<s>", "<|endoftext|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
SYSTEM = [{"role": "system", "content": "You are terse."}]
TALK = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]
TOOL_TALK = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "18 C, sunny"},
    {"role": "assistant", "content": "It is 18 C and sunny in Paris."},
]


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer):
    def make(family: str):
        bos, eos, others = FAMILIES[family]
        tok = AutoTokenizer.from_pretrained(smollm2_tokenizer)
        tok.add_special_tokens({"bos_token": bos, "eos_token": eos, "additional_special_tokens": others})
        tok.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
        return tok

    return make


def ours(tok, row, train_on_reasoning=True):
    ex = encode_row("t.jsonl:1", tok, "chat", row, False, train_on_reasoning)
    return ex.tokens.tolist(), ex.mask


def reference(tok, row):
    """TRL's assistant_only_loss mask: transformers over TRL's training template."""
    template = get_training_chat_template(tok)
    kwargs = dict(tools=row.get("tools"), return_dict=True, return_assistant_tokens_mask=True)
    out = tok.apply_chat_template(row["messages"], chat_template=template, **kwargs)
    same_text = tok.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
    assert tok.apply_chat_template(row["messages"], chat_template=template, tools=row.get("tools"), tokenize=False) == (
        same_text
    ), "the training template renders this row differently, so it is no reference for it"
    return out["input_ids"], np.asarray(out["assistant_masks"], bool)


CASES = [
    ("qwen2_5", {"messages": SYSTEM + TALK}),
    ("qwen2_5", {"messages": TOOL_TALK, "tools": TOOLS}),
    ("qwen3", {"messages": [TALK[0], TALK[1]]}),
    ("qwen3", {"messages": [TALK[0], {**TALK[1], "reasoning_content": "They greet me."}]}),
    (
        "qwen3",
        {"messages": [TOOL_TALK[0], {**TOOL_TALK[1], "reasoning_content": "Call it."}, *TOOL_TALK[2:]], "tools": TOOLS},
    ),
    ("llama3", {"messages": SYSTEM + TALK}),
    ("gemma", {"messages": TALK}),
    ("gemma3", {"messages": SYSTEM + TALK}),
    ("phi3", {"messages": SYSTEM + TALK}),
    ("phi3_5", {"messages": SYSTEM + TALK}),
]


@pytest.mark.parametrize(("family", "row"), CASES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(CASES)])
def test_masks_equal_trl_assistant_only_loss(tokenizers, family, row):
    tok = tokenizers(family)
    tokens, mask = ours(tok, row)
    ref_tokens, ref_mask = reference(tok, row)
    assert tokens == ref_tokens
    if family == "qwen2_5":
        # TRL's Qwen2.5 training template opens its generation block before the "\n" that ends
        # "<|im_start|>assistant\n", a token the generation prompt supplies; we do not train it.
        only_ref = np.flatnonzero(ref_mask & ~mask)
        assert [tok.decode(tokens[i - 3 : i + 1]) for i in only_ref] == ["<|im_start|>assistant\n"] * 2
        ref_mask[only_ref] = False
    assert mask.tolist() == ref_mask.tolist()
    assert tok.eos_token_id in [t for t, m in zip(tokens, mask) if m] or family.startswith("gemma")


def trained(tok, row, train_on_reasoning=True) -> list[str]:
    """Each run of trained tokens, decoded."""
    tokens, mask = ours(tok, row, train_on_reasoning)
    edges = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
    return [tok.decode(tokens[a:b]) for a, b in zip(edges[::2], edges[1::2])]


def test_qwen3_drops_earlier_reasoning_as_its_template_does(tokenizers):
    """Qwen3 renders reasoning only after the last user turn: the earlier turn's is dropped, the
    last one's trained unless --no-train-on-reasoning (its tokens then stay in the input)."""
    tok = tokenizers("qwen3")
    row = {
        "messages": [
            TALK[0],
            {**TALK[1], "reasoning_content": "EARLIER"},
            TALK[2],
            {**TALK[3], "thinking": "Two and two make four."},
        ]
    }
    assert trained(tok, row) == [
        "Hello! How can I help?<|im_end|>\n",
        "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>\n",
    ]
    assert trained(tok, row, train_on_reasoning=False) == ["Hello! How can I help?<|im_end|>\n", "4<|im_end|>\n"]
    tokens, _ = ours(tok, row, train_on_reasoning=False)
    text = tok.decode(tokens)
    assert "Two and two make four." in text and "EARLIER" not in text


@pytest.mark.parametrize("family", ["llama3_1", "llama3_2"])
def test_llama3_1_tool_calls_are_trained_and_tool_results_are_not(tokenizers, family):
    """Llama 3.1/3.2 add a dated system turn and put the tools into the first user turn."""
    tok = tokenizers(family)
    row = {"messages": SYSTEM + TOOL_TALK, "tools": TOOLS}
    assert trained(tok, row) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "It is 18 C and sunny in Paris.<|eot_id|>",
    ]
    assert "18 C, sunny" in tok.decode(ours(tok, row)[0])


def test_smollm2_trains_every_reply_and_its_end_of_turn(tokenizers):
    assert trained(tokenizers("smollm2"), {"messages": TALK}) == [
        "Hello! How can I help?<|im_end|>\n",
        "4<|im_end|>\n",
    ]


def test_a_template_without_tools_refuses_tool_rows(tokenizers):
    with pytest.raises(UserError, match=r"^t.jsonl:1: a tool-calling row, but this tokenizer's chat template has no"):
        ours(tokenizers("gemma3"), {"messages": TOOL_TALK, "tools": TOOLS})


def test_a_template_without_reasoning_refuses_reasoning_rows(tokenizers):
    row = {"messages": [TALK[0], {**TALK[1], "reasoning_content": "hm"}]}
    with pytest.raises(UserError, match=r"^t.jsonl:1: messages\[1\] has 'reasoning_content' but .* renders no reason"):
        ours(tokenizers("llama3"), row)


def test_a_turn_the_template_rewrites_is_refused_with_its_index(tokenizers):
    """No exact mask for a reply the template does not render as written: refused, not guessed."""
    tok = tokenizers("smollm2")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if loop.index0 > 1 %}{{ m.content | replace('4', 'four') }}{% else %}{{ m.content }}{% endif %}"
        "<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert trained(tok, {"messages": TALK[:2]}) == ["Hello! How can I help?<|im_end|>\n"]
    with pytest.raises(UserError, match=r"^t.jsonl:1: messages\[3\]: the chat template renders this turn without '4'"):
        ours(tok, {"messages": TALK})


def test_a_template_with_no_end_of_turn_token_is_refused(tokenizers):
    tok = tokenizers("smollm2")
    tok.chat_template = tok.chat_template.replace("'<|im_end|>' + ", "")
    with pytest.raises(
        UserError, match=r"^t.jsonl:1: this tokenizer's chat template closes an assistant reply with '\\n',"
    ):
        ours(tok, {"messages": TALK})


END_OF_TURN = {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "phi3": "<|end|>"}


@pytest.mark.parametrize("family", sorted(END_OF_TURN))
def test_each_assistant_turns_end_of_turn_is_trained_and_is_a_stop_token(tokenizers, family):
    """The model learns to stop (every reply's end-of-turn token is a target, the user's are not),
    and generation stops on that same token (model/stops.end_of_turn finds it in the template)."""
    from mlx_lora.model.stops import end_of_turn

    tok = tokenizers(family)
    eot = tok.convert_tokens_to_ids(END_OF_TURN[family])
    tokens, mask = ours(tok, {"messages": TALK})
    trained = [t for t, m in zip(tokens, mask) if m]
    assert trained.count(eot) == 2 < tokens.count(eot)  # two replies; the user's turns end with it too
    assert end_of_turn(tok) == eot


def test_a_template_that_reads_only_content_parts_trains_string_turns_as_parts(smollm2_tokenizer):
    """SmolVLM's template writes nothing for a string content (it iterates the string for parts): each
    string content goes to it as one text part, so its tokens are transformers' rendering of those parts."""
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_utterance>", "<image>"]})
    tok.chat_template = SMOLVLM_TEMPLATE
    assert "2+2" not in tok.apply_chat_template(TALK, tokenize=False)  # the template as it is
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in TALK]
    tokens, _ = ours(tok, {"messages": TALK})
    assert tokens == tok.apply_chat_template(parts, tokenize=True, return_dict=False)
    assert trained(tok, {"messages": TALK}) == [" Hello! How can I help?<end_of_utterance>\n", " 4<end_of_utterance>\n"]
