"""Writing files that must never be half-written or readable by others."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path: str | Path, data: bytes, mode: int = 0o600) -> Path:
    """Write a new file with ``mode``, then rename it over ``path``.

    The file is created with mode 600 (``mkstemp``) in the target folder and only then
    given ``mode``, so a secret is never readable by others, whatever ``path`` was before
    (a world-readable file keeps nothing; a symlink planted there is replaced, not
    followed), and a crash leaves the old file or the new one, never half of one.
    """
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
