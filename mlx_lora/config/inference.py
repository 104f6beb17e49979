"""What `generate` and `chat` take: the base, its adapters and sampling."""

from dataclasses import dataclass

from mlx_lora.config.fields import opt
from mlx_lora.config.precision import PrecisionConfig


@dataclass(frozen=True)
class InferenceConfig(PrecisionConfig):
    """What `generate` and `chat` share: the base, its adapters and sampling."""

    model: str | None = opt(None, "Base model (default: the one the adapter names, else the shipped model).")
    adapter_path: list[str] | None = opt(
        None,
        "Adapter directory (default: none; the base model alone). Repeat it to load several; DIR:WEIGHT "
        "or --adapter-weights combines them as a weighted sum of their updates.",
    )
    adapter_weights: str | None = opt(
        None, "Weights of the --adapter-path directories in order, e.g. 0.7,0.3 (default: 1 each)."
    )
    max_tokens: int = opt(100, "Most tokens to generate.")
    temp: float = opt(0.0, "Sampling temperature (0: greedy).")
    top_p: float = opt(1.0, "Nucleus sampling: keep the smallest set of tokens with this much probability.")
    seed: int = opt(0, "Sampling seed.")

    def problems(self) -> list[str]:
        p = PrecisionConfig.problems(self)
        if self.max_tokens < 1:
            p.append(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.temp < 0:
            p.append(f"--temp must be 0 or more, got {self.temp}")
        if not 0 < self.top_p <= 1:
            p.append(f"--top-p must be in (0, 1], got {self.top_p}")
        return p


ENGINES = ("mlx", "llama.cpp")


@dataclass(frozen=True)
class GenerateConfig(InferenceConfig):
    prompt: str = opt("Q: Tom has 3 apples and buys 4 more. How many apples does he have?\nA:", "Prompt text.")
    chat: bool = opt(False, "Wrap the prompt as a user turn in the tokenizer's chat template.")
    image: list[str] | None = opt(
        None,
        "Image file for a vision-language --model; repeat it for several. The images and the prompt "
        "make one user turn in the chat template.",
    )
    engine: str = opt(
        "mlx",
        "What decodes: mlx, or llama.cpp (a .gguf base on the CPU with at most one adapter, unweighted; "
        "needs llama-cpp-python): ~8x faster there, its greedy text can differ from MLX's (docs/gguf.md).",
    )

    def problems(self) -> list[str]:
        p = InferenceConfig.problems(self)
        if self.engine not in ENGINES:
            p.append(f"--engine must be one of {', '.join(ENGINES)}, got '{self.engine}'")
        return p


@dataclass(frozen=True)
class ChatConfig(InferenceConfig):
    system: str | None = opt(None, "System message at the start of every conversation.")
