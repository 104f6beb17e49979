"""A training run: the LoRA options plus data, optimisation, methods, saving and reporting."""

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_lora.config.data import DataConfig
from mlx_lora.config.fields import DATA, DISTRIBUTED, METHODS, MODEL, OPTIMISATION, SAVING, opt, split_list
from mlx_lora.config.lora import LoRAConfig
from mlx_lora.config.precision import PrecisionConfig

LR_SCHEDULES = ("constant", "linear", "cosine")
REPORT_TO = ("tensorboard", "wandb")
STREAM_MODES = ("auto", "on", "off")
OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo", "grpo")
PREFERENCE_OBJECTIVES = ("dpo", "ipo", "orpo", "simpo")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "gspo")
BUILT_IN_REWARDS = ("exact-match", "format")
# TRL's defaults: DPOConfig/ORPOConfig beta 0.1 (IPO's tau, ORPO's lambda); SimPO's paper and TRL's
# CPO docs use beta 2.0 (CPOConfig's own default, 0.1, is for the sigmoid CPO loss); GRPOConfig 0.0.
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "orpo": 0.1, "simpo": 2.0, "grpo": 0.0}
# AdamW's learning rate when --learning-rate is not given. 1e-3 suits LoRA on the shipped small
# model; GRPO's policy-gradient steps want far smaller ones (TRL's GRPOConfig: 1e-6 for full
# fine-tuning; LoRA recipes use 1e-5 to 5e-5).
DEFAULT_LEARNING_RATE = {"sft": 1e-3, "dpo": 1e-3, "ipo": 1e-3, "orpo": 1e-3, "simpo": 1e-3, "grpo": 1e-5}
GRPO_FIELDS = (
    "group_size",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "epsilon",
    "epsilon_high",
    "grpo_iterations",
    "loss_type",
    "rewards",
    "reward_weights",
    "format_regex",
)
# The objectives each hyperparameter applies to: set for another, it would be silently ignored.
APPLIES_TO = {
    "beta": (*PREFERENCE_OBJECTIVES, "grpo"),
    "label_smoothing": ("dpo", "simpo"),
    "simpo_gamma": ("simpo",),
    "cpo_alpha": ("simpo",),
} | {name: ("grpo",) for name in GRPO_FIELDS}


