"""A fused model as one GGUF file that llama.cpp runs: tensors named and laid out the way llama.cpp's
convert_hf_to_gguf.py writes them, and the tokenizer in the form llama.cpp re-implements it."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np

from mlx_lora.errors import UserError
from mlx_lora.formats.gguf_vocab import add_vocab
from mlx_lora.model.gguf import GEMMA3_LOCAL_ROPE, GEMMA3_PATTERN, GEMMA_27B_LAYERS, gemma_query_scalar
from mlx_lora.model.lora import MAGNITUDE, expert_name
from mlx_lora.model.rope import LLAMA3, LLAMA3_DEFAULTS, ROPE_FREQS, ROPE_SCALING_KEY, llama3_factors, rope_type

GGUF_FILE = "model.gguf"
GGUF_ADAPTER_FILE = "adapter.gguf"
QTYPE = gguf.GGMLQuantizationType
# --gguf-type -> (tensor type of the 2-D weights, general.file_type)
WEIGHT_TYPES = {
    "f32": (QTYPE.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QTYPE.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QTYPE.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (QTYPE.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# HF model_type -> llama.cpp architecture, and the rope_theta mlx-lm assumes when config.json has none.
# Mistral and Mixtral are llama to llama.cpp (convert_hf_to_gguf.py's MistralModel, MixtralModel), q/k
# permuted alike. Phi-3's fused qkv_proj and gate_up_proj are llama.cpp's attn_qkv and ffn_up as they
# are (gate rows first). Stacked experts (E, out, in) are llama.cpp's ffn_*_exps as they are.
ARCHITECTURES = {
    "llama": (gguf.MODEL_ARCH.LLAMA, 10000.0),
    "mistral": (gguf.MODEL_ARCH.LLAMA, 10000.0),
    "mixtral": (gguf.MODEL_ARCH.LLAMA, 1000000.0),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, 1000000.0),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, 1000000.0),
    "qwen3_moe": (gguf.MODEL_ARCH.QWEN3MOE, 1000000.0),
    "gemma2": (gguf.MODEL_ARCH.GEMMA2, 10000.0),
    "gemma3_text": (gguf.MODEL_ARCH.GEMMA3, 1000000.0),
    "phi3": (gguf.MODEL_ARCH.PHI3, 10000.0),
    "olmo2": (gguf.MODEL_ARCH.OLMO2, 10000.0),
    "smollm3": (gguf.MODEL_ARCH.SMOLLM3, 10000.0),
}
# llama.cpp rotates adjacent pairs (its rope type NORM) in these; the others rotate halves, as HF does
PAIRWISE_ROPE = (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.SMOLLM3)
SMOLLM3_NO_ROPE_STEP = 4  # llama.cpp's smollm3 leaves rope out of every 4th block, fixed (no key for it)
GEMMA_NAMES = {"gemma2": "Gemma 2", "gemma3_text": "Gemma 3"}
GEMMA_NORMS_PLUS_1 = (gguf.MODEL_ARCH.GEMMA2, gguf.MODEL_ARCH.GEMMA3)


def check_gguf(config: dict[str, Any], gguf_type: str, flag: str = "--export-gguf") -> None:
    """Before any work: can we write this model as GGUF? One line naming what is supported."""
    model_type = config.get("model_type")
    experts = config.get("num_experts") or config.get("num_local_experts")
    instead = (
        "fuse without --export-gguf and run llama.cpp's convert_hf_to_gguf.py on the fused directory"
        if flag == "--export-gguf"
        else "fuse, and run llama.cpp's convert_hf_to_gguf.py on the fused directory"
        if experts  # PEFT has no form for LoRA on stacked experts
        else "convert --to peft and run llama.cpp's convert_lora_to_gguf.py on it"
    )
    if model_type not in ARCHITECTURES:
        raise UserError(f"{flag}: GGUF export supports {', '.join(ARCHITECTURES)} models, not {model_type}; {instead}")
    if config.get("sliding_window") and config.get("use_sliding_window", True) and model_type == "mistral":
        raise UserError(f"{flag}: llama.cpp's llama has no sliding-window attention (Mistral v0.1); {instead}")
    kind = rope_type(config.get("rope_scaling"))
    if kind not in ("default", LLAMA3) or (kind == LLAMA3 and ARCHITECTURES[model_type][0] != gguf.MODEL_ARCH.LLAMA):
        raise UserError(f"{flag}: rope scaling '{kind}' of a {model_type} model is not written yet; {instead}")
    if model_type in GEMMA_27B_LAYERS and config.get("query_pre_attn_scalar") != gemma_query_scalar(config):
        name, scalar = GEMMA_NAMES[model_type], gemma_query_scalar(config)
        raise UserError(
            f"{flag}: llama.cpp scales {name}'s queries by 1/sqrt({scalar}), this model by "
            f"1/sqrt({config.get('query_pre_attn_scalar')}); llama.cpp cannot run it as trained"
        )
    if problem := _what_llama_cpp_computes_otherwise(config):
        raise UserError(f"{flag}: {problem}; llama.cpp cannot run it as trained")
    if gguf_type not in WEIGHT_TYPES:
        raise UserError(f"--gguf-type must be one of {', '.join(WEIGHT_TYPES)}, got '{gguf_type}'")


def _what_llama_cpp_computes_otherwise(config: dict[str, Any]) -> str | None:
    """What llama.cpp's graph for the architecture fixes that this model's config sets otherwise."""
    model_type, blocks = config["model_type"], config["num_hidden_layers"]
    step = [int((i + 1) % SMOLLM3_NO_ROPE_STEP != 0) for i in range(blocks)]
    if model_type == "smollm3" and config.get("no_rope_layers", step) != step:
        return f"llama.cpp's smollm3 leaves rope out of every {SMOLLM3_NO_ROPE_STEP}th block, this model elsewhere"
    if model_type == "gemma3_text" and config.get("sliding_window_pattern", GEMMA3_PATTERN) != GEMMA3_PATTERN:
        return f"llama.cpp's gemma3 has a global block every {GEMMA3_PATTERN}th, this model not"
    if model_type == "gemma3_text" and config.get("rope_local_base_freq", GEMMA3_LOCAL_ROPE) != GEMMA3_LOCAL_ROPE:
        return f"llama.cpp's gemma3 rotates its sliding blocks at base {GEMMA3_LOCAL_ROPE:g}, this model otherwise"
    if model_type == "qwen3_moe" and not config.get("norm_topk_prob"):
        return "llama.cpp's qwen3moe renormalizes the chosen experts' weights, this model does not (norm_topk_prob)"
    if model_type == "qwen3_moe" and (config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1):
        return "llama.cpp's qwen3moe has experts in every block, this model not (mlp_only_layers)"
    return None


def architecture(config: dict[str, Any]) -> str:
    """llama.cpp's name for the model's architecture (general.architecture): Mistral is llama."""
    return gguf.MODEL_ARCH_NAMES[ARCHITECTURES[config["model_type"]][0]]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotates the two halves of each head (rotate_half); llama.cpp's llama rotates adjacent
    pairs. Interleave the halves, as convert_hf_to_gguf.py's LlamaModel.permute does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stored_type(name: str, shape: tuple[int, ...], qtype: QTYPE) -> QTYPE:
    """The type a tensor is written in: norms, biases and other 1-D tensors stay float32 (llama.cpp
    adds and multiplies them in f32); rows that are not whole Q8_0 blocks fall back to F16, as
    convert_hf_to_gguf.py does."""
    if len(shape) <= 1 or name.endswith(("_norm.weight", "ffn_gate_inp.weight")):  # a router too
        return QTYPE.F32
    if qtype == QTYPE.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[QTYPE.Q8_0][0]:
        return QTYPE.F16
    return qtype


def _tensor(name: str, w: mx.array, qtype: QTYPE, arch: gguf.MODEL_ARCH) -> tuple[np.ndarray, QTYPE]:
    """Gemma's RMSNorm multiplies by 1 + weight, llama.cpp's by the weight: the 1 is added here, as
    convert_hf_to_gguf.py's Gemma2Model does."""
    data = np.array(w.astype(mx.float32))
    qtype = stored_type(name, data.shape, qtype)
    if arch in GEMMA_NORMS_PLUS_1 and name.endswith("norm.weight"):
        return data + 1, qtype
    if qtype == QTYPE.F32:
        return data, qtype
    if qtype == QTYPE.F16:
        return data.astype(np.float16), qtype
    return gguf.quants.quantize(data, qtype), qtype


