"""`mlx-lora upload` and `fuse --upload-repo`: a Hub repository every runtime can use, with its card.

An adapter repo holds the adapter as PEFT files at its root (so `PeftModel.from_pretrained(base,
"user/name")` works), our own files under mlx-lora/, mlx-lm's under mlx-lm/ and llama.cpp's under
gguf/ (each where that format can express the adapter), the run's loss.png, metrics.jsonl and
`eval --output` JSON when they sit beside it, and a README.md model card written from all of
these. Everything is staged in a temporary directory, then sent as one commit through
huggingface-hub, so a failure before the commit leaves the Hub as it was.
"""

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlx_lora.atomic import OWNER, replace_dir, write_bytes
from mlx_lora.commands.evaluate import table
from mlx_lora.commands.info import spans
from mlx_lora.config import UploadConfig
from mlx_lora.config.commands import HUB_REPO
from mlx_lora.errors import UserError
from mlx_lora.formats.gguf import GGUF_ADAPTER_FILE, GGUF_FILE
from mlx_lora.formats.loader import read_adapter
from mlx_lora.formats.native import AdapterConfig, read_json
from mlx_lora.formats.peft import PEFT_CONFIG
from mlx_lora.formats.registry import FORMATS, Format, Weights, export, format_named
from mlx_lora.reporting.metrics import METRICS, read_metrics
from mlx_lora.reporting.plot import LOSS_PNG

CARD = "README.md"
COMMAND = "mlx-lora upload"
# Required, and at the root: the one place PeftModel.from_pretrained looks. The others go where
# their Format.hub_dir says, when they can hold the adapter.
ROOT_FORMAT = "peft"
RUN_FILES = (LOSS_PNG, METRICS)
PROMPT = "Hello, who are you?"
NO_TOKEN = (
    "no Hugging Face token: run `hf auth login`, or set HF_TOKEN to a token with write access "
    "(https://huggingface.co/settings/tokens)"
)


@dataclass
class Staged:
    """A repo's files in `directory`, and what its card says about them."""

    directory: Path
    repo: str
    base: str  # the base's Hub id, or the name the adapter records when it has none
    formats: list[str] = field(default_factory=list)  # names of the formats written
    skipped: dict[str, str] = field(default_factory=dict)  # format -> why it could not be written
    evals: dict[str, dict] = field(default_factory=dict)  # file name -> `eval --output` result


def eval_results(run: Path) -> dict[str, dict]:
    """The `eval --output` files in a run directory: JSON objects with a task and a model's figures."""
    found = {}
    for path in sorted(run.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and "task" in data and ("adapter" in data or "base" in data):
            found[path.name] = data
    return found


def copy_run_files(run: Path, out: Path) -> dict[str, dict]:
    """loss.png, metrics.jsonl and eval results beside the adapter, copied into the repo."""
    evals = eval_results(run)
    for name in [*RUN_FILES, *evals]:
        if (run / name).is_file():
            shutil.copy(run / name, out / name)
    return evals


def stage_adapter(
    adapter_dir: Path, out: Path, repo: str, base_model_id: str | None = None, model: str | None = None
) -> Staged:
    """Every format the adapter can be written in, the run's files and the card, into `out` (new);
    `model` is the base's directory or id where the adapter's own record will not do (a GGUF base)."""
    adapter_dir = Path(adapter_dir)
    adapter, weights = read_adapter(adapter_dir)
    root = format_named(ROOT_FORMAT)
    _stage(root, adapter, weights, adapter_dir, out, model, base_model_id)
    staged = Staged(out, repo, read_json(out / PEFT_CONFIG)["base_model_name_or_path"], [root.name])
    for fmt in (f for f in FORMATS if f is not root):
        try:
            _stage(fmt, adapter, weights, adapter_dir, out, model, staged.base)
            staged.formats.append(fmt.name)
        except UserError as e:  # mlx-lm and llama.cpp cannot hold every adapter; the card says why
            staged.skipped[fmt.name] = str(e)
    staged.evals = copy_run_files(adapter_dir, out)
    write_bytes(out / CARD, adapter_card(staged, adapter, _metrics(adapter_dir)).encode())
    return staged


def _stage(
    fmt: Format,
    adapter: AdapterConfig,
    weights: Weights,
    src: Path,
    out: Path,
    model: str | None,
    base_model_id: str | None,
) -> None:
    """`fmt`'s files in its folder of the repo, all of them or none (as `convert` writes them)."""
    ready = export(fmt, adapter, weights, src, model, base_model_id)
    with replace_dir(out / fmt.hub_dir, COMMAND, "--repo", {"ADAPTER_DIR": src}) as tmp:
        fmt.write(tmp, ready)


def _metrics(run: Path) -> list[dict]:
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


def hub_token() -> str:
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UserError(NO_TOKEN)
    return token


def repo_files(directory: Path) -> dict[str, Path]:
    """{path in the repo: file} for every file under `directory` but our record of who wrote it."""
    files = (p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != OWNER)  # OWNER: ours, not the repo's
    return {p.relative_to(directory).as_posix(): p for p in files}


def push(files: dict[str, Path | bytes], repo: str, private: bool, message: str) -> str:
    """Create the repo if needed and commit `files` ({path in the repo: file or content}) as one commit,
    to the Hub HF_ENDPOINT names (huggingface.co by default) with the token of `hf auth login` or HF_TOKEN."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=hub_token())
    operations = [CommitOperationAdd(path_in_repo=k, path_or_fileobj=v) for k, v in files.items()]
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.create_commit(repo, operations, commit_message=message)
    except (HfHubHTTPError, OSError, ValueError) as e:  # HTTP errors, no network, a card the Hub refuses
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"upload to {repo} failed: {first}") from None
    return str(url)


def upload(cfg: UploadConfig, log=print) -> Staged:
    hub_token()  # before any work: a missing token is the commonest failure
    with tempfile.TemporaryDirectory() as tmp:
        staged = stage_adapter(Path(cfg.adapter_dir), Path(tmp) / "repo", cfg.repo, cfg.base_model_id, cfg.model)
        for to, why in staged.skipped.items():
            log(f"not uploaded as {to}: {why}")
        files = repo_files(staged.directory)
        log(f"uploading {len(files)} files to {cfg.repo}: {', '.join(files)}")
        message = f"Upload adapter {Path(cfg.adapter_dir).resolve().name} (mlx-lora)"
        url = push(files, cfg.repo, cfg.private, message)
    log(f"uploaded to {url}")
    return staged


def upload_fused(model_dir: Path, adapter_dir: Path, repo: str, private: bool, log=print) -> str:
    """The fused model's files as they are, and its card (the directory itself is not changed)."""
    adapter, _ = read_adapter(adapter_dir)
    card = fused_card(repo, adapter.base_model, adapter, _metrics(adapter_dir), (model_dir / GGUF_FILE).is_file())
    files = {**repo_files(model_dir), CARD: card.encode()}
    log(f"uploading {len(files)} files to {repo}")
    url = push(files, repo, private, f"Upload {model_dir.name}, fused by mlx-lora")
    log(f"uploaded to {url}")
    return url