@dataclass(frozen=True)
class TrainConfig(DataConfig, LoRAConfig, PrecisionConfig):
    """A training run. Inherits LoRAConfig and DataConfig so CLI flags and YAML keys share one flat namespace."""

    model: str | None = opt(None, "HF model directory or hub id (default: the shipped model).", panel=MODEL)
    max_seq_length: int = opt(2048, "Rows longer than this many tokens are truncated.", panel=DATA)
    # Default: the loss covers completions and assistant turns only.
    train_on_prompt: bool = opt(False, "Also train on prompt and user tokens.", panel=DATA)
    train_on_reasoning: bool = opt(
        True,
        "Train on assistant turns' reasoning (reasoning_content or thinking) as the template renders it.",
        panel=DATA,
    )
    show_mask: int | None = opt(
        None, "Print the first N training rows with the trained tokens marked, and the counts, then exit.", panel=DATA
    )
    iters: int = opt(300, "Optimizer steps to train for.", panel=OPTIMISATION)
    epochs: float | None = opt(None, "Passes over the training set (instead of --iters).", panel=OPTIMISATION)
    batch_size: int = opt(4, "Rows per batch.", panel=OPTIMISATION)
    learning_rate: float | None = opt(
        None,
        "AdamW learning rate (default by --objective: "
        + ", ".join(f"{o} {lr:g}" for o, lr in DEFAULT_LEARNING_RATE.items())
        + ").",
        panel=OPTIMISATION,
    )
    weight_decay: float = opt(0.0, "AdamW weight decay.", panel=OPTIMISATION)
    seed: int = opt(0, "Seed for LoRA init, dropout and data order.", panel=OPTIMISATION)
    adapter_path: str = opt("adapters", "Directory for the adapter, its config and checkpoints.", panel=SAVING)
    val_every: int = opt(50, "Validate every N steps (0: at start and end only).", panel=SAVING)
    val_batches: int = opt(25, "Batches per validation (-1: the whole split).", panel=SAVING)
    report_every: int = opt(10, "Print the training loss every N steps.", panel=SAVING)
    save_every: int = opt(100, "Checkpoint to <adapter-path>/checkpoints every N steps (0: never).", panel=SAVING)
    report_to: str | None = opt(None, "Also log to tensorboard, wandb or both (comma-separated).", panel=SAVING)
    # Restores weights, optimizer, step, data order and random state; the run's saved options apply
    # unless given again. An adapter directory means its latest checkpoint.
    resume: str | None = opt(None, "Continue from a checkpoint or adapter directory.", panel=SAVING)
    # A new run (fresh optimizer, step 0, its own --adapter-path) whose adapter starts as this one:
    # its modules, rank, alpha and methods come with it (--dropout may change). SFT -> DPO or GRPO.
    init_adapter: str | None = opt(
        None, "Start a new run from this adapter's weights (mlx-lora, PEFT or mlx-lm files).", panel=MODEL
    )
    # Training methods (issue 8): how the steps are computed, not what the adapter is.
    # The frozen blocks before the first LoRA block: their output is kept in RAM, or a temporary
    # file when large; --no-prefix-cache recomputes them every step.
    prefix_cache: bool = opt(True, "Compute the frozen first blocks once per row.", panel=METHODS)
    # on: the frozen blocks run one at a time, each block's weights loaded only while it runs, their
    # output kept on disk; training then holds only the LoRA blocks and the head (docs/memory.md).
    # auto: on when the whole model would not fit in memory.
    stream_prefix: str = opt("auto", f"Stream the frozen blocks from disk: {', '.join(STREAM_MODES)}.", panel=METHODS)
    # Attention and positions stay within each row, so losses equal the unpacked run's.
    pack: bool = opt(False, "Pack several rows into each --max-seq-length sequence.", panel=METHODS)
    grad_checkpoint: bool = opt(
        False, "Recompute blocks in the backward pass: less memory, ~30% slower.", panel=METHODS
    )
    # The same update as one k-times-larger batch.
    grad_accumulation_steps: int = opt(1, "Sum gradients over N batches per optimizer step.", panel=METHODS)
    lr_schedule: str = opt("constant", f"Schedule after warmup: {', '.join(LR_SCHEDULES)}.", panel=OPTIMISATION)
    warmup_steps: int = opt(0, "Raise the learning rate linearly over N steps.", panel=OPTIMISATION)
    final_lr_ratio: float = opt(0.1, "linear/cosine: last learning rate / --learning-rate.", panel=OPTIMISATION)
    early_stopping_patience: int | None = opt(
        None, "Stop after N validations without improvement; keep the best.", panel=METHODS
    )
    # In a group started by mlx.launch: a process waiting this long for the others (to join, in one
    # step, at validation) ends them all, as when one died or hangs.
    peer_timeout: float = opt(300.0, "Seconds to wait for a silent peer before ending the group.", panel=DISTRIBUTED)

    # Preference tuning (issue 16): the objective and its hyperparameters, named as TRL names them.
    objective: str = opt(
        "sft",
        "sft: cross-entropy on completions; dpo, ipo, orpo, simpo: preference tuning on "
        "{prompt, chosen, rejected} rows (docs/preference.md); grpo: reinforcement learning with "
        "verifiable rewards on prompt rows (docs/grpo.md).",
    )
    beta: float | None = opt(
        None,
        "dpo: the KL strength beta; ipo: tau; orpo: lambda, the odds-ratio weight; simpo: the reward scale "
        "grpo: the KL strength, 0 for no reference pass (default: 0.1, 2.0 for simpo, 0 for grpo).",
    )
    label_smoothing: float = opt(0.0, "dpo, simpo: the probability that a pair's labels are flipped (cDPO).")
    simpo_gamma: float = opt(0.5, "simpo: the target reward margin gamma.")
    cpo_alpha: float = opt(0.0, "simpo: weight of the NLL loss on the chosen completions (CPO's BC term).")

    # GRPO (issue 31), named as TRL's GRPOConfig names them; --batch-size counts prompts.
    group_size: int = opt(8, "grpo: completions sampled per prompt, whose rewards are compared.")
    max_completion_tokens: int = opt(256, "grpo: the longest completion sampled (dr_grpo's normaliser).")
    temperature: float = opt(1.0, "grpo: sampling temperature of the completions.")
    top_p: float = opt(1.0, "grpo: nucleus sampling of the completions (1: off).")
    epsilon: float = opt(0.2, "grpo: the ratio is clipped below at 1 - epsilon.")
    epsilon_high: float | None = opt(None, "grpo: clipped above at 1 + epsilon-high (default: epsilon; DAPO: 0.28).")
    grpo_iterations: int = opt(1, "grpo: updates per batch of completions, against the log-probs that sampled them.")
    # grpo: sequence means; dr_grpo: / (completions x --max-completion-tokens); dapo: / completion
    # tokens; gspo: one ratio per sequence (docs/grpo.md).
    loss_type: str = opt("dapo", f"grpo: the loss, {', '.join(GRPO_LOSS_TYPES)}.")
    rewards: str = opt("exact-match", "grpo: exact-match, format, python:FILE.py:FUNCTION, comma-separated; summed.")
    reward_weights: str | None = opt(None, "grpo: a weight per reward, comma-separated (default: 1 each).")
    format_regex: str = opt(r"#### *-?\d", "grpo: the regex the format reward searches the completion for.")

    @property
    def preference(self) -> bool:
        return self.objective in PREFERENCE_OBJECTIVES

    @property
    def epsilon_high_value(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def reward_weight_values(self) -> list[float]:
        """--reward-weights as numbers (problems() checked them), or 1 per reward."""
        if self.reward_weights is None:
            return [1.0] * len(split_list(self.rewards))
        return [float(w) for w in split_list(self.reward_weights)]

    @property
    def learning_rate_value(self) -> float:
        """--learning-rate, or the objective's default."""
        return (
            self.learning_rate
            if self.learning_rate is not None
            else DEFAULT_LEARNING_RATE.get(self.objective, DEFAULT_LEARNING_RATE["sft"])
        )

    @property
    def learning_rate_text(self) -> str:
        """e.g. '1e-05 (grpo's default)', for the run's first lines and `info`."""
        given = self.learning_rate is not None
        return f"{self.learning_rate_value:g}" + ("" if given else f" ({self.objective}'s default)")

    @property
    def beta_value(self) -> float:
        """--beta, or the objective's default."""
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.objective, 0.1)

    def problems(self) -> list[str]:
        p = LoRAConfig.problems(self) + DataConfig.problems(self) + PrecisionConfig.problems(self)
        p += self._objective_problems()
        for name in ("iters", "batch_size", "max_seq_length"):
            if getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.show_mask is not None and self.show_mask < 1:
            p.append(f"--show-mask must be at least 1, got {self.show_mask}")
        if self.epochs is not None and self.epochs <= 0:
            p.append(f"--epochs must be positive, got {self.epochs}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            p.append(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.peer_timeout <= 0:
            p.append(f"--peer-timeout must be positive, got {self.peer_timeout}")
        for name in ("val_every", "report_every", "save_every"):
            if getattr(self, name) < 0:
                p.append(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        unknown = set(split_list(self.report_to)) - set(REPORT_TO)
        if unknown:
            p.append(f"--report-to: unknown {', '.join(sorted(unknown))}; choose from {', '.join(REPORT_TO)}")
        p += self._init_adapter_problems()
        if self.val_batches == 0 or self.val_batches < -1:
            p.append(f"--val-batches must be -1 (all) or a positive count, got {self.val_batches}")
        p += self._method_problems()
        return p

    def _objective_problems(self) -> list[str]:
        p = []
        if self.objective not in OBJECTIVES:
            return [f"--objective must be one of {', '.join(OBJECTIVES)}, got '{self.objective}'"]
        if self.beta is not None and (self.beta < 0 if self.objective == "grpo" else self.beta <= 0):
            p.append(f"--beta must be {'0 or more' if self.objective == 'grpo' else 'positive'}, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            p.append(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.cpo_alpha < 0:
            p.append(f"--cpo-alpha must be 0 or more, got {self.cpo_alpha}")
        for name, objectives in APPLIES_TO.items():
            if getattr(self, name) != getattr(TrainConfig, name) and self.objective not in objectives:
                flag = "--" + name.replace("_", "-")
                p.append(f"{flag} applies to --objective {' or '.join(objectives)}, not {self.objective}")
        if self.objective == "grpo":
            p += self._grpo_problems()
        if self.objective == "sft":
            return p
        if self.pack:
            whole = "each completion is" if self.objective == "grpo" else "chosen and rejected are"
            p.append(f"--pack does not apply to --objective {self.objective}: {whole} scored whole")
        if self.train_on_prompt:
            p.append(f"--train-on-prompt does not apply to --objective {self.objective}: it compares completions")
        if self.init in ("olora", "pissa") and self.beta_value > 0:
            p.append(
                f"--init {self.init} moves part of the base into the adapter, so the base with the adapter off is "
                f"no reference for --objective {self.objective}; use --init default or gaussian"
            )
        return p

    def _init_adapter_problems(self) -> list[str]:
        if not self.init_adapter:
            return []
        if self.resume:
            return [
                "--init-adapter starts a new run from an adapter, --resume continues a run from its "
                "checkpoint; give one of them"
            ]
        if Path(self.init_adapter).resolve() == Path(self.adapter_path).resolve():
            return [
                f"--adapter-path {self.adapter_path} is the adapter --init-adapter starts from; "
                "give the new run its own --adapter-path"
            ]
        return []

    def _grpo_problems(self) -> list[str]:
        p = [
            f"--{name.replace('_', '-')} must be at least {least}, got {getattr(self, name)}"
            for name, least in (("group_size", 2), ("max_completion_tokens", 1), ("grpo_iterations", 1))
            if getattr(self, name) < least
        ]
        if self.temperature <= 0:
            p.append(f"--temperature must be positive (a group needs different completions), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            p.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 < self.epsilon < 1:
            p.append(f"--epsilon must be in (0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            p.append(f"--epsilon-high must be positive, got {self.epsilon_high}")
        if self.stream_prefix == "on":
            p.append("--stream-prefix on does not apply to --objective grpo: sampling runs the whole model")
        if self.early_stopping_patience is not None:
            p.append("--early-stopping-patience watches the val loss; --objective grpo validates a mean reward")
        if self.loss_type not in GRPO_LOSS_TYPES:
            p.append(f"--loss-type must be one of {', '.join(GRPO_LOSS_TYPES)}, got '{self.loss_type}'")
        return p + self._reward_problems()

    def _reward_problems(self) -> list[str]:
        p, specs = [], split_list(self.rewards)
        if not specs:
            p.append("--rewards is empty; name at least one: exact-match, format or python:FILE.py:FUNCTION")
        for spec in specs:
            if spec not in BUILT_IN_REWARDS and not spec.startswith("python:"):
                p.append(f"--rewards: unknown reward '{spec}'; use exact-match, format or python:FILE.py:FUNCTION")
        try:
            re.compile(self.format_regex)
        except re.error as e:
            p.append(f"--format-regex {self.format_regex!r} is not a regular expression: {e}")
        if self.reward_weights is not None:
            weights = split_list(self.reward_weights)
            if len(weights) != len(specs):
                p.append(f"--reward-weights gives {len(weights)} weights for {len(specs)} rewards; give one per reward")
            for w in weights:
                try:
                    if not math.isfinite(float(w)):
                        raise ValueError
                except ValueError:
                    p.append(f"--reward-weights: '{w}' is not a number")
        return p

    def _method_problems(self) -> list[str]:
        p = []
        if self.grad_accumulation_steps < 1:
            p.append(f"--grad-accumulation-steps must be at least 1, got {self.grad_accumulation_steps}")
        if self.lr_schedule not in LR_SCHEDULES:
            p.append(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got '{self.lr_schedule}'")
        if self.stream_prefix not in STREAM_MODES:
            p.append(f"--stream-prefix must be one of {', '.join(STREAM_MODES)}, got '{self.stream_prefix}'")
        if self.warmup_steps < 0:
            p.append(f"--warmup-steps must be 0 or more, got {self.warmup_steps}")
        if not 0 <= self.final_lr_ratio <= 1:
            p.append(f"--final-lr-ratio must be in [0, 1], got {self.final_lr_ratio}")
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience < 1:
                p.append(f"--early-stopping-patience must be at least 1, got {self.early_stopping_patience}")
            if self.val_every == 0:
                p.append(
                    "--early-stopping-patience needs validations during training: "
                    "set --val-every to a positive step count"
                )
        return p


# Recorded in every adapter's `training` block: what reproducing the run (and its model card) needs first.
RECIPE_FIELDS = ("data", "iters", "epochs", "batch_size", "learning_rate", "max_seq_length")
METHOD_FIELDS = (
    "train_on_prompt",
    "train_on_reasoning",
    "weight_decay",
    "pack",
    "grad_accumulation_steps",
    "lr_schedule",
    "warmup_steps",
    "final_lr_ratio",
    "early_stopping_patience",
    "objective",
    "init_adapter",
    "beta",
    "label_smoothing",
    "simpo_gamma",
    "cpo_alpha",
    *GRPO_FIELDS,
)


def method_options(cfg: "TrainConfig") -> dict[str, Any]:
    """How the run trained, as adapter_config.json's `training` block records it: the recipe
    (data, length, batch, learning rate) always, the methods only where changed from their defaults."""
    changed = {n: getattr(cfg, n) for n in METHOD_FIELDS if getattr(cfg, n) != getattr(TrainConfig, n)}
    return {n: getattr(cfg, n) for n in RECIPE_FIELDS} | {"learning_rate": cfg.learning_rate_value} | changed