def _q8_0(w: mx.array) -> mx.array:
    """Q8_0 computed in MLX, apart from gguf-py's: per block of 32, d = max|w| / 127 kept as f16 and
    codes round(w / d) (halves away from zero, as ggml's roundf)."""
    blocks = w.astype(mx.float32).reshape(-1, gguf.GGML_QUANT_SIZES[QTYPE.Q8_0][0])  # (n_blocks, 32)
    d = mx.abs(blocks).max(axis=-1, keepdims=True) / 127
    x = blocks * mx.where(d == 0, 0, 1 / d)
    codes = mx.sign(x) * mx.floor(mx.abs(x) + 0.5)
    return (codes * d.astype(mx.float16).astype(mx.float32)).reshape(w.shape)


def as_stored(weights: dict[str, mx.array], config: dict, gguf_type: str) -> dict[str, mx.array]:
    """`weights` (mlx-lm's names) rounded in MLX as write_gguf stores them in `gguf_type`, in float32:
    what a reader of the file must get back, whatever layout the file uses."""
    qtype = WEIGHT_TYPES[gguf_type][0]
    names = Layout.of(config).names
    out = {}
    for key, w in weights.items():
        kind = stored_type(gguf_name(names, key) or key, w.shape, qtype)
        if kind == QTYPE.Q8_0:
            w = _q8_0(w)
        elif kind in (QTYPE.F16, QTYPE.BF16):
            w = w.astype(mx.float16 if kind == QTYPE.F16 else mx.bfloat16)
        out[key] = w.astype(mx.float32)
    return out


