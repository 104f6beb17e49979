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


@dataclass(frozen=True)
class Layout:
    """Where one architecture's language-model weights live, under three spellings: mlx-vlm's
    module paths, the Hub checkpoint's tensor names, transformers 5's module paths (PEFT's keys)."""

    ours: str
    checkpoint: str
    transformers: str
    image_token: str  # the placeholder its chat template writes for one image, which its processor expands
    tower: str | None = None  # the vision_config model_type checked, where the model_type names others too
    # mlx-vlm's merge of image features reads its batch as one row (LLaVA's places them by the image
    # tokens' columns, for a batch of 1): a batch goes to it laid end to end
    merges_one_row: bool = False

    def checked(self, config: dict[str, Any]) -> bool:
        """Whether `config` is the checked form of this architecture (its vision tower's, where that varies)."""
        vision = config.get("vision_config")
        given = vision.get("model_type", self.tower) if isinstance(vision, dict) else None
        return self.tower is None or given == self.tower

    def to_transformers(self, path: str) -> str:
        if not path.startswith(self.ours):
            raise UserError(f"{path}: LoRA outside the language model's blocks has no PEFT form here yet")
        return self.transformers + path[len(self.ours) :]

    def from_transformers(self, path: str) -> str:
        return self.ours + path[len(self.transformers) :] if path.startswith(self.transformers) else path

    def checkpoint_as_transformers(self, name: str) -> str:
        """A Hub checkpoint's tensor name as transformers 5 names the module (its vision tower's left as is)."""
        return self.transformers + name[len(self.checkpoint) :] if name.startswith(self.checkpoint) else name


QWEN_VL = Layout("language_model.model.", "model.", "model.language_model.", "<|image_pad|>")
LAYOUTS = {
    "qwen2_vl": QWEN_VL,
    "qwen2_5_vl": QWEN_VL,
    "idefics3": Layout("language_model.", "model.text_model.", "model.text_model.", "<image>"),  # SmolVLM
    # LLaVA-1.5 (llava-hf): a CLIP tower (transformers' default for a vision_config without a model_type);
    # `llava` also names Pixtral-towered checkpoints, which mlx-lm reads as mistral3's language model
    "llava": Layout(
        "language_model.model.",
        "language_model.model.",
        "model.language_model.",
        "<image>",
        tower="clip_vision_model",
        merges_one_row=True,
    ),
}


def is_vision(config: dict[str, Any]) -> bool:
    """A model mlx-vlm builds: a `vision_config`, and an architecture checked here (LAYOUTS, in its
    checked form: LLaVA with a CLIP tower) or one mlx-lm has no text model for. A multimodal checkpoint
    mlx-lm reads as its language model alone (Gemma 3, Mistral 3, Pixtral, LLaVA with a Pixtral tower)
    keeps loading that way: text fine-tuning of it is unchanged.
    Phi-3-vision's config.json names its tower `img_processor` (mlx-vlm adds the `vision_config`)."""
    if not any(isinstance(config.get(key), dict) for key in VISION_CONFIG_KEYS):
        return False
    kind = str(config.get("model_type", ""))
    if kind in LAYOUTS and LAYOUTS[kind].checked(config):
        return True
    text_model = f"mlx_lm.models.{MODEL_REMAPPING.get(kind, kind)}"
    return not kind.isidentifier() or importlib.util.find_spec(text_model) is None


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


def llava_processor(theirs):
    """mlx-vlm's LlavaProcessor's parts in transformers' own LlavaProcessor. mlx-vlm 0.7.10's hands every
    keyword to its image processor too (add_special_tokens, padding), which transformers 5's image
    processors refuse, so mlx-vlm's generation and the rows' placeholder expansion would stop there;
    transformers' hands the tokenizer's to the tokenizer alone and expands `<image>` the same way."""
    from transformers import LlavaProcessor

    processor = LlavaProcessor(
        image_processor=theirs.image_processor,
        tokenizer=theirs.tokenizer,  # with mlx-vlm's stopping criteria
        patch_size=theirs.patch_size,
        vision_feature_select_strategy=theirs.vision_feature_select_strategy,
        chat_template=theirs.chat_template,
        image_token=theirs.image_token,
        num_additional_image_tokens=theirs.num_additional_image_tokens,
    )
    processor.detokenizer = theirs.detokenizer
    return processor


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
        if config.get("model_type") == "llava":
            processor = llava_processor(processor)
    except (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, RuntimeError) as e:
        raise UserError(f"--model {path}: mlx-vlm cannot load it ({e}); point --model at a complete model") from None
    return model, processor


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # the text loader reports a broken config.json as it always has
    return config if isinstance(config, dict) else {}
