"""`mlx-lora convert`: an adapter in any format we read, rewritten as mlx-lora, PEFT or mlx-lm files."""

from dataclasses import replace
from pathlib import Path

from mlx_lm.utils import load_model

from mlx_lora.atomic import replace_dir
from mlx_lora.config import ConvertConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import check_base, read_adapter
from mlx_lora.formats.mlxlm import block_count, write_mlxlm
from mlx_lora.formats.native import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_json, write_adapter
from mlx_lora.formats.peft import PEFT_CONFIG, PEFT_WEIGHTS, checkpoint_names, hub_id, write_peft
from mlx_lora.model.base import fingerprint, resolve_model

# What a previous conversion leaves; OUT_DIR holding anything else is not ours to replace.
ADAPTER_FILES = {ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS}


def convert(cfg: ConvertConfig, log=print) -> Path:
    """Rewrite the adapter; the base is read only where the output needs it (PEFT: its checkpoint's
    weight names; mlx-lm: its block count, unless the adapter says it) or --model names one."""
    src, out = Path(cfg.adapter_dir), Path(cfg.out_dir)
    if out.exists() and out.resolve() == src.resolve():
        raise UserError(f"OUT_DIR {out} is the adapter directory itself; choose another")
    if out.exists() and (not out.is_dir() or {p.name for p in out.iterdir()} - ADAPTER_FILES):
        raise UserError(f"OUT_DIR {out} exists and holds other files; choose a new or empty directory")
    config, weights = read_adapter(src)
    blocks = block_count(config) if cfg.to == "mlx-lm" else None
    base_dir = None
    if cfg.model or cfg.to == "peft" or (cfg.to == "mlx-lm" and blocks is None):
        base_dir = _base(cfg, config, src)
        base_config = read_json(base_dir / "config.json")
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
        elif cfg.to == "mlx-lm":
            num_blocks = len(load_model(base_dir, lazy=True)[0].layers) if base_dir else blocks
            write_mlxlm(tmp, config, weights, num_blocks, cfg.base_model_id or config.base_model)
        else:
            write_adapter(tmp, replace(config, base_model=cfg.base_model_id or config.base_model), weights)
    log(f"{cfg.to} adapter written to {out}")
    return out


def _base(cfg: ConvertConfig, config, src: Path) -> Path:
    if not (cfg.model or config.base_model):
        raise UserError(f"{src}: the adapter names no base model; pass --model")
    return resolve_model(cfg.model or config.base_model)
