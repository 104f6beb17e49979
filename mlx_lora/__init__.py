"""mlx-lora: LoRA fine-tuning on MLX that travels to mlx-lm, transformers/PEFT and llama.cpp."""

from mlx_lora import blas

blas.enable()  # must run before anything imports mlx.core; see blas.py

__version__ = "0.1.0"
