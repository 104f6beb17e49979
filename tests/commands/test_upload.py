"""`mlx-lora upload` and `fuse --upload-repo`: the staged repo, its card, and the commit huggingface-hub sends."""

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
import yaml
from conftest import TOKENS, hf_logits, mlx_logits
from huggingface_hub import ModelCard, constants
from peft import PeftModel
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from mlx_lora.cli import app
from mlx_lora.commands import upload as upload_module
from mlx_lora.commands.evaluate import run as run_eval
from mlx_lora.commands.fuse import fuse
from mlx_lora.commands.upload import stage_adapter, upload
from mlx_lora.config import EvalConfig, FuseConfig, TrainConfig, UploadConfig
from mlx_lora.errors import UserError
from mlx_lora.formats.loader import load_for_inference
from mlx_lora.hub.card import CARD
from mlx_lora.hub.repo import repo_files
from mlx_lora.reporting.results import table
from mlx_lora.training.loop import train

ATOL = 1e-4  # as tests/formats/test_peft.py: fp32 through two frameworks' matmuls on a tiny model
REPO = "someone/tiny-adapter"
ADAPTER_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "eval.json",
    "gguf/adapter.gguf",
    "gguf/Modelfile",
    "loss.png",
    "metrics.jsonl",
    "mlx-lm/adapter_config.json",
    "mlx-lm/adapters.safetensors",
    "mlx-lora/adapter_config.json",
    "mlx-lora/adapters.safetensors",
}


