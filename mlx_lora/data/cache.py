"""Tokenized sets on disk (--data-cache DIR), reused by later runs that would tokenize the same rows
the same way: same data (file size and modification time, or the datasets fingerprint), tokenizer,
mapping, split choice, --max-seq-length and --train-on-prompt. A run that misses writes its entry.

One entry is a .npz: every example's tokens and mask laid end to end, their lengths, and the
warnings tokenizing printed (said again on a hit).
"""

import hashlib
import io
import json
from dataclasses import fields
from pathlib import Path

import numpy as np

from mlx_lora import atomic
from mlx_lora.config.data import DataConfig
from mlx_lora.data.examples import Example, load_sets
from mlx_lora.data.sources import HOLDOUT_SEED, valid_split_name

VERSION = 1  # bump when the encoding of rows changes, so old entries are not read


def tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's whole definition (vocabulary, merges, normalizer, special tokens, chat template)."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper holds the transformers one
    backend = getattr(hf, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(hf.get_vocab().items()))
    extra = json.dumps([getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id])
    return hashlib.sha256((definition + extra).encode()).hexdigest()


def split_fingerprint(source, split: str) -> str:
    """Changes whenever the split's rows may have: a file's size and mtime, or the datasets fingerprint."""
    files = getattr(source, "files", None)
    if files is not None:
        stat = files[split].stat()
        return f"{files[split].resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return f"{source.origin}:{source.tables[split]._fingerprint}"


def cache_key(source, cfg: DataConfig, part: str, split: str, tokenizer_id: str, **encoding) -> str:
    """`part` is which rows of `split`: all, or the kept / held-out part of a validation hold-out."""
    mapping = {f.name: getattr(cfg, f.name) for f in fields(DataConfig)}  # every data option: none is missed
    described = dict(
        version=VERSION, data=split_fingerprint(source, split), part=part, mapping=mapping, tokenizer=tokenizer_id
    )
    return hashlib.sha256(json.dumps({**described, **encoding}, sort_keys=True).encode()).hexdigest()[:32]


def save(path: Path, examples: list[Example], warnings: list[str]) -> None:
    lengths = np.array([len(ex.tokens) for ex in examples], np.int64)
    buffer = io.BytesIO()
    np.savez(
        buffer,
        tokens=np.concatenate([ex.tokens for ex in examples]),
        mask=np.concatenate([ex.mask for ex in examples]),
        lengths=lengths,
        warnings=np.array(json.dumps(warnings)),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, buffer.getvalue())


def load(path: Path) -> tuple[list[Example], list[str]] | None:
    """The entry's examples and warnings; None when it is missing or unreadable (then it is rewritten)."""
    try:
        with np.load(path) as entry:
            tokens, mask, lengths = entry["tokens"], entry["mask"], entry["lengths"]
            warnings = json.loads(str(entry["warnings"]))
    except (OSError, ValueError, KeyError):
        return None
    ends = np.cumsum(lengths)
    starts = ends - lengths
    return [Example(tokens[s:e], mask[s:e]) for s, e in zip(starts, ends)], warnings


def entry_paths(source, cfg: DataConfig, tokenizer, cache_dir: Path, **encoding) -> dict[str, Path] | None:
    """Where the training and validation entries live; None when a split is missing (the uncached
    path then says so)."""
    valid = valid_split_name(source, cfg)
    if cfg.train_split not in source.splits or (valid is not None and valid not in source.splits):
        return None
    holdout = f"{cfg.valid_fraction} seed {HOLDOUT_SEED}"
    parts = {
        "train": (cfg.train_split, "all" if valid else f"kept {holdout}"),
        "valid": (valid, "all") if valid else (cfg.train_split, f"held out {holdout}"),
    }
    tokenizer_id = tokenizer_fingerprint(tokenizer)
    return {
        role: cache_dir / f"{cache_key(source, cfg, part, split, tokenizer_id, **encoding)}.npz"
        for role, (split, part) in parts.items()
    }


def tokenized_sets(
    source, cfg: DataConfig, tokenizer, max_seq_length: int, train_on_prompt: bool, cache_dir: Path | None, log=print
) -> dict[str, list[Example]]:
    """examples.load_sets, read from `cache_dir` when an earlier run wrote the same entries there."""
    encoding = dict(max_seq_length=max_seq_length, train_on_prompt=train_on_prompt)
    paths = entry_paths(source, cfg, tokenizer, cache_dir, **encoding) if cache_dir else None
    if paths is None:
        return load_sets(source, cfg, tokenizer, max_seq_length, train_on_prompt, log)
    entries = {role: load(path) for role, path in paths.items()}
    if all(entries.values()):
        for line in entries["train"][1]:
            log(line)
        log(f"tokenized rows read from the cache ({cache_dir}): {paths['train'].name}, {paths['valid'].name}")
        return {role: examples for role, (examples, _) in entries.items()}
    said = []
    sets = load_sets(
        source, cfg, tokenizer, max_seq_length, train_on_prompt, lambda line: (said.append(line), log(line))
    )
    for role, path in paths.items():
        save(path, sets[role], said if role == "train" else [])
    log(f"tokenized rows saved to the cache ({cache_dir}) for later runs")
    return sets
