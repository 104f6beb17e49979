"""`mlx-lora eval --task preference`: does the adapter prefer the chosen completions?

For every pair it scores the summed completion log-probs of both sides twice, with the adapter
and with it switched off (the base: DPO's reference), and reports
- preference accuracy: the share of pairs whose chosen side is the more likely one, and the mean
  log-prob margin (chosen - rejected), for the adapter and (--compare-base) for the base;
- reward accuracy and margin, as DPO logs them: reward = beta * (log-prob - base log-prob), beta
  from the adapter's training (its --beta, else its objective's default, else 0.1).
"""

import json
from pathlib import Path

import numpy as np

from mlx_lora.config import EvalConfig
from mlx_lora.config.train import DEFAULT_BETA
from mlx_lora.data.preference import load_pairs
from mlx_lora.formats.native import ADAPTER_CONFIG
from mlx_lora.model.base import Base
from mlx_lora.model.lora import first_adapted_block, lora_layers
from mlx_lora.training.objectives import Objective
from mlx_lora.training.preference import PreferenceFeed, pair_cut


def adapter_beta(adapter_path: str | None) -> float:
    """The beta the adapter was trained with, as adapter_config.json's `training` block records it."""
    path = Path(adapter_path or "") / ADAPTER_CONFIG
    try:
        training = json.loads(path.read_text()).get("training", {}) if adapter_path else {}
    except (OSError, ValueError, AttributeError):
        training = {}
    return training.get("beta") or DEFAULT_BETA.get(training.get("objective"), 0.1)


def figures(margins: np.ndarray) -> dict:
    return {"accuracy": float((margins > 0).mean()), "margin": float(margins.mean())}


def run_preference(cfg: EvalConfig, base: Base, adapter_path: str | None, path: Path, log=print) -> dict:
    pairs = load_pairs(path, base.tokenizer, cfg.max_seq_length, max_rows=cfg.max_examples)
    log(f"eval {base.name}{f' + {adapter_path}' if adapter_path else ''} on {path}: {len(pairs)} preference pairs")
    adapted = bool(adapter_path and lora_layers(base.model))
    beta = adapter_beta(adapter_path)
    # blocks before the adapter's first are computed once, in the base's pass, for both
    cut = pair_cut(base.model, first_adapted_block(base.model) if adapted else 0, pairs, log)
    feed = PreferenceFeed(Objective("dpo", beta), cut, cache_prefix=True, log=log)
    off = feed.reference_logps(base.model, pairs, cfg.batch_size)  # (N, 2): the base
    result = {"model": base.name, "adapter_path": adapter_path, "data": str(path), "task": "preference"}
    result["rows"] = len(pairs)
    if adapted:
        on = feed.pair_logps(base.model, pairs, cfg.batch_size)
        rewards = beta * (on - off)  # (N, 2)
        result["adapter"] = figures(on[:, 0] - on[:, 1]) | {
            "reward_accuracy": float((rewards[:, 0] > rewards[:, 1]).mean()),
            "reward_margin": float((rewards[:, 0] - rewards[:, 1]).mean()),
            "beta": beta,
        }
    if cfg.compare_base or "adapter" not in result:
        result["base"] = figures(off[:, 0] - off[:, 1])
    if "adapter" in result and "base" in result:
        result["difference"] = {k: result["adapter"][k] - result["base"][k] for k in ("accuracy", "margin")}
    result["pairs"] = [
        {
            "pair": i + 1,
            "base": [float(x) for x in off[i]],
            **({"adapter": [float(x) for x in on[i]]} if "adapter" in result else {}),
        }
        for i in range(len(pairs))
    ]
    return result
