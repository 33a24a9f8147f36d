"""Flower Arrays from someone else, checked before numpy allocates anything for them.

A Flower ``Array`` holds its tensor as ``.npy`` bytes (or raw bytes for other stypes), and
numpy allocates what the ``.npy`` header declares before it reads the data: a reply or a
file of a few bytes can ask for gigabytes. :func:`check_payload` holds the bytes to the
dtype and shape they claim; checkpoints and training replies both use it.
"""

from __future__ import annotations

import io
import math

import numpy as np

NUMPY_STYPE = "numpy.ndarray"


def npy_header(stream) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype a ``.npy`` stream's header declares, read without its data.

    Raises
    ------
    ValueError
        For a stream that is not ``.npy`` of version 1.0 or 2.0, or a malformed header.
    """
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return tuple(shape), dtype


def check_payload(spec_dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> None:
    """Check that ``data`` holds exactly what dtype, shape and stype say, nothing more.

    A numpy array's ``.npy`` header declares its own shape and dtype, and numpy allocates
    what the header declares before reading the data: it must declare the spec's, and the
    data must be exactly that long.

    Raises
    ------
    ValueError
        Saying what does not match.
    """
    dtype = np.dtype(spec_dtype)  # TypeError for an unknown dtype
    if dtype.hasobject or dtype.itemsize == 0:
        raise ValueError(f"dtype {spec_dtype} is not a plain numeric type")
    payload = math.prod(shape) * dtype.itemsize
    header = 0
    if stype == NUMPY_STYPE:
        buffer = io.BytesIO(data)
        declared, declared_dtype = npy_header(buffer)
        if tuple(declared) != shape or declared_dtype != dtype:
            raise ValueError(
                f"its .npy header declares {declared_dtype}{list(declared)}, the spec "
                f"{spec_dtype}{list(shape)}"
            )
        header = buffer.tell()
    if header + payload != len(data):
        raise ValueError(f"{spec_dtype}{list(shape)} takes {payload} bytes, it holds {len(data)}")
