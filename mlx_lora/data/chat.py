"""A conversation as its tokenizer's chat template renders it, and which of its tokens the loss counts.

The conversation is rendered once, whole, as the template renders it: earlier turns' reasoning dropped
where the template drops it, tools through the template's own tools support. A template with
`{% generation %}` blocks marks the trained characters itself (transformers' assistant mask). For any
other, each assistant turn is found in that one rendering: it starts where the template's generation
prompt ends and runs through its end-of-turn token and what the template writes after it before the next
turn (what TRL's training templates put in their generation blocks). A turn not found that way, or not
holding its own reply, is refused; the mask is never guessed. Tokens are those of the whole rendering,
so they equal `apply_chat_template(..., tokenize=True)`.
"""

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mlx_lora.errors import UserError

GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
REASONING_FIELDS = ("reasoning_content", "thinking")
PROBE_USER, PROBE_REPLY, PROBE_TOOL = "mlxloraprobeuser", "mlxloraprobereply", "mlxloraprobetool"


@dataclass(frozen=True)
class TurnShape:
    """What a template writes around one assistant reply, read off a probe conversation."""

    header: str  # from the end of the user's text to where the reply starts (the generation prompt's end)
    end: str  # the end-of-turn token that closes a reply
    after: tuple[str, ...]  # what the template writes after `end` when the reply is the last message,
    # as special tokens and single characters: a turn keeps as much of it as comes next, whole tokens only


def hf_tokenizer(tokenizer):
    """The transformers tokenizer under mlx-lm's wrapper."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def _render(hf, messages, tools=None, generation_prompt=False) -> str:
    if _reads_parts_only(hf, hf.chat_template):
        messages = [as_parts(m) for m in messages]
    return hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt)


def as_parts(message: dict) -> dict:
    """A message whose string content is given as one text part."""
    content = message.get("content")
    return {**message, "content": [{"type": "text", "text": content}]} if isinstance(content, str) else message


@lru_cache(maxsize=16)
def _reads_parts_only(hf, template: str) -> bool:
    """Whether the template renders a turn's content only from a list of parts (SmolVLM's: it
    iterates a string's characters for parts and writes none), so string contents go to it as parts."""
    probe = [{"role": "user", "content": PROBE_USER}]
    try:
        return PROBE_USER not in hf.apply_chat_template(probe, tokenize=False) and PROBE_USER in (
            hf.apply_chat_template([as_parts(probe[0])], tokenize=False)
        )
    except Exception:  # a template that refuses either probe is rendered as it is
        return False


def _specials(hf) -> list[str]:
    found = set(hf.all_special_tokens) | {t.content for t in hf.added_tokens_decoder.values() if t.special}
    return sorted((s for s in found if s), key=len, reverse=True)


def _special_prefix(hf, text: str) -> str:
    """The longest special token `text` starts with, or ""."""
    return next((s for s in _specials(hf) if text.startswith(s)), "")


def _atoms(hf, text: str) -> tuple[str, ...]:
    """`text` as its special tokens and single characters."""
    atoms = []
    while text:
        atoms.append(_special_prefix(hf, text) or text[0])
        text = text[len(atoms[-1]) :]
    return tuple(atoms)


def turn_shape(where: str, hf) -> TurnShape:
    shape = _turn_shape(hf, hf.chat_template)
    if isinstance(shape, str):
        raise UserError(f"{where}: {shape}")
    return shape


@lru_cache(maxsize=16)
def _turn_shape(hf, template: str) -> TurnShape | str:
    """The template's assistant turn, from a one-exchange probe; or why no exact mask can be
    derived: its reply is not preceded by its generation prompt, or not closed by a special token."""
    user = [{"role": "user", "content": PROBE_USER}]
    prompt = _render(hf, user, generation_prompt=True)
    full = _render(hf, [*user, {"role": "assistant", "content": PROBE_REPLY}])
    reply = full.find(PROBE_REPLY)
    if PROBE_USER not in prompt or not full.startswith(prompt) or reply < 0:
        return (
            "this tokenizer's chat template does not start an assistant reply where its generation prompt "
            "ends, so no exact loss mask can be derived; use prompt/completion rows"
        )
    tail = full[reply + len(PROBE_REPLY) :]
    end = _special_prefix(hf, tail)
    if not end:
        return (
            f"this tokenizer's chat template closes an assistant reply with {tail[:20]!r}, not an end-of-turn "
            "token, so the model could not learn to stop; use prompt/completion rows"
        )
    return TurnShape(prompt[prompt.find(PROBE_USER) + len(PROBE_USER) :], end, _atoms(hf, tail[len(end) :]))


