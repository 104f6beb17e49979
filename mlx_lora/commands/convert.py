"""`mlx-lora convert`: an adapter in any format we read, rewritten as mlx-lora, PEFT, mlx-lm or GGUF files."""

from dataclasses import replace
from pathlib import Path

from mlx_lora.atomic import replace_dir
from mlx_lora.config import ConvertConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.gguf import GGUF_ADAPTER_FILE, write_gguf_adapter
from mlx_lora.formats.loader import check_base, read_adapter
from mlx_lora.formats.mlxlm import block_count, write_mlxlm
from mlx_lora.formats.native import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_json, write_adapter
from mlx_lora.formats.peft import PEFT_CONFIG, PEFT_WEIGHTS, checkpoint_names, hub_id, write_peft
from mlx_lora.model.base import fingerprint, load_mlx_model, mlx_config, resolve_model
from mlx_lora.model.gguf import GGUF_SUFFIX, read_gguf_config

# What a previous conversion leaves; OUT_DIR holding anything else is not ours to replace.
ADAPTER_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, GGUF_ADAPTER_FILE}


def _base(name: str, to: str) -> tuple[Path, dict]:
    """The base's directory and config; a GGUF base gives its config from its metadata."""
    if name.endswith(GGUF_SUFFIX):
        if to in ("peft", "mlx-lm"):
            raise UserError(
                f"--to {to} needs the Hugging Face base the adapter fits, not the GGUF {name}; pass --model"
            )
        return Path(name), read_gguf_config(Path(name))
    base_dir = resolve_model(name)
    config = read_json(base_dir / "config.json")
    return base_dir, config | mlx_config(config, base_dir / "config.json")  # both spellings, as the base loads


def convert(cfg: ConvertConfig, log=print) -> Path:
    """Rewrite the adapter; the base is read only where the output needs it (PEFT: its checkpoint's
    weight names; GGUF: its architecture; mlx-lm: its block count, unless the adapter says it) or --model names one."""
    src, out = Path(cfg.adapter_dir), Path(cfg.out_dir)
    if out.exists() and out.resolve() == src.resolve():
        raise UserError(f"OUT_DIR {out} is the adapter directory itself; choose another")
    if out.exists() and (not out.is_dir() or {p.name for p in out.iterdir()} - ADAPTER_FILES):
        raise UserError(f"OUT_DIR {out} exists and holds other files; choose a new or empty directory")
    config, weights = read_adapter(src)
    blocks = block_count(config) if cfg.to == "mlx-lm" else None
    base_dir = base_config = None
    if cfg.model or cfg.to in ("peft", "gguf") or (cfg.to == "mlx-lm" and blocks is None):
        if not (cfg.model or config.base_model):
            raise UserError(f"{src}: the adapter names no base model; pass --model")
        base_dir, base_config = _base(cfg.model or config.base_model, cfg.to)
        check_base(config, base_config, str(base_dir), src)
        config = replace(config, base_fingerprint=fingerprint(base_config))  # foreign formats record none
    with replace_dir(out) as tmp:
        if cfg.to == "peft":
            write_peft(
                tmp,
                config,
                weights,
                cfg.base_model_id or hub_id(base_dir, config.base_model),
                checkpoint_names(base_dir),
            )
        elif cfg.to == "gguf":
            scales = {m: config.lora.scale_of(m) for m in config.modules}
            write_gguf_adapter(tmp / GGUF_ADAPTER_FILE, config.modules, weights, scales, base_config)
        elif cfg.to == "mlx-lm":
            num_blocks = len(load_mlx_model(base_dir, lazy=True)[0].layers) if base_dir else blocks
            write_mlxlm(tmp, config, weights, num_blocks, cfg.base_model_id or config.base_model)
        else:
            write_adapter(tmp, replace(config, base_model=cfg.base_model_id or config.base_model), weights)
    log(f"{cfg.to} adapter written to {out}")
    return out
