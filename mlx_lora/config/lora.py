"""What an adapter is: rank, alpha, targets and methods, stored in adapter_config.json."""

import math
import re
from dataclasses import dataclass, fields
from typing import Any

from mlx_lora.config.fields import MODEL, opt
from mlx_lora.errors import UserError

INITS = ("default", "gaussian", "olora", "pissa")
_PATTERN_ITEM = re.compile(r"(.+?)=([^,=]+)(?:,|$)")  # lazy, so regexes may hold commas: a{1,2}=4


@dataclass(frozen=True)
class LoRAConfig:
    """What an adapter is: stored in adapter_config.json and enough to rebuild it on a base."""

    targets: str = opt(
        "q_proj,v_proj",
        "Modules to adapt: names, a regex over module paths (also a vision model's tower), or all-linear.",
        panel=MODEL,
    )
    rank: int = opt(8, "LoRA rank r.", panel=MODEL)
    alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha/r.", panel=MODEL)
    dropout: float = opt(0.0, "Dropout on the LoRA branch input.", panel=MODEL)
    num_layers: int = opt(16, "Adapt the last N transformer blocks of the language model (-1: all).", panel=MODEL)
    layers: str | None = opt(None, "Exact blocks to adapt, e.g. 0,5,7 (overrides --num-layers).", panel=MODEL)
    # DoRA: the weight is m * (W + BA) / ||W + BA||, with m learned per output row.
    dora: bool = opt(False, "DoRA: also learn a magnitude per output row.", panel=MODEL)
    rslora: bool = opt(False, "rsLoRA: scale by alpha/sqrt(r) instead of alpha/r.", panel=MODEL)
    # default: A uniform, B zero; gaussian: A normal with std 1/r, B zero; olora: QR of W; pissa: SVD
    # of W. olora/pissa adapters are saved as a plain LoRA of twice the rank on the unmodified base.
    init: str = opt("default", f"Start of A and B: {', '.join(INITS)}.", panel=MODEL)
    # Matched against the end of each module path like PEFT's rank_pattern; YAML takes a mapping.
    rank_pattern: str | None = opt(None, "Per-module rank, e.g. '.*v_proj=16,.*q_proj=4'.", panel=MODEL)
    alpha_pattern: str | None = opt(None, "Per-module alpha, e.g. '.*v_proj=32'.", panel=MODEL)

    @property
    def scale(self) -> float:
        """The scale of modules that no pattern names."""
        return lora_scale(self.alpha, self.rank, self.rslora)

    def summary(self) -> str:
        """e.g. 'LoRA DoRA init pissa r=8 alpha=16.0 rank_pattern=.*v_proj=16'."""
        methods = [("DoRA", self.dora), ("rsLoRA", self.rslora), (f"init {self.init}", self.init != "default")]
        patterns = [
            f"{name}={value}"
            for name, value in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern))
            if value
        ]
        return " ".join(["LoRA", *(m for m, on in methods if on), f"r={self.rank}", f"alpha={self.alpha}", *patterns])

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """Rank and alpha of one module: the first pattern matching its path, else --rank/--alpha."""
        ranks, alphas = parse_pattern(self.rank_pattern), parse_pattern(self.alpha_pattern)
        rank = ranks.get(pattern_key(ranks, path), self.rank)
        return int(rank), alphas.get(pattern_key(alphas, path), self.alpha)

    def scale_of(self, path: str) -> float:
        rank, alpha = self.rank_alpha(path)
        return lora_scale(alpha, rank, self.rslora)

    def problems(self) -> list[str]:
        """Every problem with the values, in words the user can act on."""
        p = []
        if self.rank < 1:
            p.append(f"--rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            p.append(f"--alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.num_layers == 0 or self.num_layers < -1:
            p.append(f"--num-layers must be -1 (all) or a positive count, got {self.num_layers}")
        if not str(self.targets).strip():
            p.append("--targets is empty: give module names such as q_proj,v_proj, a regex or all-linear")
        try:
            parse_layers(self.layers)
        except UserError as e:
            p.append(str(e))
        if self.init not in INITS:
            p.append(f"--init must be one of {', '.join(INITS)}, got '{self.init}'")
        p += _pattern_problems(self)
        return p


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def parse_pattern(spec: str | None) -> dict[str, float]:
    """'regex=value,regex=value' -> {regex: value}, in the order given (the first match wins)."""
    if not spec:
        return {}
    items = _PATTERN_ITEM.findall(spec)
    if "".join(f"{k}={v}," for k, v in items).rstrip(",") != spec.strip().rstrip(","):
        raise ValueError(f"'{spec}' is not a list of regex=number items such as '.*v_proj=16,.*q_proj=4'")
    try:
        return {k.strip(): float(v) for k, v in items}
    except ValueError:
        raise ValueError(f"'{spec}': every value after '=' must be a number") from None


def format_pattern(pattern: dict[str, float]) -> str | None:
    """The inverse of parse_pattern, exact for every float."""
    return ",".join(f"{k}={int(v) if v == int(v) else repr(v)}" for k, v in pattern.items()) or None


def pattern_key(pattern: dict[str, float], path: str) -> str | None:
    """PEFT's get_pattern_key: the first regex that matches the whole path or a dotted suffix of it."""
    return next((k for k in pattern if re.match(rf"(.*\.)?({k})$", path)), None)


def parse_layers(spec: str | None) -> list[int] | None:
    if spec is None:
        return None
    try:
        return [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--layers must be comma-separated integers such as 0,5,7, got '{spec}'") from None


def _pattern_problems(cfg: LoRAConfig) -> list[str]:
    p = []
    for name in ("rank_pattern", "alpha_pattern"):
        flag = "--" + name.replace("_", "-")
        try:
            pattern = parse_pattern(getattr(cfg, name))
        except ValueError as e:
            p.append(f"{flag} {e}")
            continue
        for key, value in pattern.items():
            try:
                re.compile(key)
            except re.error as e:
                p.append(f"{flag}: '{key}' is not a valid regular expression ({e})")
            if value <= 0 or (name == "rank_pattern" and value != int(value)):
                p.append(
                    f"{flag}: {key}={value:g} must be a positive "
                    + ("whole number" if name == "rank_pattern" else "number")
                )
    return p


def lora_part(cfg: LoRAConfig) -> dict[str, Any]:
    """The LoRA fields of any config, as stored in adapter_config.json."""
    return {f.name: getattr(cfg, f.name) for f in fields(LoRAConfig)}
