"""A disk cache of scikit-learn's bundled datasets, split: a process need not import it.

A SuperNode starts a fresh process for every message, and loading scikit-learn's digits
(or breast cancer, diabetes) imports scikit-learn, SciPy and pandas first: about a second
per message for some 500 KB of data. The first process to load a set writes its
train/test split (the arrays :class:`~lepton_flwr.data.datasets.CentralData` holds, bit
for bit) to one ``.npz`` file; the next ones read it with numpy alone.

The file's name holds a digest of everything the split depends on: the dataset, its
options and seed, the versions of scikit-learn and numpy, and the source of
:mod:`lepton_flwr.data.datasets` and of this module, so a change to any of them reads
another file and the old one is never used again (it cannot go stale). The digest is also
stored inside the file and must match.

A folder that belongs to another user, or that others may write in, is not used. A file
read back is untrusted input: one that is a link or not a regular file, another user's or
open to others (not mode 600), larger than ``MAX_BYTES``, not a zip of exactly the
expected arrays unpacking to at most ``MAX_BYTES``, or whose arrays have another dtype,
shape, row count, non-finite values or labels or features out of range, is refused, the
set is loaded from scikit-learn, and the file replaced. Values within range cannot be
told from the real ones: the folder is as trusted as the user's own files. Files are
written whole (a temporary file renamed into place), mode 600, in a folder of mode 700.
They hold a public dataset, never a node's own data.

Where: the folder named by ``LEPTON_FLWR_DATA_CACHE`` (``DATA_CACHE_ENV``); unset, the
user's cache folder (:func:`default_folder`); set but empty, no cache (every process
imports scikit-learn, as before).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import stat
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from lepton_flwr.arrays import npy_header
from lepton_flwr.files import read_private, write_atomically

DATA_CACHE_ENV = "LEPTON_FLWR_DATA_CACHE"
FORMAT = 1
MAX_BYTES = 64 << 20  # of a file, and of its arrays unpacked
ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_KEY = "key"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """What a dataset's split must look like to be accepted from disk.

    Attributes
    ----------
    rows : int
        Examples in the whole set (train + test).
    example_shape : tuple[int, ...]
        Shape of one example.
    num_outputs : int
        Classes (labels int64 in ``[0, num_outputs)``), or 1 for a regression (float32).
    value_range : tuple[float, float] | None
        Bounds every feature lies within, if the set has them.
    """

    rows: int
    example_shape: tuple[int, ...]
    num_outputs: int
    value_range: tuple[float, float] | None = None

    def test_rows(self, test_fraction: float) -> int:
        """Rows of the test split, as scikit-learn's ``train_test_split`` counts them."""
        return math.ceil(test_fraction * self.rows)


