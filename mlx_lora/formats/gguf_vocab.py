"""A Hugging Face tokenizer as llama.cpp's GGUF vocabulary: byte-level BPE ("gpt2": tokens, merges
and the pre-tokenizer regex by its llama.cpp name) or SentencePiece ("llama": pieces with scores),
token types as INT32, special token ids and the chat template (gguf-py's SpecialVocab), and the stop
tokens beyond EOS that llama.cpp ends a generation on."""

import json
from pathlib import Path

import gguf

from mlx_lora.errors import UserError
from mlx_lora.model.gguf import NO_MERGE, PRE_TOKENIZERS, pre_signature
from mlx_lora.model.stops import GENERATION_CONFIG, eos_ids

TOKEN = gguf.TokenType


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e}); the model directory needs a valid {path.name}") from None


def _steps(node: dict | None) -> list[dict]:
    if not node:
        return []
    return node.get("pretokenizers", []) if node.get("type") == "Sequence" else [node]


def _is_byte_level(tok: dict) -> bool:
    return any(s.get("type") == "ByteLevel" for s in _steps(tok.get("pre_tokenizer")) + _steps(tok.get("decoder")))


def pre_name(tok: dict, path: Path) -> str:
    """llama.cpp splits text with its own copy of each known regex before BPE; name the one that
    equals this tokenizer's, or refuse, since any other split gives other token ids."""
    signature = pre_signature(tok.get("pre_tokenizer"))
    for name, pre in PRE_TOKENIZERS.items():
        if pre_signature(pre) == signature:
            return name
    raise UserError(
        f"{path}: --export-gguf knows the pre-tokenizers {', '.join(PRE_TOKENIZERS)} (llama.cpp's names), "
        f"not this one ({[s[0] for s in signature]}); run llama.cpp's convert_hf_to_gguf.py on the fused directory"
    )


def bpe_vocab(tok: dict, path: Path, n_config: int) -> tuple[list[str], list[int], str]:
    """Tokens in byte-level form, their types, and the pre-tokenizer name. A character-level BPE
    without merges (the shipped tokenizer) is written byte-level too: each token's UTF-8 bytes mapped
    to GPT-2's printable characters, so ' ' becomes 'Ġ', and any split gives the same single-character ids."""
    byte_level = _is_byte_level(tok)
    if not byte_level and tok["model"].get("merges"):
        raise UserError(
            f"{path}: a BPE tokenizer with merges but no byte-level pre-tokenizer; llama.cpp cannot reproduce "
            "it, so --export-gguf stops here"
        )
    pre = pre_name(tok, path) if byte_level else "default"
    vocab = dict(tok["model"]["vocab"])
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    vocab.update({a["content"]: i for i, a in added.items()})
    reverse = {i: t for t, i in vocab.items()}
    to_unicode = gguf.vocab.bytes_to_unicode()
    tokens, types = [], []
    for i in range(max(n_config, max(reverse) + 1)):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")  # the model has more rows than the tokenizer has tokens
            types.append(TOKEN.USER_DEFINED)
        elif i in added:
            tokens.append(added[i]["content"])
            types.append(TOKEN.CONTROL if added[i].get("special") else TOKEN.USER_DEFINED)
        else:
            text = reverse[i]
            tokens.append(text if byte_level else "".join(to_unicode[b] for b in text.encode()))
            types.append(TOKEN.NORMAL)
    return tokens, types, pre


def merge_scores(tok: dict) -> dict[str, float]:
    """SentencePiece BPE merges the adjacent pair whose result scores highest; Hugging Face's copy
    of it stores the merges in order instead. Score each product by minus its merge rank."""
    scores: dict[str, float] = {}
    for rank, merge in enumerate(tok["model"].get("merges", [])):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(a + b, -float(rank))
    return scores


