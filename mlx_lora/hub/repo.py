"""A Hugging Face Hub repository: the token, a directory's files, one commit; a fused model sent as it is."""

from pathlib import Path

from mlx_lora.atomic import OWNER
from mlx_lora.errors import UserError
from mlx_lora.formats.gguf import GGUF_FILE
from mlx_lora.formats.loader import read_adapter
from mlx_lora.hub.card import CARD, fused_card, run_metrics

NO_TOKEN = (
    "no Hugging Face token: run `hf auth login`, or set HF_TOKEN to a token with write access "
    "(https://huggingface.co/settings/tokens)"
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


def upload_fused(model_dir: Path, adapter_dir: Path, repo: str, private: bool, log=print) -> str:
    """The fused model's files as they are, and its card (the directory itself is not changed)."""
    adapter, _ = read_adapter(adapter_dir)
    card = fused_card(repo, adapter.base_model, adapter, run_metrics(adapter_dir), (model_dir / GGUF_FILE).is_file())
    files = {**repo_files(model_dir), CARD: card.encode()}
    log(f"uploading {len(files)} files to {repo}")
    url = push(files, repo, private, f"Upload {model_dir.name}, fused by mlx-lora")
    log(f"uploaded to {url}")
    return url
