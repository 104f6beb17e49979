"""A vision-language base through mlx-vlm (the optional extra `mlx-lora[vision]`).

A directory whose config.json holds a `vision_config` is a vision-language model: mlx-vlm builds
it (vision tower, projector, language model) and its own processor reads the images. LoRA goes on
the language model's blocks, which mlx-vlm's models expose as `model.layers` as mlx-lm's do, so
model/lora.py chooses and wraps them unchanged. Each architecture listed in LAYOUTS has been
checked against transformers (tests/model/test_vision.py), Phi-3-vision, which transformers has no
class for, against mlx-vlm (tests/training/test_phi3_v.py); others load but are refused for training.
"""

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx_lm.utils import MODEL_REMAPPING

from mlx_lora.errors import UserError

VISION_HINT = 'pip install "mlx-lora[vision]"'
VISION_CONFIG_KEYS = ("vision_config", "img_processor")  # img_processor: Phi-3-vision's Hub config.json


@dataclass(frozen=True)
class Layout:
    """Where one architecture's language-model weights live, under three spellings: mlx-vlm's
    module paths, the Hub checkpoint's tensor names, transformers 5's module paths (PEFT's keys)."""

    ours: str
    checkpoint: str
    transformers: str
    image_token: str  # the placeholder its chat template writes for one image, which its processor expands
    # Phi-3-vision's scheme: its template reads string contents only, so an image is written into the
    # text as image_token.format(N) (N counted over the conversation from 1), which its processor
    # turns into a run of N's negative id; no placeholder token
    numbered: bool = False

    def to_transformers(self, path: str) -> str:
        if not path.startswith(self.ours):
            raise UserError(f"{path}: LoRA outside the language model's blocks has no PEFT form here yet")
        return self.transformers + path[len(self.ours) :]

    def from_transformers(self, path: str) -> str:
        return self.ours + path[len(self.transformers) :] if path.startswith(self.transformers) else path

    def checkpoint_as_transformers(self, name: str) -> str:
        """A Hub checkpoint's tensor name as transformers 5 names the module (its vision tower's left as is)."""
        return self.transformers + name[len(self.checkpoint) :] if name.startswith(self.checkpoint) else name

    def as_text(self, messages: list[dict]) -> list[dict]:
        """A numbered layout's messages: each content list as one string, its images as numbered
        tags, each on a line before what follows (the Phi-3-vision model card's prompt)."""
        out, count = [], 0
        for m in messages:
            content = m.get("content")
            if not isinstance(content, list):
                out.append(m)
                continue
            text = []
            for part in content:
                count += part.get("type") != "text"
                text.append(part["text"] if part.get("type") == "text" else self.image_token.format(count) + "\n")
            out.append({**m, "content": "".join(text)})
        return out


QWEN_VL = Layout("language_model.model.", "model.", "model.language_model.", "<|image_pad|>")
LAYOUTS = {
    "qwen2_vl": QWEN_VL,
    "qwen2_5_vl": QWEN_VL,
    "idefics3": Layout("language_model.", "model.text_model.", "model.text_model.", "<image>"),  # SmolVLM
    # Phi-3-vision: mlx-vlm's module paths are the Hub checkpoint's names (model.layers.N.self_attn.qkv_proj,
    # model.vision_embed_tokens...). transformers has no class for it (the Hub's Phi3VForCausalLM is
    # remote code, whose module paths are those names too), so a PEFT export names them so.
    "phi3_v": Layout("model.", "model.", "model.", "<|image_{}|>", numbered=True),
}


def is_vision(config: dict[str, Any]) -> bool:
    """A model mlx-vlm builds: a `vision_config`, and an architecture checked here (LAYOUTS) or one
    mlx-lm has no text model for. A multimodal checkpoint mlx-lm reads as its language model alone
    (Gemma 3, Mistral 3, Pixtral) keeps loading that way: text fine-tuning of it is unchanged.
    Phi-3-vision's config.json names its tower `img_processor` (mlx-vlm adds the `vision_config`)."""
    if not any(isinstance(config.get(key), dict) for key in VISION_CONFIG_KEYS):
        return False
    kind = str(config.get("model_type", ""))
    text_model = f"mlx_lm.models.{MODEL_REMAPPING.get(kind, kind)}"
    return kind in LAYOUTS or not kind.isidentifier() or importlib.util.find_spec(text_model) is None


def layout(config: dict[str, Any], what: str) -> Layout:
    """The checked layout of a vision-language base, or one line saying which architectures `what` supports."""
    kind = config.get("model_type")
    if kind not in LAYOUTS:
        raise UserError(
            f"{what} on a vision-language model supports {', '.join(sorted(LAYOUTS))} so far, not {kind!r}; "
            "see docs/vision.md"
        )
    return LAYOUTS[kind]


def template_messages(config: dict[str, Any], messages: list[dict]) -> list[dict]:
    """`messages` as the base's chat template reads them (Layout.as_text for a numbered layout)."""
    spell = LAYOUTS.get(config.get("model_type"))
    return spell.as_text(messages) if spell is not None and spell.numbered else messages


def require_text(base, what: str) -> None:
    """`what` is not built for a vision-language base yet: one line, before any work."""
    if getattr(base, "processor", None) is not None:
        raise UserError(
            f"{what} on a vision-language model ({base.name}) is not built yet; train, eval, chat, serve and "
            "generate --image are (docs/vision.md)"
        )


def _mlx_vlm():
    try:
        from mlx_vlm import utils
    except ImportError:
        return None
    return utils


def load_vision(path: Path, config: dict[str, Any], lazy: bool) -> tuple[nn.Module, Any]:
    """(mlx-vlm's model, the model's own processor) of a vision-language directory."""
    utils = _mlx_vlm()
    if utils is None:
        raise UserError(
            f"--model {path}: a vision-language model ({config.get('model_type')}), which loads through "
            f"mlx-vlm: {VISION_HINT}"
        )
    try:
        model = utils.load_model(path, lazy=lazy)
        processor = utils.load_processor(path, eos_token_ids=config.get("eos_token_id"))
    except (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, RuntimeError) as e:
        raise UserError(f"--model {path}: mlx-vlm cannot load it ({e}); point --model at a complete model") from None
    return model, processor


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # the text loader reports a broken config.json as it always has
    return config if isinstance(config, dict) else {}
