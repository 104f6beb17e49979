"""`mlx-lora upload`: a Hub repository every runtime can use, with its card (hub/card.py).

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
from pathlib import Path

from mlx_lora.atomic import replace_dir, write_bytes
from mlx_lora.config import UploadConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import read_adapter
from mlx_lora.formats.native import AdapterConfig, read_json
from mlx_lora.formats.peft import PEFT_CONFIG
from mlx_lora.formats.registry import FORMATS, Format, Weights, export, format_named
from mlx_lora.hub.card import CARD, Staged, adapter_card, run_metrics
from mlx_lora.hub.repo import hub_token, push, repo_files
from mlx_lora.reporting.metrics import METRICS
from mlx_lora.reporting.plot import LOSS_PNG

COMMAND = "mlx-lora upload"
# Required, and at the root: the one place PeftModel.from_pretrained looks. The others go where
# their Format.hub_dir says, when they can hold the adapter.
ROOT_FORMAT = "peft"
RUN_FILES = (LOSS_PNG, METRICS)


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
    write_bytes(out / CARD, adapter_card(staged, adapter, run_metrics(adapter_dir)).encode())
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
