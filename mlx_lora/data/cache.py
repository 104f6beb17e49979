"""Tokenized sets on disk, reused by later runs that would tokenize the same rows the same way: same
data (file size and modification time, or the datasets fingerprint), tokenizer, mapping, split
choice, --max-seq-length and --train-on-prompt. A run that misses writes its entry. On by default,
as `datasets` caches: in --data-cache DIR, else $MLX_LORA_CACHE/tokenized, else the platform's cache
directory; --no-data-cache turns it off. The directory is kept under MAX_BYTES by removing the least
recently used entries, only ever ones this cache wrote (their .mlx-lora-output.json says so).

One entry is a directory of .npy arrays, an ExampleSet's three (every example's tokens and mask
laid end to end, and where each starts), and warnings.json (what tokenizing printed, said again
on a hit). A hit reads the offsets alone; tokens and mask stay on disk and a batch reads its own
rows (os.pread), so memory does not grow with the rows. Not a memory map: the page cache maps a
file in folios of up to 2 MB, and every row touched would keep one in the process's RSS.
"""

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO

import numpy as np

from mlx_lora import atomic
from mlx_lora.config.data import DataConfig
from mlx_lora.data.examples import ExampleSet, load_sets
from mlx_lora.data.sources import HOLDOUT_SEED, valid_split_name
from mlx_lora.errors import UserError
from mlx_lora.machine import CACHE_ENV, platform_cache

VERSION = 3  # bump when the encoding of rows or the layout of an entry changes, so old entries are not read
ARRAYS = ("tokens", "mask", "offsets")  # <name>.npy in an entry, ExampleSet's fields
WARNINGS = "warnings.json"
NOT_KEYS = ("data_cache", "cache_data")  # where the cache is, or whether it is used, does not change what is in it
WRITER = "mlx-lora data cache"  # the writer atomic.replace_dir records in each entry
TOKENIZED = "tokenized"  # the data cache's folder in it
MAX_BYTES = 10 * 2**30  # the data cache's size cap


def cache_location(data_cache: str | None, cache_data: bool, log=print) -> Path | None:
    """Where tokenized rows are kept (`data_cache`: --data-cache), made if missing; None with
    --no-data-cache (`cache_data` False), or when the default place cannot be made (said once; the
    run goes on uncached). A place the user named that cannot be made is refused."""
    if not cache_data:
        return None
    named = f"--data-cache {data_cache}" if data_cache else None
    named = named or (f"{CACHE_ENV}={os.environ[CACHE_ENV]}" if os.environ.get(CACHE_ENV) else None)
    path = Path(data_cache).expanduser() if data_cache else platform_cache() / TOKENIZED
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if named:
            raise UserError(f"{named}: cannot make {path} ({e.strerror}); name a writable directory") from None
        log(f"tokenized rows not cached: cannot make {path} ({e.strerror}); set {CACHE_ENV} or --data-cache DIR")
        return None
    return path


def _entry_bytes(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())


def trim(cache_dir: Path, keep: Collection[Path], cap: int = MAX_BYTES) -> tuple[int, int]:
    """Remove this cache's least recently used entries (by their directory's mtime, which a hit
    renews) until the rest fit in `cap`, never one in `keep`; (bytes, entries) left."""
    sizes, used = {}, {}
    for p in cache_dir.iterdir():  # not another writer's .KEY.*.tmp/.old (hidden); any may vanish as we look
        with contextlib.suppress(FileNotFoundError):
            if not p.name.startswith(".") and (atomic.owner_of(p) or {}).get("written_by") == WRITER:
                sizes[p], used[p] = _entry_bytes(p), p.stat().st_mtime
    total = sum(sizes.values())
    for entry in sorted(used, key=used.get):
        if total <= cap:
            break
        if entry not in keep:
            shutil.rmtree(entry, ignore_errors=True)
            total -= sizes.pop(entry)
    return total, len(sizes)


