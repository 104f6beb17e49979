"""The options of the commands around training: fuse, convert, eval, plot and upload."""

import re
from dataclasses import dataclass

from mlx_lora.config.data import DataConfig
from mlx_lora.config.fields import arg, opt
from mlx_lora.config.precision import PrecisionConfig

CONVERT_FORMATS = ("peft", "mlx", "mlx-lm", "gguf")
EVAL_TASKS = ("auto", "exact-match", "loss", "preference")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
BY_SHARD_MODES = ("auto", "on", "off")
HUB_REPO = re.compile(r"[\w.-]+/[\w.-]+")  # user/name, as the Hub spells repository ids


def repo_problems(flag: str, repo: str | None) -> list[str]:
    if repo is None or HUB_REPO.fullmatch(repo):
        return []
    return [f"{flag} must be a Hub repository id such as user/name, got '{repo}'"]


@dataclass(frozen=True)
class PlotConfig:
    runs: list[str] | None = arg("Run directories (the --adapter-path of each training run).")
    output: str | None = opt(None, "PNG to write (default: RUN_DIR/loss.png for one run, loss.png for several).")

    def problems(self) -> list[str]:
        return []


@dataclass(frozen=True)
class FuseConfig(PrecisionConfig):
    model: str | None = opt(None, "Base model (default: the one the adapter names).")
    adapter_path: str = opt("adapters", "Adapter directory to merge.")
    save_path: str = opt("fused_model", "Directory for the merged model (replaced only once it checks out).")
    # --requantize reports the logit change re-quantizing causes; --dequantize (the default) merges
    # in full precision and saves the whole model de-quantized.
    requantize: bool = opt(
        False, "Quantized base: re-quantize the merged layers like the base (default: de-quantize).", off="--dequantize"
    )
    export_gguf: bool = opt(
        False,
        "Also write <save-path>/model.gguf for llama.cpp; llama (SmolLM2 too), mistral, qwen2, qwen3, gemma2 and "
        "phi3 models.",
    )
    gguf_type: str = opt(
        "f16", "Type of the 2-D weights in model.gguf: f32, f16, bf16 or q8_0 (norms and biases stay f32)."
    )
    upload_repo: str | None = opt(None, "Then upload the fused model, with a model card, to this Hub repo (user/name).")
    private: bool = opt(False, "With --upload-repo: create the repository private.", off="--public")

    # on: read one safetensors shard, merge the adapted weights in it, write it, then the next, so
    # peak memory is about the largest shard; the self-check then compares a few blocks' outputs.
    # auto: on when the whole model would not fit twice (base, and the fused copy it checks against).
    by_shard: str = opt(
        "auto", f"Merge one shard at a time, for a base larger than memory: {', '.join(BY_SHARD_MODES)}."
    )

    def problems(self) -> list[str]:
        p = PrecisionConfig.problems(self) + repo_problems("--upload-repo", self.upload_repo)
        if self.gguf_type not in GGUF_TYPES:
            p.append(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got '{self.gguf_type}'")
        if self.by_shard not in BY_SHARD_MODES:
            p.append(f"--by-shard must be one of {', '.join(BY_SHARD_MODES)}, got '{self.by_shard}'")
        return p


@dataclass(frozen=True)
class UploadConfig:
    adapter_dir: str | None = arg("Adapter directory to upload (the --adapter-path of a training run).")
    repo: str | None = opt(None, "Hub repository to create or update, user/name (required).")
    private: bool = opt(False, "Create the repository private.", off="--public")
    model: str | None = opt(
        None, "Hugging Face base the adapter belongs to, to place the PEFT files (default: the one the adapter names)."
    )
    base_model_id: str | None = opt(
        None, "Hub id of the base, for the card and PEFT's config (default: the one the adapter names)."
    )

    def problems(self) -> list[str]:
        return repo_problems("--repo", self.repo) if self.repo else ["--repo is required: the Hub repo, user/name"]


@dataclass(frozen=True)
class ConvertConfig:
    adapter_dir: str | None = arg("Adapter directory to read: mlx-lora, PEFT or mlx_lm.lora format.")
    out_dir: str | None = arg("Directory to write (created, or replaced once complete).")
    to: str = opt(
        "peft",
        "Format to write: peft (Hugging Face PEFT), mlx (mlx-lora's own), mlx-lm (mlx_lm.lora's) or gguf "
        "(llama.cpp's LoRA adapter, OUT_DIR/adapter.gguf; the bases --export-gguf writes).",
    )
    model: str | None = opt(None, "Base model the adapter belongs to (default: the one the adapter names).")
    base_model_id: str | None = opt(
        None, "Base model id to record in the output, e.g. the Hugging Face id for PEFT (default: the adapter's base)."
    )

    def problems(self) -> list[str]:
        return (
            [] if self.to in CONVERT_FORMATS else [f"--to must be one of {', '.join(CONVERT_FORMATS)}, got '{self.to}'"]
        )


@dataclass(frozen=True)
class EvalConfig(DataConfig, PrecisionConfig):
    model: str | None = opt(None, "Base model (default: the one the adapter names, else the shipped model).")
    adapter_path: str | None = opt(
        None, "Adapter directory (default: ./adapters when it exists, else the base model alone)."
    )
    split: str = opt(
        "test",
        "Split to evaluate: test, valid or train (as --test-split, --valid-split and --train-split name "
        "them) or any other split by its name.",
    )
    max_examples: int | None = opt(None, "Evaluate only the first N rows of the split (default: all).")
    task: str = opt(
        "auto",
        "auto: loss and perplexity, plus exact match on rows whose reference has an answer after ####, "
        "or preference on {prompt, chosen, rejected} rows; exact-match: exact match on every row; "
        "loss: loss and perplexity only; preference: how often the chosen side is the likelier, and "
        "DPO's reward accuracy and margin against the base.",
    )
    compare_base: bool = opt(False, "Also evaluate the base without the adapter and print both side by side.")
    output: str | None = opt(None, "Write every figure and each example's prediction to this JSON file.")
    batch_size: int = opt(16, "Rows per batch for the loss.")
    generation_batch_size: int = opt(
        64,
        "Rows decoded together for exact match: a step reads the weights once for all of them, so more "
        "rows cost less each (on a 2-core CPU 64 rows decode 2x the tokens/s of 16), at a KV cache each.",
    )
    max_tokens: int = opt(256, "Most tokens generated per answer.")
    max_seq_length: int = opt(2048, "Rows longer than this many tokens are truncated for the loss.")

    def problems(self) -> list[str]:
        p = DataConfig.problems(self) + PrecisionConfig.problems(self)
        if self.task not in EVAL_TASKS:
            p.append(f"--task must be one of {', '.join(EVAL_TASKS)}, got '{self.task}'")
        for name in ("batch_size", "generation_batch_size", "max_tokens", "max_examples", "max_seq_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                p.append(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        return p
