"""Make the bundled default model: a ~1M-parameter character-level Llama in mlx_lora/default_model/.

It is pre-trained here, briefly, on short stories that do sums in prose ("Tom had 3 apples. He
got 4 more. 3 + 4 = 7, so he had 7 apples."), never in the "Q: ... A: ... #### 7" form of
data/*.jsonl: the base can add but does not know the format, so a LoRA fine-tune on
data/train.jsonl has something to learn and something to build on. The directory loads with
both mlx_lm.load and transformers' Auto classes. Seeded; about 3 minutes on 2 CPU cores when
MLX runs on OpenBLAS, several times longer on its own matmul:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python data/make_model.py
"""

import json
import random
import string
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from make_data import ITEMS, NAMES
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from tokenizers import Tokenizer, decoders, models, processors

OUT = Path(__file__).resolve().parent.parent / "mlx_lora" / "default_model"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0-3, in Llama's order
UNK, BOS, EOS, PAD = range(4)
CHARS = [c for c in string.printable if c.isprintable()] + ["\n"]  # printable ASCII + newline
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": len(SPECIALS) + len(CHARS),
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": PAD,
    "torch_dtype": "float32",
}
SEQ_LEN, BATCH, STEPS, LR = 256, 16, 1200, 3e-3


def save_tokenizer(out):
    """One token per character, BOS prepended like Llama; Fuse joins tokens back without spaces."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    tok.decoder = decoders.Fuse()
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return vocab


def story(rng):
    """A few sentences in which someone's things are added, taken away or counted in groups."""
    (n, p), (m, _) = rng.sample(NAMES, 2)
    item, P = rng.choice(ITEMS), p.capitalize()
    kind = rng.choice(["add", "add", "sub", "sub", "mul", "two"])
    if kind == "add":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        c = a + b
        start = rng.choice(
            [
                f"{n} had {a} {item}. {P} got {b} more.",
                f"{n} had {a} {item} and {m} had {b} {item}.",
                f"{n} found {a} {item}, then {b} more.",
            ]
        )
        sums = [f"{a} + {b} = {c}"]
    elif kind == "sub":
        a = rng.randint(2, 30)
        b = rng.randint(1, a - 1)
        c = a - b
        start = rng.choice([f"{n} had {a} {item}. {P} gave {b} to {m}.", f"{n} had {a} {item} but lost {b} of them."])
        sums = [f"{a} - {b} = {c}"]
    elif kind == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = a * b
        start = rng.choice(
            [f"{n} had {a} boxes with {b} {item} in each box.", f"{n} got {a} bags of {item}, and each bag held {b}."]
        )
        sums = [f"{a} * {b} = {c}"]
    else:
        a, b = rng.randint(1, 15), rng.randint(1, 15)
        d = rng.randint(1, a + b - 1)
        c = a + b - d
        start = f"{n} had {a} {item}. {P} got {b} more, then gave {d} to {m}."
        sums = [f"{a} + {b} = {a + b}", f"{a + b} - {d} = {c}"]
    end = rng.choice([f"So {p} had {c} {item}.", f"Now {n} had {c} {item}.", f"That made {c} {item} in all."])
    work = " ".join(f"{s}." for s in sums) if rng.random() < 0.7 else ""
    opening = rng.choice(
        ["", "", f"One day {n} went to the shop.", "It was a sunny day.", f"{n} and {m} were friends."]
    )
    return " ".join(s for s in [opening, start, work, end] if s)


def batches(rng, vocab):
    """Random SEQ_LEN+1 windows of a stream of <s>story</s> documents."""
    stream = []
    while len(stream) < STEPS * BATCH * SEQ_LEN // 2:  # each character seen about twice
        stream += [BOS] + [vocab[c] for c in story(rng)] + [EOS]
    stream = mx.array(stream)
    for _ in range(STEPS):
        starts = mx.array([rng.randrange(len(stream) - SEQ_LEN - 1) for _ in range(BATCH)])
        yield stream[starts[:, None] + mx.arange(SEQ_LEN + 1)]  # (B, T+1)


def pretrain(model, vocab):
    def loss_fn(model, x):
        logits = model(x[:, :-1])  # (B, T, V)
        return nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean")

    warmup = 50
    schedule = optim.join_schedules(
        [optim.linear_schedule(0, LR, warmup), optim.cosine_decay(LR, STEPS - warmup, LR / 10)],
        [warmup],
    )
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    state = [model.state, opt.state]

    def step(x):
        loss, grads = nn.value_and_grad(model, loss_fn)(model, x)
        opt.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)

    tic, rng = time.time(), random.Random(0)
    for i, x in enumerate(batches(rng, vocab)):
        loss = step(x)
        mx.eval(state, loss)
        if i % 100 == 0 or i == STEPS - 1:
            print(f"step {i:4d}  loss {loss.item():.3f}  {time.time() - tic:.0f}s", flush=True)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    vocab = save_tokenizer(OUT)
    mx.random.seed(0)
    model = llama.Model(
        llama.ModelArgs(**{k: v for k, v in CONFIG.items() if k in llama.ModelArgs.__dataclass_fields__})
    )
    print(f"{sum(v.size for _, v in tree_flatten(model.parameters())) / 1e6:.2f}M parameters")
    pretrain(model, vocab)
    weights = dict(sorted(tree_flatten(model.parameters())))
    mx.save_safetensors(str(OUT / "model.safetensors"), weights, metadata={"format": "pt"})
    (OUT / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
