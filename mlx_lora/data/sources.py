"""Where rows come from: a directory of split.jsonl files, one data file, a dataset directory or a
Hugging Face dataset id; and which rows are the training, validation and test splits.

A source hands out rows as `Row(where, number, fields)`: `where` names the file and line, or the
dataset, split and row, for every later error. JSONL directories and files are read here without
the `datasets` library; everything else goes through it (an optional extra: mlx-lora[datasets]).
"""

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_lora.config.data import VALID_NAMES, DataConfig
from mlx_lora.data.mapping import mapped_columns
from mlx_lora.data.rows import DEFAULT_DATA_DIRS, Row, file_rows, iter_file_rows, lines
from mlx_lora.errors import UserError

FILE_BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}  # datasets' readers
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
HOLDOUT_SEED = 0  # fixed, not --seed: eval must find the same held-out rows without knowing the run's seed
INSTALL_HINT = 'pip install "mlx-lora[datasets]"'


@dataclass
class JsonlSource:
    """split name -> .jsonl file; read with read_rows, no extra dependency."""

    name: str
    files: dict[str, Path]

    @property
    def splits(self) -> list[str]:
        return list(self.files)

    def columns(self, split: str) -> list[str] | None:
        return None  # JSONL rows may differ in their keys; each row is checked as it is mapped

    @property
    def origin(self) -> str:
        """What a run records as its data: the absolute path."""
        return str(Path(self.name).resolve())

    def label(self, split: str) -> str:
        return str(self.files[split])

    def read(self, split: str) -> list[Row]:
        return file_rows(self.files[split])

    def stream(self, split: str) -> Iterator[Row]:
        return iter_file_rows(self.files[split])

    def count(self, split: str) -> int:
        """The rows `stream` yields (or it fails first): the non-blank lines, not parsed."""
        return sum(1 for line in lines(self.files[split]) if line.strip())


@dataclass
class TableSource:
    """A datasets.DatasetDict: parquet, arrow, csv, json, a dataset directory or a hub id."""

    name: str
    tables: Any
    origin: str  # what a run records as its data: the absolute path or the hub id

    @property
    def splits(self) -> list[str]:
        return list(self.tables)

    def columns(self, split: str) -> list[str] | None:
        return list(self.tables[split].column_names)

    def label(self, split: str) -> str:
        return f"{self.name} {split}"

    def read(self, split: str) -> list[Row]:
        return list(self.stream(split))

    def stream(self, split: str) -> Iterator[Row]:
        return (Row(f"{self.name} {split} row {i}", i, dict(r)) for i, r in enumerate(self.tables[split], 1))

    def count(self, split: str) -> int:
        return self.tables[split].num_rows


def open_source(data: str | None, data_config: str | None = None, log=print) -> JsonlSource | TableSource:
    """The source `--data` names: None for the bundled set, a directory, a file or a hub id."""
    if data is None:
        return _jsonl_dir(next(d for d in DEFAULT_DATA_DIRS if (d / "train.jsonl").exists()), data_config)
    path = Path(data).expanduser()
    if path.is_dir():
        if any(path.glob("*.jsonl")):  # our own layout: <split>.jsonl, read without `datasets`
            return _jsonl_dir(path, data_config)
        return TableSource(str(path), _load(data, str(path), str(path), data_config), str(path.resolve()))
    if path.is_file():
        return _file(path, data_config)
    if data.startswith((".", "/", "~")) or path.suffix in {".jsonl", *FILE_BUILDERS} or not HUB_ID.fullmatch(data):
        raise UserError(
            f"--data {data}: no such file or directory (nor a Hugging Face dataset id such as openai/gsm8k)"
        )
    return _hub(data, data_config, log)


def _jsonl_dir(path: Path, data_config: str | None) -> JsonlSource:
    _no_config(path, data_config)
    return JsonlSource(str(path), {p.stem: p for p in sorted(path.glob("*.jsonl"))})


def _no_config(path: Path, data_config: str | None) -> None:
    if data_config is not None:
        raise UserError(
            f"--data-config {data_config}: {path} is a file or JSONL directory, which has no configurations; "
            "--data-config names a subset of a Hugging Face dataset"
        )