def _kept(text: str, at: int, atoms: tuple[str, ...]) -> int:
    """Where the leading run of `atoms` that `text` has at `at` ends."""
    for atom in atoms:
        if not text.startswith(atom, at):
            break
        at += len(atom)
    return at


def _refuse_turn(where: str, i: int, why: str):
    raise UserError(
        f"{where}: messages[{i}]: {why}, so no exact loss mask can be derived for it; "
        "use prompt/completion rows or a model whose template renders it"
    )


def _reply_parts(message: dict) -> list[str]:
    """What of an assistant message its turn must show: the reply and each tool call's name."""
    calls = [c.get("function", c).get("name", "") for c in message.get("tool_calls") or []]
    return [(message.get("content") or "").strip(), *calls]


def text_parts(content) -> list[str]:
    """A message's text: its content, or the text parts of a content list (a vision row's user turn)."""
    if isinstance(content, list):
        return [p["text"].strip() for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return [(content or "").strip()]


def derived_spans(where: str, text: str, messages: list[dict], shape: TurnShape) -> list[tuple[int, int]]:
    """Each assistant turn's trained characters in `text`, walking the messages in order."""
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            for part in text_parts(m.get("content")):
                found = text.find(part, cursor)
                cursor = found + len(part) if found >= 0 else cursor
            continue
        head = text.find(shape.header, cursor)
        if head < 0:
            _refuse_turn(where, i, "the chat template does not open this assistant turn with its generation prompt")
        start = head + len(shape.header)
        close = text.find(shape.end, start)
        if close < 0:
            _refuse_turn(where, i, f"the chat template does not close this assistant turn with {shape.end!r}")
        missing = [p for p in _reply_parts(m) if p not in text[start:close]]
        if missing:
            _refuse_turn(where, i, f"the chat template renders this turn without {missing[0][:30]!r}")
        stop = _kept(text, close + len(shape.end), shape.after)
        spans.append((start, stop))
        cursor = stop
    return spans


def marked_spans(hf, messages: list[dict], tools) -> tuple[str, list[tuple[int, int]]]:
    """The template's own `{% generation %}` spans (transformers renders them)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    [text], [spans] = render_jinja_template(
        conversations=[messages],
        tools=tools,
        chat_template=hf.chat_template,
        return_assistant_tokens_mask=True,
        **hf.special_tokens_map,
    )
    return text, [tuple(s) for s in spans]


def reasoning_spans(text: str, messages: list[dict], spans) -> list[tuple[int, int]]:
    """Within trained spans, each assistant turn's reasoning block: from the turn's start to its
    reply (or to the reasoning's end when the turn has no reply). A turn whose reasoning the
    template dropped has none."""
    out, cursor = [], 0
    for m in messages:
        reasoning = (m.get("reasoning_content") or m.get("thinking") or "").strip() if m["role"] == "assistant" else ""
        at = text.find(reasoning, cursor) if reasoning else -1
        span = next((s for s in spans if s[0] <= at < s[1]), None)
        if span is None:
            continue
        end = at + len(reasoning)
        reply = (m.get("content") or "").strip()
        begins = text.find(reply, end) if reply else end
        out.append((span[0], begins if 0 <= begins < span[1] else end))
        cursor = end
    return out


def token_mask(offsets: np.ndarray, spans) -> np.ndarray:
    """Tokens overlapping any span, as transformers' assistant mask marks them."""
    mask = np.zeros(len(offsets), bool)  # offsets: (T, 2) characters [start, end) of each token
    for start, end in spans:
        mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    return mask


def template_fields(where: str, hf, row: dict) -> tuple[list[dict], list | None]:
    """The row's messages and tools as the template reads them: reasoning under the field the
    template names; tool rows only for a template with tools support."""
    template = hf.chat_template or ""
    messages = [dict(m) for m in row["messages"]]
    field = next((f for f in REASONING_FIELDS if f in template), None)
    for i, m in enumerate(messages):
        given = next((f for f in REASONING_FIELDS if m.get(f) is not None), None)
        if given and field is None:
            raise UserError(
                f"{where}: messages[{i}] has '{given}' but this tokenizer's chat template renders no reasoning; "
                "drop the field or use a model whose template has it"
            )
        if given and given != field:
            m[field] = m.pop(given)
    tools = row.get("tools")
    uses_tools = tools is not None or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if uses_tools and not _renders_tools(hf):
        raise UserError(
            f"{where}: a tool-calling row, but this tokenizer's chat template has no tools support; "
            "drop the tools or use a model whose template has it"
        )
    return messages, tools


def _renders_tools(hf) -> bool:
    return _template_renders_tools(hf, hf.chat_template)


@lru_cache(maxsize=16)
def _template_renders_tools(hf, template: str) -> bool:
    tool = {"type": "function", "function": {"name": PROBE_TOOL, "description": "", "parameters": {}}}
    try:
        return PROBE_TOOL in _render(hf, [{"role": "user", "content": "x"}], tools=[tool])
    except Exception:  # a template may refuse tools outright (raise_exception)
        return False


@dataclass(frozen=True)
class RenderedChat:
    """A conversation as its template renders it, and which characters of it the loss counts."""

    text: str
    messages: list[dict]
    spans: list[tuple[int, int]]  # each assistant turn's trained characters

    def mask(self, offsets: np.ndarray, train_on_prompt: bool, train_on_reasoning: bool = True) -> np.ndarray:
        """Which tokens (their characters' `offsets` in `text`, (T, 2)) the loss counts: each assistant
        turn's reply, tool calls and end-of-turn (all with --train-on-prompt), and its reasoning
        unless --no-train-on-reasoning."""
        mask = np.ones(len(offsets), bool) if train_on_prompt else token_mask(offsets, self.spans)
        if not train_on_reasoning:
            mask &= ~token_mask(offsets, reasoning_spans(self.text, self.messages, self.spans))
        return mask


def render_chat(where: str, tokenizer, row: dict) -> RenderedChat:
    """The row's conversation rendered whole by the chat template, with its trained spans."""
    hf = hf_tokenizer(tokenizer)
    messages, tools = template_fields(where, hf, row)
    try:
        if GENERATION.search(hf.chat_template):
            text, spans = marked_spans(hf, messages, tools)
        else:
            text = _render(hf, messages, tools)
            spans = derived_spans(where, text, messages, turn_shape(where, hf))
    except UserError:
        raise
    except Exception as e:  # the template's own raise_exception or a jinja error: the row's fault
        raise UserError(f"{where}: the chat template refused this row: {e}") from None
    return RenderedChat(text, messages, spans)


def tokens_with_offsets(where: str, tokenizer, text: str, special: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (T,), each token's characters in `text` (T, 2)); `special`: with the tokenizer's BOS etc."""
    try:
        encoded = hf_tokenizer(tokenizer)(text, add_special_tokens=special, return_offsets_mapping=True)
    except NotImplementedError:  # a Python tokenizer has no character offsets
        raise UserError(f"{where}: 'messages' rows need a tokenizer.json tokenizer to place the loss mask") from None
    tokens = np.asarray(encoded["input_ids"], np.int32)
    return tokens, np.asarray(encoded["offset_mapping"], np.int64).reshape(-1, 2)


def encode_chat(where: str, tokenizer, row: dict, train_on_prompt: bool, train_on_reasoning: bool = True):
    """(tokens, mask) of a chat row: the whole rendering tokenized once, masked as RenderedChat.mask says."""
    rendered = render_chat(where, tokenizer, row)
    tokens, offsets = tokens_with_offsets(where, tokenizer, rendered.text)
    return tokens, rendered.mask(offsets, train_on_prompt, train_on_reasoning)
