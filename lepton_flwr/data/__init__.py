"""Offline datasets and their split across clients."""

from lepton_flwr.data.datasets import (
    DATASETS,
    CentralData,
    DatasetNotInstalledError,
    DatasetSpec,
    load_dataset,
)
from lepton_flwr.data.partition import (
    PARTITIONERS,
    ClientData,
    load_client_data,
    partition_indices,
    resolve_num_partitions,
)

__all__ = [
    "DATASETS",
    "PARTITIONERS",
    "CentralData",
    "ClientData",
    "DatasetNotInstalledError",
    "DatasetSpec",
    "load_client_data",
    "load_dataset",
    "partition_indices",
    "resolve_num_partitions",
]
