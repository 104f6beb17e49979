"""Where A and B start (`--init`), following PEFT's init_lora_weights, and how such adapters are saved.

OLoRA and PiSSA move the top-r part of W into A0, B0 and train on the residual W - ΔW0. The
saved adapter must still apply to the unmodified W, so it is stored as the plain LoRA
ΔW - ΔW0 of twice the rank (LoRALinear.export); `saved_config` says what that file is.
"""

import math
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.config import LoRAConfig, format_pattern, parse_pattern

BASE_CHANGING = ("olora", "pissa")


def initialize(layer: nn.Module, method: str) -> None:
    """Set a fresh LoRALinear's A and B (and W for OLoRA/PiSSA); `default` is the constructor's."""
    rank = layer.lora_a.shape[-1]
    if method == "gaussian":  # PEFT: A ~ N(0, 1/r), B = 0
        layer.lora_a = mx.random.normal(layer.lora_a.shape) / rank
    elif method in BASE_CHANGING:
        weight = layer.linear.weight  # (out, in); quantized bases are refused in lora._check_choices
        w = weight.astype(mx.float32)
        if method == "olora":  # PEFT olora_init: W = QR, B0 = Q[:, :r], A0 = R[:r]
            q, r = mx.linalg.qr(w, stream=mx.cpu)  # (out, k), (k, in)
            a0, b0 = r[:rank].T, q[:, :rank].T  # (in, r), (r, out)
        else:  # PEFT pissa_init: W = U S Vh; B0 A0 = U_r S_r Vh_r / scale, split as sqrt(S_r) on each side
            u, s, vh = mx.linalg.svd(w, stream=mx.cpu)  # (out, out), (k,), (in, in)
            root = mx.sqrt(s[:rank] / layer.scale)  # (r,)
            a0, b0 = (vh[:rank] * root[:, None]).T, (u[:, :rank] * root).T  # (in, r), (r, out)
        layer.lora_a, layer.lora_b = a0, b0
        layer.initial = (a0, b0)
        layer.linear.weight = (w - layer.delta()).astype(weight.dtype)  # W_res: W_res + ΔW0 = W
    if layer.dora:
        layer.magnitude = layer.weight_norm()  # ||W + ΔW||, which is ||W|| at every start


def saved_config(cfg: LoRAConfig) -> LoRAConfig:
    """The config of the file an adapter is saved as: OLoRA/PiSSA become a plain LoRA of rank 2r.

    Alpha grows with the rank so every module's scale stays the same: ×2 for alpha/r,
    ×√2 for rsLoRA's alpha/√r (PEFT's conversion refuses rsLoRA with patterns; this is exact).
    """
    if cfg.init not in BASE_CHANGING:
        return cfg
    grow = math.sqrt(2) if cfg.rslora else 2.0
    ranks, alphas = parse_pattern(cfg.rank_pattern), parse_pattern(cfg.alpha_pattern)
    return replace(
        cfg,
        init="default",
        rank=2 * cfg.rank,
        alpha=cfg.alpha * grow,
        rank_pattern=format_pattern({k: 2 * v for k, v in ranks.items()}),
        alpha_pattern=format_pattern({k: v * grow for k, v in alphas.items()}),
    )
