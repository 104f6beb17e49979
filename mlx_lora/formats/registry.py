"""Every adapter format in one ordered list: how it is told apart, read, written, and what of the
base writing it needs. `read_adapter`, `convert`, `upload` and docs/adapters.md's table all walk
FORMATS, so adding a format is one entry (PEFT's ordered dispatchers in tuners/lora/model.py).
"""

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.utils import load_tokenizer

from mlx_lora.errors import UserError
from mlx_lora.formats import mlxlm, peft
from mlx_lora.formats.gguf import GGUF_ADAPTER_FILE, write_gguf_adapter
from mlx_lora.formats.modelfile import MODELFILE, write_modelfile
from mlx_lora.formats.native import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    check_base,
    read_json,
    read_native,
    write_adapter,
)
from mlx_lora.model.base import fingerprint, load_mlx_model, mlx_config, resolve_model
from mlx_lora.model.gguf import GGUF_SUFFIX, read_gguf_config
from mlx_lora.model.stops import add_template_stop
from mlx_lora.model.vision import is_vision, layout

Weights = dict[str, mx.array]
# What of the base a writer reads (Format.needs):
NOTHING = ""
CONFIG = "config"  # its architecture: config.json, or a GGUF file's metadata
CHECKPOINT = "checkpoint"  # a Hugging Face directory: its checkpoint's weight names
BLOCKS = "blocks"  # a Hugging Face directory's block count, unless the adapter says it


@dataclass
class Probe:
    """An adapter directory as the detectors see it: its adapter_config.json read at most once."""

    directory: Path

    @cached_property
    def config(self) -> dict[str, Any] | None:
        path = self.directory / ADAPTER_CONFIG
        return read_json(path) if path.is_file() else None


@dataclass(frozen=True)
class Export:
    """What a writer gets: the adapter, the id to record for its base, and the base where it was read."""

    config: AdapterConfig
    weights: Weights
    base_model_id: str | None = None  # --base-model-id
    base_dir: Path | None = None  # the base's directory (or GGUF file)
    base_config: dict[str, Any] | None = None


@dataclass(frozen=True)
class Format:
    name: str  # `convert --to NAME`
    detect: Callable[[Probe], bool] | None  # None: written, never read
    read: Callable[[Probe], tuple[AdapterConfig, Weights]] | None
    write: Callable[[Path, Export], None]
    needs: str  # NOTHING, CONFIG, CHECKPOINT or BLOCKS
    files: tuple[str, ...]  # what write puts in its directory
    hub_dir: str  # where `upload` puts it in a repo ("": the root)
    what: str  # for the docs' table
    used_by: str

    def reads_base(self, config: AdapterConfig) -> bool:
        return self.needs in (CONFIG, CHECKPOINT) or (self.needs == BLOCKS and mlxlm.block_count(config) is None)


def _write_peft(out: Path, e: Export) -> None:
    base_id = e.base_model_id or peft.hub_id(e.base_dir, e.config.base_model)
    config, weights, names = e.config, e.weights, peft.checkpoint_names(e.base_dir)
    vision = is_vision(e.base_config or {})
    if vision:  # transformers' module paths, which PeftModel on its vision-language class wraps
        config, weights, names = peft.vision_names(config, weights, names, layout(e.base_config, "convert --to peft"))
    peft.write_peft(out, config, weights, base_id, names, exact=vision)


def _write_native(out: Path, e: Export) -> None:
    write_adapter(out, replace(e.config, base_model=e.base_model_id or e.config.base_model), e.weights)


def _write_mlxlm(out: Path, e: Export) -> None:
    blocks = len(load_mlx_model(e.base_dir, lazy=True)[0].layers) if e.base_dir else mlxlm.block_count(e.config)
    mlxlm.write_mlxlm(out, e.config, e.weights, blocks, e.base_model_id or e.config.base_model)


def _write_gguf(out: Path, e: Export) -> None:
    scales = {m: e.config.lora.scale_of(m) for m in e.config.modules}
    write_gguf_adapter(out / GGUF_ADAPTER_FILE, e.config.modules, e.weights, scales, e.base_config)
    # FROM the base as the adapter names it (a hub id or the path it was trained from)
    write_modelfile(out, _base_tokenizer(e), e.base_model_id or e.config.base_model, f"./{GGUF_ADAPTER_FILE}")