def gguf_name(names: gguf.TensorNameMap, key: str) -> str | None:
    """llama.cpp's name for a tensor of mlx-lm's (stacked experts by Hugging Face's name for all of them)."""
    module, _, leaf = key.rpartition(".")
    return names.get_name(f"{expert_name(module)}.{leaf}", try_suffixes=(".weight", ".bias"))


@dataclass(frozen=True)
class Layout:
    """Where and how llama.cpp wants a model's tensors: gguf-py's name map (convert_hf_to_gguf.py's),
    and llama's q and k rows permuted to its rotation order. One for a model and for an adapter of it."""

    arch: gguf.MODEL_ARCH
    names: gguf.TensorNameMap
    heads: int
    kv_heads: int

    @classmethod
    def of(cls, config: dict) -> "Layout":
        arch, heads = ARCHITECTURES[config["model_type"]][0], config["num_attention_heads"]
        names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
        return cls(arch, names, heads, config.get("num_key_value_heads") or heads)

    def rows(self, module: str, data: np.ndarray) -> np.ndarray:
        """`data`'s rows (out first) as llama.cpp lays them out for the module they belong to."""
        if self.arch in PAIRWISE_ROPE and module.endswith("q_proj"):
            return permute(data, self.heads)
        if self.arch in PAIRWISE_ROPE and module.endswith("k_proj"):
            return permute(data, self.kv_heads)
        return data


def add_tensors(writer: gguf.GGUFWriter, weights: dict[str, mx.array], config: dict, qtype: QTYPE) -> None:
    layout = Layout.of(config)
    for key, w in weights.items():
        name = gguf_name(layout.names, key)
        if name is None:
            raise UserError(f"--export-gguf: no GGUF name for tensor {key}; this model's layout is not supported")
        data, dtype = _tensor(name, w, qtype, layout.arch)
        data = layout.rows(key.rsplit(".", 1)[0], data)  # q_proj.weight and q_proj.bias alike
        writer.add_tensor(name, data, raw_dtype=None if dtype in (QTYPE.F32, QTYPE.F16) else dtype)


def _rope_theta(config: dict) -> float:
    rope = config.get("rope_parameters") or {}
    return config.get("rope_theta", rope.get("rope_theta", ARCHITECTURES[config["model_type"]][1]))


