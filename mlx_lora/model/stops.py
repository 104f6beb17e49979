"""The tokens that end a model's answer: every stop token the model declares.

mlx-lm stops on its tokenizer's `eos_token_ids` (generate, BatchGenerator); it fills them from the
tokenizer's EOS and `eos_token_id` of generation_config.json (else config.json). A chat template may
close a reply with a token declared nowhere else (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>` where
the EOS is another token); it is added here, so generate, chat, eval and serve stop where the model
ends its turn, and the fused model's generation_config.json and GGUF carry every stop on.
"""

from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper

GENERATION_CONFIG = "generation_config.json"
PROBE_USER, PROBE_REPLY = "mlxlorastopuser", "mlxlorastopreply"


def eos_ids(value: Any) -> list[int]:
    """An `eos_token_id` as configs spell it: one id, a list, or absent."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]


def end_of_turn(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant's reply, or None (no
    template, one that refuses the probe, or one that ends a reply with plain text)."""
    hf = tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer
    if not hf.chat_template:
        return None
    messages = [{"role": "user", "content": PROBE_USER}, {"role": "assistant", "content": PROBE_REPLY}]
    try:
        text = hf.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template's own raise_exception (e.g. "must end with a user turn")
        return None
    tail = text[text.find(PROBE_REPLY) + len(PROBE_REPLY) :] if PROBE_REPLY in text else ""
    specials = {t.content for t in hf.added_tokens_decoder.values() if t.special} | set(hf.all_special_tokens)
    found = max((s for s in specials if s and tail.startswith(s)), key=len, default=None)
    return hf.convert_tokens_to_ids(found) if found else None


def add_template_stop(tokenizer: TokenizerWrapper) -> None:
    """The chat template's end-of-turn joins the tokenizer's stop tokens."""
    eot = end_of_turn(tokenizer)
    if eot is not None:
        tokenizer.eos_token_ids = tokenizer.eos_token_ids | {eot}


def stop_ids(tokenizer: TokenizerWrapper) -> list[int]:
    """Every stop token, ordered for files that name a few: the tokenizer's EOS, the template's
    end-of-turn, then the rest by id."""
    first = [t for t in (tokenizer.eos_token_id, end_of_turn(tokenizer)) if t is not None]
    return list(dict.fromkeys(first + sorted(tokenizer.eos_token_ids)))
