"""`mlx-lora fuse` on a vision-language base: the base's own checkpoint with the adapted weights merged.

mlx-vlm renames and reshapes a checkpoint's tensors as it loads them (its `sanitize`), and
transformers reads the Hub's names, so the fused directory keeps the base's layout: each shard
rewritten under its own name with every adapted projection's weight merged (shard_fuse.write_shards,
LoRALinear.fuse), every other file (config, processor, tokenizer, chat template) copied. It loads
wherever the base loads: mlx-vlm, and transformers' *ForConditionalGeneration for a Hub-layout base.
The check runs the fused model, read back through mlx-vlm, on an image and a question.
"""

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_lora.config import FuseConfig
from mlx_lora.errors import UserError
from mlx_lora.inference.generation import chat_text
from mlx_lora.model.base import Base
from mlx_lora.model.lora import lora_layers
from mlx_lora.model.vision import layout

CHECK_QUESTION = "What colour is the square?"
CHECK_SIDE = 56  # pixels: two of Qwen2-VL's 28-pixel merged patches, one of Idefics3's 56-pixel tiles


def refusals(cfg: FuseConfig, config: dict[str, Any]) -> list[str]:
    """What fuse does not build for a vision-language base, every problem at once."""
    name = config.get("model_type")
    problems = []
    try:
        layout(config, "fuse")
    except UserError as e:
        problems.append(str(e))
    if cfg.export_gguf:
        problems.append(
            f"--export-gguf: not built for a vision-language model ({name}); llama.cpp reads one as two files "
            "(the language model and an mmproj vision file); fuse without it"
        )
    if cfg.requantize:
        problems.append("--requantize: a vision-language model is fused in full precision only; drop it")
    if "quantization" in config or "quantization_config" in config:
        problems.append(
            f"fuse on a quantized vision-language model ({name}) is not built yet: its checkpoint is in MLX's "
            "quantized form, which transformers does not read; give its full-precision base with --model"
        )
    return problems


def tensor_names(base: Base, where: dict[str, str]) -> dict[str, str]:
    """Each adapted layer's module path (mlx-vlm's) -> its weight's name in the base's checkpoint: the
    Hub's spelling, transformers 5's, or mlx-vlm's own (a checkpoint mlx-vlm converted)."""
    spell = layout(base.config, "fuse")
    names = {}
    for path in lora_layers(base.model):
        tail = path[len(spell.ours) :] if path.startswith(spell.ours) else None
        spellings = [spell.checkpoint + tail, spell.transformers + tail] if tail is not None else []
        found = [n + ".weight" for n in [*spellings, path] if n + ".weight" in where]
        if not found:
            raise UserError(
                f"--model {base.path}: its checkpoint has no tensor for {path}.weight "
                f"(looked for {', '.join(n + '.weight' for n in [*spellings, path])}); fuse needs the base's own files"
            )
        names[path] = found[0]
    return names


def check_inputs(base: Base) -> dict[str, mx.array]:
    """A drawn image (a red square on grey) and CHECK_QUESTION as one user turn, read by the model's
    own processor as mlx-vlm's generation reads a prompt."""
    from mlx_vlm.utils import prepare_inputs
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (CHECK_SIDE, CHECK_SIDE), (200, 200, 200))
    ImageDraw.Draw(image).rectangle([10, 14, 37, 41], fill=(220, 40, 40))
    text = chat_text(base, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CHECK_QUESTION}]}])
    index = getattr(base.model.config, "image_token_index", None)
    return prepare_inputs(base.processor, images=[image], prompts=[text], image_token_index=index)


def vision_logits(model: nn.Module, inputs: dict[str, mx.array]) -> mx.array:
    """(T, V) float32 logits of the check inputs, computed as mlx-vlm's generation computes them: the
    merged embeddings, then the language model on them with what the merge gave (Qwen2-VL's positions).
    Phi-3-vision's model would read an attention mask given to its whole call as an additive one."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
    found = model.get_input_embeddings(ids, inputs.get("pixel_values"), mask=mask, **rest)
    extra = {k: v for k, v in found.to_dict().items() if k != "inputs_embeds" and v is not None}
    return model.language_model(ids, inputs_embeds=found.inputs_embeds, **extra).logits[0].astype(mx.float32)
