"""The disk cache of scikit-learn's split datasets: the same data, refused when unsound."""

import io
import os
import zipfile

import numpy as np
import pytest

from lepton_flwr.data import dataset_cache, datasets
from lepton_flwr.data.dataset_cache import (
    ARRAYS,
    DATA_CACHE_ENV,
    Layout,
    cache_key,
    load_through_cache,
    split_error,
)

DIGITS = datasets._DISK_CACHED["digits"][1]
OPTIONS = (("test_fraction", 0.2),)


def _fresh_digits(seed=0):
    data = datasets.load_digits(test_fraction=0.2, seed=seed)
    return {name: getattr(data, name) for name in ARRAYS}


class CountingLoad:
    """The digits split afresh, counting the calls."""

    def __init__(self, seed=0):
        self.seed, self.calls = seed, 0

    def __call__(self):
        self.calls += 1
        return _fresh_digits(self.seed)


def _through(folder, load, seed=0):
    return load_through_cache("digits", OPTIONS, seed, 0.2, DIGITS, load, folder)


def _the_file(folder):
    (path,) = folder.iterdir()
    return path


def _assert_same(arrays, expected):
    assert set(arrays) == set(ARRAYS)
    for name in ARRAYS:
        assert arrays[name].dtype == expected[name].dtype
        assert np.array_equal(arrays[name], expected[name])


@pytest.fixture(autouse=True)
def _no_process_cache():
    datasets._load_cached.cache_clear()
    yield
    datasets._load_cached.cache_clear()


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "diabetes"])
@pytest.mark.parametrize("seed", [0, 7])
def test_load_dataset_gives_the_loaders_arrays_bit_for_bit_from_the_cache(
    name, seed, tmp_path, monkeypatch
):
    monkeypatch.setenv(DATA_CACHE_ENV, str(tmp_path))
    fresh = datasets.DATASETS[name].loader(test_fraction=0.2, seed=seed)
    written = datasets.load_dataset({"name": name, "test_fraction": 0.2}, seed)
    assert _the_file(tmp_path).name.startswith(f"{name}-")
    datasets._load_cached.cache_clear()
    read = datasets.load_dataset({"name": name, "test_fraction": 0.2}, seed)
    for data in (written, read):
        for array in ARRAYS:
            assert getattr(data, array).dtype == getattr(fresh, array).dtype
            assert np.array_equal(getattr(data, array), getattr(fresh, array))
        assert data.num_outputs == fresh.num_outputs and data.natural_ids is None


def test_a_sound_file_is_read_without_loading(tmp_path):
    first = CountingLoad()
    _through(tmp_path, first)
    again = CountingLoad()
    _assert_same(_through(tmp_path, again), _fresh_digits())
    assert (first.calls, again.calls) == (1, 0)
    mode = os.stat(_the_file(tmp_path)).st_mode & 0o777
    assert mode == 0o600 and os.stat(tmp_path).st_mode & 0o777 in (0o700, 0o755)


def test_the_cache_folder_it_creates_is_private(tmp_path):
    _through(tmp_path / "new", CountingLoad())
    assert os.stat(tmp_path / "new").st_mode & 0o777 == 0o700


def test_every_input_of_the_split_changes_the_key(monkeypatch, tmp_path):
    base = cache_key("digits", OPTIONS, 0)
    assert cache_key("digits", OPTIONS, 0) == base
    assert cache_key("digits", OPTIONS, 1) != base
    assert cache_key("digits", (("test_fraction", 0.25),), 0) != base
    assert cache_key("breast_cancer", OPTIONS, 0) != base
    monkeypatch.setattr(dataset_cache, "_version", lambda name: f"{name} 99.0")
    assert cache_key("digits", OPTIONS, 0) != base
    monkeypatch.undo()
    monkeypatch.setattr(np, "__version__", "0.0.1")
    assert cache_key("digits", OPTIONS, 0) != base
    monkeypatch.undo()
    # An edit to the loaders' source (one byte) is another key.
    edited = tmp_path / "datasets.py"
    edited.write_bytes(open(datasets.__file__, "rb").read() + b"\n")
    monkeypatch.setattr(datasets, "__file__", str(edited))
    assert cache_key("digits", OPTIONS, 0) != base


def test_another_seed_reads_another_file(tmp_path):
    _through(tmp_path, CountingLoad(0), seed=0)
    other = CountingLoad(1)
    _assert_same(_through(tmp_path, other, seed=1), _fresh_digits(1))
    assert other.calls == 1 and len(list(tmp_path.iterdir())) == 2


def _archive(arrays, key):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, key=np.array(key))
    return buffer.getvalue()


