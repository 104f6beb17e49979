"""llama.cpp (llama-cpp-python) as `generate`'s decoder for a GGUF base on the CPU.

MLX's CPU backend decodes one token at a time at ~0.15x llama.cpp's speed on the same Q4_1 file
(bench/RESULTS.md, "Decoding"): it has no multi-threaded quantized matrix-vector kernel, and the
weights kept de-quantized for it (cpu_kernels) are 4-8x the bytes a token reads. llama.cpp has that
kernel. `--engine llama.cpp` decodes there: a GGUF base, MLX on the CPU, the CPU paths not switched
off (MLX_LORA_CPU_KERNELS=off), llama-cpp-python installed, at most one adapter, unweighted, which
goes as the LoRA GGUF `convert --to gguf` writes. The prompt's tokens, the stop tokens and the
text are ours, as on MLX. It is not the default: llama.cpp rounds activations to 8 bits for a
quantized file's matmuls, so its greedy text can part from MLX's where two tokens' logits are
closer than that rounding (README: the shipped model's "7. ####" becomes "7.3."); on a float32
file the two agree to fp32 rounding.
"""

import importlib.util
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import GenerationResponse

from mlx_lora.config import GenerateConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.gguf import GGUF_ADAPTER_FILE
from mlx_lora.formats.loader import Weights, read_adapter
from mlx_lora.formats.native import AdapterConfig
from mlx_lora.formats.registry import export, format_named
from mlx_lora.inference.adapter_set import parse_adapters
from mlx_lora.inference.generation import prompt_tokens
from mlx_lora.model import kernel_choice
from mlx_lora.model.base import load_base
from mlx_lora.model.gguf import GGUF_SUFFIX

INSTALL_HINT = "pip install llama-cpp-python, which compiles llama.cpp (a C compiler and cmake, ~15 min)"


def why_not(cfg: GenerateConfig, base: str | None, adapters: list[tuple[str, float | None]]) -> str | None:
    """Why llama.cpp cannot decode this run (`adapters` as adapter_set.parse_adapters gives them);
    None if it can."""
    if cfg.image:
        return "--image needs a vision-language base, which llama.cpp is not given"
    if mx.default_device() != mx.cpu:
        return "MLX computes on the GPU here"
    if kernel_choice.mode() == "off":
        return f"{kernel_choice.ENV}=off keeps every CPU-only path off"
    if base is None or not str(base).endswith(GGUF_SUFFIX):
        return "the base is not a .gguf file"
    if len(adapters) > 1 or any(weight is not None for _, weight in adapters):
        return "llama.cpp takes one adapter, unweighted"
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed: {INSTALL_HINT}"
    return None


def open_engine(cfg: GenerateConfig) -> "CppEngine | None":
    """The llama.cpp engine `--engine llama.cpp` asks for (one line saying why where it cannot), or
    None for MLX. The adapter is read once, for its base and its LoRA GGUF."""
    if cfg.engine != "llama.cpp":
        return None
    specs = parse_adapters(cfg.adapter_path or [], cfg.adapter_weights)
    adapter = (*read_adapter(Path(specs[0][0])), Path(specs[0][0])) if specs else None
    base = cfg.model or (adapter[0].base_model if adapter else None)
    why = why_not(cfg, base, specs)
    if why is not None:
        raise UserError(f"--engine llama.cpp: {why}; leave --engine out for MLX")
    try:
        return CppEngine(str(base), adapter, cfg.seed)
    except UserError as e:  # an adapter with no LoRA GGUF form (DoRA, a layer llama.cpp lacks)
        raise UserError(f"--engine llama.cpp: {e}") from None


class CppEngine:
    """The GGUF file (and the adapter as a LoRA GGUF) in llama.cpp, one context sized per prompt."""

    def __init__(self, model_path: str, adapter: tuple[AdapterConfig, Weights, Path] | None, seed: int):
        """`adapter`: (its config, its weights, its directory), as read_adapter read them."""
        self.model_path, self.seed, self.llm = model_path, seed, None
        self._dir = tempfile.TemporaryDirectory(prefix="mlx-lora-gguf-")  # gone with the engine
        self.lora = None
        if adapter is not None:
            fmt = format_named("gguf")
            fmt.write(Path(self._dir.name), export(fmt, *adapter, model_path, None))
            self.lora = str(Path(self._dir.name) / GGUF_ADAPTER_FILE)

    def describe(self) -> str:
        with_adapter = " with the adapter as a LoRA GGUF" if self.lora else ""
        return f"decoding with llama.cpp{with_adapter}, {os.cpu_count()} threads"

    def _context(self, tokens: int):
        if self.llm is None or self.llm.n_ctx() < tokens:
            from llama_cpp import Llama

            if self.llm is not None:
                self.llm.close()
            self.llm = Llama(
                self.model_path,
                lora_path=self.lora,
                n_ctx=tokens,
                n_threads=os.cpu_count(),
                seed=self.seed,
                verbose=False,
            )
        return self.llm

    def generate(self, cfg: GenerateConfig) -> Iterator[GenerationResponse]:
        """`generate`'s responses for `cfg.prompt`: MLX reads only the tokenizer, the weights are llama.cpp's."""
        base = load_base(self.model_path, lazy=True)
        return self.stream(base.tokenizer, prompt_tokens(base, cfg.prompt, cfg.chat), cfg)

    def stream(self, tokenizer, tokens: list[int], cfg: GenerateConfig) -> Iterator[GenerationResponse]:
        """mlx-lm's stream_generate, decoded by llama.cpp: a response per token (`.text` the new
        piece), the last with finish_reason "stop" (a stop token, not part of the text) or "length"."""
        llm = self._context(len(tokens) + cfg.max_tokens)
        detokenizer, stops = tokenizer.detokenizer, set(tokenizer.eos_token_ids)
        detokenizer.reset()
        start = time.perf_counter()
        first, n, finish, token = start, 0, None, None
        sampled = llm.generate(tokens, temp=cfg.temp, top_p=cfg.top_p, top_k=0, min_p=0.0, repeat_penalty=1.0)
        for n, token in enumerate(sampled, 1):
            if n == 1:
                first = time.perf_counter()
            if token in stops:
                finish = "stop"
            else:
                detokenizer.add_token(token)
                finish = "length" if n == cfg.max_tokens else None
            if finish:
                break
            yield self._response(detokenizer.last_segment, token, tokens, n, start, first, None)
        detokenizer.finalize()
        yield self._response(detokenizer.last_segment, token, tokens, n, start, first, finish or "length")

    def _response(self, text, token, tokens, n, start, first, finish) -> GenerationResponse:
        now = time.perf_counter()
        return GenerationResponse(
            text=text,
            token=token,
            logprobs=None,
            from_draft=False,
            prompt_tokens=len(tokens),
            prompt_tps=len(tokens) / max(first - start, 1e-9),
            generation_tokens=n,
            generation_tps=(n - 1) / (now - first) if n > 1 else 0.0,
            peak_memory=peak_rss_gb(),
            finish_reason=finish,
        )


def peak_rss_gb() -> float:
    """The process's peak RSS in GB (llama.cpp's memory is not MLX's, which mlx-lm's peak counts)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9
