"""A vision-language base loads through mlx-vlm and computes what transformers computes."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import fp32_tol, write_shapes
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base
from mlx_lora.model.vision import LAYOUTS, is_vision, layout


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    shapes = write_shapes(tmp_path_factory.mktemp("shapes"), {"train": 1})
    return Image.open(shapes / "imgs" / "0000.png").convert("RGB")


def inputs(base, image) -> dict[str, np.ndarray]:
    """One prompt holding `image`, as the model's own processor makes it (its placeholder expanded)."""
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour?<|im_end|>\n"
    out = base.processor(text=[text], images=[image], add_special_tokens=False)
    return {k: np.asarray(out[k]) for k in ("input_ids", "pixel_values", "image_grid_thw")}


def transformers_logits(model_dir, x) -> np.ndarray:
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    image_token = json.loads((model_dir / "config.json").read_text())["image_token_id"]
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(x["input_ids"]),
            pixel_values=torch.tensor(x["pixel_values"]),
            image_grid_thw=torch.tensor(x["image_grid_thw"]),
            mm_token_type_ids=torch.tensor((x["input_ids"] == image_token).astype(np.int64)),
        ).logits.numpy()


def test_vision_model_loads_through_mlx_vlm_with_its_processor(qwen2_vl, image):
    base = load_base(str(qwen2_vl))
    assert base.processor is not None and type(base.model).__module__ == "mlx_vlm.models.qwen2_vl.qwen2_vl"
    assert len(base.model.layers) == 2  # the language model's blocks, where LoRA goes
    x = inputs(base, image)
    # a 56x56 image: 4x4 patches of 14 pixels, merged 2x2 into 4 tokens
    assert x["image_grid_thw"].tolist() == [[1, 4, 4]] and (x["input_ids"] == 104).sum() == 4
    # the processor's pixels are transformers' own image processor's (both float32 over the same resize)
    theirs = Qwen2VLImageProcessorPil.from_pretrained(qwen2_vl)(images=[image], return_tensors="np")
    np.testing.assert_allclose(x["pixel_values"], theirs["pixel_values"], atol=fp32_tol(3 * 14 * 14), rtol=0)


def test_logits_with_an_image_equal_transformers(qwen2_vl, image):
    base = load_base(str(qwen2_vl))
    x = inputs(base, image)
    ours = base.model(
        mx.array(x["input_ids"]), mx.array(x["pixel_values"]), image_grid_thw=mx.array(x["image_grid_thw"])
    ).logits
    want = transformers_logits(qwen2_vl, x)
    # fp32 through other kernels: the longest sums are the 2 blocks' 128-wide MLPs (and the vision
    # tower's, shorter), so the two agree to n·EPS of the logits' size with n = 2 · 128
    assert np.abs(np.array(ours) - want).max() <= fp32_tol(2 * 128) * np.abs(want).max()


def test_only_checked_architectures_train(qwen2_vl):
    assert layout({"model_type": "qwen2_vl"}, "training") is LAYOUTS["qwen2_vl"]
    with pytest.raises(UserError, match="supports qwen2_vl so far, not 'llava'"):
        layout({"model_type": "llava", "vision_config": {}}, "training")


@pytest.mark.parametrize(
    "config, vision",
    [
        ({"model_type": "qwen2_vl", "vision_config": {}}, True),  # checked here: mlx-vlm
        ({"model_type": "idefics3", "vision_config": {}}, True),  # no text model in mlx-lm: mlx-vlm (refused to train)
        ({"model_type": "phi3_v", "vision_config": {}}, True),
        ({"model_type": "llava", "vision_config": {}}, False),  # mlx-lm reads it as mistral3
        ({"model_type": "gemma3", "vision_config": {}}, False),  # mlx-lm reads its language model, as before
        ({"model_type": "mistral3", "vision_config": {}}, False),
        ({"model_type": "qwen2"}, False),
    ],
)
def test_a_multimodal_checkpoint_mlx_lm_reads_stays_a_text_base(config, vision):
    assert is_vision(config) is vision
