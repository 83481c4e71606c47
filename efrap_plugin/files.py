"""Writing outputs atomically and reading safetensors files: the library's only file I/O helpers."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import EFRAPError, ModelError

__all__ = ["atomic_write", "check_writable", "read_safetensors", "safetensors_shapes", "staged"]


def _umask() -> int:
    """The process umask (read without changing it where /proc allows; else set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(path: str | Path, what: str = "output") -> Path:
    """Refuse, before any work, an output path that is a folder or whose folder cannot be written.

    Probed by creating (and removing) a file in the nearest existing folder: permission bits say
    nothing to root, nor about a read-only file system.
    """
    path = Path(path)
    if path.is_dir():
        raise EFRAPError(f"{what}: {path} is a folder; pass a file path such as {path / 'model.onnx'}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    reason = f"{folder} is not a folder"
    if folder.is_dir():
        try:
            with tempfile.TemporaryFile(dir=folder):
                return path
        except OSError as exc:
            reason = f"cannot create a file in {folder}: {exc.strerror or exc}"
    raise EFRAPError(f"{what}: cannot write {path} ({reason}); choose another path")


def atomic_write(path: Path, data: bytes) -> Path:
    """Write to a temporary name in the same folder, then rename: never a half-written file.

    The file gets the mode a plain ``open(path, "w")`` would (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise EFRAPError(f"output: cannot write {path} ({exc.strerror}); choose a writable path") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise EFRAPError(f"output: cannot write {path} ({exc.strerror}); choose a writable path") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def staged(path: str | Path | None) -> Iterator[Path | None]:
    """A temporary name beside ``path`` to write to; renamed to ``path`` only if the block succeeds.

    Several outputs staged together appear together or not at all: nothing is left at ``path`` (or
    beside it) when any step fails. ``None`` passes through, for optional outputs.
    """
    if path is None:
        yield None
        return
    path = check_writable(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial{path.suffix}"
    try:
        yield tmp
        if tmp.exists():
            os.replace(tmp, path)
    except EFRAPError as exc:  # a message names the output the user asked for, not its hidden stand-in
        text = str(exc).replace(str(tmp), str(path)).replace(tmp.name, path.name)
        if text == str(exc):
            raise
        raise type(exc)(text) from None
    finally:
        tmp.unlink(missing_ok=True)


def safetensors_shapes(path: str | Path, what: str, hint: str) -> tuple[dict[str, str], dict[str, tuple]]:
    """Header metadata and each tensor's shape, read without loading any tensor."""
    from safetensors import safe_open

    path = Path(path)
    _check_readable_file(path, what, hint)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        raise ModelError(f"{what}: {path} is not a readable safetensors file ({exc})") from None


def _check_readable_file(path: Path, what: str, hint: str) -> None:
    """A regular file, or an error that says what ``path`` is instead (missing, a folder, a pipe)."""
    if path.is_file():
        return
    if not path.exists():
        raise ModelError(f"{what}: {path} does not exist; pass {hint}")
    kind = "a folder" if path.is_dir() else "not a regular file (a pipe, socket or device)"
    raise ModelError(f"{what}: {path} is {kind}; pass {hint}")


def read_safetensors(
    path: str | Path, what: str, hint: str
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Header metadata and tensors of a safetensors file; ``what``/``hint`` shape the error messages."""
    from safetensors import safe_open

    path = Path(path)
    _check_readable_file(path, what, hint)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ModelError(f"{what}: {path} is not a readable safetensors file ({exc})") from None
