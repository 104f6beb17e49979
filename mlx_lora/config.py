"""Every option of `mlx-lora train`: its default and its help text, written once.

The CLI builds its flags from these fields, `--config run.yaml` fills them from a file and
adapter_config.json stores the LoRA part. Precedence: command line > YAML file > defaults.
"""

import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import UserError


LR_SCHEDULES = ("constant", "linear", "cosine")


def opt(default, help: str, off: Optional[str] = None):
    """An option; `off` names the flag that sets a boolean to False (default --no-<name>)."""
    return field(default=default, metadata={"help": help, "off": off})


def arg(help: str):
    """A required positional command-line argument (None until given)."""
    return field(default=None, metadata={"help": help, "positional": True})


@dataclass(frozen=True)
class LoRAConfig:
    """What an adapter is: stored in adapter_config.json and enough to rebuild it on a base."""

    targets: str = opt(
        "q_proj,v_proj",
        "Modules to adapt: comma-separated names (q_proj,v_proj), a regular expression "
        "matched against full module paths, or all-linear.",
    )
    rank: int = opt(8, "LoRA rank r.")
    alpha: float = opt(16.0, "LoRA alpha: the update is scaled by alpha/r.")
    dropout: float = opt(0.0, "Dropout on the LoRA branch input.")
    num_layers: int = opt(16, "Adapt the last N transformer blocks (-1: all).")
    layers: Optional[str] = opt(
        None, "Exact block indices to adapt, e.g. 0,5,7 (overrides --num-layers)."
    )
    dora: bool = opt(
        False, "DoRA: also learn a magnitude per output row; the weight is m * (W + BA) / ||W + BA||."
    )
    rslora: bool = opt(False, "rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r.")
    init: str = opt(
        "default",
        "Start of A and B: default (A uniform, B zero), gaussian (A normal with std 1/r, B zero), "
        "olora (QR of W) or pissa (SVD of W); olora/pissa adapters are saved as a plain LoRA "
        "of twice the rank that applies to the unmodified base.",
    )
    rank_pattern: Optional[str] = opt(
        None,
        "Per-module rank: 'regex=r,regex=r' (YAML: a mapping), matched against the end of each "
        "module path like PEFT's rank_pattern, e.g. '.*v_proj=16,.*q_proj=4'.",
    )
    alpha_pattern: Optional[str] = opt(
        None, "Per-module alpha, written like --rank-pattern, e.g. '.*v_proj=32'."
    )

    @property
    def scale(self) -> float:
        """The scale of modules that no pattern names."""
        return lora_scale(self.alpha, self.rank, self.rslora)

    def summary(self) -> str:
        """e.g. 'LoRA DoRA init pissa r=8 alpha=16.0 rank_pattern=.*v_proj=16'."""
        methods = [("DoRA", self.dora), ("rsLoRA", self.rslora), (f"init {self.init}", self.init != "default")]
        patterns = [f"{name}={value}" for name, value in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)) if value]
        return " ".join(["LoRA", *(m for m, on in methods if on), f"r={self.rank}", f"alpha={self.alpha}", *patterns])

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """Rank and alpha of one module: the first pattern matching its path, else --rank/--alpha."""
        ranks, alphas = parse_pattern(self.rank_pattern), parse_pattern(self.alpha_pattern)
        rank = ranks.get(pattern_key(ranks, path), self.rank)
        return int(rank), alphas.get(pattern_key(alphas, path), self.alpha)

    def scale_of(self, path: str) -> float:
        rank, alpha = self.rank_alpha(path)
        return lora_scale(alpha, rank, self.rslora)


INITS = ("default", "gaussian", "olora", "pissa")
_PATTERN_ITEM = re.compile(r"(.+?)=([^,=]+)(?:,|$)")  # lazy, so regexes may hold commas: a{1,2}=4


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def parse_pattern(spec: Optional[str]) -> dict[str, float]:
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


