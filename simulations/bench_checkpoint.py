"""Time writing and reading a checkpoint the size of the main job's (two encrypted models).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m simulations.bench_checkpoint`` (median of 7).
"""

import os
import statistics
import tempfile
import time

import numpy as np
from flwr.app import Array, ArrayRecord
from lepton_flwr.strategies.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

CIPHERTEXT_BYTES = 1_900_000  # the main job's encrypted model


def _encrypted_like(rng: np.random.Generator) -> ArrayRecord:
    data = rng.integers(0, 256, CIPHERTEXT_BYTES, dtype=np.uint8).tobytes()
    array = Array(dtype="uint8", shape=(len(data),), stype="lepton.ckks", data=data)
    return ArrayRecord({"ckks-00000": array})


def main(repeats: int = 7) -> None:
    """Print the checkpoint's size and the median write and read times."""
    rng = np.random.default_rng(0)
    folder, key = tempfile.mkdtemp(), os.path.join(tempfile.mkdtemp(), "checkpoint.key")
    state = {"last_good_model": _encrypted_like(rng), "last_good_round": 4}
    checkpoint = Checkpoint(5, _encrypted_like(rng), state)
    writes, reads = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        save_checkpoint(folder, checkpoint, key)
        writes.append(time.perf_counter() - start)
        start = time.perf_counter()
        load_checkpoint(folder, key)
        reads.append(time.perf_counter() - start)
    size = os.path.getsize(os.path.join(folder, "checkpoint.zip"))
    print(
        f"checkpoint {size / 1e6:.1f} MB: write {1000 * statistics.median(writes):.1f} ms, "
        f"read {1000 * statistics.median(reads):.1f} ms (median of {repeats})"
    )


if __name__ == "__main__":
    main()
