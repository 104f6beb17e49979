"""The architecture matrix: every path of mlx-lora (a column) on every architecture it is offered for
(a row), each a random-weight model that transformers makes at that architecture's real layout. A
cell either runs and agrees with the other side (transformers for Hugging Face paths, llama.cpp for
GGUF paths, mlx-lm for its own adapters) within the stated tolerance, or is refused in one line that
names what to do instead; REFUSED lists those, so a cell that stops working fails here.

docs/architectures.md is this matrix as the tests found it: test_docs_show_the_matrix regenerates
it and fails if the committed file differs (MLX_LORA_WRITE_MATRIX=1 rewrites it).

One model, one short training run and one fused model per architecture serve every column (Subject,
built on first use), so the module stays cheap."""

import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_lora.config import ConvertConfig, EvalConfig, FuseConfig, GenerateConfig, TrainConfig
from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base, load_mlx_model
from tests.conftest import TOKENS, fp32_tol, hf_logits, make_hf_model, mlx_logits, write_jsonl
from tests.formats.test_gguf import GELU_TABLE_TOLERANCE, TOLERANCE, _llama, cpp_logits, ggml_gelu

DOC = Path(__file__).parents[2] / "docs" / "architectures.md"
WRITE = "MLX_LORA_WRITE_MATRIX"
# the rows: each architecture's model in conftest._configs, and its name in the docs
ROWS = {
    "llama": "llama",
    "llama3": "llama 3.2 (llama3 rope scaling, tied embeddings)",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
    "olmo2": "olmo2",
    "smollm3": "smollm3",
}
MOE = ("qwen3_moe", "mixtral")
# Gemma 3 at its real pattern, 5 sliding blocks to 1 global (conftest's has 4 blocks, global the 4th)
SIZES = {"gemma3": dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"])}
BLOCKS = 4  # conftest.SMALL's, unless SIZES says otherwise
ITERS = 8
PROMPT = "Q: What is 3 + 4?\nA:"
REFUSE_PEFT = r"^\S+switch_mlp\.\w+: LoRA on stacked experts .*--to mlx-lm"


def _expected_refusals() -> dict[tuple[str, str], str]:
    return {(arch, "PEFT in transformers"): REFUSE_PEFT for arch in MOE}


COLUMNS = {
    "train from HF dir": "the loaded base gives transformers' logits (fp32); 8 steps lower the validation loss",
    "train from GGUF": "a Q8_0 GGUF of the base loads still 8-bit quantized and gives llama.cpp's logits (within "
    "Q8_0's activation rounding, 1e-1 of the largest); 8 steps on it lower the validation loss; that adapter "
    "fused with `--export-gguf --gguf-type f32` gives, in llama.cpp, our logits of it on the Q8_0 base (1e-4)",
    "generate": "`generate` with the adapter: each greedy token is transformers' greedy choice on the fused model "
    "(up to a near tie within fp32)",
    "eval": "`eval`'s loss with the adapter equals transformers' cross-entropy of the fused model (fp32)",
    "fuse": "transformers runs the fused directory and gives the adapter model's logits (fp32)",
    "fused GGUF in llama.cpp": "`fuse --export-gguf --gguf-type f32`: llama.cpp gives the adapter model's logits "
    "(1e-4 of the largest; Gemma against our model run with ggml's f16 GELU table, Gemma 2 within 2e-3)",
    "LoRA GGUF in llama.cpp": "`convert --to gguf` on an f32 GGUF of the base: llama.cpp gives the adapter "
    "model's logits (as above)",
    "PEFT in transformers": "`convert --to peft`: PEFT on transformers gives the adapter model's logits (fp32)",
    "mlx-lm adapter": "`convert --to mlx-lm`: mlx-lm's own load_adapters gives the adapter model's logits (fp32)",
}
REFUSED = _expected_refusals()


@dataclass
class Subject:
    """One architecture: its model, one short training run and what is made from it, each on first use."""

    arch: str
    root: Path
    data: Path

    @cached_property
    def model_dir(self) -> Path:
        return make_hf_model(self.root / "hf", self.arch, **SIZES.get(self.arch, {}))

    @property
    def fp32(self) -> float:
        """Relative fp32 tolerance of a forward: its longest sums, the MLP's 128 inner terms (the
        experts' too), through each block."""
        return fp32_tol(SIZES.get(self.arch, {}).get("num_hidden_layers", BLOCKS) * 128)

    @cached_property
    def transformers(self):
        return _transformers(self.model_dir)

    @cached_property
    def losses(self) -> list[float]:
        return _train(self.model_dir, self.data, self.root / "adapter")

    @property
    def adapter(self) -> Path:
        """The adapter trained on the Hugging Face directory (trained on first use)."""
        assert self.losses
        return self.root / "adapter"

    @cached_property
    def adapted(self) -> np.ndarray:
        """Logits of the trained adapter on the base, as every command but fuse runs it."""
        from mlx_lora.formats.loader import load_for_inference

        return mlx_logits(load_for_inference(str(self.model_dir), str(self.adapter)).model, TOKENS)

    @cached_property
    def as_ggml(self) -> np.ndarray:
        """The adapter model's logits with ggml's arithmetic where it differs beyond float32 rounding:
        Gemma's GELU read from ggml's f16 table (tests/formats/test_gguf.py). Measured: Gemma 3's gap to
        llama.cpp falls from 4.3e-4 to 1.1e-5 of the largest logit, Gemma 2's from 3.8e-3 to 8e-4."""
        import mlx.nn

        from mlx_lora.formats.loader import load_for_inference

        if self.arch not in ("gemma2", "gemma3"):
            return self.adapted
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(mlx.nn, "gelu_approx", ggml_gelu(mlx.nn.gelu_approx))
            return mlx_logits(load_for_inference(str(self.model_dir), str(self.adapter)).model, TOKENS)

    @cached_property
    def fused(self) -> Path:
        from mlx_lora.commands.fuse import fuse

        fuse(FuseConfig(adapter_path=str(self.adapter), save_path=str(self.root / "fused")), log=lambda _: None)
        return self.root / "fused"

    def tol(self, scale: float = 1.0) -> float:
        return self.fp32 * np.abs(self.adapted).max() * scale

    def refusal(self, error: UserError) -> str:
        return str(error).replace(f"{self.root}/", "")


def _transformers(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()


def _train(model: Path | str, data: Path, out: Path) -> list[float]:
    from mlx_lora.training.loop import train

    cfg = TrainConfig(
        model=str(model), data=str(data), adapter_path=str(out), iters=ITERS, batch_size=4, num_layers=2, rank=4,
        targets="all-linear", learning_rate=1e-2, val_every=0, val_batches=-1, save_every=0,
    )  # fmt: skip
    result = train(cfg, log=lambda _: None)
    first, last = result.val_losses[0], result.val_losses[ITERS]  # the whole valid split, before and after
    assert last < first, result.val_losses
    return result.losses


def _base_gguf(subject: Subject, name: str, gguf_type: str) -> Path:
    from mlx_lora.formats.gguf import write_gguf

    base = load_base(str(subject.model_dir))
    path = subject.root / name
    if not path.exists():
        write_gguf(path, dict(tree_flatten(base.model.parameters())), base.config, base.path, gguf_type)
    return path


def _assert_llama_cpp_agrees(subject: Subject, theirs: np.ndarray) -> None:
    """Within float32 rounding of our model as ggml computes it (as_ggml). Gemma 2 within
    GELU_TABLE_TOLERANCE even so: the rest of its gap (8e-4) we have not traced; Gemma 3, with the same
    GELU and no soft-capping, has none of it."""
    ours = subject.as_ggml
    tol = GELU_TABLE_TOLERANCE if subject.arch == "gemma2" else TOLERANCE["f32"]
    assert np.abs(theirs - ours).max() <= tol * max(1.0, np.abs(ours).max())


# --- the columns: each raises UserError where mlx-lora refuses the path ---------------------------


def train_from_hf(s: Subject) -> None:
    base = load_base(str(s.model_dir))
    want = hf_logits(s.transformers, TOKENS)
    assert np.abs(mlx_logits(base.model, TOKENS) - want).max() <= s.fp32 * np.abs(want).max()
    assert len(s.losses) == ITERS
    assert np.abs(s.adapted - mlx_logits(base.model, TOKENS)).max() > 100 * s.tol()  # the adapter moved it


def train_from_gguf(s: Subject) -> None:
    path = _base_gguf(s, "base.gguf", "q8_0")
    base = load_base(str(path))
    assert base.config["quantization"]["bits"] == 8  # Q8_0 held as it is: MLX's 8 bits in groups of 32
    llm = _llama(path)
    theirs = cpp_logits(llm, TOKENS)
    llm.close()
    ours = mlx_logits(base.model, TOKENS)
    assert np.abs(theirs - ours).max() <= TOLERANCE["q8_0"] * max(1.0, np.abs(ours).max())
    assert len(_train(path, s.data, s.root / "gguf-adapter")) == ITERS
    _gguf_trained_fuses_into_llama_cpp(s, path)


def _gguf_trained_fuses_into_llama_cpp(s: Subject, path: Path) -> None:
    """GGUF in, trained, fused, GGUF out: llama.cpp runs the fused f32 file as we run the adapter on the
    Q8_0 base (its weights de-quantized exactly, so float32 rounding apart, as fused_gguf; Gemma within
    GELU_TABLE_TOLERANCE, its GELU being ggml's f16 table there)."""
    from mlx_lora.commands.fuse import fuse
    from mlx_lora.formats.loader import load_for_inference

    out, adapter = s.root / "gguf-fused", str(s.root / "gguf-adapter")
    fuse(FuseConfig(adapter_path=adapter, save_path=str(out), export_gguf=True, gguf_type="f32"), log=lambda _: None)
    ours = mlx_logits(load_for_inference(str(path), adapter).model, TOKENS)
    llm = _llama(out / "model.gguf")
    theirs = cpp_logits(llm, TOKENS)
    llm.close()
    tol = GELU_TABLE_TOLERANCE if s.arch in ("gemma2", "gemma3") else TOLERANCE["f32"]
    assert np.abs(theirs - ours).max() <= tol * max(1.0, np.abs(ours).max())


def generate(s: Subject) -> None:
    from mlx_lora.inference.adapter_set import load_adapters
    from mlx_lora.inference.generation import generate, prompt_tokens

    cfg = GenerateConfig(model=str(s.model_dir), adapter_path=[str(s.adapter)], prompt=PROMPT, max_tokens=8)
    base = load_adapters(cfg).base
    prompt = prompt_tokens(base, PROMPT, chat=False)
    tokens = [r.token for r in generate(base, cfg)]
    assert tokens
    logits = hf_logits(_transformers(s.fused), prompt + tokens)[len(prompt) - 1 : -1]  # (generated, V)
    for step, (token, row) in enumerate(zip(tokens, logits)):
        assert row.max() - row[token] <= 2 * s.tol(), f"token {step}: transformers prefers {row.argmax()}"


def evaluate(s: Subject) -> None:
    import torch

    from mlx_lora.commands.evaluate import run

    result = run(EvalConfig(model=str(s.model_dir), adapter_path=str(s.adapter), data=str(s.data), task="loss"))
    hf, tokenizer, total, count = _transformers(s.fused), load_base(str(s.fused)).tokenizer, 0.0, 0
    for line in (s.data / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        prompt = tokenizer.encode(row["prompt"])
        tokens = prompt + tokenizer.encode(row["completion"], add_special_tokens=False) + [tokenizer.eos_token_id]
        logp = torch.log_softmax(torch.tensor(hf_logits(hf, tokens[:-1])), -1)
        total -= sum(logp[t - 1, tokens[t]].item() for t in range(len(prompt), len(tokens)))
        count += len(tokens) - len(prompt)
    assert result["loss_tokens"] == count
    assert abs(result["adapter"]["loss"] - total / count) <= 2 * s.tol()  # a log-softmax moves by 2x its logits


def fuse(s: Subject) -> None:
    assert np.abs(hf_logits(_transformers(s.fused), TOKENS) - s.adapted).max() <= s.tol()


def fused_gguf(s: Subject) -> None:
    from mlx_lora.commands.fuse import fuse

    out = s.root / "fused-gguf"
    fuse(
        FuseConfig(adapter_path=str(s.adapter), save_path=str(out), export_gguf=True, gguf_type="f32"),
        log=lambda _: None,
    )
    llm = _llama(out / "model.gguf")
    theirs = cpp_logits(llm, TOKENS)
    llm.close()
    _assert_llama_cpp_agrees(s, theirs)


def lora_gguf(s: Subject) -> None:
    from mlx_lora.commands.convert import convert

    convert(ConvertConfig(str(s.adapter), str(s.root / "lora-gguf"), to="gguf"), log=lambda _: None)
    llm = _llama(_base_gguf(s, "base-f32.gguf", "f32"), lora_path=str(s.root / "lora-gguf" / "adapter.gguf"))
    theirs = cpp_logits(llm, TOKENS)
    llm.close()
    _assert_llama_cpp_agrees(s, theirs)


def peft(s: Subject) -> None:
    from peft import PeftModel

    from mlx_lora.commands.convert import convert

    convert(ConvertConfig(str(s.adapter), str(s.root / "peft"), to="peft"), log=lambda _: None)
    model = PeftModel.from_pretrained(_transformers(s.model_dir), s.root / "peft").eval()
    assert np.abs(hf_logits(model, TOKENS) - s.adapted).max() <= s.tol()


def mlx_lm_adapter(s: Subject) -> None:
    from mlx_lm.tuner.utils import load_adapters

    from mlx_lora.commands.convert import convert

    convert(ConvertConfig(str(s.adapter), str(s.root / "mlx-lm"), to="mlx-lm"), log=lambda _: None)
    model = load_adapters(load_mlx_model(s.model_dir)[0], str(s.root / "mlx-lm"))
    model.eval()
    assert np.abs(mlx_logits(model, TOKENS) - s.adapted).max() <= s.tol()


CELLS = dict(
    zip(
        COLUMNS, (train_from_hf, train_from_gguf, generate, evaluate, fuse, fused_gguf, lora_gguf, peft, mlx_lm_adapter)
    )
)


# --- the matrix ------------------------------------------------------------------------------------

OUTCOMES: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def subjects(tmp_path_factory) -> dict[str, Subject]:
    root = tmp_path_factory.mktemp("matrix")
    rows = [
        {"prompt": f"Q: What is {a} + {b}?\nA:", "completion": f" {a} + {b} = {a + b}. #### {a + b}"}
        for a in range(1, 7)
        for b in range(1, 5)
    ]
    for split, part in (("train", rows[:16]), ("valid", rows[16:]), ("test", rows[16:])):
        write_jsonl(root / "data" / f"{split}.jsonl", part)
    return {arch: Subject(arch, root / arch, root / "data") for arch in ROWS}


def outcome(row: str, column: str, subjects: dict[str, Subject]) -> str:
    """Run the cell once: "ok", or "refused: <the one-line message>" where REFUSED expects that refusal."""
    if (row, column) not in OUTCOMES:
        subject, expected = subjects[row], REFUSED.get((row, column))
        mx.random.seed(0)
        try:
            CELLS[column](subject)
        except UserError as e:
            message = subject.refusal(e)
            assert expected and re.search(expected, message), f"{row} · {column} refused: {message}"
            assert "\n" not in message
            OUTCOMES[row, column] = f"refused: {message}"
        else:
            assert expected is None, f"{row} · {column} ran, where a refusal matching {expected!r} was expected"
            OUTCOMES[row, column] = "ok"
    return OUTCOMES[row, column]


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("row", ROWS)
def test_cell(row, column, subjects):
    outcome(row, column, subjects)


def matrix_markdown(outcomes: dict[tuple[str, str], str]) -> str:
    notes: list[str] = []
    lines = ["| architecture | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for row in ROWS:
        cells = []
        for column in COLUMNS:
            said = outcomes[row, column]
            if said == "ok":
                cells.append("✓")
                continue
            message = said.removeprefix("refused: ")
            notes += [message] if message not in notes else []
            cells.append(f"refused [{notes.index(message) + 1}]")
        lines.append(f"| {ROWS[row]} | " + " | ".join(cells) + " |")
    return "\n".join(
        [
            "# Architectures",
            "",
            "<!-- Generated by tests/model/test_matrix.py; do not edit. To regenerate:",
            f"     {WRITE}=1 pytest tests/model/test_matrix.py -->",
            "",
            "Every path of mlx-lora on each architecture, as the test suite found it: each ✓ is a test on a",
            "random-weight model that transformers made at that architecture's real layout (4 blocks, Gemma 3",
            "6 at its 5:1 pattern; tiny widths), trained here for 8 steps with LoRA on every linear layer of",
            "its last 2 blocks (the experts' too). A refused cell is what the command answers, in one line",
            "that names what to do instead.",
            "",
            *lines,
            "",
            "What each ✓ checked:",
            "",
            *[f"- **{column}**: {check}" for column, check in COLUMNS.items()],
            "",
            "The refusals:",
            "",
            *[f"{i}. {message}" for i, message in enumerate(notes, 1)],
            "",
        ]
    )


def test_docs_show_the_matrix(subjects):
    """Any cell not run in this session (deselected) runs here, so the table is always whole."""
    text = matrix_markdown({(row, column): outcome(row, column, subjects) for row in ROWS for column in COLUMNS})
    if os.environ.get(WRITE) == "1":
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, (
        f"{DOC} is not the matrix the tests found; regenerate it: {WRITE}=1 pytest tests/model/test_matrix.py"
    )