def _saved_line(cache_dir: Path, keep: Collection[Path]) -> str:
    size, n = trim(cache_dir, keep)
    return (
        f"tokenized rows saved to the cache {cache_dir} for later runs ({size / 2**20:.1f} MB in {n} entries; "
        f"at most {MAX_BYTES / 2**30:.0f} GB, least recently used removed first; --no-data-cache to skip)"
    )


@dataclass(frozen=True, eq=False)
class StoredArray:
    """A 1-D .npy file that hands out slices read from disk, as ExampleSet's tokens or mask."""

    file: BinaryIO  # open for the life of the set; closed when it is collected
    dtype: np.dtype
    start: int  # byte offset of element 0, after the header
    size: int

    @classmethod
    def open(cls, path: Path) -> "StoredArray":
        """ValueError when the file is not a whole 1-D .npy array."""
        file = open(path, "rb", buffering=0)  # noqa: SIM115  (lives with the array)
        try:
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            shape, _, dtype = header[np.lib.format.read_magic(file)](file)
            if len(shape) != 1 or os.fstat(file.fileno()).st_size != file.tell() + shape[0] * dtype.itemsize:
                raise ValueError  # cut short, or not what save() wrote
        except (KeyError, ValueError):
            file.close()
            raise ValueError(f"{path}: not a .npy array this version wrote") from None
        return cls(file, dtype, file.tell(), shape[0])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: slice) -> np.ndarray:
        """array[begin:end] (the step is not read: an example is a contiguous run)."""
        begin, end, _ = index.indices(self.size)
        n = max(0, end - begin)
        data = os.pread(self.file.fileno(), n * self.dtype.itemsize, self.start + begin * self.dtype.itemsize)
        return np.frombuffer(data, self.dtype, n)


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


def split_part(source, cfg: DataConfig, wanted: str) -> tuple[str, str] | None:
    """(split, which of its rows) that sources.split_rows(source, cfg, wanted) reads: all of them, or
    the kept / held-out part of a validation hold-out; None when a split it needs is missing (the
    uncached path then says so)."""
    valid = valid_split_name(source, cfg)
    holdout = f"{cfg.valid_fraction} seed {HOLDOUT_SEED}"
    if wanted == "train":
        split, part = cfg.train_split, "all" if valid else f"kept {holdout}"
    elif wanted == "valid":
        split, part = (valid, "all") if valid else (cfg.train_split, f"held out {holdout}")
    else:
        split, part = cfg.test_split if wanted == "test" else wanted, "all"
    needed = {split, cfg.train_split, valid} - {None} if wanted in ("train", "valid") else {split}
    return (split, part) if needed <= set(source.splits) else None


