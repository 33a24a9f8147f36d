"""A disk store of a model's fixed features, shared by every process on the machine.

A model whose first stage has no weights (the ScatterNet's scattering) gives every image
the same features in every round, every run and every process. Flower's simulation runs
clients in several actor processes, each with its own memory, and a deployed node starts
a fresh process for every message: kept in memory only, the features are computed again
and again. The store keeps them on disk, once per image, for every process to read.

Layout: ``<folder>/<model>-<key>/shard-<digest>.npy``. The key is a digest of everything
the features depend on besides the image: the model's class and the options of its fixed
stage, the image's shape and dtype, the feature shape, torch's and the model's libraries'
versions (kymatio for the ScatterNet), the device type and this file's format. Within a
key, a shard holds two numpy arrays one after the other: an index of ``(n, 32)`` bytes
(each row a digest of the image's bytes, then a digest of its features) and the features
``(n, *shape)`` float32. An image is found by its own digest, so any subset of any
dataset is served, whichever partition or client holds it, and an image the store has
never seen is computed afresh.

A shard is written to a temporary file in the same folder and renamed into place: a
reader sees a whole shard or none. A shard read from disk is untrusted input: one that is
a link, not a regular file, another user's or writable by others, has another dtype,
shape or size than its key implies, or a malformed header is ignored (and its images
computed afresh); each row served is checked against its digest, and a row that differs
is computed afresh too. A key folder that is a link, another user's or open to others is
neither read nor written. A disk that refuses a write costs speed, not the training.
What these checks cannot catch is a consistent shard with wrong features written under
the user's own account (its digests then match): the folder is as trusted as the user's
own files.

Where it lives: the folder named by the environment variable ``LEPTON_FLWR_FEATURE_CACHE``
(``FEATURE_CACHE_ENV``); unset or empty, nothing is stored. The simulation runner sets it
to :func:`default_folder` unless it is set already (empty turns the store off), and its
Ray actors inherit it; a deployed node uses a store when its SuperNode's environment sets
the variable (Flower 1.42 starts each ``flwr-clientapp`` process with the SuperNode's
environment). A process stores the features only of images it was given to train or test
on, in a key folder only its user may open (mode 700, shards 600): data it already holds.
Nothing is ever deleted: Fashion-MNIST's 70,000 images take 1.1 GB per key (the
ScatterNet's defaults); remove the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from importlib import metadata
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.common.logger import log

FEATURE_CACHE_ENV = "LEPTON_FLWR_FEATURE_CACHE"
FORMAT = 1
DIGEST_BYTES = 16
_SHARD_PREFIX, _SHARD_SUFFIX = "shard-", ".npy"
_HEADER_LIMIT = 10_000  # bytes of a .npy header numpy may parse (its own default)

Compute = Callable[[np.ndarray], np.ndarray]


def default_folder() -> Path:
    """``$XDG_CACHE_HOME/lepton-flwr/features``, else ``~/.cache/lepton-flwr/features``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lepton-flwr" / "features"


def configured_folder() -> Path | None:
    """The folder ``LEPTON_FLWR_FEATURE_CACHE`` names; None (no store) if unset or empty."""
    value = os.environ.get(FEATURE_CACHE_ENV, "")
    return Path(value).expanduser() if value else None


def image_digests(x: np.ndarray) -> list[bytes]:
    """A 16-byte BLAKE2b digest of each example's bytes (row-major float data)."""
    rows = np.ascontiguousarray(x).reshape(len(x), -1)
    return [hashlib.blake2b(row, digest_size=DIGEST_BYTES).digest() for row in rows]


def _library_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def store_key(model, example_shape: tuple[int, ...], dtype: np.dtype, device: str) -> str:
    """The name of the folder that holds ``model``'s features of such examples.

    Everything but the image that the features depend on is in it, so that features made
    under other options, shapes, library versions or on another device type are never
    served.
    """
    import torch

    return _key(
        f"{type(model).__module__}.{type(model).__qualname__}",
        tuple(model.fixed_features_options),
        tuple(int(s) for s in example_shape),
        np.dtype(dtype).str,
        tuple(int(s) for s in model.fixed_features_shape),
        tuple(getattr(model, "fixed_features_libraries", ())),
        torch.device(device).type,
    )


@lru_cache(maxsize=64)
def _key(model_class: str, options: tuple, example_shape, dtype, feature_shape, libraries, device):
    import torch

    versions = [("torch", torch.__version__)] + [(n, _library_version(n)) for n in libraries]
    identity = (FORMAT, model_class, options, example_shape, dtype, feature_shape, versions, device)
    digest = hashlib.blake2b(repr(identity).encode(), digest_size=12).hexdigest()
    return f"{model_class.rsplit('.', 1)[-1]}-{digest}"


