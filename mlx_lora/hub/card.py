"""README.md, the model card the Hub shows: of an adapter repo (`upload`) and of a fused model
(`fuse --upload-repo`), written from the adapter's config, the run's metrics and `eval` results."""

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlx_lora.config.commands import HUB_REPO
from mlx_lora.formats.gguf import GGUF_ADAPTER_FILE, GGUF_FILE
from mlx_lora.formats.native import AdapterConfig
from mlx_lora.reporting.metrics import METRICS, read_metrics
from mlx_lora.reporting.plot import LOSS_PNG
from mlx_lora.reporting.results import spans, table

CARD = "README.md"
PROMPT = "Hello, who are you?"


@dataclass
class Staged:
    """A repo's files in `directory`, and what its card says about them."""

    directory: Path
    repo: str
    base: str  # the base's Hub id, or the name the adapter records when it has none
    formats: list[str] = field(default_factory=list)  # names of the formats written
    skipped: dict[str, str] = field(default_factory=dict)  # format -> why it could not be written
    evals: dict[str, dict] = field(default_factory=dict)  # file name -> `eval --output` result


def run_metrics(run: Path) -> list[dict]:
    return read_metrics(run) if (run / METRICS).is_file() else []


def is_hub_id(name: str) -> bool:
    return bool(HUB_REPO.fullmatch(name)) and not Path(name).exists()


def front_matter(base: str, library: str, tags: list[str]) -> str:
    """The card's YAML header the Hub reads: base model (when it is a Hub id), library, tags."""
    meta = {**({"base_model": base} if is_hub_id(base) else {}), "library_name": library, "tags": tags}
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"


def training_rows(adapter: AdapterConfig, metrics: list[dict]) -> list[tuple[str, str]]:
    """(option, value) for the card: the LoRA options, the recorded recipe and methods, the losses."""
    lora, recorded = adapter.lora, dict(adapter.training)
    rows = [("base model", f"`{adapter.base_model}`")]
    if "data" in recorded:  # adapters saved before the recipe was recorded say nothing of their data
        rows.append(("data", f"`{recorded.pop('data') or 'the bundled arithmetic set'}`"))
    rows += [
        ("LoRA", f"r={lora.rank}, alpha={lora.alpha:g} (scale {lora.scale:g}), dropout {lora.dropout:g}"),
        ("modules", f"{len(adapter.modules)}: `{lora.targets}` in blocks {spans(adapter.layers)}"),
    ]
    methods = [m for m, on in (("DoRA", lora.dora), ("rsLoRA", lora.rslora)) if on]
    methods += [f"{adapter.trained_init} init"] if adapter.trained_init else []
    methods += [
        f"{k} `{v}`" for k, v in (("rank_pattern", lora.rank_pattern), ("alpha_pattern", lora.alpha_pattern)) if v
    ]
    rows += [("methods", ", ".join(methods))] if methods else []
    rows += [(k.replace("_", " "), f"`{v}`") for k, v in recorded.items() if v is not None]
    losses = [r["loss"] for r in metrics if r.get("loss") is not None]
    vals = [r["val_loss"] for r in metrics if r.get("val_loss") is not None]
    rows += [("train loss", f"{losses[0]:.3f} → {losses[-1]:.3f}")] if losses else []
    rows += [("validation loss", f"{vals[0]:.3f} → {vals[-1]:.3f}")] if vals else []
    return rows


def _table(rows: list[tuple[str, str]]) -> str:
    return "| option | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def results_section(evals: dict[str, dict], has_plot: bool) -> str:
    parts = ["## Results\n"] if evals or has_plot else []
    parts += [f"![training and validation loss]({LOSS_PNG})\n"] if has_plot else []
    for name, result in evals.items():
        rows = f", {result['rows']} rows" if result.get("rows") else ""
        what = f"`mlx-lora eval` on `{result.get('data')}`{rows} ([{name}]({name}))"
        parts.append(f"{what}:\n\n```\n{table(result)}\n```\n")
    return "\n".join(parts)


def adapter_card(staged: Staged, adapter: AdapterConfig, metrics: list[dict]) -> str:
    """README.md: front matter, what was trained on what, the results, the files and how to use them."""
    tags = ["mlx", "mlx-lora", "lora", *(["dora"] if adapter.lora.dora else [])]
    name = staged.repo.split("/")[-1]
    return "\n".join(
        [
            front_matter(staged.base, "peft", tags),
            f"# {name}\n",
            f"A LoRA adapter for `{staged.base}`, trained with mlx-lora on MLX.\n",
            "## Training\n",
            _table(training_rows(adapter, metrics)),
            results_section(staged.evals, (staged.directory / LOSS_PNG).is_file()),
            "## Use it\n",
            *adapter_usage(staged, name),
        ]
    )


def adapter_usage(staged: Staged, name: str) -> list[str]:
    repo, base = staged.repo, staged.base
    parts = [
        f"With mlx-lora (it reads the PEFT files at the root):\n\n```bash\nhf download {repo} --local-dir {name}\n"
        f'mlx-lora generate --model {base} --adapter-path {name} --prompt "{PROMPT}"\n```\n',
        "With PEFT and transformers:\n\n```python\nfrom peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
        f'model = PeftModel.from_pretrained(base, "{repo}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n```\n',
    ]
    if "mlx-lm" in staged.formats:
        parts.append(
            f'With mlx-lm:\n\n```bash\nhf download {repo} --include "mlx-lm/*" --local-dir {name}\n'
            f'mlx_lm.generate --model {base} --adapter-path {name}/mlx-lm --prompt "{PROMPT}"\n```\n'
        )
    if "gguf" in staged.formats:
        parts.append(
            f"With llama.cpp, on a GGUF of the base:\n\n```bash\nhf download {repo} gguf/{GGUF_ADAPTER_FILE} "
            f'--local-dir {name}\nllama-cli -m base.gguf --lora {name}/gguf/{GGUF_ADAPTER_FILE} -p "{PROMPT}"\n```\n'
        )
    parts += [f"Not included as {to}: {why}\n" for to, why in staged.skipped.items()]
    return parts


def fused_card(repo: str, base: str, adapter: AdapterConfig, metrics: list[dict], has_gguf: bool) -> str:
    """README.md of a fused model: what was merged into what, and how to run it."""
    name = repo.split("/")[-1]
    usage = [
        f'With mlx-lm:\n\n```bash\nmlx_lm.generate --model {repo} --prompt "{PROMPT}"\n```\n',
        "With transformers:\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")\n```\n',
    ]
    if has_gguf:
        usage.append(
            f"With llama.cpp:\n\n```bash\nhf download {repo} {GGUF_FILE} --local-dir {name}\n"
            f'llama-cli -m {name}/{GGUF_FILE} -p "{PROMPT}"\n```\n'
        )
    return "\n".join(
        [
            front_matter(base, "transformers", ["mlx", "mlx-lora", "lora", "merged"]),
            f"# {name}\n",
            f"`{base}` with a LoRA adapter merged into its weights by `mlx-lora fuse`; it loads as a plain model.\n",
            "## Training of the merged adapter\n",
            _table(training_rows(adapter, metrics)),
            results_section({}, False),
            "## Use it\n",
            *usage,
        ]
    )
