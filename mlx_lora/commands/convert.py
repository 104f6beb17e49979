"""`mlx-lora convert`: an adapter in any format we read, rewritten in any format of formats/registry.FORMATS."""

from pathlib import Path

from mlx_lora.atomic import claim_dir, replace_dir
from mlx_lora.config import ConvertConfig
from mlx_lora.formats.loader import read_adapter
from mlx_lora.formats.registry import export, format_named

COMMAND = "mlx-lora convert"


def convert(cfg: ConvertConfig, log=print) -> Path:
    """Rewrite the adapter; the base is read only where the output needs it (registry.export)."""
    src, out = Path(cfg.adapter_dir), Path(cfg.out_dir)
    claim_dir(out, COMMAND, "OUT_DIR", {"ADAPTER_DIR": src})
    fmt = format_named(cfg.to)
    adapter = export(fmt, *read_adapter(src), src, cfg.model, cfg.base_model_id)
    with replace_dir(out, COMMAND, "OUT_DIR", {"ADAPTER_DIR": src}) as tmp:
        fmt.write(tmp, adapter)
    log(f"{cfg.to} adapter written to {out}")
    return out
