"""Files that must never be half-written, read through a link, or readable by others.

A file we write is never written through a symbolic link planted where it goes: it is
written to a new file and renamed over the path (:func:`write_atomically`), or opened
with ``O_NOFOLLOW`` (:func:`open_for_append`). A file we read is opened with
``O_NOFOLLOW`` too, must be a regular file, and has a size cap (:func:`read_file`); a
secret must also be ours and readable by us only (:func:`read_private`).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import TextIO


class UnsafeFileError(OSError):
    """A link, not a regular file, too large, or (a secret) readable by others.

    The message names the path and the reason.
    """


def _temporary_beside(path: Path, data: bytes, mode: int) -> str:
    """A new file in ``path``'s folder holding ``data`` (synced), then given ``mode``.

    It is created with mode 600 (``mkstemp``), so a secret is never readable by others.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return temporary


def write_atomically(path: str | Path, data: bytes, mode: int = 0o600) -> Path:
    """Write a new file with ``mode``, then rename it over ``path``.

    Whatever ``path`` was before, it is replaced, not written through (a world-readable
    file keeps nothing; a symlink planted there is replaced, not followed), and a crash
    leaves the old file or the new one, never half of one.
    """
    path = Path(path)
    temporary = _temporary_beside(path, data, mode)
    try:
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def create_exclusively(path: str | Path, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` unless something is there already; True if made.

    The content is written to a temporary file first and then linked to ``path``, which
    fails if ``path`` exists (a file, or a link, which is not followed): two processes
    creating the same file at once end up with one complete file, the first one's.
    """
    path = Path(path)
    temporary = _temporary_beside(path, data, mode)
    try:
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        Path(temporary).unlink(missing_ok=True)


def open_regular(path: str | Path, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """``os.open`` that refuses a symbolic link at ``path`` and anything but a regular file.

    ``O_NOFOLLOW`` makes the kernel refuse a link in the last component; ``O_NONBLOCK``
    keeps a FIFO planted there from blocking the open (it is then refused as not a
    regular file).

    Raises
    ------
    UnsafeFileError
        If ``path`` is a symbolic link or not a regular file.
    OSError
        If it cannot be opened otherwise (``FileNotFoundError`` if missing).
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path} is a symbolic link; links are never followed") from err
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeFileError(f"{path} is not a regular file")
    return fd


def read_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of a regular file, never read through a link, at most ``max_bytes``.

    Raises
    ------
    UnsafeFileError
        If ``path`` is a link, not a regular file, or holds more than ``max_bytes``.
    OSError
        If it cannot be read otherwise.
    """
    return _read(path, max_bytes, private=False)


def read_private(path: str | Path, max_bytes: int) -> bytes:
    """:func:`read_file` for a secret: it must also be ours and unreadable by others.

    Raises
    ------
    UnsafeFileError
        As :func:`read_file`, or if the file belongs to another user or its mode lets
        the group or others read or write it.
    """
    return _read(path, max_bytes, private=True)


def _read(path: str | Path, max_bytes: int, private: bool) -> bytes:
    with os.fdopen(open_regular(path), "rb") as handle:
        info = os.fstat(handle.fileno())
        if private and info.st_uid != os.geteuid():
            raise UnsafeFileError(f"{path} belongs to another user (uid {info.st_uid})")
        if private and stat.S_IMODE(info.st_mode) & 0o077:
            raise UnsafeFileError(
                f"{path} has mode {stat.S_IMODE(info.st_mode):o}: others may read or change "
                f"it; it must be 600"
            )
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafeFileError(f"{path} holds more than {max_bytes} bytes")
    return data


def open_for_append(path: str | Path, mode: int = 0o644) -> TextIO:
    """Open a text file for appending (created with ``mode``), never through a link.

    Raises
    ------
    UnsafeFileError
        If ``path`` is a symbolic link or not a regular file.
    """
    fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    return os.fdopen(fd, "a", encoding="utf-8")
