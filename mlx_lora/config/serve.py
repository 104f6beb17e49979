"""What `serve` takes: the base, its adapters by name, where to listen and the limits a request meets."""

import os
import re
from dataclasses import dataclass
from pathlib import Path

from mlx_lora.config.fields import opt
from mlx_lora.config.precision import PrecisionConfig

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BASE_ID = "base"  # the model id that asks for the base without an adapter
API_KEY_ENV = "MLX_LORA_API_KEY"  # the API key where a process list does not show it


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """'name=path' -> (name, path); ValueError with the fix otherwise."""
    name, sep, path = spec.partition("=")
    if not sep or not path:
        raise ValueError(f"--adapter {spec!r}: write NAME=DIR, e.g. --adapter math=adapters/math")
    if not ADAPTER_NAME.fullmatch(name) or name == BASE_ID:
        raise ValueError(
            f"--adapter {spec!r}: the name must be letters, digits, '.', '_' or '-' (at most 64) and not '{BASE_ID}'"
        )
    return name, path


@dataclass(frozen=True)
class ServeConfig(PrecisionConfig):
    model: str | None = opt(None, "Base model (default: the one the first adapter names, else the shipped model).")
    adapter: list[str] | None = opt(
        None, "An adapter to serve as NAME=DIR; repeat it for several. A request's `model` picks one by NAME."
    )
    host: str = opt("127.0.0.1", "Address to listen on; anything but loopback exposes the server to your network.")
    port: int = opt(8080, "Port to listen on.")
    api_key: str | None = opt(
        None,
        f"Require `Authorization: Bearer KEY` on every route but /health. Every user of the machine sees a flag"
        f" in the process list: set the environment variable {API_KEY_ENV} instead (the flag wins if both are set).",
    )
    max_batch: int = opt(16, "Most requests decoded together in one batch (rows of the batch may use any adapter).")
    max_tokens: int = opt(512, "Most tokens a request may ask for; also what a request that names none gets.")
    max_prompt_tokens: int | None = opt(
        None,
        "Longest prompt accepted, in tokens (after the chat template); default and most: the model's context length.",
    )
    prefill_step: int = opt(
        256,
        "Prompt tokens read per row in one step; between steps new requests join and cancelled ones leave, so a"
        " long prompt holds the others up for one step at most.",
    )
    max_body_bytes: int = opt(1_000_000, "Largest request body accepted, in bytes.")
    max_requests: int = opt(256, "Most requests open at once (decoding or waiting for a row); more get 429.")
    allow_adapter_loading: bool = opt(
        False, "Allow POST /v1/adapters and DELETE /v1/adapters/NAME (only for directories under --adapter-root)."
    )
    adapter_root: str | None = opt(None, "The directory under which runtime-loaded adapters must lie.")

    def problems(self) -> list[str]:
        p = PrecisionConfig.problems(self)
        for spec in self.adapter or []:
            try:
                parse_adapter_spec(spec)
            except ValueError as e:
                p.append(str(e))
        names = [spec.partition("=")[0] for spec in self.adapter or []]
        p += [f"--adapter: the name '{n}' is given twice" for n in sorted({n for n in names if names.count(n) > 1})]
        if not 0 <= self.port <= 65535:
            p.append(f"--port must be in 0..65535, got {self.port}")
        for name in ("max_batch", "max_tokens", "max_prompt_tokens", "prefill_step", "max_body_bytes", "max_requests"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                p.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.allow_adapter_loading and not self.adapter_root:
            p.append("--allow-adapter-loading needs --adapter-root DIR: the only place adapters may be loaded from")
        if self.adapter_root and not Path(self.adapter_root).is_dir():
            p.append(f"--adapter-root {self.adapter_root}: no such directory")
        if self.api_key is not None and not self.api_key.strip():
            p.append("--api-key is empty; give a key or leave the option out")
        if self.api_key is None and API_KEY_ENV in os.environ and not os.environ[API_KEY_ENV].strip():
            p.append(f"the environment variable {API_KEY_ENV} is empty; give a key or unset it")
        return p

    @property
    def key(self) -> str | None:
        """The API key: --api-key, else the environment's MLX_LORA_API_KEY, else None (no key asked)."""
        return self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV) or None
