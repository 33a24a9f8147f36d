"""Split a training pool across clients with flwr-datasets partitioners, offline.

IID shards are flwr-datasets' own, computed without importing it (:func:`iid_shards`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lepton_flwr.config import ConfigError
from lepton_flwr.data.datasets import CentralData, load_dataset

# Partitioners run on a local `datasets.Dataset`; nothing may touch the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

PARTITIONERS = ("iid", "dirichlet", "natural")


@dataclass(frozen=True)
class ClientData:
    """One client's own data: a local training split and a local test split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def natural_id_count(data: CentralData) -> int:
    """Number of distinct natural client ids in a training pool."""
    if data.natural_ids is None:
        return 0
    return len(np.unique(data.natural_ids))


def resolve_num_partitions(cfg: dict) -> int:
    """Number of clients the config asks for (one per natural id when it says null).

    Raises
    ------
    ConfigError
        If ``partition=natural`` and an explicit node count differs from the number
        of natural ids.
    """
    requested = cfg["simulation"]["num_supernodes"]
    if cfg["partition"]["name"] != "natural":
        return requested
    count = natural_id_count(load_dataset(cfg["dataset"], cfg["seed"]))
    if requested is not None and requested != count:
        raise ConfigError(
            f"partition=natural gives one client per '{cfg['dataset']['natural_id']}' value: "
            f"{count} clients, but simulation.num_supernodes={requested}. "
            f"Set simulation.num_supernodes={count} or null."
        )
    return count


def _make_partitioner(partition_cfg: dict, num_partitions: int, seed: int):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    name = partition_cfg["name"]
    if name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(partition_cfg["alpha"]),
            min_partition_size=int(partition_cfg.get("min_partition_size", 0)),
            seed=seed,
        )
    if name == "natural":
        return NaturalIdPartitioner(partition_by="natural_id")
    raise ConfigError(f"Unknown partition '{name}'. Allowed choices: {', '.join(PARTITIONERS)}.")


def partition_indices(
    data: CentralData, partition_cfg: dict, num_partitions: int, seed: int = 0
) -> list[np.ndarray]:
    """Row indices of the training pool that each client gets.

    Only a label column, the natural id and the row index go through flwr-datasets,
    so partitioning stays fast whatever the size of the features.

    Raises
    ------
    ConfigError
        More clients than training samples, a non-positive alpha, label partitioning
        of a regression target, or a partitioner that cannot meet its constraints.
    """
    name = partition_cfg["name"]
    n_rows = len(data.y_train)
    if num_partitions < 1:
        raise ConfigError(f"Number of clients must be >= 1, got {num_partitions}.")
    if num_partitions > n_rows:
        raise ConfigError(
            f"{num_partitions} clients but only {n_rows} training samples: "
            f"every client needs at least one. Use fewer clients."
        )
    if name == "dirichlet":
        if partition_cfg["alpha"] <= 0:
            raise ConfigError(f"partition.alpha must be > 0, got {partition_cfg['alpha']}.")
        if data.num_outputs == 1:
            raise ConfigError(
                "partition=dirichlet splits by class label; this dataset is a regression."
            )
    if name == "iid":
        return iid_shards(n_rows, num_partitions)
    from datasets import Dataset  # with flwr-datasets: pandas, matplotlib (seconds)

    columns = {"row": np.arange(n_rows), "label": data.y_train}
    if name == "natural":
        if data.natural_ids is None:
            raise ConfigError("partition=natural needs a dataset with a natural client id.")
        columns["natural_id"] = data.natural_ids
    table = Dataset.from_dict(columns)
    partitioner = _make_partitioner(partition_cfg, num_partitions, seed)
    partitioner.dataset = table
    try:
        parts = [
            np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)
            for i in range(partitioner.num_partitions)
        ]
    except ValueError as err:
        raise ConfigError(f"partition={name} failed for {num_partitions} clients: {err}") from err
    return parts


def iid_shards(n_rows: int, num_partitions: int) -> list[np.ndarray]:
    """flwr-datasets' ``IidPartitioner`` on rows ``0..n_rows-1``, without importing it.

    Its partition i is ``Dataset.shard(num_partitions, i, contiguous=True)``: contiguous
    shards in the pool's order, the first ``n_rows % num_partitions`` one row longer,
    which is numpy's ``array_split``. Importing flwr-datasets (pandas, matplotlib, seaborn,
    Hugging Face datasets: seconds of CPU) would cost a deployed node that much on every
    message, since each starts a fresh process; ``tests/test_cold_start.py`` checks that
    both give the same rows.
    """
    return np.array_split(np.arange(n_rows, dtype=np.int64), num_partitions)


@lru_cache(maxsize=4)
def _partitions_cached(dataset_key: str, partition_key: str, num_partitions: int, seed: int):
    import json

    dataset_cfg, partition_cfg = json.loads(dataset_key), json.loads(partition_key)
    data = load_dataset(dataset_cfg, seed)
    return data, partition_indices(data, partition_cfg, num_partitions, seed)


def load_client_data(cfg: dict, partition_id: int, num_partitions: int) -> ClientData:
    """Return client ``partition_id``'s train/test split (cached per process).

    Parameters
    ----------
    cfg : dict
        The composed run config.
    partition_id, num_partitions : int
        From the node config (``partition-id``, ``num-partitions``).
    """
    import json

    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id {partition_id} is outside [0, {num_partitions}).")
    data, parts = _partitions_cached(
        json.dumps(cfg["dataset"], sort_keys=True),
        json.dumps(cfg["partition"], sort_keys=True),
        num_partitions,
        cfg["seed"],
    )
    rows = parts[partition_id]
    rng = np.random.default_rng([cfg["seed"], partition_id])
    rows = rng.permutation(rows)
    n_test = int(round(len(rows) * cfg["partition"]["test_fraction"]))
    if len(rows) - n_test < 1:
        n_test = len(rows) - 1
    test_rows, train_rows = rows[:n_test], rows[n_test:]
    return ClientData(
        data.x_train[train_rows],
        data.y_train[train_rows],
        data.x_train[test_rows],
        data.y_train[test_rows],
    )