def entry_path(source, cfg: DataConfig, wanted: str, tokenizer_id: str, cache_dir: Path, **encoding) -> Path | None:
    """Where the entry of one set lives; None when its split is missing."""
    found = split_part(source, cfg, wanted)
    if found is None:
        return None
    split, part = found
    mapping = {f.name: getattr(cfg, f.name) for f in fields(DataConfig) if f.name not in NOT_KEYS}
    described = dict(
        version=VERSION, data=split_fingerprint(source, split), part=part, mapping=mapping, tokenizer=tokenizer_id
    )
    key = hashlib.sha256(json.dumps({**described, **encoding}, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir / key


def save(path: Path, examples: ExampleSet, warnings: list[str]) -> None:
    """Written whole or not at all: a run killed mid-write leaves no entry a later run would trust.
    Another process writing the same entry at once (each rank of a group) may publish it first: its
    entry, whole and of the same rows, is as good as ours."""
    try:
        with atomic.replace_dir(path, WRITER, "--data-cache") as tmp:
            for name in ARRAYS:
                np.save(tmp / f"{name}.npy", getattr(examples, name))
            (tmp / WARNINGS).write_text(json.dumps(warnings))
    except OSError:
        if load(path) is None:
            raise


def load(path: Path) -> tuple[ExampleSet, list[str]] | None:
    """The entry's examples (offsets in memory, tokens and mask on disk) and its warnings; None when
    it is missing or damaged (then it is rewritten)."""
    try:
        offsets = np.load(path / "offsets.npy")
        tokens, mask = StoredArray.open(path / "tokens.npy"), StoredArray.open(path / "mask.npy")
        warnings = json.loads((path / WARNINGS).read_text())
    except (OSError, ValueError):
        return None
    consistent = offsets.dtype == np.int64 and offsets.ndim == 1 and len(offsets) > 1
    consistent = consistent and offsets[0] == 0 and offsets[-1] == len(tokens)
    if not (consistent and len(mask) == len(tokens) and tokens.dtype == np.int32 and mask.dtype == bool):
        return None
    with contextlib.suppress(OSError):  # a read-only cache is still read
        os.utime(path)  # used now: the last entry trim() removes
    return ExampleSet(tokens, mask, offsets), warnings


def tokenized_sets(
    source,
    cfg: DataConfig,
    tokenizer,
    max_seq_length: int,
    train_on_prompt: bool,
    cache_dir: Path | None,
    log=print,
    train_on_reasoning: bool = True,
) -> dict[str, ExampleSet]:
    """examples.load_sets, read from `cache_dir` when an earlier run wrote the same entries there."""
    masking = dict(train_on_prompt=train_on_prompt, train_on_reasoning=train_on_reasoning)
    encoding = dict(max_seq_length=max_seq_length, train_on_prompt=train_on_prompt)
    encoding |= {} if train_on_reasoning else {"train_on_reasoning": False}  # keyed as dataset._one_split keys
    if cache_dir is None:
        return load_sets(source, cfg, tokenizer, max_seq_length, log=log, **masking)
    tokenizer_id = tokenizer_fingerprint(tokenizer)
    paths = {role: entry_path(source, cfg, role, tokenizer_id, cache_dir, **encoding) for role in ("train", "valid")}
    if None in paths.values():
        return load_sets(source, cfg, tokenizer, max_seq_length, log=log, **masking)
    entries = {role: load(path) for role, path in paths.items()}
    if all(entries.values()):
        for line in entries["train"][1]:
            log(line)
        log(f"tokenized rows read from the cache ({cache_dir}): {paths['train'].name}, {paths['valid'].name}")
        return {role: examples for role, (examples, _) in entries.items()}
    said = []
    sets = load_sets(source, cfg, tokenizer, max_seq_length, log=lambda line: (said.append(line), log(line)), **masking)
    for role, path in paths.items():
        save(path, sets[role], said if role == "train" else [])
    log(_saved_line(cache_dir, paths.values()))
    return {role: (load(path) or (sets[role],))[0] for role, path in paths.items()}  # on disk: memory let go


def tokenized_split(
    source,
    cfg: DataConfig,
    wanted: str,
    tokenizer,
    cache_dir: Path | None,
    tokenize: Callable[[Callable], ExampleSet],
    log=print,
    **encoding,
) -> ExampleSet:
    """One set, as `split_rows(source, cfg, wanted)` names it (what eval reads): `tokenize(log)` makes
    it, or the entry an earlier run wrote (a training run's validation entry, when eval reads the
    same rows the same way)."""
    path = (
        entry_path(source, cfg, wanted, tokenizer_fingerprint(tokenizer), cache_dir, **encoding) if cache_dir else None
    )
    if path is None:
        return tokenize(log)
    entry = load(path)
    if entry is not None:
        for line in entry[1]:
            log(line)
        log(f"tokenized rows read from the cache ({cache_dir}): {path.name}")
        return entry[0]
    said = []
    examples = tokenize(lambda line: (said.append(line), log(line)))
    save(path, examples, said)
    log(_saved_line(cache_dir, [path]))
    return (load(path) or (examples,))[0]
