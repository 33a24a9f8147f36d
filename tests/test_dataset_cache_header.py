"""A dataset-cache file whose .npy header declares a huge array is refused (review T).

numpy's ``read_array`` allocates the shape a header declares before reading a byte: a
1.5 KB file declaring 2^60 float32 values ended the loading process with MemoryError.
Each member's header is now checked against the member's size first; the file is refused
and the split loaded afresh (fails without ``dataset_cache._check_header``).
"""

import io
import os
import zipfile

import numpy as np

from lepton_flwr.data import datasets
from lepton_flwr.data.dataset_cache import ARRAYS, cache_key, load_through_cache

DIGITS = datasets._DISK_CACHED["digits"][1]
OPTIONS = (("test_fraction", 0.2),)


def _npy_header_only(shape):
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + bytes(64)


def test_a_header_declaring_a_huge_array_is_refused_and_loaded_afresh(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    key = cache_key("digits", OPTIONS, 0)
    path = folder / f"digits-{key}.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x_train.npy", _npy_header_only((1 << 60,)))  # 4 EiB declared
        for name in ARRAYS[1:]:
            archive.writestr(f"{name}.npy", _npy_header_only((1,)))
        key_member = io.BytesIO()
        np.save(key_member, np.array(key))
        archive.writestr("key.npy", key_member.getvalue())
    os.chmod(path, 0o600)  # the user's own file: only its content is hostile
    calls = []

    def load():
        calls.append(1)
        data = datasets.load_digits(test_fraction=0.2, seed=0)
        return {name: getattr(data, name) for name in ARRAYS}

    arrays = load_through_cache("digits", OPTIONS, 0, 0.2, DIGITS, load, folder)
    assert calls == [1]
    expected = load()
    for name in ARRAYS:
        assert np.array_equal(arrays[name], expected[name])