def default_folder() -> Path:
    """``$XDG_CACHE_HOME/lepton-flwr/datasets``, else ``~/.cache/lepton-flwr/datasets``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lepton-flwr" / "datasets"


def configured_folder() -> Path | None:
    """The folder ``LEPTON_FLWR_DATA_CACHE`` names; unset, :func:`default_folder`; empty, None.

    Unset in a process with no home folder to find, None too.
    """
    value = os.environ.get(DATA_CACHE_ENV)
    if value is None:
        try:
            return default_folder()
        except (RuntimeError, KeyError):  # Path.home() without HOME or a passwd entry
            return None
    return Path(value).expanduser() if value else None


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


def cache_key(name: str, options: tuple, seed: int) -> str:
    """A digest of everything a packaged split depends on (see the module's docstring)."""
    from lepton_flwr.data import datasets

    code = hashlib.blake2b(digest_size=16)
    for source in (datasets.__file__, __file__):
        code.update(Path(source).read_bytes())
    inputs = (
        FORMAT,
        name,
        options,
        seed,
        _version("scikit-learn"),
        np.__version__,
        code.hexdigest(),
    )
    return hashlib.blake2b(repr(inputs).encode(), digest_size=16).hexdigest()


def split_error(arrays: dict[str, np.ndarray], layout: Layout, test_fraction: float) -> str | None:
    """Why ``arrays`` are not a split of ``layout`` with ``test_fraction``; None if they are."""
    if set(arrays) != set(ARRAYS):
        return f"holds {sorted(arrays)}, not {list(ARRAYS)}"
    x_train, y_train, x_test, y_test = (arrays[name] for name in ARRAYS)
    label_dtype = np.float32 if layout.num_outputs == 1 else np.int64
    n_test = layout.test_rows(test_fraction)
    expected = {
        "x_train": (np.float32, (layout.rows - n_test, *layout.example_shape)),
        "y_train": (label_dtype, (layout.rows - n_test,)),
        "x_test": (np.float32, (n_test, *layout.example_shape)),
        "y_test": (label_dtype, (n_test,)),
    }
    for name, (dtype, shape) in expected.items():
        array = arrays[name]
        if array.dtype != dtype or array.shape != shape:
            return f"{name} is {array.dtype} {array.shape}, not {np.dtype(dtype)} {shape}"
    for name in ARRAYS:
        if not np.isfinite(arrays[name]).all():
            return f"{name} holds a value that is not finite"
    if layout.value_range is not None:
        low, high = layout.value_range
        for x in (x_train, x_test):
            if x.size and (x.min() < low or x.max() > high):
                return f"a feature lies outside [{low}, {high}]"
    if layout.num_outputs > 1:
        for y in (y_train, y_test):
            if y.size and (y.min() < 0 or y.max() >= layout.num_outputs):
                return f"a label lies outside [0, {layout.num_outputs})"
    return None


def _check_header(handle, member: zipfile.ZipInfo) -> None:
    """Refuse a member whose ``.npy`` header declares more data than the member holds.

    numpy allocates the declared shape before reading the data: a small file declaring
    2^60 values would end the process with MemoryError instead of being refused.
    """
    try:
        shape, dtype = npy_header(handle)
    except ValueError as err:
        raise ValueError(f"{member.filename}: {err}") from err
    if dtype.hasobject:
        raise ValueError(f"{member.filename}: holds Python objects")
    if math.prod(shape) * dtype.itemsize > member.file_size:
        raise ValueError(f"{member.filename}: its header declares more data than it holds")


def _read(path: Path, key: str) -> dict[str, np.ndarray]:
    """The arrays of a cache file; raises ValueError (or OSError) on anything unexpected."""
    data = read_private(path, MAX_BYTES)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        members = archive.infolist()
        names = sorted(member.filename for member in members)
        if names != sorted(f"{name}.npy" for name in (*ARRAYS, _KEY)):
            raise ValueError(f"holds {names}")
        if sum(member.file_size for member in members) > MAX_BYTES:
            raise ValueError(f"unpacks to more than {MAX_BYTES} bytes")
        arrays = {}
        for member in members:
            with archive.open(member) as handle:
                _check_header(handle, member)
            with archive.open(member) as handle:
                arrays[member.filename[: -len(".npy")]] = np.lib.format.read_array(
                    handle, allow_pickle=False
                )
    stored = arrays.pop(_KEY)
    if stored.shape != () or stored.dtype.kind != "U" or str(stored) != key:
        raise ValueError("was written for other inputs (its key differs)")
    return arrays


def _unsafe_folder(folder: Path) -> str | None:
    """Why ``folder`` may not hold the cache (another user's, or others may write in it)."""
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        return None  # created (mode 700) when the first split is written
    except OSError as err:
        return str(err)
    if not stat.S_ISDIR(info.st_mode):
        return "not a folder"
    if info.st_uid != os.geteuid():
        return f"it belongs to another user (uid {info.st_uid})"
    if info.st_mode & 0o022:
        return f"mode {stat.S_IMODE(info.st_mode):o}: others may write in it"
    return None


def _write(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, **{_KEY: np.array(key)})
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomically(path, buffer.getvalue(), 0o600)


def load_through_cache(
    name: str,
    options: tuple,
    seed: int,
    test_fraction: float,
    layout: Layout,
    load: Callable[[], dict[str, np.ndarray]],
    folder: Path | None,
) -> dict[str, np.ndarray]:
    """The split's arrays from ``folder`` if a sound file is there; else ``load()``, kept there.

    Parameters
    ----------
    name, options, seed :
        The dataset, its loader options and its split seed (the cache key's inputs).
    test_fraction : float
        The test split's fraction, in (0, 1): how many test rows a sound file holds.
    layout : Layout
        What a sound file holds.
    load : Callable[[], dict[str, np.ndarray]]
        Loads the split afresh (with scikit-learn), arrays named as ``ARRAYS``.
    folder : Path | None
        The cache folder; None loads afresh and keeps nothing.
    """
    if folder is None:
        return load()
    unsafe = _unsafe_folder(folder)
    if unsafe is not None:
        logger.warning("dataset cache %s not used (%s): loading %s afresh", folder, unsafe, name)
        return load()
    key = cache_key(name, options, seed)
    path = folder / f"{name}-{key}.npz"
    try:
        arrays = _read(path, key)
        reason = split_error(arrays, layout, test_fraction)
    except FileNotFoundError:
        reason = None
        arrays = None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        reason, arrays = str(err) or type(err).__name__, None
    if arrays is not None and reason is None:
        return arrays
    if reason is not None:
        logger.warning("dataset cache %s refused (%s): loading %s afresh", path, reason, name)
    arrays = load()
    if split_error(arrays, layout, test_fraction) is None:
        try:
            _write(path, key, arrays)
        except OSError as err:  # a read-only or full disk: the run goes on without a cache
            logger.info("dataset cache %s not written: %s", path, err)
    return arrays
