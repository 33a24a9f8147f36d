"""The disk store of fixed features: shared by processes, keyed, refusing what it cannot trust."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from lepton_flwr.models import build_model, feature_store, training
from lepton_flwr.models.feature_store import FEATURE_CACHE_ENV, image_digests, store_key

SMALL_SCATNET = {"name": "scatnet", "J": 1, "groups": 9}  # 8x8 images: (9, 4, 4) features


@pytest.fixture
def store_folder(tmp_path, monkeypatch):
    """A fresh store folder, and a process with nothing in memory (as a new one would be)."""
    folder = tmp_path / "features"
    monkeypatch.setenv(FEATURE_CACHE_ENV, str(folder))
    monkeypatch.setattr(training, "_FEATURES", OrderedDict())
    monkeypatch.setattr(feature_store, "_STORES", {})
    return folder


def forget_in_memory(monkeypatch):
    """What a new process knows: nothing but the disk."""
    monkeypatch.setattr(training, "_FEATURES", OrderedDict())
    monkeypatch.setattr(feature_store, "_STORES", {})


def counting_model(options=SMALL_SCATNET, shape=(1, 8, 8)):
    """A ScatterNet whose fixed stage counts the images it transforms."""
    model = build_model(options, shape, 3)
    calls: list[int] = []
    fixed = model.fixed_features
    model.fixed_features = lambda t: calls.append(len(t)) or fixed(t)
    return model, calls, fixed


def fresh(fixed, x):
    with torch.no_grad():
        return fixed(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def images(n=40, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32)


def shard_files(folder):
    return sorted(folder.glob("*/shard-*.npy"))


CHILD = """
import numpy as np, torch
from lepton_flwr.models import build_model, training
x = np.random.default_rng(0).normal(size=(40, 1, 8, 8)).astype(np.float32)[::-1]
model = build_model({"name": "scatnet", "J": 1, "groups": 9}, (1, 8, 8), 3)
calls = []
fixed = model.fixed_features
model.fixed_features = lambda t: calls.append(len(t)) or fixed(t)
_, features = training.learning_part(model, x)
import sys
scattered = "kymatio" in sys.modules
with torch.no_grad():
    assert np.array_equal(features, fixed(torch.from_numpy(x.copy())).numpy())
