"""Review T: a dataset-cache file whose .npy header declares a huge array must be refused.

``lepton_flwr.data.dataset_cache`` reads a cache file back as untrusted input: anything
unexpected is refused, the split loaded afresh and the file replaced. The unpacked-size
cap sums the zip members' declared sizes, but numpy's ``read_array`` allocates the shape
its header declares before reading a byte of data: a 1.5 KB file declaring 2^60 float32
values raises MemoryError, which ``load_through_cache`` does not catch, so the process that
loads the dataset dies instead of loading it afresh (reproduction:
/tmp/T/b2_dataset_cache_alloc.py). Fix: check each member's header (dtype, shape against
the layout, shape × itemsize against the member's size) before ``read_array``, or catch
MemoryError with the other refusals.
"""

import io
import os
import zipfile

import numpy as np
import pytest

from lepton_flwr.data import datasets
from lepton_flwr.data.dataset_cache import ARRAYS, cache_key, load_through_cache

DIGITS = datasets._DISK_CACHED["digits"][1]
OPTIONS = (("test_fraction", 0.2),)


def _npy_header_only(shape):
    buffer = io.BytesIO()
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + bytes(64)


@pytest.mark.xfail(
    strict=True,
    raises=MemoryError,
    reason="review T: read_array allocates a header's declared shape; MemoryError escapes",
)
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
