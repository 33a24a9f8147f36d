"""Decryptions under one key, counted in a file before each is made.

The flooding of :mod:`lepton_flwr.he.publish` is sized for ``DECRYPTIONS`` published
decryptions of a model under one key. Whoever decrypts keeps the count in a folder of
its own, in ``he-decryptions-<key fingerprint>.json``, across processes and runs:

- a client in its node's ``state-dir`` (:mod:`lepton_flwr.mods.decryptions`, which
  counts every use of a model, not only every decryption);
- the key holder beside its secret context, or in a folder it names
  (:func:`lepton_flwr.he.keyholder.decrypt_arrays`, which ``lepton-flwr decrypt``, the
  key holder's evaluation and the simulation runner use).

The count is written before the decryption is made, so a crash can waste a count but
never lose one; a count file that cannot be read (a link, malformed, too large) stops
decrypting rather than restart the count. Each party counts its own decryptions: the
budget is per party and key, not per key across every party that holds it.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from lepton_flwr.files import read_file, write_atomically
from lepton_flwr.numbers import is_int

MAX_BYTES = 4096


class DecryptionCountError(ValueError):
    """The count cannot be read or written, or the budget under the key is spent."""


def count_file(folder: str | Path | None, key_fingerprint: str) -> Path | None:
    """Where decryptions under a key are counted in ``folder``.

    None without a folder, or for a fingerprint that is not hexadecimal (it could not
    name a file safely).
    """
    if not folder or not all(c in "0123456789abcdef" for c in key_fingerprint):
        return None
    return Path(str(folder)) / f"he-decryptions-{key_fingerprint}.json"


def read_count(path: Path | None) -> int:
    """Decryptions counted in ``path`` (0 without a file, or without a path).

    Raises
    ------
    DecryptionCountError
        If the file is a link, too large or malformed: the count must not restart.
    """
    if path is None:
        return 0
    try:
        count = json.loads(read_file(path, MAX_BYTES))["count"]
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DecryptionCountError(
            f"cannot read the decryption count {path.name} ({type(err).__name__}); nothing "
            f"is decrypted rather than restart the count"
        ) from err
    if not is_int(count) or count < 0:
        raise DecryptionCountError(
            f"the decryption count in {path.name} is not a whole number >= 0"
        )
    return count


def write_count(path: Path, count: int) -> None:
    """Replace the count in ``path`` with ``count`` (atomically, never through a link).

    Raises
    ------
    DecryptionCountError
        If it cannot be written; then nothing must be decrypted.
    """
    try:
        write_atomically(path, json.dumps({"count": count}).encode())
    except OSError as err:
        raise DecryptionCountError(
            f"cannot write the decryption count {path.name} ({type(err).__name__}); "
            f"nothing was decrypted"
        ) from err


def spend_one(path: Path, budget: int) -> int:
    """Count one more decryption in ``path``, or refuse it past ``budget``.

    The folder is locked while the count is read and written, so two processes of the
    same party decrypting at once both count.

    Returns
    -------
    int
        The count with this decryption.

    Raises
    ------
    DecryptionCountError
        If ``budget`` decryptions are counted already, or the count cannot be read or
        written (nothing may be decrypted then).
    """
    try:
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise DecryptionCountError(
            f"cannot open the folder of the decryption count {path.name} "
            f"({type(err).__name__}); nothing was decrypted"
        ) from err
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        used = read_count(path)
        if used >= budget:
            raise DecryptionCountError(
                f"{used} decryptions are counted under this key in {path.name}, the most "
                f"its published decryptions are flooded for ({budget}); nothing more is "
                f"decrypted: make new keys (`lepton-flwr keygen`)"
            )
        write_count(path, used + 1)
        return used + 1
    finally:
        os.close(folder)  # closing releases the lock