@pytest.fixture(scope="module")
def run_dir(llama, tmp_path_factory):
    """A trained adapter with everything a run leaves beside it, and an `eval --output` file."""
    root = tmp_path_factory.mktemp("upload")
    data = root / "data"
    data.mkdir()
    rows = [{"prompt": f"Q: {a} + 1?\nA:", "completion": f" {a} + 1 = {a + 1}. #### {a + 1}"} for a in range(12)]
    for split, part in (("train", rows[:8]), ("valid", rows[8:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    out = root / "run"
    cfg = TrainConfig(
        model=str(llama), data=str(data), adapter_path=str(out), iters=3, batch_size=2, val_every=3, save_every=0
    )
    train(cfg, log=lambda _: None)
    eval_cfg = EvalConfig(
        model=str(llama),
        adapter_path=str(out),
        data=str(data),
        split="valid",
        task="loss",
        output=str(out / "eval.json"),
    )
    run_eval(eval_cfg, log=lambda _: None)
    return out


def test_staged_repo_loads_in_peft_and_its_card_says_what_was_trained(llama, run_dir, tmp_path):
    staged = stage_adapter(run_dir, tmp_path / "repo", REPO, base_model_id="HuggingFaceTB/tiny-llama")
    assert set(repo_files(staged.directory)) == ADAPTER_FILES and staged.skipped == {}
    hf = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, staged.directory).eval()
    ours = load_for_inference(str(llama), str(run_dir))
    np.testing.assert_allclose(hf_logits(peft_model, TOKENS), mlx_logits(ours.model, TOKENS), atol=ATOL, rtol=0)

    card = ModelCard.load(staged.directory / CARD)  # the Hub's own parser of the front matter
    assert card.data.base_model == "HuggingFaceTB/tiny-llama" and card.data.library_name == "peft"
    assert {"mlx", "mlx-lora", "lora"} <= set(card.data.tags)
    text = card.text
    for row in (
        f"| data | `{run_dir.parent / 'data'}` |",
        "| iters | `3` |",
        "| batch size | `2` |",
        "| learning rate | `0.001` |",
        "| LoRA | r=8, alpha=16 (scale 2), dropout 0 |",
    ):
        assert row in text, row
    assert table(json.loads((run_dir / "eval.json").read_text())) in text
    assert "![training and validation loss](loss.png)" in text
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in text
    assert "--adapter-path tiny-adapter/mlx-lm" in text and "--lora tiny-adapter/gguf/adapter.gguf" in text
    assert "mlx-lora generate --model HuggingFaceTB/tiny-llama --adapter-path tiny-adapter " in text


def test_a_local_base_is_left_out_of_the_front_matter(run_dir, tmp_path):
    staged = stage_adapter(run_dir, tmp_path / "repo", REPO)
    front = yaml.safe_load((staged.directory / CARD).read_text().split("---")[1])
    assert "base_model" not in front and front["library_name"] == "peft"


class Hub(BaseHTTPRequestHandler):
    """The Hub endpoints create_repo and create_commit call; every request is recorded."""

    requests: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
        base = self.path.split("?")[0]
        if base == "/api/repos/create":
            reply = {"url": f"http://{self.headers['Host']}/{REPO}"}
        elif base == "/api/validate-yaml":
            reply = {"errors": [], "warnings": []}
        elif base.endswith("/preupload/main"):
            files = json.loads(body)["files"]
            reply = {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        elif base.endswith("/commit/main"):
            reply = {"commitUrl": f"http://{self.headers['Host']}/{REPO}/commit/{'a' * 40}", "commitOid": "a" * 40}
        else:
            self.send_error(404)
            return
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    Hub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", url)  # what HF_ENDPOINT sets when huggingface_hub is imported
    yield url
    server.shutdown()
    server.server_close()


def _committed(requests) -> dict[str, bytes]:
    """{path: content} of the one commit request (ndjson: a header, then one line per file, base64)."""
    (commit,) = [body for path, _, body in requests if "/commit/" in path]
    lines = [json.loads(line) for line in commit.decode().splitlines()]
    assert lines[0]["key"] == "header"
    return {l["value"]["path"]: base64.b64decode(l["value"]["content"]) for l in lines[1:] if l["key"] == "file"}


def test_upload_creates_the_repo_and_commits_the_staged_files(run_dir, hub, tmp_path):
    cfg = UploadConfig(adapter_dir=str(run_dir), repo=REPO, private=True, base_model_id="HuggingFaceTB/tiny-llama")
    lines = []
    upload(cfg, log=lines.append)
    paths = [path.split("?")[0] for path, _, _ in Hub.requests]
    assert paths[0] == "/api/repos/create" and paths[-1] == f"/api/models/{REPO}/commit/main"
    assert f"/api/models/{REPO}/preupload/main" in paths
    create = json.loads(Hub.requests[0][2])
    assert (create["name"], create["organization"], create["visibility"]) == ("tiny-adapter", "someone", "private")
    assert all(headers["authorization"] == "Bearer hf_test_token" for _, headers, _ in Hub.requests)
    again = stage_adapter(run_dir, tmp_path / "again", REPO, "HuggingFaceTB/tiny-llama")  # staging is deterministic
    assert _committed(Hub.requests) == {k: p.read_bytes() for k, p in repo_files(again.directory).items()}
    assert lines[-1] == f"uploaded to {hub}/{REPO}"


def test_fuse_upload_repo_commits_the_fused_model_and_its_card(llama, run_dir, hub, tmp_path):
    fused = tmp_path / "fused"
    cfg = FuseConfig(model=str(llama), adapter_path=str(run_dir), save_path=str(fused), upload_repo=REPO)
    fuse(cfg, log=lambda _: None)
    committed = _committed(Hub.requests)
    assert {k: v for k, v in committed.items() if k != CARD} == {
        k: p.read_bytes() for k, p in repo_files(fused).items()
    }
    front = yaml.safe_load(committed[CARD].decode().split("---")[1])
    assert front["library_name"] == "transformers" and "merged" in front["tags"]
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in committed[CARD].decode()
    assert not (fused / CARD).exists() or (fused / CARD).read_bytes() != committed[CARD]  # the directory is untouched


def test_a_missing_token_is_one_line_before_any_work(run_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(upload_module, "stage_adapter", None)  # reaching it would raise a TypeError
    result = CliRunner().invoke(app, ["upload", str(run_dir), "--repo", REPO])
    assert result.exit_code == 2 and result.output.startswith("error: no Hugging Face token: run `hf auth login`")
    assert len(result.output.strip().splitlines()) == 1
    fused = CliRunner().invoke(
        app, ["fuse", "--adapter-path", str(run_dir), "--save-path", str(tmp_path / "f"), "--upload-repo", REPO]
    )
    assert fused.exit_code == 2 and "no Hugging Face token" in fused.output and not (tmp_path / "f").exists()


def test_bad_repo_ids_and_a_missing_repo_are_user_errors(run_dir):
    assert UploadConfig(adapter_dir=str(run_dir)).problems() == ["--repo is required: the Hub repo, user/name"]
    assert "--repo must be a Hub repository id" in UploadConfig(adapter_dir="x", repo="no slash").problems()[0]
    result = CliRunner().invoke(app, ["upload", str(run_dir), "--repo", "a/b/c"])
    assert (
        result.exit_code == 2 and "--repo must be a Hub repository id such as user/name, got 'a/b/c'" in result.output
    )
    with pytest.raises(UserError, match="--upload-repo must be"):
        from mlx_lora.config import build_config

        build_config(FuseConfig, {}, {"upload_repo": "x"})