def _file(path: Path, data_config: str | None) -> JsonlSource | TableSource:
    """A single file is the training split; validation is held out of it."""
    if path.suffix == ".jsonl":
        _no_config(path, data_config)
        return JsonlSource(str(path), {"train": path})
    if path.suffix not in FILE_BUILDERS:
        raise UserError(
            f"--data {path}: unknown file type '{path.suffix}'; use .jsonl, {', '.join(FILE_BUILDERS)} or a directory"
        )
    _no_config(path, data_config)
    tables = _load(str(path), str(path), FILE_BUILDERS[path.suffix], data_files={"train": str(path)})
    return TableSource(str(path), tables, str(path.resolve()))


def _datasets(data: str):
    try:
        import datasets
    except ImportError:
        raise UserError(f"--data {data}: reading it needs the datasets library: {INSTALL_HINT}") from None
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip() or '?').splitlines()[0][:200]}"


def _load(data: str, name: str, *args, **kwargs):
    """datasets.load_dataset with each of its refusals as one line that says what to change."""
    datasets = _datasets(data)
    try:
        return datasets.load_dataset(*args, **kwargs)
    except datasets.exceptions.DatasetNotFoundError:
        raise UserError(
            f"--data {data}: no such dataset on the Hugging Face hub, or it is private or gated "
            "(log in with `hf auth login`)"
        ) from None
    except ValueError as e:
        message = str(e)
        available = re.search(r"\[([^\]]*)\]", message)
        choices = available[1].replace("'", "") if available else "?"
        if "not found" in message and "BuilderConfig" in message:
            raise UserError(f"--data-config {args[1]}: {data} has no such configuration; it has: {choices}") from None
        if "Config name is missing" in message:
            raise UserError(
                f"--data {data}: has several configurations; pick one with --data-config: {choices}"
            ) from None
        raise UserError(f"--data {name}: the datasets library cannot read it ({_first_line(e)})") from None
    except FileNotFoundError as e:  # also datasets' DataFilesNotFoundError and EmptyDatasetError
        raise UserError(f"--data {name}: found no data to read ({_first_line(e)})") from None
    except datasets.exceptions.DatasetGenerationError as e:  # its own message is generic; the cause says what
        cause = e.__cause__ or e.__context__ or e
        raise UserError(f"--data {name}: the datasets library cannot read it ({_first_line(cause)})") from None


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or constants.HF_HUB_OFFLINE


def cached_snapshot(repo_id: str) -> Path | None:
    """The hub cache's copy of a dataset repo (as `hf download --repo-type dataset` leaves it), if any."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return None


def _hub(repo_id: str, data_config: str | None, log) -> TableSource:
    """A hub dataset: downloaded (and cached) by datasets; offline, or with the hub unreachable, the
    hub cache's snapshot read like a local dataset directory."""
    _datasets(repo_id)
    from huggingface_hub import constants

    name = f"{repo_id} [{data_config}]" if data_config else repo_id
    snapshot = cached_snapshot(repo_id)
    nor = "" if "/" in repo_id else f"; nor is there a file or directory named {repo_id} here"
    if offline():
        if snapshot is None:
            raise UserError(
                f"--data {repo_id}: not in the local cache ({constants.HF_HUB_CACHE}) and the hub is unreachable "
                f"(HF_HUB_OFFLINE is set); fetch it once online: hf download --repo-type dataset {repo_id}{nor}"
            )
        return TableSource(name, _load(repo_id, name, str(snapshot), data_config), repo_id)
    try:
        return TableSource(name, _load(repo_id, name, repo_id, data_config), repo_id)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - no network surfaces as httpx, OSError or ConnectionError types
        if snapshot is not None:
            log(f"the hub is unreachable ({type(e).__name__}); reading {repo_id} from the cache: {snapshot}")
            return TableSource(name, _load(repo_id, name, str(snapshot), data_config), repo_id)
        reason = (str(e).splitlines() or [""])[0][:200]
        raise UserError(
            f"--data {repo_id}: not in the local cache ({constants.HF_HUB_CACHE}) and the hub is unreachable "
            f"({type(e).__name__}: {reason}); connect, or set HF_HUB_OFFLINE=1 to use only the cache{nor}"
        ) from None


