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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import MODEL_REMAPPING

from mlx_lora.errors import UserError
from mlx_lora.model.stops import end_of_turn

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
    vision_type: str | None = None  # the vision_config model_type checked, where the model_type names others too
    # mlx-vlm's merge of image features reads its batch as one row (LLaVA's places them by the image
    # tokens' columns, for a batch of 1): a batch goes to it laid end to end
    merges_one_row: bool = False
    # Phi-3-vision's scheme: its template reads string contents only, so an image is written into the
    # text as image_token.format(N) (N counted over the conversation from 1), which its processor
    # turns into a run of N's negative id; no placeholder token
    numbered: bool = False

    def _renamed(self, path: str, src: int, dst: int) -> str | None:
        """`path` from spelling `src` (0 ours, 1 checkpoint, 2 transformers) to `dst`, by its longest prefix."""
        triples = [(self.ours, self.checkpoint, self.transformers), *self.tower]
        found = sorted((t for t in triples if path.startswith(t[src])), key=lambda t: -len(t[src]))
        return found[0][dst] + path[len(found[0][src]) :] if found else None

    def checked(self, config: dict[str, Any]) -> bool:
        """Whether `config` is the checked form of this architecture (its vision tower's, where that varies)."""
        vision = config.get("vision_config")
        given = vision.get("model_type", self.vision_type) if isinstance(vision, dict) else None
        return self.vision_type is None or given == self.vision_type

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

    @property
    def images_as_text(self) -> Callable[[list[dict]], list[dict]] | None:
        """`as_text` where this layout writes its images into the text (numbered), else None."""
        return self.as_text if self.numbered else None

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
    # Gemma 3 with vision: the Hub checkpoint (google/gemma-3-4b-it) keeps transformers 4's names
    "gemma3": Layout(
        "language_model.model.",
        "language_model.model.",
        "model.language_model.",
        "<start_of_image>",
        tower=(("vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower."),),  # SigLIP
    ),
    # LLaVA-1.5 (llava-hf): a CLIP tower (transformers' default for a vision_config without a model_type);
    # `llava` also names Pixtral-towered checkpoints, which mlx-lm reads as mistral3's language model
    "llava": Layout(
        "language_model.model.",
        "language_model.model.",
        "model.language_model.",
        "<image>",
        vision_type="clip_vision_model",
        merges_one_row=True,
    ),
    # Phi-3-vision: mlx-vlm's module paths are the Hub checkpoint's names (model.layers.N.self_attn.qkv_proj,
    # model.vision_embed_tokens...). transformers has no class for it (the Hub's Phi3VForCausalLM is
    # remote code, whose module paths are those names too), so a PEFT export names them so.
    "phi3_v": Layout("model.", "model.", "model.", "<|image_{}|>", numbered=True),
}


def is_vision(config: dict[str, Any]) -> bool:
    """A model mlx-vlm builds: a `vision_config`, and an architecture checked here (LAYOUTS, in its
    checked form: LLaVA with a CLIP tower) or one mlx-lm has no text model for. A multimodal checkpoint
    mlx-lm reads as its language model alone (Mistral 3, Pixtral, LLaVA with a Pixtral tower) keeps
    loading that way: text fine-tuning of it is unchanged; so does a Gemma 3 without a `vision_config`
    (gemma3_text, or text-only). Phi-3-vision's config.json names its tower `img_processor` (mlx-vlm
    adds the `vision_config`)."""
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


def template_messages(config: dict[str, Any], messages: list[dict]) -> list[dict]:
    """`messages` as the base's chat template reads them (Layout.as_text for a numbered layout)."""
    spell = LAYOUTS.get(config.get("model_type"))
    as_text = spell.images_as_text if spell is not None else None
    return as_text(messages) if as_text else messages


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
    if (fixed := merge_width(config)) is not config:
        model.config.hidden_size = fixed[TEXT_WIDTH]  # this model's own config object, read by its merge
    stop_at_end_of_turn(processor)
    return model, processor


def refuse_feature_token(where: str, text: str, config: dict[str, Any], processor) -> None:
    """One line for a prompt (already in the chat template) holding the token a checked model's processor
    writes for an image's features where that is not the template's placeholder (Gemma 3's
    <image_soft_token> for <start_of_image>): the model would meet more image tokens than features, on
    which mlx-vlm stops with a shape error. data/vision.py refuses such a row."""
    spell = LAYOUTS.get(config.get("model_type"))
    token = getattr(processor, "image_token", None)
    if spell is not None and isinstance(token, str) and token != spell.image_token and token in text:
        raise UserError(f"{where} holds {token!r}, the token this model reads an image's features into; leave it out")


def stop_at_end_of_turn(processor) -> None:
    """mlx-vlm's generation stops on config.json's `eos_token_id` alone; the chat template's end of turn
    (Gemma 3's <end_of_turn>, where a config lists only <eos>) joins them, as model/stops.py does for
    a text model's tokenizer."""
    tokenizer = getattr(processor, "tokenizer", processor)  # mlx-vlm: its tokenizer, else the processor
    criteria, eot = getattr(tokenizer, "stopping_criteria", None), end_of_turn(tokenizer)
    if criteria is not None and eot is not None and eot not in criteria.eos_token_ids:
        criteria.add_eos_token_ids(eot)


TEXT_WIDTH = "hidden_size"


def merge_width(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as mlx-vlm must read it to merge images at the right scale. mlx-vlm's Gemma 3 divides
    the image features by the square root of the top-level `hidden_size` (its default 2048: the Hub's
    config.json has none) before its language model multiplies every embedding by that of the text
    width, so that, as in transformers, only the text embeddings end up scaled: the text width is put
    at the top where it is missing."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    if config.get("model_type") != "gemma3" or TEXT_WIDTH in config or TEXT_WIDTH not in text:
        return config
    return {**config, TEXT_WIDTH: text[TEXT_WIDTH]}


def forward(model: nn.Module, inputs: dict[str, Any]) -> Any:
    """(B, T, V) logits of a processor's inputs as mlx-vlm's generation computes them: the merged embeddings,
    then the language model on them with what the merge returned (Qwen2-VL's 3-D positions). Not the
    model's own __call__: mlx-vlm 0.7.10's Gemma 3 hands its language model the padding mask as the
    attention mask, so every token would see every other."""
    ids, rest = inputs["input_ids"], {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values")}
    mask = rest.pop("attention_mask", None)
    found = model.get_input_embeddings(
        ids, inputs.get("pixel_values"), mask=mx.ones(ids.shape) if mask is None else mask, **rest
    )
    merged = {k: v for k, v in found.to_dict().items() if k != "inputs_embeds" and v is not None}
    return model.language_model(ids, inputs_embeds=found.inputs_embeds, **(rest | merged)).logits


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}  # the text loader reports a broken config.json as it always has
    return config if isinstance(config, dict) else {}