print("computed", sum(calls), scattered)
"""


def test_a_second_process_reads_what_the_first_stored_and_computes_nothing(tmp_path):
    env = {**os.environ, FEATURE_CACHE_ENV: str(tmp_path / "features"), "OMP_NUM_THREADS": "1"}

    def child() -> str:
        done = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
        )
        return done.stdout.strip()

    assert child() == "computed 40 True"
    # Another process, the same images: all from the disk, without importing kymatio (a
    # deployed node's flwr-clientapp process, started afresh for each message).
    assert child() == "computed 0 False"
    assert len(shard_files(tmp_path / "features")) == 1


def test_stored_features_equal_fresh_ones_for_any_subset_in_any_order(store_folder, monkeypatch):
    x = images(60)
    model, calls, fixed = counting_model()
    training.learning_part(model, x)
    assert calls == [60]
    forget_in_memory(monkeypatch)
    subset = x[np.random.default_rng(1).permutation(60)[:17]]
    head, features = training.learning_part(model, subset)
    assert calls == [60]  # nothing computed: every image found by its own digest
    assert head is model.head
    assert features.dtype == np.float32
    assert np.array_equal(features, fresh(fixed, subset))  # bit for bit


def test_images_the_store_lacks_are_computed_alone_and_added(store_folder, monkeypatch):
    x, other = images(30), images(10, seed=5)
    model, calls, fixed = counting_model()
    training.learning_part(model, x)
    forget_in_memory(monkeypatch)
    mixed = np.concatenate([other[:4], x[:6], other[4:]])
    _, features = training.learning_part(model, mixed)
    assert calls == [30, 10]  # only the 10 new images
    assert np.array_equal(features, fresh(fixed, mixed))
    forget_in_memory(monkeypatch)
    training.learning_part(model, mixed)
    assert calls == [30, 10]


def test_another_dataset_never_gets_the_features_of_the_first(store_folder, monkeypatch):
    x = images(30)
    model, calls, fixed = counting_model()
    training.learning_part(model, x)
    forget_in_memory(monkeypatch)
    for other in (x + 1.0, x * 0.5, x.astype(np.float64).astype(np.float32) + 1e-6):
        _, features = training.learning_part(model, other)
        assert calls[-1] == 30  # computed, not served
        assert np.array_equal(features, fresh(fixed, other))


def test_other_options_shapes_versions_or_devices_use_another_folder(monkeypatch):
    model = build_model(SMALL_SCATNET, (1, 8, 8), 3)
    key = store_key(model, (1, 8, 8), np.float32, "cpu")
    assert key == store_key(build_model(SMALL_SCATNET, (1, 8, 8), 10), (1, 8, 8), np.float32, "cpu")
    others = [
        store_key(
            build_model({**SMALL_SCATNET, "L": 4, "groups": 5}, (1, 8, 8), 3),
            (1, 8, 8),
            np.float32,
            "cpu",
        ),
        store_key(
            build_model({"name": "scatnet", "J": 2, "groups": 27}, (1, 8, 8), 3),
            (1, 8, 8),
            np.float32,
            "cpu",
        ),
        store_key(build_model(SMALL_SCATNET, (1, 16, 16), 3), (1, 16, 16), np.float32, "cpu"),
        store_key(model, (1, 8, 8), np.float64, "cpu"),
        store_key(model, (1, 8, 8), np.float32, "cuda"),
    ]
    feature_store._key.cache_clear()
    monkeypatch.setattr(feature_store, "_library_version", lambda name: "0.0-other")
    others.append(store_key(model, (1, 8, 8), np.float32, "cpu"))
    feature_store._key.cache_clear()
    assert len({key, *others}) == len(others) + 1


def corrupt_truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def corrupt_flipped_feature(path):
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # a bit of the last image's features
    path.write_bytes(bytes(data))


def corrupt_garbage(path):
    path.write_bytes(b"\x93NUMPY this is not a shard" * 50)


def corrupt_wrong_feature_shape(path):
    index = np.zeros((40, 32), np.uint8)
    with open(path, "wb") as handle:
        np.lib.format.write_array(handle, index)
        np.lib.format.write_array(handle, np.zeros((40, 9, 2, 8), np.float32))  # same size


def corrupt_wrong_dtype(path):
    index = np.zeros((40, 32), np.uint8)
    with open(path, "wb") as handle:
        np.lib.format.write_array(handle, index)
        np.lib.format.write_array(handle, np.zeros((40, 9, 4, 2), np.float64))  # same size


def corrupt_huge_count(path):
    with open(path, "wb") as handle:
        handle.write(np.lib.format.magic(1, 0))
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "|u1", "fortran_order": False, "shape": (10**12, 32)}
        )


def corrupt_into_a_link(path):
    target = path.with_name("elsewhere")
    path.rename(target)
    path.symlink_to(target)


@pytest.mark.parametrize(
    "corrupt",
    [
        corrupt_truncated,
        corrupt_flipped_feature,
        corrupt_garbage,
        corrupt_wrong_feature_shape,
        corrupt_wrong_dtype,
        corrupt_huge_count,
        corrupt_into_a_link,
    ],
)
def test_a_damaged_shard_is_refused_and_its_images_computed_afresh(
    store_folder, monkeypatch, corrupt
):
    x = images(40)
    model, calls, fixed = counting_model()
    training.learning_part(model, x)
    (shard,) = shard_files(store_folder)
    corrupt(shard)
    forget_in_memory(monkeypatch)
    _, features = training.learning_part(model, x)
    # A shard that cannot be read is refused whole; a row failing its digest, alone.
    recomputed = [1] if corrupt is corrupt_flipped_feature else [40]
    assert calls == [40, *recomputed]
    assert np.array_equal(features, fresh(fixed, x))
    (store,) = feature_store._STORES.values()
    assert store.refused and shard.name in store.refused[0]
    forget_in_memory(monkeypatch)  # the recomputed features were stored again, whole
    _, again = training.learning_part(model, x)
    assert calls == [40, *recomputed] and np.array_equal(again, features)


def test_a_half_written_shard_is_never_read(store_folder, monkeypatch):
    x = images(20)
    model, calls, fixed = counting_model()
    training.learning_part(model, x)
    (shard,) = shard_files(store_folder)
    data = shard.read_bytes()
    shard.unlink()
    (shard.parent / ".writing-abc").write_bytes(data[: len(data) // 2])  # a writer's temp file
    forget_in_memory(monkeypatch)
    training.learning_part(model, x)
    assert calls == [20, 20]
    (store,) = feature_store._STORES.values()
    assert store.refused == []  # not even opened: only renamed shards are read


def test_the_store_is_private_and_a_folder_open_to_others_is_neither_read_nor_written(
    store_folder, monkeypatch
):
    x = images(20)
    model, calls, _ = counting_model()
    training.learning_part(model, x)
    (shard,) = shard_files(store_folder)
    assert shard.stat().st_mode & 0o777 == 0o600
    assert shard.parent.stat().st_mode & 0o777 == 0o700
    shard.parent.chmod(0o755)
    forget_in_memory(monkeypatch)
    training.learning_part(model, images(5, seed=9))
    training.learning_part(model, x)
    assert calls == [20, 5, 20]  # nothing read from it ...
    assert shard_files(store_folder) == [shard]  # ... and nothing written to it


def test_the_store_holds_the_images_it_was_given_and_no_others(store_folder):
    x = images(25)
    model, _, _ = counting_model()
    training.learning_part(model, x[:10])
    training.learning_part(model, x[5:25])
    (store,) = feature_store._STORES.values()
    store._scan()
    assert set(store._where) == set(image_digests(x))
    assert sum(np.load(p, mmap_mode="r").shape[0] for p in shard_files(store_folder)) == 25


def test_without_the_variable_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(FEATURE_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    forget_in_memory(monkeypatch)
    model, calls, _ = counting_model()
    training.learning_part(model, images(10))
    assert calls == [10] and not any(tmp_path.iterdir())
    assert training.store_fixed_features(model, images(10)) is None


def test_the_runner_stores_the_whole_dataset_once(store_folder, monkeypatch):
    from lepton_flwr.config import load_config
    from lepton_flwr.data import load_dataset
    from simulations.run import store_fixed_features

    cfg = load_config("+experiment=digits_smoke model=scatnet model.J=1 model.groups=9")
    data = load_dataset(cfg["dataset"], cfg["seed"])
    store_fixed_features(cfg, data)
    everything = np.concatenate([data.x_train, data.x_test])
    (store,) = feature_store._STORES.values()
    assert set(store._where) == set(image_digests(everything))
    model, calls, fixed = counting_model(cfg["model"], data.input_shape)
    forget_in_memory(monkeypatch)
    client = data.x_train[np.random.default_rng(3).permutation(len(data.x_train))[:50]]
    _, features = training.learning_part(model, client)
    assert calls == [] and np.array_equal(features, fresh(fixed, client))
    forget_in_memory(monkeypatch)
    store_fixed_features(cfg, data)  # a later run computes nothing
    assert len(shard_files(store_folder)) == 2  # train and test, one shard each


def test_the_runner_leaves_models_without_a_fixed_stage_and_an_empty_variable_alone(
    tmp_path, monkeypatch
):
    from lepton_flwr.config import load_config
    from lepton_flwr.data import load_dataset
    from simulations.run import store_fixed_features

    folder = tmp_path / "features"
    monkeypatch.setenv(FEATURE_CACHE_ENV, str(folder))
    cfg = load_config("+experiment=digits_smoke")  # logistic regression
    store_fixed_features(cfg, load_dataset(cfg["dataset"], cfg["seed"]))
    monkeypatch.setenv(FEATURE_CACHE_ENV, "")
    cfg = load_config("+experiment=digits_smoke model=scatnet model.J=1 model.groups=9")
    store_fixed_features(cfg, load_dataset(cfg["dataset"], cfg["seed"]))
    assert not folder.exists()


def test_shards_with_random_damage_anywhere_are_never_trusted(store_folder, monkeypatch):
    """Seeded byte flips anywhere in a shard (headers included): always the fresh features."""
    x = images(12)
    model, calls, fixed = counting_model()
    training.learning_part(model, x)
    (shard,) = shard_files(store_folder)
    original = shard.read_bytes()
    expected = fresh(fixed, x)
    rng = np.random.default_rng(11)
    for _ in range(40):
        data = bytearray(original)
        for position in rng.integers(0, 300 if rng.random() < 0.7 else len(data), 3):
            data[position] = int(rng.integers(0, 256))
        shard.write_bytes(bytes(data))
        for other in shard_files(store_folder):
            if other != shard:
                other.unlink()  # keep the damaged shard the only one
        forget_in_memory(monkeypatch)
        _, features = training.learning_part(model, x)
        assert np.array_equal(features, expected)


def test_a_disk_that_refuses_the_write_costs_speed_not_the_training(store_folder, monkeypatch):
    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(feature_store.FeatureStore, "_write", full_disk)
    x = images(10)
    model, calls, fixed = counting_model()
    _, features = training.learning_part(model, x)
    assert calls == [10] and np.array_equal(features, fresh(fixed, x))


def test_the_runner_sets_the_default_folder_for_its_run_only(tmp_path, monkeypatch):
    from lepton_flwr.config import load_config
    from lepton_flwr.data import load_dataset
    from simulations.run import fixed_features_stored

    monkeypatch.delenv(FEATURE_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    forget_in_memory(monkeypatch)
    cfg = load_config("+experiment=digits_smoke model=scatnet model.J=1 model.groups=9")
    data = load_dataset(cfg["dataset"], cfg["seed"])
    default = tmp_path / "lepton-flwr" / "features"
    with fixed_features_stored(cfg, data):
        assert os.environ[FEATURE_CACHE_ENV] == str(default)  # what the Ray actors inherit
        assert len(shard_files(default)) == 2
    assert FEATURE_CACHE_ENV not in os.environ  # a later test or run in this process: none
    chosen = tmp_path / "chosen"
    monkeypatch.setenv(FEATURE_CACHE_ENV, str(chosen))
    with fixed_features_stored(cfg, data):
        assert os.environ[FEATURE_CACHE_ENV] == str(chosen)
    assert os.environ[FEATURE_CACHE_ENV] == str(chosen) and len(shard_files(chosen)) == 2
