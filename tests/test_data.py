import numpy as np
import pytest
from conftest import FASHION_MNIST_ROOT, needs_fashion_mnist

from lepton_flwr.config import ConfigError, load_config
from lepton_flwr.data import (
    DatasetNotInstalledError,
    load_client_data,
    load_dataset,
    partition_indices,
    resolve_num_partitions,
)
from lepton_flwr.data.datasets import load_fashion_mnist


def test_digits_are_split_into_a_pool_and_a_global_test_set():
    data = load_dataset({"name": "digits", "test_fraction": 0.2})
    assert data.input_shape == (1, 8, 8)
    assert len(data.y_train) + len(data.y_test) == 1797
    assert len(data.y_test) == pytest.approx(0.2 * 1797, abs=1)
    assert data.num_outputs == 10 and data.x_train.dtype == np.float32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0


@pytest.mark.parametrize(
    ("name", "outputs", "features"), [("breast_cancer", 2, 30), ("diabetes", 1, 10)]
)
def test_sklearn_tabular_sets(name, outputs, features):
    data = load_dataset({"name": name, "test_fraction": 0.2})
    assert data.num_outputs == outputs and data.input_shape == (features,)
    assert abs(float(data.x_train.mean())) < 1e-5  # standardized on the pool


def test_loans_keep_the_state_of_each_row():
    data = load_dataset({"name": "loans", "test_fraction": 0.2, "natural_id": "state"})
    assert data.num_outputs == 1 and data.y_train.dtype == np.float32
    assert data.input_shape == (11,)
    assert len(np.unique(data.natural_ids)) >= 45
    assert len(data.natural_ids) == len(data.y_train)
    assert 5 < float(np.mean(data.y_train)) < 20  # interest rates in percent


@needs_fashion_mnist
def test_fashion_mnist_from_the_debian_package():
    data = load_fashion_mnist(str(FASHION_MNIST_ROOT))
    assert data.x_train.shape == (60000, 1, 28, 28) and data.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(data.y_train).tolist() == [6000] * 10
    assert abs(float(data.x_train.mean())) < 0.01  # normalized with the published mean


def test_missing_fashion_mnist_names_the_debian_package(tmp_path):
    with pytest.raises(DatasetNotInstalledError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path))


def _digits():
    return load_dataset({"name": "digits", "test_fraction": 0.2})


def test_iid_partitions_are_disjoint_and_cover_the_pool():
    data = _digits()
    parts = partition_indices(data, {"name": "iid"}, 5)
    rows = np.concatenate(parts)
    assert len(parts) == 5 and len(rows) == len(np.unique(rows)) == len(data.y_train)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_partitions_skew_labels_and_follow_the_seed():
    data = _digits()
    cfg = {"name": "dirichlet", "alpha": 0.1, "min_partition_size": 5}
    parts = partition_indices(data, cfg, 5, seed=1)
    again = partition_indices(data, cfg, 5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    shares = [np.bincount(data.y_train[p], minlength=10) / len(p) for p in parts]
    # IID clients would hold about 10 % of each class; alpha=0.1 gives dominant classes.
    assert max(s.max() for s in shares) > 0.4
    rows = np.concatenate(parts)
    assert len(rows) == len(np.unique(rows))


def test_natural_partition_gives_one_client_per_state():
    cfg = load_config("+experiment=loans_linreg")
    n = resolve_num_partitions(cfg)
    data = load_dataset(cfg["dataset"], cfg["seed"])
    parts = partition_indices(data, cfg["partition"], n)
    assert len(parts) == n == len(np.unique(data.natural_ids))
    for rows in parts:
        assert len(np.unique(data.natural_ids[rows])) == 1


def test_natural_partition_with_a_wrong_node_count_is_refused():
    cfg = load_config("+experiment=loans_linreg simulation.num_supernodes=7")
    with pytest.raises(ConfigError, match="simulation.num_supernodes=7"):
        resolve_num_partitions(cfg)


def test_more_clients_than_samples_is_refused():
    with pytest.raises(ConfigError, match="5000 clients but only 1437 training samples"):
        partition_indices(_digits(), {"name": "iid"}, 5000)


def test_dirichlet_on_a_regression_target_is_refused():
    data = load_dataset({"name": "diabetes", "test_fraction": 0.2})
    with pytest.raises(ConfigError, match="regression"):
        partition_indices(data, {"name": "dirichlet", "alpha": 0.5}, 3)


def test_client_train_and_test_splits_are_disjoint(digits_cfg):
    a = load_client_data(digits_cfg, 0, 3)
    b = load_client_data(digits_cfg, 1, 3)
    assert len(a.y_test) == pytest.approx(0.2 * (len(a.y_train) + len(a.y_test)), abs=1)
    rows_a = {x.tobytes() for x in np.concatenate([a.x_train, a.x_test])}
    assert not {x.tobytes() for x in a.x_test} & {x.tobytes() for x in a.x_train}
    assert len(rows_a & {x.tobytes() for x in b.x_train}) < 5  # digits has a few duplicates


def test_partition_id_out_of_range_is_refused(digits_cfg):
    with pytest.raises(ConfigError, match="partition-id 3"):
        load_client_data(digits_cfg, 3, 3)