def _base_tokenizer(e: Export):
    """A directory base's tokenizer with its stops, for the Modelfile; a GGUF base holds its own."""
    if e.base_dir is None or Path(e.base_dir).is_file():
        return None
    tokenizer = load_tokenizer(Path(e.base_dir), eos_token_ids=(e.base_config or {}).get("eos_token_id"))
    add_template_stop(tokenizer)
    return tokenizer


def _is_native(probe: Probe) -> bool:
    return probe.config is not None and not mlxlm.is_mlxlm(probe.config)


def _is_mlxlm(probe: Probe) -> bool:
    return probe.config is not None and mlxlm.is_mlxlm(probe.config)


# In the order they are told apart (the first whose detect says yes reads the directory) and listed.
FORMATS = (
    Format(
        name="peft",
        detect=lambda p: peft.is_peft(p.directory),  # by its weight file: its config is adapter_config.json too
        read=lambda p: peft.read_peft(p.directory),
        write=_write_peft,
        needs=CHECKPOINT,
        files=(peft.PEFT_CONFIG, peft.PEFT_WEIGHTS),
        hub_dir="",
        what="Hugging Face PEFT's LoRA files",
        used_by='`PeftModel.from_pretrained(base, "you/arith-lora")`',
    ),
    Format(
        name="mlx",
        detect=_is_native,
        read=lambda p: read_native(p.directory, p.config),
        write=_write_native,
        needs=NOTHING,
        files=(ADAPTER_CONFIG, ADAPTER_WEIGHTS),
        hub_dir="mlx-lora",
        what="mlx-lora's own files",
        used_by="`mlx-lora --adapter-path`",
    ),
    Format(
        name="mlx-lm",
        detect=_is_mlxlm,
        read=lambda p: mlxlm.read_mlxlm(p.directory, p.config),
        write=_write_mlxlm,
        needs=BLOCKS,
        files=(ADAPTER_CONFIG, ADAPTER_WEIGHTS),
        hub_dir="mlx-lm",
        what="mlx_lm.lora's files",
        used_by="`mlx_lm.generate --adapter-path`",
    ),
    Format(
        name="gguf",
        detect=None,
        read=None,
        write=_write_gguf,
        needs=CONFIG,
        files=(GGUF_ADAPTER_FILE, MODELFILE),
        hub_dir="gguf",
        what="llama.cpp's LoRA adapter",
        used_by="`llama-cli --lora`, Ollama's `ADAPTER`",
    ),
)


def format_named(name: str) -> Format:
    return next(f for f in FORMATS if f.name == name)  # ConvertConfig checked the name


def detect(directory: Path) -> tuple[Format, Probe] | None:
    """The first format that says the directory is its own, and what it looked at."""
    probe = Probe(Path(directory))
    return next(((f, probe) for f in FORMATS if f.detect and f.detect(probe)), None)


def _base(name: str, fmt: Format) -> tuple[Path, dict]:
    """The base's directory and config; a GGUF base gives its config from its metadata."""
    if name.endswith(GGUF_SUFFIX):
        if fmt.needs in (CHECKPOINT, BLOCKS):
            raise UserError(
                f"--to {fmt.name} needs the Hugging Face base the adapter fits, not the GGUF {name}; pass --model"
            )
        return Path(name), read_gguf_config(Path(name))
    base_dir = resolve_model(name)
    config = read_json(base_dir / "config.json")
    return base_dir, config | mlx_config(config, base_dir / "config.json")  # both spellings, as the base loads


def export(
    fmt: Format, config: AdapterConfig, weights: Weights, src: Path, model: str | None, base_model_id: str | None
) -> Export:
    """The adapter ready for `fmt.write`; the base is read only where the format needs it (PEFT: its
    checkpoint's weight names; GGUF: its architecture; mlx-lm: its block count, unless the adapter
    says it) or `model` names one, and then checked against the adapter."""
    if not (model or fmt.reads_base(config)):
        return Export(config, weights, base_model_id)
    if not (model or config.base_model):
        raise UserError(f"{src}: the adapter names no base model; pass --model")
    base_dir, base_config = _base(model or config.base_model, fmt)
    check_base(config, base_config, str(base_dir), src)
    config = replace(config, base_fingerprint=fingerprint(base_config))  # foreign formats record none
    return Export(config, weights, base_model_id, base_dir, base_config)