class FeatureStore:
    """One key's folder: look features up by image digest, add the ones computed.

    Parameters
    ----------
    folder : Path
        The key's folder (created, mode 700, when the first shard is written).
    feature_shape : tuple[int, ...]
        The shape of one example's features; a shard with another is ignored.
    """

    def __init__(self, folder: Path, feature_shape: tuple[int, ...]):
        self.folder = Path(folder)
        self.feature_shape = tuple(int(s) for s in feature_shape)
        self._row_bytes = 4 * int(np.prod(self.feature_shape))
        self._shards: dict[str, tuple[np.ndarray, np.memmap] | None] = {}
        self._where: dict[bytes, tuple[str, int]] = {}
        self._bad_rows: set[tuple[str, int]] = set()
        self.refused: list[str] = []  # shards ignored, with the reason (for logs and tests)

    # --- reading ---------------------------------------------------------------------------
    def _scan(self) -> None:
        """Open the shards this process has not seen yet; index their images.

        Nothing is read from a folder that is a link, another user's, or open to others.
        """
        if not self._folder_is_ours():
            return
        names = sorted(os.listdir(self.folder))
        for name in names:
            if not (name.startswith(_SHARD_PREFIX) and name.endswith(_SHARD_SUFFIX)):
                continue
            if name in self._shards:
                continue
            try:
                shard = self._open(self.folder / name)
            except Exception as err:  # noqa: BLE001 - numpy's parser, fed a hostile header
                self._refuse(name, f"{type(err).__name__}: {err}")
                continue
            self._shards[name] = shard
            self._index(name, shard[0])

    def _folder_is_ours(self) -> bool:
        """Whether the folder exists, is no link, is ours and only we may write to it."""
        try:
            info = os.lstat(self.folder)
        except FileNotFoundError:
            return False
        if (
            stat.S_ISDIR(info.st_mode)
            and info.st_uid == os.geteuid()
            and not stat.S_IMODE(info.st_mode) & 0o077
        ):
            return True
        reason = f"{self.folder} is a link, not a folder, another user's or open to others"
        if reason not in self.refused:
            self.refused.append(reason)
        return False

    def _index(self, name: str, index: np.ndarray) -> None:
        for row, digest in enumerate(index[:, :DIGEST_BYTES]):
            if (name, row) not in self._bad_rows:
                self._where.setdefault(digest.tobytes(), (name, row))

    def _refuse(self, name: str, reason: str, row: int | None = None) -> None:
        """Ignore a shard (or one of its rows) from now on in this process; index the rest."""
        if row is None:
            self._shards[name] = None
        else:
            self._bad_rows.add((name, row))
        self.refused.append(f"{name}: {reason}")
        self._where = {}
        for other, shard in self._shards.items():
            if shard is not None:
                self._index(other, shard[0])

    def _open(self, path: Path) -> tuple[np.ndarray, np.memmap]:
        """Read a shard's index and map its features read-only, checking both headers.

        Raises
        ------
        ValueError
            If the file is not two arrays of the expected dtypes and shapes filling it.
        OSError
            If it is a link, not a regular file, or cannot be read.
        """
        from lepton_flwr.files import open_regular

        with os.fdopen(open_regular(path), "rb") as handle:
            info = os.fstat(handle.fileno())
            if info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o022:
                raise ValueError("another user owns it or may write to it")
            size = info.st_size
            count, index_offset = _read_header(handle, np.uint8, lambda n: (n, 2 * DIGEST_BYTES))
            if index_offset + count * (2 * DIGEST_BYTES + self._row_bytes) > size:
                raise ValueError(f"{size} bytes: too few for {count} rows")
            index = np.frombuffer(handle.read(count * 2 * DIGEST_BYTES), np.uint8)
            index = index.reshape(count, 2 * DIGEST_BYTES)
            rows, offset = _read_header(handle, np.float32, lambda n: (n, *self.feature_shape))
            if rows != count:
                raise ValueError(f"{count} index rows but {rows} feature rows")
            if size != offset + count * self._row_bytes:
                raise ValueError(
                    f"{size} bytes where the headers imply {offset + count * self._row_bytes}"
                )
            features = np.memmap(handle, np.float32, "r", offset, (count, *self.feature_shape))
        return index, features

    def read(self, digests: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
        """The stored features of the images with these digests.

        Returns
        -------
        tuple[np.ndarray, np.ndarray]
            An ``(n, *feature_shape)`` float32 array, filled where found, and the positions
            (into ``digests``) of the images not found or whose stored rows failed their check.
        """
        features = np.zeros((len(digests), *self.feature_shape), np.float32)
        if any(d not in self._where for d in digests):
            self._scan()  # another process may have added them since
        missing = [i for i, d in enumerate(digests) if not self._fill(d, features, i)]
        return features, np.array(missing, dtype=np.int64)

    def lacking(self, digests: Sequence[bytes]) -> np.ndarray:
        """The positions of the images no shard indexes (their rows are checked when read)."""
        if any(d not in self._where for d in digests):
            self._scan()
        return np.array([i for i, d in enumerate(digests) if d not in self._where], np.int64)

    def _fill(self, digest: bytes, out: np.ndarray, i: int) -> bool:
        """Copy the image's stored row into ``out[i]`` if one passes its check."""
        while (where := self._where.get(digest)) is not None:
            name, row = where
            index, features = self._shards[name]
            out[i] = features[row]
            check = hashlib.blake2b(out[i], digest_size=DIGEST_BYTES).digest()
            if check == index[row, DIGEST_BYTES:].tobytes():
                return True
            self._refuse(name, f"row {row}'s features differ from their digest", row)
        return False

    # --- writing ---------------------------------------------------------------------------
    def add(self, digests: Sequence[bytes], features: np.ndarray) -> None:
        """Write the features of images not stored yet as a new shard (atomically)."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.shape != (len(digests), *self.feature_shape):
            raise ValueError(f"features of shape {features.shape} for {len(digests)} images")
        fresh, seen = [], set()
        for i, digest in enumerate(digests):
            if digest not in self._where and digest not in seen:
                fresh.append(i)
                seen.add(digest)
        if not fresh:
            return
        features = features[fresh]
        index = np.empty((len(fresh), 2 * DIGEST_BYTES), np.uint8)
        for row, i in enumerate(fresh):
            index[row, :DIGEST_BYTES] = np.frombuffer(digests[i], np.uint8)
            check = hashlib.blake2b(features[row], digest_size=DIGEST_BYTES).digest()
            index[row, DIGEST_BYTES:] = np.frombuffer(check, np.uint8)
        name = f"{_SHARD_PREFIX}{hashlib.blake2b(index, digest_size=16).hexdigest()}{_SHARD_SUFFIX}"
        try:
            self._write(name, index, features)
        except OSError as err:  # a full or read-only disk costs speed, never the training
            log(WARNING, "fixed features not stored in %s: %s", self.folder, err)
            return
        self._scan()

    def _write(self, name: str, index: np.ndarray, features: np.ndarray) -> None:
        """Write a shard to a temporary file beside it, then rename it into place."""
        self.folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.folder.mkdir(mode=0o700, exist_ok=True)
        if not self._folder_is_ours():
            return  # neither read nor written: others could read or change it
        descriptor, temporary = tempfile.mkstemp(prefix=".writing-", dir=self.folder)
        try:
            with os.fdopen(descriptor, "wb") as handle:  # mkstemp's mode: 600
                np.lib.format.write_array(handle, index, allow_pickle=False)
                np.lib.format.write_array(handle, features, allow_pickle=False)
            os.replace(temporary, self.folder / name)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _read_header(
    handle, dtype, expected_shape: Callable[[int], tuple[int, ...]]
) -> tuple[int, int]:
    """Parse one .npy header; return its row count and the offset of its data.

    Raises
    ------
    ValueError
        If the header is malformed or its dtype, order or shape is not the expected one.
    """
    version = np.lib.format.read_magic(handle)
    reader = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }.get(version)
    if reader is None:
        raise ValueError(f".npy format version {version} is not one numpy writes here")
    shape, fortran_order, found = reader(handle, max_header_size=_HEADER_LIMIT)
    if found != np.dtype(dtype).newbyteorder("<") or fortran_order:
        raise ValueError(
            f"dtype {found}{' (Fortran order)' if fortran_order else ''}, not {np.dtype(dtype)}"
        )
    if len(shape) < 1 or tuple(shape) != expected_shape(shape[0]):
        raise ValueError(f"shape {shape}, not {expected_shape(shape[0] if shape else 0)}")
    return int(shape[0]), handle.tell()


_STORES: dict[tuple[Path, str], FeatureStore] = {}


def store_for(model, x: np.ndarray, device: str) -> FeatureStore | None:
    """The store for ``model``'s features of examples like ``x``; None if there is none.

    None when ``LEPTON_FLWR_FEATURE_CACHE`` names no folder or the model does not declare
    its features' shape (``fixed_features_shape``). One object per folder and key in a
    process, so that its shards are opened once.
    """
    root = configured_folder()
    shape = getattr(model, "fixed_features_shape", None)
    if root is None or shape is None:
        return None
    key = store_key(model, x.shape[1:], x.dtype, device)
    if (root, key) not in _STORES:
        _STORES[root, key] = FeatureStore(root / key, shape)
    return _STORES[root, key]


def features_through(
    store: FeatureStore, x: np.ndarray, digests: Sequence[bytes], compute: Compute
) -> np.ndarray:
    """Features of ``x``: the stored ones, the rest computed with ``compute`` and added."""
    features, missing = store.read(digests)
    if len(missing):
        fresh = compute(x[missing])
        features[missing] = fresh
        store.add([digests[i] for i in missing], fresh)
    return features
