"""Writing a file so that a crash never leaves it half-written: temp name, then rename."""

from __future__ import annotations

import errno
import os
from pathlib import Path


# Errors of the destination, not of the data: a full disk or quota, a file too large, a read-only mount.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class WriteError(OSError):
    """A file could not be written (disk full, quota, permissions); `filename` is the file
    that was meant, and no temporary file is left."""


def write_error(error: OSError, path: str | Path) -> WriteError:
    """`error` as a `WriteError` whose message names `path` (a failed `write()` names no file)."""
    code = error.errno or errno.EIO
    return WriteError(code, f"cannot write {path}: {os.strerror(code)}", str(path))


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (bytes, or text as UTF-8) to `path` through `path.tmp` and a rename. A failed
    write removes the temp file and raises `WriteError` naming `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        tmp.replace(path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise write_error(error, path) from error
    return path