def _tampered(change):
    """The digits split after ``change`` (a function of a dict of copies)."""
    arrays = {name: value.copy() for name, value in _fresh_digits().items()}
    change(arrays)
    return arrays


def _set(name, value):
    return lambda arrays: arrays.__setitem__(name, value)


def _poke(name, index, value):
    def change(arrays):
        arrays[name].flat[index] = value

    return change


HOSTILE = {
    "float64 features": lambda a: a.__setitem__("x_train", a["x_train"].astype(np.float64)),
    "int32 labels": lambda a: a.__setitem__("y_test", a["y_test"].astype(np.int32)),
    "a row short": lambda a: a.__setitem__("x_train", a["x_train"][:-1]),
    "rows moved to test": lambda a: a.update(
        x_test=np.concatenate([a["x_test"], a["x_train"][:1]]),
        y_test=np.concatenate([a["y_test"], a["y_train"][:1]]),
        x_train=a["x_train"][1:],
        y_train=a["y_train"][1:],
    ),
    "flat features": lambda a: a.__setitem__("x_test", a["x_test"].reshape(len(a["x_test"]), 64)),
    "a label out of range": _poke("y_train", 3, 10),
    "a negative label": _poke("y_test", 0, -1),
    "a NaN": _poke("x_train", 5, np.nan),
    "a feature above 1": _poke("x_test", 9, 1.5),
    "a missing array": lambda a: a.pop("y_test"),
    "an extra array": _set("natural_ids", np.zeros(3)),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_file_with_the_wrong_arrays_is_refused_and_replaced(case, tmp_path, caplog):
    _through(tmp_path, CountingLoad())
    path = _the_file(tmp_path)
    key = path.stem.split("-", 1)[1]
    path.write_bytes(_archive(_tampered(HOSTILE[case]), key))
    load = CountingLoad()
    _assert_same(_through(tmp_path, load), _fresh_digits())
    assert load.calls == 1
    assert "refused" in caplog.text
    # Replaced by a sound file: the next process reads it.
    again = CountingLoad()
    _assert_same(_through(tmp_path, again), _fresh_digits())
    assert again.calls == 0


def _unsound_files(key):
    sound = _archive(_fresh_digits(), key)
    pickled = io.BytesIO()
    np.savez(pickled, **_fresh_digits(), key=np.array([key], dtype=object))
    extra = io.BytesIO()
    with zipfile.ZipFile(extra, "w") as archive:
        with zipfile.ZipFile(io.BytesIO(sound)) as original:
            for member in original.infolist():
                archive.writestr(member, original.read(member))
        archive.writestr("script.py", b"print('hello')")
    return {
        "empty": b"",
        "not a zip": b"PK\x03\x04 but nothing else",
        "truncated": sound[: len(sound) // 2],
        "another key": _archive(_fresh_digits(), "0" * 32),
        "a pickled key": pickled.getvalue(),
        "an extra member": extra.getvalue(),
    }


@pytest.mark.parametrize(
    "case",
    ["empty", "not a zip", "truncated", "another key", "a pickled key", "an extra member"],
)
def test_a_damaged_or_foreign_file_is_refused_and_replaced(case, tmp_path):
    _through(tmp_path, CountingLoad())
    path = _the_file(tmp_path)
    path.write_bytes(_unsound_files(path.stem.split("-", 1)[1])[case])
    load = CountingLoad()
    _assert_same(_through(tmp_path, load), _fresh_digits())
    assert load.calls == 1
    again = CountingLoad()
    _through(tmp_path, again)
    assert again.calls == 0  # replaced by a sound file


def test_a_file_larger_than_the_cap_is_refused(tmp_path, monkeypatch):
    _through(tmp_path, CountingLoad())
    monkeypatch.setattr(dataset_cache, "MAX_BYTES", 1000)
    load = CountingLoad()
    _assert_same(_through(tmp_path, load), _fresh_digits())
    assert load.calls == 1


def test_arrays_that_unpack_beyond_the_cap_are_refused(tmp_path, monkeypatch):
    # A compressed member small on disk but large unpacked (a zip bomb, in small).
    _through(tmp_path, CountingLoad())
    path = _the_file(tmp_path)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **_fresh_digits(), key=np.array(path.stem.split("-", 1)[1]))
    path.write_bytes(buffer.getvalue())
    monkeypatch.setattr(dataset_cache, "MAX_BYTES", len(buffer.getvalue()) + 1000)
    load = CountingLoad()
    _through(tmp_path, load)
    assert load.calls == 1


def test_a_link_in_place_of_the_file_is_not_followed(tmp_path):
    _through(tmp_path / "cache", CountingLoad())
    path = _the_file(tmp_path / "cache")
    elsewhere = tmp_path / "elsewhere.npz"
    elsewhere.write_bytes(path.read_bytes())
    path.unlink()
    path.symlink_to(elsewhere)
    load = CountingLoad()
    _assert_same(_through(tmp_path / "cache", load), _fresh_digits())
    assert load.calls == 1
    assert not path.is_symlink()  # replaced by a file, the link's target untouched
    assert elsewhere.read_bytes() == path.read_bytes()


def test_a_file_others_may_read_is_refused_and_replaced(tmp_path):
    _through(tmp_path, CountingLoad())
    path = _the_file(tmp_path)
    path.chmod(0o644)
    load = CountingLoad()
    _assert_same(_through(tmp_path, load), _fresh_digits())
    assert load.calls == 1 and os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_folder_others_may_write_in_is_not_used(mode, tmp_path):
    folder = tmp_path / "shared"
    _through(folder, CountingLoad())
    folder.chmod(mode)
    for _ in range(2):
        load = CountingLoad()
        _assert_same(_through(folder, load), _fresh_digits())
        assert load.calls == 1  # neither read nor written
    folder.chmod(0o700)
    again = CountingLoad()
    _through(folder, again)
    assert again.calls == 0


def test_a_file_in_place_of_the_folder_is_not_used(tmp_path):
    load = CountingLoad()
    (tmp_path / "not-a-folder").write_text("x")
    _through(tmp_path / "not-a-folder", load)
    assert load.calls == 1


def test_an_unwritable_folder_loads_without_a_cache(tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("x")
    load = CountingLoad()
    _assert_same(_through(blocked / "cache", load), _fresh_digits())
    assert load.calls == 1


def test_no_folder_loads_afresh_and_keeps_nothing(tmp_path):
    load = CountingLoad()
    _through(None, load)
    _through(None, load)
    assert load.calls == 2


def test_a_split_that_does_not_fit_the_layout_is_not_written(tmp_path):
    wrong = Layout(rows=1000, example_shape=(1, 8, 8), num_outputs=10)
    load_through_cache("digits", OPTIONS, 0, 0.2, wrong, CountingLoad(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_folder_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_CACHE_ENV, str(tmp_path / "mine"))
    assert dataset_cache.configured_folder() == tmp_path / "mine"
    monkeypatch.setenv(DATA_CACHE_ENV, "")
    assert dataset_cache.configured_folder() is None
    monkeypatch.delenv(DATA_CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dataset_cache.configured_folder() == tmp_path / "xdg" / "lepton-flwr" / "datasets"


def test_no_home_folder_means_no_cache(monkeypatch):
    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.delenv(DATA_CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(dataset_cache.Path, "home", staticmethod(no_home))
    assert dataset_cache.configured_folder() is None


def test_an_empty_variable_turns_the_cache_off(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_CACHE_ENV, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    datasets.load_dataset({"name": "digits", "test_fraction": 0.2}, 0)
    assert list(tmp_path.iterdir()) == []


def test_a_loader_put_in_datasets_by_hand_is_called_not_served_from_the_cache(
    monkeypatch, tmp_path
):
    monkeypatch.setenv(DATA_CACHE_ENV, str(tmp_path))
    datasets.load_dataset({"name": "digits", "test_fraction": 0.2}, 0)  # fills the cache
    datasets._load_cached.cache_clear()
    calls = []

    def by_hand(**options):
        calls.append(options)
        return datasets.load_digits(**options)

    spec = datasets.DATASETS["digits"]
    monkeypatch.setitem(
        datasets.DATASETS,
        "digits",
        datasets.DatasetSpec(spec.task, spec.image_shape, spec.natural_id, by_hand),
    )
    datasets.load_dataset({"name": "digits", "test_fraction": 0.2}, 0)
    assert calls == [{"seed": 0, "test_fraction": 0.2}]


@pytest.mark.parametrize("options", [{}, {"test_fraction": 1}, {"test_fraction": 0.0}])
def test_a_split_without_a_test_fraction_in_0_1_is_not_cached(options, monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_CACHE_ENV, str(tmp_path))
    try:
        datasets.load_dataset({"name": "digits", **options}, 0)
    except ValueError:
        pass  # scikit-learn refuses some of them: what matters is that nothing is kept
    assert list(tmp_path.iterdir()) == []


def test_split_error_accepts_the_loaders_splits():
    for name, (loader, layout) in datasets._DISK_CACHED.items():
        data = loader(test_fraction=0.3, seed=2)
        arrays = {array: getattr(data, array) for array in ARRAYS}
        assert split_error(arrays, layout, 0.3) is None, name
        assert split_error(arrays, layout, 0.2) is not None, name