def add_llama3_rope(writer: gguf.GGUFWriter, config: dict) -> None:
    """Llama 3's rope scaling as llama.cpp runs it: rope_freqs.weight, one divisor per frequency
    (convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors; llama.cpp has no key for it), and the
    rope_scaling itself under our key, so that our reader gives back the config's exact values."""
    rope = config.get("rope_scaling") or {}
    if rope_type(rope) != LLAMA3:
        return
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_tensor(ROPE_FREQS, llama3_factors(rope, _rope_theta(config), head_dim))
    kept = {k: rope[k] for k in ("factor", *LLAMA3_DEFAULTS) if k in rope}
    writer.add_string(ROPE_SCALING_KEY, json.dumps({"rope_type": LLAMA3} | kept))


def add_hparams(writer: gguf.GGUFWriter, config: dict, n_vocab: int, file_type: int) -> None:
    """The llama.cpp keys of convert_hf_to_gguf.py's TextModel.set_gguf_parameters, and those its
    Gemma2Model, Gemma3Model, Phi3MiniModel and the mixture-of-experts models add."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(int(head_dim * config.get("partial_rotary_factor", 1.0)))
    if head_dim != config["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if config["model_type"] == "gemma2":
        writer.add_attn_logit_softcapping(config.get("attn_logit_softcapping", 50.0))  # mlx-lm's defaults
        writer.add_final_logit_softcapping(config.get("final_logit_softcapping", 30.0))
    if config["model_type"] in ("gemma2", "gemma3_text", "phi3") and config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    if experts := config.get("num_experts") or config.get("num_local_experts"):
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
    if "moe_intermediate_size" in config:
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(file_type)


def write_gguf(
    path: Path,
    weights: dict[str, mx.array],
    config: dict,
    tokenizer_dir: Path,
    gguf_type: str = "f16",
    name: str | None = None,
) -> None:
    """`weights` in mlx-lm's names (HF's for these architectures), full precision; `tokenizer_dir` holds
    tokenizer.json and tokenizer_config.json (and tokenizer.model for SentencePiece) as the loaded
    tokenizer saves them (transformers may change the split on load: Qwen2Tokenizer does)."""
    check_gguf(config, gguf_type)
    qtype, file_type = WEIGHT_TYPES[gguf_type]
    arch = ARCHITECTURES[config["model_type"]][0]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or Path(path).stem)
    n_vocab = add_vocab(writer, Path(tokenizer_dir), config.get("vocab_size", 0))
    add_hparams(writer, config, n_vocab, file_type)
    add_llama3_rope(writer, config)
    add_tensors(writer, weights, config, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_gguf_adapter(
    path: Path, modules: list[str], weights: dict[str, mx.array], scales: dict[str, float], base_config: dict
) -> None:
    """A LoRA adapter in llama.cpp's GGUF form (convert_lora_to_gguf.py's): `<base tensor>.lora_a`
    (r, in) and `.lora_b` (out, r) in float32 (each expert's, (E, r, in) and (E, out, r), for stacked
    experts), q/k's B rows permuted like the base weights.
    llama.cpp scales B·A by alpha / r with one alpha per file; ours can differ per module (rsLoRA,
    rank and alpha patterns, OLoRA/PiSSA's 2r), so each module's scale goes into its B and the file
    says alpha 0, which llama.cpp reads as "apply B·A as it is"."""
    check_gguf(base_config, "f32", "--to gguf")
    if any(k.endswith(f".{MAGNITUDE}") for k in weights):
        raise UserError("--to gguf: llama.cpp's LoRA adapters have no DoRA magnitude; fuse and --export-gguf instead")
    layout = Layout.of(base_config)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[layout.arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    for module in modules:
        name = gguf_name(layout.names, f"{module}.weight")
        if name is None:
            raise UserError(f"--to gguf: llama.cpp has no tensor for {module}; only linear layers of the blocks")
        a = np.array(weights[f"{module}.lora_a"].astype(mx.float32)).swapaxes(-1, -2)  # ([E,] r, in)
        b = np.array((weights[f"{module}.lora_b"] * scales[module]).astype(mx.float32)).swapaxes(-1, -2)
        b = layout.rows(module, b)  # ([E,] out, r)
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