def spm_vocab(directory: Path, tok: dict, n_config: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types: from tokenizer.model when there is one (its own scores), else from
    tokenizer.json's byte-fallback BPE with scores from the merge order."""
    if (directory / "tokenizer.model").is_file():
        entries = [(t.decode(), s, int(k)) for t, s, k in gguf.SentencePieceVocab(directory).all_tokens()]
    else:
        scores = merge_scores(tok)
        unreachable = -float(len(scores) + 1)  # multi-character pieces no merge makes: never merged into
        added = {a["id"]: a for a in tok.get("added_tokens", [])}
        reverse = {i: t for t, i in tok["model"]["vocab"].items()} | {i: a["content"] for i, a in added.items()}
        entries = []
        for i in range(max(reverse) + 1):
            text = reverse.get(i, f"[PAD{i}]")
            kind = TOKEN.BYTE if len(text) == 6 and text.startswith("<0x") and text.endswith(">") else TOKEN.NORMAL
            if i in added:
                kind = TOKEN.CONTROL if added[i].get("special") else TOKEN.USER_DEFINED
            if text == tok["model"].get("unk_token"):
                kind = TOKEN.UNKNOWN
            score = scores.get(text, 0.0 if len(text) == 1 or kind != TOKEN.NORMAL else unreachable)
            entries.append((text, score, int(kind)))
    entries += [(f"[PAD{i}]", -1000.0, int(TOKEN.UNUSED)) for i in range(len(entries), n_config)]
    return [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries]


def _adds_space_prefix(tok: dict) -> bool:
    norm = tok.get("normalizer") or {}
    normalizers = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    if any(n.get("type") == "Prepend" for n in normalizers):
        return True
    return any(
        s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never"
        for s in _steps(tok.get("pre_tokenizer"))
    )


def added_specials(path: Path, ids: dict[str, int]) -> dict[str, bool]:
    """Whether encoding adds BOS / EOS, as the tokenizer itself does it. Written always: without the
    keys llama.cpp guesses from the pre-tokenizer name (llama-bpe: add BOS)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    plain, full = tokenizer.encode("a", add_special_tokens=False).ids, tokenizer.encode("a").ids
    return {
        "bos": "bos" in ids and full[:1] == [ids["bos"]] and plain[:1] != [ids["bos"]],
        "eos": "eos" in ids and full[-1:] == [ids["eos"]] and plain[-1:] != [ids["eos"]],
    }


def add_vocab(writer: gguf.GGUFWriter, directory: Path, n_config: int) -> int:
    """Write the tokenizer of `directory`; returns the number of tokens (the model's vocab rows)."""
    tok = read_json(directory / "tokenizer.json")
    model = tok.get("model", {})
    spm = (directory / "tokenizer.model").is_file() or model.get("byte_fallback", False)
    if spm:
        tokens, scores, types = spm_vocab(directory, tok, n_config)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(_adds_space_prefix(tok))
    elif model.get("type") == "BPE":
        tokens, types, pre = bpe_vocab(tok, directory / "tokenizer.json", n_config)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
    else:
        raise UserError(
            f"{directory / 'tokenizer.json'}: a {model.get('type')} tokenizer; --export-gguf writes BPE and "
            "SentencePiece tokenizers only"
        )
    writer.add_token_list(tokens)
    writer.add_token_types(types)  # gguf-py writes a list of ints as INT32, the type llama.cpp requires
    special = gguf.SpecialVocab(directory, load_merges=not spm, n_vocab=len(tokens))
    special.add_special_token |= added_specials(directory / "tokenizer.json", special.special_token_ids)
    if not spm and not special.merges:
        special.merges = [NO_MERGE]
    special.add_to_gguf(writer, quiet=True)
    add_stops(writer, directory, special.special_token_ids.get("eos"))
    return len(tokens)


def add_stops(writer: gguf.GGUFWriter, directory: Path, eos: int | None) -> None:
    """generation_config.json's stop tokens other than EOS (the fused model lists the template's
    end-of-turn first, stops.stop_ids) as the end-of-turn and end-of-message ids, which llama.cpp
    adds to its end-of-generation set; it has no key for a third, which only its own by-text
    detection of end tokens (`<|eot_id|>`, `<|im_end|>`, `<end_of_turn>`, ...) would add."""
    file = directory / GENERATION_CONFIG
    found = eos_ids(read_json(file).get("eos_token_id")) if file.is_file() else []
    extra = [t for t in found if t != eos]
    if extra:
        writer.add_eot_token_id(extra[0])
    if len(extra) > 1:
        writer.add_eom_token_id(extra[1])
