"""A vision-language base loads through mlx-vlm and computes what transformers computes."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from conftest import VLM_TERMS, fp32_tol, write_shapes
from PIL import Image
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base
from mlx_lora.model.vision import LAYOUTS, is_vision, layout


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    shapes = write_shapes(tmp_path_factory.mktemp("shapes"), {"train": 1}, size=56)
    return Image.open(shapes / "imgs" / "0000.png").convert("RGB")


QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
PROMPTS = {  # a user turn holding one image, as each chat template writes it
    "qwen2_vl": QWEN_PROMPT,
    "qwen2_5_vl": QWEN_PROMPT,
    "idefics3": "<|im_start|>User:<image>What colour?<end_of_utterance>\n",
}
PIXELS = {  # transformers' own image processor of each, and what it makes of one 56x56 image
    # 4x4 patches of 14 pixels, merged 2x2 into 4 tokens
    "qwen2_vl": (Qwen2VLImageProcessorPil, {"image_grid_thw": [[1, 4, 4]]}, 4),
    "qwen2_5_vl": (Qwen2VLImageProcessorPil, {"image_grid_thw": [[1, 4, 4]]}, 4),
    # resized to 112 pixels and cut into 2x2 tiles of 56, plus the whole image: 5 tiles of 4 tokens
    "idefics3": (Idefics3ImageProcessorPil, {"pixel_attention_mask": np.ones((1, 5, 56, 56), int).tolist()}, 20),
}


def inputs(base, image) -> dict[str, np.ndarray]:
    """One prompt holding `image`, as the model's own processor makes it (its placeholder expanded)."""
    out = base.processor(text=[PROMPTS[base.config["model_type"]]], images=[image], add_special_tokens=False)
    return {k: np.asarray(v) for k, v in out.items() if k != "attention_mask"}


def transformers_logits(model_dir, x) -> np.ndarray:
    config = json.loads((model_dir / "config.json").read_text())
    model_class = getattr(transformers, config["architectures"][0])  # Qwen2VLForConditionalGeneration, ...
    model = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
    given = {k: torch.tensor(v) for k, v in x.items()}
    if "image_grid_thw" in x:  # Qwen-VL's: which tokens are the image's, for its 3-D positions
        given["mm_token_type_ids"] = torch.tensor((x["input_ids"] == config["image_token_id"]).astype(np.int64))
    with torch.no_grad():
        return model(**given).logits.numpy()


def test_vision_model_loads_through_mlx_vlm_with_its_processor(vlm, image):
    base = load_base(str(vlm))
    kind = base.config["model_type"]
    assert base.processor is not None and type(base.model).__module__ == f"mlx_vlm.models.{kind}.{kind}"
    assert len(base.model.layers) == 2  # the language model's blocks, where LoRA goes
    x = inputs(base, image)
    processor, shapes, image_tokens = PIXELS[kind]
    assert all(x[k].tolist() == v for k, v in shapes.items())
    assert (x["input_ids"] == base.config["image_token_id"]).sum() == image_tokens
    # the processor's pixels are transformers' own image processor's (both float32 over the same resize)
    theirs = processor.from_pretrained(vlm)(images=[image], return_tensors="np")
    np.testing.assert_allclose(x["pixel_values"], theirs["pixel_values"], atol=fp32_tol(3 * 14 * 14), rtol=0)


def test_logits_with_an_image_equal_transformers(vlm, image):
    base = load_base(str(vlm))
    x = inputs(base, image)
    ours = base.model(mx.array(x["input_ids"]), **{k: mx.array(v) for k, v in x.items() if k != "input_ids"}).logits
    want = transformers_logits(vlm, x)
    # fp32 through other kernels: n·EPS of the logits' size, n the terms of the longest sums on the
    # way (conftest's VLM_TERMS: the 2 blocks' 128-wide MLPs; Idefics3's patch sums besides)
    tol = fp32_tol(VLM_TERMS[base.config["model_type"]])
    assert np.abs(np.array(ours) - want).max() <= tol * np.abs(want).max()


def test_only_checked_architectures_train():
    assert layout({"model_type": "qwen2_vl"}, "training") is LAYOUTS["qwen2_vl"]
    assert layout({"model_type": "qwen2_5_vl"}, "training") is LAYOUTS["qwen2_5_vl"]
    assert layout({"model_type": "idefics3"}, "training") is LAYOUTS["idefics3"]
    assert layout({"model_type": "phi3_v"}, "training") is LAYOUTS["phi3_v"]  # checked against mlx-vlm (test_phi3_v.py)
    with pytest.raises(UserError, match="supports idefics3, phi3_v, qwen2_5_vl, qwen2_vl so far, not 'llava'"):
        layout({"model_type": "llava", "vision_config": {}}, "training")


@pytest.mark.parametrize(
    "config, vision",
    [
        ({"model_type": "qwen2_vl", "vision_config": {}}, True),  # checked here: mlx-vlm
        ({"model_type": "qwen2_5_vl", "vision_config": {}}, True),  # checked here (mlx-lm would read its text alone)
        ({"model_type": "idefics3", "vision_config": {}}, True),  # checked here (SmolVLM)
        ({"model_type": "phi3_v", "vision_config": {}}, True),
        ({"model_type": "phi3_v", "img_processor": {"image_dim_out": 1024}}, True),  # Phi-3-vision's Hub config
        ({"model_type": "llava", "vision_config": {}}, False),  # mlx-lm reads it as mistral3
        ({"model_type": "gemma3", "vision_config": {}}, False),  # mlx-lm reads its language model, as before
        ({"model_type": "mistral3", "vision_config": {}}, False),
        ({"model_type": "qwen2"}, False),
    ],
)
def test_a_multimodal_checkpoint_mlx_lm_reads_stays_a_text_base(config, vision):
    assert is_vision(config) is vision
