"""Reading named arrays from an untrusted .npz: only the arrays asked for, only the rows used.

``np.load`` inflates a whole member on access, whatever its header declares; here each member's .npy
header is read first, its declared size checked, and only the leading rows the work needs are
streamed out of the archive.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from .errors import DataError

__all__ = ["MAX_ARRAY_BYTES", "read_npz_arrays"]

MAX_ARRAY_BYTES = 4 << 30
"""The most one array read from an .npz may take in memory (after taking only the rows used)."""


def _read_header(fh, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(fh)
        return np.lib.format.read_array_header_2_0(fh)
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{where}: not a readable .npy array ({exc})") from None


def _read_rows(zf: zipfile.ZipFile, member: str, rows: int | None, where: str) -> np.ndarray:
    with zf.open(member) as fh:
        shape, fortran, dtype = _read_header(fh, where)
        if dtype.hasobject:
            raise DataError(f"{where}: holds Python objects (dtype {dtype}); save plain numeric arrays")
        if fortran and len(shape) > 1:
            raise DataError(f"{where}: stored in Fortran order; save it with np.ascontiguousarray(x)")
        full = (shape[0] if rows is None else min(shape[0], rows), *shape[1:]) if shape else ()
        nbytes = math.prod(full) * dtype.itemsize
        if nbytes > MAX_ARRAY_BYTES:
            raise DataError(
                f"{where}: {full} {dtype} would take {nbytes / 2**30:.1f} GiB (the limit is "
                f"{MAX_ARRAY_BYTES / 2**30:.0f} GiB); pass fewer or smaller inputs"
            )
        try:
            data = fh.read(nbytes)
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"{where}: damaged archive member ({exc})") from None
    if len(data) < nbytes:
        raise DataError(f"{where}: header declares {shape} {dtype}, the file holds fewer bytes")
    return np.frombuffer(data, dtype=dtype).reshape(full).copy()


def read_npz_arrays(
    path: str | Path, names: tuple[str, ...], rows: int | None = None
) -> tuple[dict[str, np.ndarray], list[str]]:
    """The arrays ``names`` present in ``path`` (others are never read), each cut to its first ``rows``,
    and the names of every array the archive holds."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = {n.removesuffix(".npy"): n for n in zf.namelist()}
            found = {n: _read_rows(zf, members[n], rows, f"{path}:{n}") for n in names if n in members}
            return found, sorted(members)
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError) as exc:
        raise DataError(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})") from None