# --- splits ----------------------------------------------------------------------------------


def _check_split(source, split: str, flag: str) -> None:
    if split not in source.splits:
        raise UserError(
            f"{flag} {split}: {source.name} has no such split; it has: {', '.join(source.splits) or 'none'}"
        )


def _split(source, split: str, flag: str) -> list[Row]:
    _check_split(source, split, flag)
    return source.read(split)


def check_columns(source, split: str, cfg: DataConfig) -> None:
    """Every column the mapping names exists in the split (sources that know their columns)."""
    columns = source.columns(split)
    if columns is None:
        return
    missing = [flag for flag, column in mapped_columns(cfg) if column not in columns]
    if missing:
        raise UserError(
            f"{'; '.join(missing)}: no such column in {source.name} {split}; its columns: {', '.join(columns)}"
        )


def valid_split_name(source, cfg: DataConfig) -> str | None:
    if cfg.valid_split is not None:
        return cfg.valid_split
    return next((n for n in VALID_NAMES if n in source.splits), None)


def held_out(count: int, fraction: float, where: str) -> np.ndarray:
    """(count,) bool: a seeded `fraction` of the rows (at least one, never all) is held out."""
    if count < 2:
        raise UserError(f"{where}: {count} row, too few to hold out a validation set; add a validation split")
    n = min(count - 1, max(1, round(fraction * count)))
    held = np.zeros(count, bool)
    held[np.random.default_rng(HOLDOUT_SEED).permutation(count)[:n]] = True
    return held


def _say_held_out(source, cfg: DataConfig, held: np.ndarray, log) -> None:
    log(
        f"{source.name} has no validation split ({', '.join(VALID_NAMES)}): holding out {held.sum()} of "
        f"{len(held)} {cfg.train_split} rows for validation (--valid-fraction {cfg.valid_fraction}, "
        f"seed {HOLDOUT_SEED})"
    )


def train_valid_rows(source, cfg: DataConfig, log=print) -> tuple[list[Row], list[Row]]:
    """The training and validation rows; without a validation split, a held-out part of train (said in one line)."""
    train, valid = train_valid_streams(source, cfg, log)
    return list(train), list(valid)


def train_valid_streams(source, cfg: DataConfig, log=print) -> tuple[Iterable[Row], Iterable[Row]]:
    """train_valid_rows, read a row at a time as they are consumed, so no split need be held whole;
    a hold-out counts the training rows first and reads them twice, once for each side."""
    _check_split(source, cfg.train_split, "--train-split")
    check_columns(source, cfg.train_split, cfg)
    valid = valid_split_name(source, cfg)
    if valid is not None:
        _check_split(source, valid, "--valid-split")
        check_columns(source, valid, cfg)
        return source.stream(cfg.train_split), source.stream(valid)
    held = held_out(source.count(cfg.train_split), cfg.valid_fraction, f"{source.name} {cfg.train_split}")
    _say_held_out(source, cfg, held, log)
    side = lambda keep: (row for row, h in zip(source.stream(cfg.train_split), held, strict=True) if h != keep)
    return side(True), side(False)


def split_rows(source, cfg: DataConfig, wanted: str, log=print) -> list[Row]:
    """The rows of one split: `train`, `valid` and `test` as --train-split, --valid-split and
    --test-split name them (valid held out of train when there is none), or a split by its name."""
    if wanted in ("train", "valid"):
        return train_valid_rows(source, cfg, log)[wanted == "valid"]
    name = cfg.test_split if wanted == "test" else wanted
    rows = _split(source, name, "--test-split" if name != wanted else "--split")
    check_columns(source, name, cfg)
    return rows


def split_label(source, cfg: DataConfig, wanted: str) -> str:
    """How messages and results name the split `split_rows(source, cfg, wanted)` read."""
    if wanted == "valid":
        valid = valid_split_name(source, cfg)
        return source.label(valid) if valid else f"{source.label(cfg.train_split)} (held out)"
    return source.label({"train": cfg.train_split, "test": cfg.test_split}.get(wanted, wanted))
