"""Writes that leave either the old file or the new one, never a torn one (kill -9 safe)."""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx

from mlx_lora.errors import UserError


def check_writable(directory: Path, flag: str) -> None:
    """Fail before the work, not after it, and leave nothing behind: a probe file in `directory`,
    or where it does not exist yet, a probe directory in its nearest existing parent (the writers
    create it when they first have something to write)."""
    directory = Path(directory)
    existing = next(p for p in (directory, *directory.absolute().parents) if p.exists() or p == p.parent)
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, os.strerror(20))
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".write-test."))
    except OSError as e:
        raise UserError(f"{flag} {directory}: cannot write there ({e.strerror}); choose another directory") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_file(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any saved file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")

    _replace_file(Path(path), write)


def write_bytes(path: Path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _replace_file(Path(path), write)


def save_safetensors(path: Path, arrays: dict[str, mx.array], metadata: dict | None = None) -> None:
    # mx.save_safetensors appends ".safetensors" unless the name already ends with it.
    def write(tmp):
        named = tmp + ".safetensors"
        mx.save_safetensors(named, arrays, metadata=metadata or {})
        os.replace(named, tmp)

    _replace_file(Path(path), write)


@contextmanager
def replace_dir(path: Path):
    """Yield a fresh temporary directory that replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        for f in tmp.rglob("*"):  # on disk before the rename publishes them
            if f.is_file():
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale(directory: Path) -> None:
    """Clear what a writer killed mid-save left in `directory`: its temporaries are deleted, and a
    directory caught between replace_dir's two renames gets its previous version back."""
    directory = Path(directory)
    for tmp in directory.glob(".*.tmp"):
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    for old in directory.glob(".*.old"):
        target = old.with_name(old.name[1 : -len(".old")])
        if target.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, target)
