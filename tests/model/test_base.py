"""Model loading: a hub id goes through huggingface-hub's cache, offline too."""

import re
import shutil

import huggingface_hub.constants as hf_constants
import mlx.core as mx
import pytest

from mlx_lora.errors import UserError
from mlx_lora.model.base import load_base


def _fake_hub_cache(cache, repo_id, model_dir):
    """The layout huggingface-hub writes: models--org--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_loads_from_the_cache_when_offline(llama, tmp_path, monkeypatch):
    _fake_hub_cache(tmp_path, "someone/tiny-llama", llama)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    from_hub, local = load_base("someone/tiny-llama"), load_base(str(llama))
    assert from_hub.name == "someone/tiny-llama"
    tokens = mx.array([[1, 40, 41, 42]])
    assert mx.array_equal(from_hub.model(tokens), local.model(tokens))


def test_unknown_hub_id_offline_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="--model nobody/nothing: not a local directory"):
        load_base("nobody/nothing")


def test_directory_without_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="has no config.json"):
        load_base(str(tmp_path))


@pytest.mark.parametrize(
    "name", ["./no-such-dir", "../no/such", "/no/such/dir", "~/no-such-dir", "a/b/c", "dir with space"]
)
def test_a_missing_path_is_no_such_directory_without_asking_the_hub(name, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the hub"))
    with pytest.raises(UserError, match=f"^--model {re.escape(name)}: no such directory$"):
        load_base(name)


def test_org_name_whose_org_is_a_local_directory_says_no_such_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(UserError, match="^--model models/llama: no such directory"):
        load_base("models/llama")
