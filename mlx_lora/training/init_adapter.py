"""`train --init-adapter DIR`: a new run whose adapter starts as an existing one (SFT -> DPO, GRPO).

The adapter, in any format `formats/loader.read_adapter` reads, decides what is adapted and how
(modules, rank, alpha, DoRA, rsLoRA, patterns): its weights only mean something in that shape.
A LoRA option the user set to another value is refused rather than silently overruled; --dropout
alone may change, since it acts on the branch's input in training and not on the weights.
"""

from dataclasses import replace
from pathlib import Path

from mlx_lora.config import TrainConfig, lora_part
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import apply_adapter, read_adapter
from mlx_lora.formats.native import AdapterConfig, describe
from mlx_lora.formats.registry import Weights
from mlx_lora.model.base import Base

FREE = ("dropout",)  # LoRA options a run started from an adapter may set anew


def from_adapter(cfg: TrainConfig) -> tuple[TrainConfig, tuple[AdapterConfig, Weights] | None]:
    """With --init-adapter: the run's options with the adapter's LoRA options (and its base, unless
    --model names one), and the adapter (its config with the run's --dropout when given, its
    weights); without: the options as they are, and None."""
    if not cfg.init_adapter:
        return cfg, None
    directory = Path(cfg.init_adapter)
    adapter, weights = read_adapter(directory, "--init-adapter")
    theirs = lora_part(adapter.lora)
    for name, value in lora_part(cfg).items():
        if name not in FREE and value != getattr(TrainConfig, name) and value != theirs[name]:
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"--init-adapter {directory}: the adapter's {name} is {theirs[name]!r} but {flag} {value!r} was "
                f"given; drop {flag}: a run started from an adapter keeps its shape"
            )
    free = {n: getattr(cfg, n) for n in FREE if getattr(cfg, n) != getattr(TrainConfig, n)}
    lora = replace(adapter.lora, **free)
    cfg = replace(cfg, model=cfg.model or adapter.base_model, **lora_part(lora))
    return cfg, (replace(adapter, lora=lora), weights)


def apply_initial(base: Base, adapter: AdapterConfig, weights: Weights, directory: Path) -> AdapterConfig:
    """Wrap `base` as the adapter says and load its weights (a base of other shapes refused, naming
    both); the config the new run saves: this base, no record of how the old adapter was trained.
    Only the adapter is read now, so a streamed run still reads its frozen blocks one at a time."""
    apply_adapter(base, adapter, weights, directory, whole=False)
    return describe(base, adapter.lora, adapter.modules)