def format_pattern(pattern: dict[str, float]) -> Optional[str]:
    """The inverse of parse_pattern, exact for every float."""
    return ",".join(f"{k}={int(v) if v == int(v) else repr(v)}" for k, v in pattern.items()) or None


def pattern_key(pattern: dict[str, float], path: str) -> Optional[str]:
    """PEFT's get_pattern_key: the first regex that matches the whole path or a dotted suffix of it."""
    return next((k for k in pattern if re.match(rf"(.*\.)?({k})$", path)), None)


@dataclass(frozen=True)
class TrainConfig(LoRAConfig):
    """A training run. Inherits LoRAConfig so CLI flags and YAML keys share one flat namespace."""

    model: Optional[str] = opt(
        None, "Hugging Face model directory or hub id (default: the small model shipped with mlx-lora)."
    )
    data: Optional[str] = opt(
        None, "Directory with train.jsonl and valid.jsonl (default: the bundled arithmetic set)."
    )
    adapter_path: str = opt(
        "adapters", "Directory for adapters.safetensors, adapter_config.json and checkpoints."
    )
    iters: int = opt(300, "Optimizer steps to train for.")
    epochs: Optional[float] = opt(
        None, "Train for this many passes over the training set instead of --iters."
    )
    batch_size: int = opt(4, "Rows per batch.")
    learning_rate: float = opt(1e-3, "AdamW learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_seq_length: int = opt(2048, "Rows longer than this many tokens are truncated.")
    seed: int = opt(0, "Seed for LoRA init, dropout and data order.")
    val_every: int = opt(50, "Compute the validation loss every N steps (0: only at start and end).")
    val_batches: int = opt(25, "Validation batches per evaluation (-1: the whole split).")
    report_every: int = opt(10, "Print the training loss every N steps.")
    save_every: int = opt(100, "Write a checkpoint under <adapter-path>/checkpoints every N steps (0: never).")
    train_on_prompt: bool = opt(
        False, "Also train on prompt / user tokens (default: loss on completions and assistant turns only)."
    )
    report_to: Optional[str] = opt(
        None, "Also send the metrics to tensorboard, wandb or both (comma-separated); each must be installed."
    )
    resume: Optional[str] = opt(
        None,
        "Continue from a checkpoint directory (or an adapter directory: its latest checkpoint): weights, "
        "optimizer, step, data order and random state; the run's saved options apply unless given again.",
    )
    prefix_cache: bool = opt(
        True, "Compute the frozen blocks before the first LoRA block once per row and reuse their output "
        "in later epochs (RAM, or a temporary file when large); --no-prefix-cache recomputes them every step.",
    )
    # Training methods (issue 8): how the steps are computed, not what the adapter is.
    pack: bool = opt(
        False, "Pack several rows into each sequence of up to --max-seq-length tokens; attention and "
        "positions stay within each row, so losses equal the unpacked run's.",
    )
    grad_checkpoint: bool = opt(
        False, "Recompute each transformer block in the backward pass: less memory, about 30% more time."
    )
    grad_accumulation_steps: int = opt(
        1, "Sum gradients over this many batches per optimizer step (same update as one k-times-larger batch)."
    )
    lr_schedule: str = opt(
        "constant", f"Learning-rate schedule after warmup: {', '.join(LR_SCHEDULES)}."
    )
    warmup_steps: int = opt(0, "Raise the learning rate linearly over the first N steps.")
    final_lr_ratio: float = opt(
        0.1, "linear / cosine: the last step's learning rate as a fraction of --learning-rate."
    )
    early_stopping_patience: Optional[int] = opt(
        None, "Stop after N validations (every --val-every steps) without a better validation loss, "
        "and keep the best adapter.",
    )
    peer_timeout: float = opt(
        300.0, "In a group started by mlx.launch: end every process when one waits this many seconds for "
        "the others (to join, in one step, at validation), as when a process died or hangs.",
    )


def _unwrap(tp) -> type:
    """Optional[X] -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: _unwrap(hints[f.name]) for f in fields(cls)}


def _coerce(name: str, value: Any, tp: type) -> Any:
    """YAML reads `1e-4` as a string and users write lists where we take comma strings."""
    if value is None:
        return None
    if typing.get_origin(tp) is list:
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    if tp is str and isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    if tp is str and isinstance(value, dict):  # rank_pattern / alpha_pattern as a YAML mapping
        return ",".join(f"{k}={v}" for k, v in value.items())
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
        if tp is int:
            if number != int(number):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            return int(number)
        return number
    return str(value)


def load_yaml(path: Path, cls=None) -> dict[str, Any]:
    """Read a YAML options file, naming file, line and key for every problem at once."""
    cls = cls or TrainConfig
    try:
        root = yaml.compose(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if root is None:
        return {}
    if not isinstance(root, yaml.MappingNode):
        raise UserError(f"{path}:1: expected 'key: value' lines at the top level")
    types_ = field_types(cls)
    values, problems = {}, []
    for key_node, value_node in root.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        name = key.replace("-", "_")
        if name not in types_:
            close = difflib.get_close_matches(name, types_, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"{path}:{line}: unknown key '{key}'{hint}")
            continue
        try:
            raw = yaml.safe_load(yaml.serialize(value_node))
            values[name] = _coerce(name, raw, types_[name])
        except ValueError as e:
            problems.append(f"{path}:{line}: {e}")
    if values.get("iters") is not None and values.get("epochs") is not None:
        problems.append(f"{path}: both iters and epochs are set; training length is one or the other, keep one")
    if problems:
        raise UserError("\n".join(problems))
    return values


def build_config(cls, file_values: dict[str, Any], cli_values: dict[str, Any]):
    """Defaults < YAML < command line; then validate the result."""
    given = {k: v for k, v in cli_values.items() if v is not None and v != []}
    merged = {**file_values, **given}
    if "iters" in given and "epochs" in given:
        raise UserError("--iters and --epochs both given: training length is one or the other; keep one")
    if "iters" in given:
        merged["epochs"] = None  # --iters on the command line beats epochs from a file or a resumed run
    cfg = replace(cls(), **merged)
    problems = check(cfg)
    if problems:
        raise UserError("\n".join(problems))
    return cfg


def split_list(spec: Optional[str]) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']; None -> []."""
    return [s.strip() for s in str(spec or "").split(",") if s.strip()]


def parse_layers(spec: Optional[str]) -> Optional[list[int]]:
    if spec is None:
        return None
    try:
        return [int(s) for s in str(spec).split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--layers must be comma-separated integers such as 0,5,7, got '{spec}'") from None


def check(cfg) -> list[str]:
    """Every problem with the values, in words the user can act on."""
    p = []
    if isinstance(cfg, LoRAConfig):
        if cfg.rank < 1:
            p.append(f"--rank must be at least 1, got {cfg.rank}")
        if cfg.alpha <= 0:
            p.append(f"--alpha must be positive, got {cfg.alpha}")
        if not 0.0 <= cfg.dropout < 1.0:
            p.append(f"--dropout must be in [0, 1), got {cfg.dropout}")
        if cfg.num_layers == 0 or cfg.num_layers < -1:
            p.append(f"--num-layers must be -1 (all) or a positive count, got {cfg.num_layers}")
        if not str(cfg.targets).strip():
            p.append("--targets is empty: give module names such as q_proj,v_proj, a regex or all-linear")
        try:
            parse_layers(cfg.layers)
        except UserError as e:
            p.append(str(e))
        if cfg.init not in INITS:
            p.append(f"--init must be one of {', '.join(INITS)}, got '{cfg.init}'")
        p += _pattern_problems(cfg)
    if isinstance(cfg, TrainConfig):
        for name in ("iters", "batch_size", "max_seq_length"):
            if getattr(cfg, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
        if cfg.epochs is not None and cfg.epochs <= 0:
            p.append(f"--epochs must be positive, got {cfg.epochs}")
        if cfg.learning_rate <= 0:
            p.append(f"--learning-rate must be positive, got {cfg.learning_rate}")
        if cfg.peer_timeout <= 0:
            p.append(f"--peer-timeout must be positive, got {cfg.peer_timeout}")
        for name in ("val_every", "report_every", "save_every"):
            if getattr(cfg, name) < 0:
                p.append(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(cfg, name)}")
        unknown = set(split_list(cfg.report_to)) - set(REPORT_TO)
        if unknown:
            p.append(f"--report-to: unknown {', '.join(sorted(unknown))}; choose from {', '.join(REPORT_TO)}")
        if cfg.val_batches == 0 or cfg.val_batches < -1:
            p.append(f"--val-batches must be -1 (all) or a positive count, got {cfg.val_batches}")
        p += check_methods(cfg)
    if isinstance(cfg, ConvertConfig) and cfg.to not in CONVERT_FORMATS:
        p.append(f"--to must be one of {', '.join(CONVERT_FORMATS)}, got '{cfg.to}'")
    if isinstance(cfg, EvalConfig):
        p += eval_problems(cfg)
    if isinstance(cfg, InferenceConfig):
        if cfg.max_tokens < 1:
            p.append(f"--max-tokens must be at least 1, got {cfg.max_tokens}")
        if cfg.temp < 0:
            p.append(f"--temp must be 0 or more, got {cfg.temp}")
        if not 0 < cfg.top_p <= 1:
            p.append(f"--top-p must be in (0, 1], got {cfg.top_p}")
    return p


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
                p.append(f"{flag}: {key}={value:g} must be a positive {'whole number' if name == 'rank_pattern' else 'number'}")
    return p


def check_methods(cfg: "TrainConfig") -> list[str]:
    p = []
    if cfg.grad_accumulation_steps < 1:
        p.append(f"--grad-accumulation-steps must be at least 1, got {cfg.grad_accumulation_steps}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        p.append(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got '{cfg.lr_schedule}'")
    if cfg.warmup_steps < 0:
        p.append(f"--warmup-steps must be 0 or more, got {cfg.warmup_steps}")
    if not 0 <= cfg.final_lr_ratio <= 1:
        p.append(f"--final-lr-ratio must be in [0, 1], got {cfg.final_lr_ratio}")
    if cfg.early_stopping_patience is not None:
        if cfg.early_stopping_patience < 1:
            p.append(f"--early-stopping-patience must be at least 1, got {cfg.early_stopping_patience}")
        if cfg.val_every == 0:
            p.append("--early-stopping-patience needs validations during training: set --val-every to a positive step count")
    return p


METHOD_FIELDS = ("pack", "grad_accumulation_steps", "lr_schedule", "warmup_steps", "final_lr_ratio", "early_stopping_patience")


def method_options(cfg: "TrainConfig") -> dict[str, Any]:
    """The training methods a run changed from their defaults (those that shape the weights),
    as adapter_config.json's `training` block records them."""
    return {n: getattr(cfg, n) for n in METHOD_FIELDS if getattr(cfg, n) != getattr(TrainConfig, n)}


def lora_part(cfg: LoRAConfig) -> dict[str, Any]:
    """The LoRA fields of any config, as stored in adapter_config.json."""
    return {f.name: getattr(cfg, f.name) for f in fields(LoRAConfig)}


REPORT_TO = ("tensorboard", "wandb")


@dataclass(frozen=True)
class InferenceConfig:
    """What `generate` and `chat` share: the base, its adapters and sampling."""

    model: Optional[str] = opt(None, "Base model (default: the one the adapter names, else the shipped model).")
    adapter_path: Optional[list[str]] = opt(
        None,
        "Adapter directory (default: none; the base model alone). Repeat it to load several; DIR:WEIGHT "
        "or --adapter-weights combines them as a weighted sum of their updates.",
    )
    adapter_weights: Optional[str] = opt(
        None, "Weights of the --adapter-path directories in order, e.g. 0.7,0.3 (default: 1 each)."
    )
    max_tokens: int = opt(100, "Most tokens to generate.")
    temp: float = opt(0.0, "Sampling temperature (0: greedy).")
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability.")
    seed: int = opt(0, "Sampling seed.")


@dataclass(frozen=True)
class GenerateConfig(InferenceConfig):
    prompt: str = opt("Q: Tom has 3 apples and buys 4 more. How many apples does he have?\nA:", "Prompt text.")
    chat: bool = opt(False, "Wrap the prompt as a user turn in the tokenizer's chat template.")


@dataclass(frozen=True)
class ChatConfig(InferenceConfig):
    system: Optional[str] = opt(None, "System message at the start of every conversation.")


@dataclass(frozen=True)
class PlotConfig:
    runs: Optional[list[str]] = arg("Run directories (the --adapter-path of each training run).")
    output: Optional[str] = opt(None, "PNG to write (default: RUN_DIR/loss.png for one run, loss.png for several).")


@dataclass(frozen=True)
class FuseConfig:
    model: Optional[str] = opt(None, "Base model (default: the one the adapter names).")
    adapter_path: str = opt("adapters", "Adapter directory to merge.")
    save_path: str = opt("fused_model", "Directory for the merged model (replaced only once it checks out).")
    requantize: bool = opt(
        False,
        "Quantized base: re-quantize the merged layers like the base and report the logit change "
        "this causes (default, --dequantize: save the whole model de-quantized, merged in full precision).",
        off="--dequantize",
    )
    export_gguf: bool = opt(
        False, "Also write <save-path>/model.gguf (float16) for llama.cpp; llama, mistral and mixtral models only."
    )


CONVERT_FORMATS = ("peft", "mlx", "mlx-lm")


@dataclass(frozen=True)
class ConvertConfig:
    adapter_dir: Optional[str] = arg("Adapter directory to read: mlx-lora, PEFT or mlx_lm.lora format.")
    out_dir: Optional[str] = arg("Directory to write (created, or replaced once complete).")
    to: str = opt("peft", "Format to write: peft (Hugging Face PEFT), mlx (mlx-lora's own) or mlx-lm (mlx_lm.lora's).")
    model: Optional[str] = opt(None, "Base model the adapter belongs to (default: the one the adapter names).")
    base_model_id: Optional[str] = opt(
        None, "Base model id to record in the output, e.g. the Hugging Face id for PEFT (default: the adapter's base)."
    )


EVAL_TASKS = ("auto", "exact-match", "loss")


@dataclass(frozen=True)
class EvalConfig:
    model: Optional[str] = opt(None, "Base model (default: the one the adapter names, else the shipped model).")
    adapter_path: Optional[str] = opt(
        None, "Adapter directory (default: ./adapters when it exists, else the base model alone)."
    )
    data: Optional[str] = opt(None, "Directory holding the split's .jsonl file (default: the bundled arithmetic set).")
    split: str = opt("test", "Evaluate <split>.jsonl of --data: test, valid, train or any other name.")
    max_examples: Optional[int] = opt(None, "Evaluate only the first N rows of the split (default: all).")
    task: str = opt(
        "auto",
        "auto: loss and perplexity, plus exact match on rows whose reference has an answer after ####; "
        "exact-match: exact match on every row; loss: loss and perplexity only.",
    )
    compare_base: bool = opt(False, "Also evaluate the base without the adapter and print both side by side.")
    output: Optional[str] = opt(None, "Write every figure and each example's prediction to this JSON file.")
    batch_size: int = opt(16, "Rows per batch for the loss and for generation.")
    max_tokens: int = opt(256, "Most tokens generated per answer.")


def eval_problems(cfg: EvalConfig) -> list[str]:
    p = []
    if cfg.task not in EVAL_TASKS:
        p.append(f"--task must be one of {', '.join(EVAL_TASKS)}, got '{cfg.task}'")
    for name in ("batch_size", "max_tokens", "max_examples"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            p.append(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return p
