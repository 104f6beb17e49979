"""A llama.cpp GGUF file as a base model: weights as model/gguf_tensors.py reads them (quantized
types stay MLX-quantized, group size 32, where MLX's form holds them exactly), the config from the
file's metadata, the tokenizer converted by transformers from the same file's metadata; llama's q/k rows put back
in Hugging Face's order."""

import json
import tempfile
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_lora.errors import UserError
from mlx_lora.model.gguf_tensors import GROUP_SIZE, read_shapes, read_tensors, tensor_arrays
from mlx_lora.model.rope import ROPE_FREQS, ROPE_SCALING_KEY, llama3_scaling, matches

GGUF_SUFFIX = ".gguf"
# llama.cpp architecture -> Hugging Face model_type; a llama with experts is a Mixtral (convert_hf_to_gguf.py's)
ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "olmo2": "olmo2",
    "smollm3": "smollm3",
}
# the rope base a file without rope.freq_base runs at (llama.cpp's default, 10000, unless the
# converter always writes it; these are mlx-lm's defaults too)
ROPE_BASES = {"qwen2": 1000000.0, "qwen3": 1000000.0, "qwen3moe": 1000000.0, "gemma3": 1000000.0}
CLASSES = {
    "llama": "LlamaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
PAIRWISE_ROPE = ("llama", "mixtral", "smollm3")  # llama.cpp's q/k rows interleaved: unpermute
# Gemma's RMSNorm multiplies by 1 + weight, llama.cpp's by the weight: the file's norms hold the 1
NORMS_PLUS_1 = ("gemma2", "gemma3_text")
# llama.cpp tells Gemma 2 and 3 27B by their block counts, for their attention scale
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}
# llama.cpp's gemma3 fixes what Gemma 3's config can set: a global block every 6th, the others' rope base
GEMMA3_PATTERN, GEMMA3_LOCAL_ROPE = 6, 10000.0
GENERIC = "PreTrainedTokenizerFast"  # transformers' tokenizer class that changes nothing in tokenizer.json
# llama.cpp refuses a gpt2 vocabulary without merges, so the GGUF writer gives a merge-less one this
# merge. Symbols start as single characters and only merges make longer ones, so a merge of two
# multi-character strings never fires; the reader drops it (transformers would refuse its parts).
NO_MERGE = "<no-merge> <no-merge>"
# The ids llama.cpp ends a generation on (its end-of-generation set), as mlx-lm's stop tokens
STOP_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
# tokenizer_config.json's special tokens, by their GGUF id key (tokenizer.ggml.<key>)
SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}
# GGUF tensor name (after blk.N.) -> mlx-lm / Hugging Face module name
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# OLMo 2's norms after attention and after the MLP; Gemma's before them too; Phi-3's fused q/k/v
# and gate/up projections (gate rows first, as llama.cpp's attn_qkv and ffn_up hold them)
NORMS_AFTER = {"post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
GEMMA_LAYER_NAMES = LAYER_NAMES | NORMS_AFTER | {"ffn_norm": "pre_feedforward_layernorm"}
LAYER_NAMES_OF = {
    "gemma2": GEMMA_LAYER_NAMES,
    "gemma3_text": GEMMA_LAYER_NAMES,
    "olmo2": LAYER_NAMES | NORMS_AFTER,
    "phi3": LAYER_NAMES | {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
}
# A mixture-of-experts block's router and stacked experts, under the block's name (Mixtral's or Qwen's)
EXPERT_NAMES = {
    "ffn_gate_inp": "gate",
    "ffn_gate_exps": "switch_mlp.gate_proj",
    "ffn_up_exps": "switch_mlp.up_proj",
    "ffn_down_exps": "switch_mlp.down_proj",
}
MOE_BLOCK = {"mixtral": "block_sparse_moe", "qwen3_moe": "mlp"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# llama.cpp's byte-level BPE pre-tokenizers by their GGUF name (tokenizer.ggml.pre), as the
# tokenizer.json pre_tokenizer that splits text the same way. The GGUF writer names a tokenizer by
# this table; the reader puts the split back (transformers' GGUF conversion writes GPT-2's for all).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


PRE_TOKENIZERS = {
    "gpt-2": BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [_split(LLAMA3_REGEX), BYTE_LEVEL | {"use_regex": False}]},
    "qwen2": {"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), BYTE_LEVEL | {"use_regex": False}]},
}


def pre_signature(pre: dict | None) -> tuple:
    """What decides a pre-tokenizer's split, step by step (trim_offsets and the like do not)."""
    steps = (pre or {}).get("pretokenizers", []) if (pre or {}).get("type") == "Sequence" else [pre or {}]
    return tuple(
        (
            s.get("type"),
            (s.get("pattern") or {}).get("Regex"),
            s.get("behavior"),
            s.get("individual_digits"),
            s.get("add_prefix_space"),
            s.get("use_regex", True) if s.get("type") == "ByteLevel" else None,
        )
        for s in steps
    )


# The sizes the reader divides or allocates by (a crafted header may hold anything); the second
# set may be absent, and the reader then derives them.
SIZES = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")
OPTIONAL_SIZES = ("attention.head_count_kv", "attention.key_length", "rope.dimension_count", "context_length")


def check_dimensions(key, path: Path) -> None:
    """Each size a positive whole number; the heads a multiple of the key/value heads and, without a
    key_length, a divisor of the embedding width."""
    damaged = f"--model {path}: metadata"
    for name in SIZES + OPTIONAL_SIZES:
        value = key(name, 1 if name in OPTIONAL_SIZES else None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{damaged} {name} is {value!r:.40}, not a positive whole number; the file is damaged")
    heads, width = key("attention.head_count"), key("embedding_length")
    if heads % key("attention.head_count_kv", heads):
        raise UserError(f"{damaged} attention.head_count_kv does not divide head_count {heads}; the file is damaged")
    if key("attention.key_length") is None and width % heads:
        raise UserError(f"{damaged} attention.head_count {heads} does not divide embedding_length {width}")
    eps = key("attention.layer_norm_rms_epsilon")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise UserError(f"{damaged} attention.layer_norm_rms_epsilon is {eps!r:.40}; the file is damaged")


def rope_scaling(meta: dict[str, Any], factors: np.ndarray, config: dict[str, Any], path: Path) -> dict[str, Any]:
    """Llama 3's rope_scaling, from our key where the file has it, else recovered from rope_freqs; either
    way it must give the file's factors, which are what llama.cpp runs."""
    base, dim = config["rope_theta"], config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if ROPE_SCALING_KEY in meta:
        rope = json.loads(meta[ROPE_SCALING_KEY])
        if not matches(rope, factors, base, dim):
            raise UserError(f"--model {path}: {ROPE_FREQS} disagrees with {ROPE_SCALING_KEY}; the file was altered")
        return rope
    if (rope := llama3_scaling(factors, base, dim)) is None:
        raise UserError(
            f"--model {path}: {ROPE_FREQS} is not Llama 3's rope scaling with two or more frequencies between its "
            "thresholds, the only kind read; use the Hugging Face model"
        )
    return rope


def readable(meta: dict[str, Any], weights: dict[str, mx.array], path: Path) -> tuple[str, str]:
    """The file's llama.cpp architecture and the model_type it is read as; what is not read is refused."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(
            f"--model {path}: a GGUF of {arch}; reading GGUF supports {', '.join(ARCHITECTURES)} only; "
            "use the Hugging Face model"
        )
    model_type = "mixtral" if arch == "llama" and f"{arch}.expert_count" in meta else ARCHITECTURES[arch]
    if f"{arch}.expert_count" in meta and model_type not in MOE_BLOCK:
        raise UserError(f"--model {path}: experts in a GGUF of {arch} are not read; use the Hugging Face model")
    scaled = ROPE_FREQS in weights and arch != "llama" or any(n.startswith("rope_factors") for n in weights)  # Phi-3's
    if any(k.startswith(f"{arch}.rope.scaling") for k in meta) or scaled:
        raise UserError(f"--model {path}: rope scaling in a GGUF is not read yet; use the Hugging Face model")
    if unknown := [n for n in weights if n != ROPE_FREQS and hf_name(n, model_type) is None]:
        raise UserError(
            f"--model {path}: tensor {unknown[0]} of a GGUF of {arch} is not read; use the Hugging Face model"
        )
    return arch, model_type


def gguf_config(meta: dict[str, Any], weights: dict[str, mx.array], path: Path) -> dict[str, Any]:
    """The Hugging Face config.json keys mlx-lm's models read, from llama.cpp's keys."""
    arch, model_type = readable(meta, weights, path)

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    check_dimensions(key, path)
    heads = key("attention.head_count")
    head_dim = key("attention.key_length", key("embedding_length") // heads)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"--model {path}: partial rotary embeddings are not read yet; use the Hugging Face model")
    config = {
        "model_type": model_type,
        "architectures": [CLASSES[model_type]],
        "hidden_size": key("embedding_length"),
        "num_hidden_layers": key("block_count"),
        "intermediate_size": key("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "rms_norm_eps": float(f"{key('attention.layer_norm_rms_epsilon'):.6g}"),  # stored as float32
        "rope_theta": float(key("rope.freq_base", ROPE_BASES.get(arch, 10000.0))),
        "max_position_embeddings": key("context_length"),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in weights,
    }
    # only then (and for Qwen 3, whose configs always state it), so the fingerprint equals the HF config's
    if head_dim != config["hidden_size"] // heads or model_type in ("qwen3", "qwen3_moe"):
        config["head_dim"] = head_dim
    if model_type in MOE_BLOCK:
        config |= moe_config(key, model_type, path)
    if model_type in GEMMA_27B_LAYERS:
        config |= gemma_config(key, config, "output.weight" in weights, path)
    if ROPE_FREQS in weights:
        config["rope_scaling"] = rope_scaling(meta, np.array(weights[ROPE_FREQS]), config, path)
    for name in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{name}_token_id" in meta:
            config[f"{name.replace('padding', 'pad')}_token_id"] = meta[f"tokenizer.ggml.{name}_token_id"]
    return config


def gemma_query_scalar(config: dict) -> int:
    """What llama.cpp's gemma2 and gemma3 divide q by (the root of): hidden / heads for the 27B, else
    head_dim; GGUF has no key for it, and Gemma 2's and 3's own configs follow this rule."""
    if config["num_hidden_layers"] == GEMMA_27B_LAYERS[config["model_type"]]:
        return config["hidden_size"] // config["num_attention_heads"]
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def gemma_config(key, config: dict[str, Any], untied: bool, path: Path) -> dict[str, Any]:
    """What llama.cpp's gemma2 and gemma3 fix or derive and mlx-lm reads from the config (its
    defaults are one Gemma's, so each is stated: head_dim 256 would be wrong here)."""
    window = key("attention.sliding_window", None if config["model_type"] == "gemma3_text" else 4096)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UserError(f"--model {path}: metadata attention.sliding_window is {window!r:.40}; the file is damaged")
    if untied and config["model_type"] == "gemma2":
        raise UserError(
            f"--model {path}: a Gemma 2 with its own output head, which Gemma 2 has not; the file was altered"
        )
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    scalar = gemma_query_scalar(config | {"head_dim": head_dim})
    out = {"head_dim": head_dim, "query_pre_attn_scalar": scalar, "sliding_window": window}
    if config["model_type"] == "gemma2":  # llama.cpp's defaults where the file has no key, as mlx-lm's
        caps = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
        return out | {name: key(name, cap) for name, cap in caps.items()}
    return out | {"sliding_window_pattern": GEMMA3_PATTERN, "rope_local_base_freq": GEMMA3_LOCAL_ROPE}


def moe_config(key, model_type: str, path: Path) -> dict[str, Any]:
    """The experts' keys mlx-lm's mixtral and qwen3_moe read. llama.cpp renormalizes the chosen experts'
    weights in both (Mixtral's softmax over the chosen is the same), and puts experts in every block."""
    experts, used = key("expert_count"), key("expert_used_count")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in (experts, used)) or used > experts:
        raise UserError(f"--model {path}: metadata expert_count {experts!r:.20}, expert_used_count {used!r:.20}; "
                        "the file is damaged")  # fmt: skip
    if model_type == "mixtral":
        return {"num_local_experts": experts, "num_experts_per_tok": used}
    width = key("expert_feed_forward_length")
    moe = {"moe_intermediate_size": width, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}
    return {"num_experts": experts, "num_experts_per_tok": used} | moe


def hf_name(name: str, model_type: str = "llama") -> str | None:
    """blk.3.attn_q.scales -> model.layers.3.self_attn.q_proj.scales; blk.3.ffn_up_exps.weight ->
    model.layers.3.mlp.switch_mlp.up_proj.weight (Mixtral: block_sparse_moe)"""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) < 3:
        return None
    if parts[0] == "blk" and parts[2] in EXPERT_NAMES:
        module = f"{MOE_BLOCK.get(model_type, 'mlp')}.{EXPERT_NAMES[parts[2]]}"
        return f"model.layers.{parts[1]}.{module}.{'.'.join(parts[3:])}"
    names = LAYER_NAMES_OF.get(model_type, LAYER_NAMES)
    if parts[0] == "blk" and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{'.'.join(parts[3:])}"
    if parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{'.'.join(parts[1:])}"
    return None


def unpermute(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's row interleave of q/k (rows only, so quantized weights, scales and biases alike)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def compute_dtype(weights: dict[str, mx.array]) -> mx.Dtype:
    """float32 for a quantized file: its scales come as float16, but the norms are float32 and carry
    the activations to float32 anyway, and de-quantizing (fuse) in float32 loses nothing. Otherwise
    the dtype of the 2-D weights (an f16 GGUF runs in float16, as its Hugging Face model would)."""
    if any(name.endswith(".scales") for name in weights):
        return mx.float32
    return next((w.dtype for w in weights.values() if w.ndim == 2), mx.float32)


def hf_weights(weights: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    dtype = compute_dtype(weights)
    out = {}
    for name, w in weights.items():
        if name == ROPE_FREQS:  # in the config, as rope_scaling
            continue
        w = w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w  # packed uint32 stays
        key = hf_name(name, config["model_type"])
        if config["model_type"] in PAIRWISE_ROPE and ".q_proj." in key:
            w = unpermute(w, config["num_attention_heads"])
        elif config["model_type"] in PAIRWISE_ROPE and ".k_proj." in key:
            w = unpermute(w, config["num_key_value_heads"])
        elif config["model_type"] in NORMS_PLUS_1 and key.endswith("norm.weight"):
            w = w - 1  # exact wherever the stored 1 + w lies in [0.5, 2] (Sterbenz)
        out[key] = w
    return out


def quantized_layers(weights: dict[str, mx.array]) -> dict[str, dict]:
    """mlx-lm's per-layer quantization entry for every module GGUF stores quantized (bits differ:
    SmolLM2's Q4_1 file keeps the embedding in Q8_0)."""
    layers = {}
    for key, scales in weights.items():
        if key.endswith(".scales"):
            module = key.removesuffix(".scales")
            bits = weights[f"{module}.weight"].shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
            layers[module] = {"group_size": GROUP_SIZE, "bits": bits}
    return layers


def quantization_config(layers: dict[str, dict]) -> dict[str, Any]:
    """mlx-lm's form: the common bits, and the modules that differ (mlx-lm quantizes the rest by
    the presence of their .scales)."""
    bits = [q["bits"] for q in layers.values()]
    most = max(set(bits), key=bits.count)
    return {"group_size": GROUP_SIZE, "bits": most, **{k: q for k, q in layers.items() if q["bits"] != most}}


def gguf_tokenizer_files(meta: dict[str, Any], out: Path) -> None:
    """Hugging Face tokenizer files in `out`, converted by transformers' GGUF tokenizer mapping from
    the file's metadata. AutoTokenizer.from_pretrained(gguf_file=...) does the same but reads the
    file with a reader that imports torch, which a plain install of mlx-lora does not have."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    grouped = {
        group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokens, config = grouped["tokenizer"], grouped["tokenizer_config"]
    if "merges" in tokens:
        tokens["merges"] = [merge for merge in tokens["merges"] if merge != NO_MERGE]
    if "tokens" not in tokens:
        raise UserError("--model: this GGUF file holds no tokenizer (tokenizer.ggml.tokens); use a model that has one")
    if tokens.get("tokenizer_type") == "llama":  # as transformers does: llama.cpp adds BOS unless told not to
        config.setdefault("add_bos_token", True)
    for name, key in SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens["tokens"]):
            config[name] = tokens["tokens"][token_id]
    backend, _ = convert_gguf_tokenizer(meta["general.architecture"], tokens)
    PreTrainedTokenizerFast(tokenizer_object=backend, **config).save_pretrained(out)
    _drop_tokens_beyond(out, len(tokens["tokens"]))


def _drop_tokens_beyond(out: Path, n: int) -> None:
    """Tokens the converter added past the file's own n (GPT-2's default `<|endoftext|>` where the
    file names no such token): the model has no embedding row for them, and a GGUF written from this
    tokenizer would list more tokens than its embedding has rows. They go, and so does any special
    token setting that names one."""
    tok = json.loads((out / "tokenizer.json").read_text())
    gone = {a["content"] for a in tok.get("added_tokens", []) if a["id"] >= n}
    if not gone:
        return
    tok["added_tokens"] = [a for a in tok["added_tokens"] if a["id"] < n]
    (out / "tokenizer.json").write_text(json.dumps(tok))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if not (out / name).is_file():
            continue
        settings = json.loads((out / name).read_text())
        for key, value in list(settings.items()):
            content = value.get("content") if isinstance(value, dict) else value
            if isinstance(content, str) and content in gone:
                del settings[key]
            elif isinstance(value, list):
                settings[key] = [v for v in value if (v.get("content") if isinstance(v, dict) else v) not in gone]
        if isinstance(settings.get("added_tokens_decoder"), dict):
            settings["added_tokens_decoder"] = {i: v for i, v in settings["added_tokens_decoder"].items() if int(i) < n}
        (out / name).write_text(json.dumps(settings, indent=2))


def load_gguf_tokenizer(meta: dict[str, Any], eos_token_ids: Any) -> TokenizerWrapper:
    from mlx_lm.utils import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf_tokenizer_files(meta, Path(tmp))
        files = json.loads((Path(tmp) / "tokenizer.json").read_text())
        if (pre := meta.get("tokenizer.ggml.pre")) in PRE_TOKENIZERS:
            files["pre_tokenizer"] = PRE_TOKENIZERS[pre]
            (Path(tmp) / "tokenizer.json").write_text(json.dumps(files))
        # the generic class takes tokenizer.json as it is; Qwen2Tokenizer would put Qwen's split back
        config = json.loads((Path(tmp) / "tokenizer_config.json").read_text())
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": GENERIC}))
        return load_tokenizer(Path(tmp), eos_token_ids=eos_token_ids)


class Reader(gguf.GGUFReader):
    """gguf-py's reader, slicing a plain view of its mapped file: each slice of an np.memmap runs
    memmap's Python hooks, and the reader takes ~1M slices of a 49k-token vocabulary's metadata
    (3.0 of the 3.5 s opening SmolLM2's file took on this CPU, against 1.1 s). The bytes and the
    mapping are the same; only the arrays' class is plain."""

    def _get(self, *args, **kwargs):
        if type(self.data) is np.memmap:
            self.data = self.data.view(np.ndarray)
        return super()._get(*args, **kwargs)


def open_gguf(path: Path) -> tuple[gguf.GGUFReader, dict[str, Any]]:
    """gguf-py's reader of the file (tensors mapped, not read) and its metadata as Python values."""
    try:
        reader = Reader(path)
    except (OSError, ValueError, IndexError) as e:  # a short or foreign file fails as it is parsed
        raise UserError(f"--model {path}: not a readable GGUF file ({e}); is it complete?") from None
    return reader, {name: field.contents() for name, field in reader.fields.items()}


def read_gguf(path: Path, lazy: bool = False) -> tuple[dict[str, mx.array], dict[str, Any]]:
    """The tensors (`lazy`: stand-ins of their shapes and dtypes, nothing read, but for rope_freqs,
    whose values the config needs) and the metadata."""
    reader, meta = open_gguf(path)
    tensors = (read_shapes if lazy else read_tensors)(reader, path)
    if lazy and ROPE_FREQS in tensors:
        tensors[ROPE_FREQS] = tensor_arrays(next(t for t in reader.tensors if t.name == ROPE_FREQS))[ROPE_FREQS]
    return tensors, meta


def read_gguf_config(path: Path) -> dict[str, Any]:
    tensors, meta = read_gguf(path, lazy=True)
    return gguf_config(meta, tensors, path)


def gguf_model(path: Path, lazy: bool = False) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """The model alone (mlx-lm's class, quantized where the file is), its config and the file's metadata."""
    from mlx_lm.utils import _get_classes

    raw, meta = read_gguf(path, lazy)
    config = gguf_config(meta, raw, path)
    weights = hf_weights(raw, config)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = model.sanitize(weights) if hasattr(model, "sanitize") else weights  # gemma3_text: drops a tied head
    if layers := quantized_layers(weights):
        config["quantization"] = quantization_config(layers)
        nn.quantize(model, GROUP_SIZE, 4, class_predicate=lambda p, _: layers.get(p, False))
    model.load_weights(list(weights.items()))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config, meta


def load_gguf(path: Path, lazy: bool = False) -> tuple[nn.Module, TokenizerWrapper, dict[str, Any]]:
    """The model, its tokenizer and config; `lazy`: the weights are stand-ins of the right shapes and
    dtypes (read_gguf), for what needs only those (`mlx-lora info`)."""
    model, config, meta = gguf_model(path, lazy)
    return model, load_gguf_tokenizer(meta, [meta[k] for k in STOP_KEYS if k in meta]), config
