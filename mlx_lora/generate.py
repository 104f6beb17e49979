"""Run a base model, with or without an adapter, through mlx-lm's own streaming generation."""

from pathlib import Path
from typing import Iterator, Optional

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from .adapters import load_adapter, read_config
from .config import GenerateConfig
from .models import Base, load_base


def load_for_inference(model: Optional[str], adapter_path: Optional[str]) -> Base:
    """The base the adapter names (unless `model` overrides it), with the adapter applied."""
    recorded = read_config(Path(adapter_path)).base_model if adapter_path else None
    base = load_base(model or recorded)
    if adapter_path:
        load_adapter(base, Path(adapter_path))
    base.model.eval()
    return base


def prompt_tokens(base: Base, prompt: str, chat: bool) -> list[int]:
    tokenizer = base.tokenizer
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(prompt)


def generate(base: Base, cfg: GenerateConfig) -> Iterator[str]:
    """Yield text pieces as mlx-lm produces them."""
    mx.random.seed(cfg.seed)
    sampler = make_sampler(temp=cfg.temp, top_p=cfg.top_p)
    tokens = prompt_tokens(base, cfg.prompt, cfg.chat)
    for response in stream_generate(base.model, base.tokenizer, tokens, max_tokens=cfg.max_tokens, sampler=sampler):
        yield response.text
