"""A vision-language base through mlx-vlm (the optional extra `mlx-lora[vision]`).

A directory whose config.json holds a `vision_config` is a vision-language model: mlx-vlm builds
it (vision tower, projector, language model) and its own processor reads the images. LoRA goes on
the language model's blocks, which mlx-vlm's models expose as `model.layers` as mlx-lm's do, so
model/lora.py chooses and wraps them unchanged. Each architecture listed in LAYOUTS has been
checked against transformers (tests/model/test_vision.py); others load but are refused for training.
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


LANGUAGE_MODEL = "language_model."  # where mlx-vlm keeps a vision-language model's text model
TRANSFORMERS_BASE = "model."  # transformers 5 holds every part of a *ForConditionalGeneration but its head here


@dataclass(frozen=True)
class Layout:
    """Where one architecture's weights live, under three spellings: mlx-vlm's module paths, the Hub
    checkpoint's tensor names, transformers 5's module paths (PEFT's keys). The first three fields
    name the language model. The vision tower's and projector's parts, which a `--targets` regex may
    reach (model/lora.py), keep their names under mlx-vlm and transformers 5 but for the latter's
    `model.` (Idefics3's `vision_model.`, `connector.`), unless `tower` says how mlx-vlm renamed one
    (Qwen-VL's `visual.` is its `vision_tower.`)."""

    ours: str
    checkpoint: str
    transformers: str
    image_token: str  # the placeholder its chat template writes for one image, which its processor expands
    tower: tuple[tuple[str, str, str], ...] = ()  # (ours, checkpoint, transformers) prefixes mlx-vlm renamed

    def _renamed(self, path: str, src: int, dst: int) -> str | None:
        """`path` from spelling `src` (0 ours, 1 checkpoint, 2 transformers) to `dst`, by its longest prefix."""
        triples = [(self.ours, self.checkpoint, self.transformers), *self.tower]
        found = sorted((t for t in triples if path.startswith(t[src])), key=lambda t: -len(t[src]))
        return found[0][dst] + path[len(found[0][src]) :] if found else None

    def to_transformers(self, path: str) -> str:
        renamed = self._renamed(path, 0, 2)
        if renamed is None and not path.startswith(LANGUAGE_MODEL):  # a part of the tower or projector
            renamed = TRANSFORMERS_BASE + path
        if renamed is None:
            raise UserError(
                f"{path}: no transformers name for this module of the vision-language model (model/vision.py: "
                "LAYOUTS); LoRA there has no PEFT form here yet"
            )
        return renamed

    def from_transformers(self, path: str) -> str:
        renamed = self._renamed(path, 2, 0)
        if renamed is None and path.startswith(TRANSFORMERS_BASE) and not path.startswith(self.ours):
            return path[len(TRANSFORMERS_BASE) :]  # a part of the tower or projector; our own paths pass as they are
        return renamed or path

    def checkpoint_as_transformers(self, name: str) -> str:
        """A Hub checkpoint's tensor name as transformers 5 names the module."""
        renamed = self._renamed(name, 1, 2)
        if renamed is None and not name.startswith((TRANSFORMERS_BASE, "lm_head.")):
            return TRANSFORMERS_BASE + name
        return renamed or name

    def spellings(self, path: str) -> list[str]:
        """The names one of our module paths may have in the Hub checkpoint and in transformers."""
        if self._renamed(path, 0, 0) is not None:
            return [self._renamed(path, 0, 1), self._renamed(path, 0, 2)]
        return [path, TRANSFORMERS_BASE + path] if not path.startswith(LANGUAGE_MODEL) else []


QWEN_VL = Layout(
    "language_model.model.",
    "model.",
    "model.language_model.",
    "<|image_pad|>",
    tower=(("vision_tower.", "visual.", "model.visual."),),
)
LAYOUTS = {
    "qwen2_vl": QWEN_VL,
    "qwen2_5_vl": QWEN_VL,
    "idefics3": Layout("language_model.", "model.text_model.", "model.text_model.", "<image>"),  # SmolVLM
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
