"""Writes that leave either the old file or the new one, never a torn one (kill -9 safe), and
never touch what another command or the user put there.

A directory a command writes as a whole (fuse's model, convert's adapter, a checkpoint, a data
cache entry) or writes files into (train's --adapter-path) holds OWNER, naming the command and
the files it wrote. A command replaces a directory only while every file in it is one OWNER
lists; one that writes named files into a directory does so where none of those names is taken,
or where OWNER says it wrote them.
"""

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Collection
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


OWNER = ".mlx-lora-output.json"  # hidden: loaders and uploads pass it by
# What a failed write says: these mean the disk, not the code; anything else is a bug to show.
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


def owner_of(directory: Path) -> dict | None:
    """What OWNER in `directory` says ({"written_by", "files"}), or None where there is none or it is unreadable."""
    try:
        data = json.loads((Path(directory) / OWNER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("written_by"), str) else None


def _foreign(directory: Path, command: str, writes: Collection[str] | None) -> list[str]:
    """The entries of `directory` that `command` would replace though it did not write them.
    Writing the whole directory (`writes` None) replaces every entry; writing the names in
    `writes` into it replaces only those, and only where its OWNER names another writer or none."""
    entries = sorted(p.name for p in directory.iterdir() if p.name != OWNER)
    owner = owner_of(directory)
    if owner is None or owner["written_by"] != command:
        return [e for e in entries if writes is None or e in writes]
    listed = owner.get("files") if writes is None else None
    if not isinstance(listed, list):
        return []
    written = {Path(f).parts[0] for f in listed if isinstance(f, str) and f}
    on_disk = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {OWNER}
    return sorted({Path(f).parts[0] for f in on_disk - set(listed)} | (set(entries) - written))


def claim_dir(
    directory: Path,
    command: str,
    flag: str,
    inputs: dict[str, Path] | None = None,
    writes: Collection[str] | None = None,
) -> None:
    """Refuse to write `command`'s output to `directory` where it would replace a file `command`
    did not write (claim_dir's _foreign), or one of `inputs` ({flag: path})."""
    directory = Path(directory)
    for name, path in (inputs or {}).items():
        if path is not None and Path(path).exists() and directory.resolve() in (p := Path(path).resolve(), *p.parents):
            what = "is" if p == directory.resolve() else "holds"
            raise UserError(f"{flag} {directory} {what} the input {name} {path}; choose another directory")
    if not directory.exists():
        return
    if not directory.is_dir():
        raise UserError(f"{flag} {directory}: is a file, not a directory; choose a new or empty directory")
    foreign = _foreign(directory, command, writes)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(
            f"{flag} {directory}: holds other files than {command} wrote ({shown}); "
            "choose a new or empty directory, or move those out of it"
        )


def mark_dir(directory: Path, command: str) -> None:
    """Make `directory` (if new) and record that `command` writes into it (claim_dir first)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (owner_of(directory) or {}).get("written_by") != command:
        write_json(directory / OWNER, {"written_by": command})


def _fsync_dir(directory: Path) -> None:
    """A rename is on disk only once its directory is: after a power loss, the old or the new name."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_error(path: Path, e: OSError) -> UserError:
    reason = (e.strerror or os.strerror(e.errno)).lower()
    return UserError(f"{path}: cannot write it ({reason}); it was left as it was; free some space and run again")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_file(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any saved file
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        if e.errno in DISK_ERRORS:
            raise _disk_error(path, e) from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data) -> None:
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_bytes(path: Path, data: bytes) -> None:
    _replace_file(Path(path), lambda f: f.write(data))


def save_safetensors(path: Path, arrays: dict[str, mx.array], metadata: dict | None = None) -> None:
    # Through a Python file: a failed write raises OSError with its reason (a path gives RuntimeError without one).
    _replace_file(Path(path), lambda f: mx.save_safetensors(f, arrays, metadata=metadata or {}))


@contextmanager
def replace_dir(path: Path, command: str, flag: str, inputs: dict[str, Path] | None = None):
    """Yield a fresh temporary directory that replaces `path` only if the block succeeds, and only
    while `path` is new, empty or `command`'s own output (claim_dir, checked again before the swap)."""
    path = Path(path)
    claim_dir(path, command, flag, inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        try:
            yield tmp
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            write_json(tmp / OWNER, {"written_by": command, "files": files})
            for f in tmp.rglob("*"):  # on disk before the rename publishes them
                if f.is_file():
                    with open(f, "rb") as handle:
                        os.fsync(handle.fileno())
        except OSError as e:
            if e.errno in DISK_ERRORS:
                raise _disk_error(path, e) from None
            raise
        except RuntimeError as e:  # mx.save_safetensors given a path (mlx-lm's writers) says no reason
            if not str(e).startswith("[write]"):
                raise
            full = shutil.disk_usage(tmp).free < 2**20
            raise _disk_error(path, OSError(errno.ENOSPC if full else errno.EIO, None if full else str(e))) from None
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        claim_dir(path, command, flag, inputs)
        _swap(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap(tmp: Path, path: Path) -> None:
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_stale(directory: Path) -> None:
    """Clear what a writer killed mid-save left in `directory`: its temporaries are deleted, and a
    directory caught between replace_dir's two renames gets its previous version back."""
    directory = Path(directory)
    for tmp in [*directory.glob(".*.tmp"), *directory.glob(".*.tmp.safetensors")]:  # the latter: older versions
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    for old in directory.glob(".*.old"):
        target = old.with_name(old.name[1 : -len(".old")])
        if target.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, target)
