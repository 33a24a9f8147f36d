"""Micro-benchmark of the packed wire format (lepton_flwr.he.packed): times and bytes.

``python -m simulations.bench_packed [--params 1000000] [--uploads 10] [--repeats 3]``
encrypts ``--uploads`` updates of ``--params`` values with SEAL as the codec does with
complex slots (N values a ciphertext: seeded secret-key encryption), then prints medians
over ``--repeats`` runs of

- the client's packing (``PackedFormat.pack_upload``: SEAL's inverse NTT, CRT, rounding at
  d_up, bit-packing) and the server's parsing (``parse_upload``: unpack, range check),
  per polynomial and per update;
- the server's aggregation of all uploads, deserialisation included (``PackedSum``: parse,
  seed expansion by SEAL, addition; then ``download``: c0 reduced, rounded at d_down and
  packed, c1 read out of SEAL and packed), on one core and on two (forked processes over
  chunk ranges, as ``CkksAdder.sum_updates`` splits them, the pool's start included);
- the same without expanding seeds on the server (c0 only: what sending the uploads'
  seeds down instead of c1 would cost the server), and what it would cost a client to
  expand them;
- the client's load of the download (``load_download``);
- bytes per float32 value up and down (chunk payloads only, no container).

One process per measurement, OMP_NUM_THREADS=1; the machine may be shared, so compare
rows of one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from multiprocessing import get_context

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from lepton_flwr.he import CKKSParams, create_secret_context
from lepton_flwr.he.keys import public_context_bytes
from lepton_flwr.he.packed import SEED_BYTES, PackedFormat, PackedSum, _add_wide
from lepton_flwr.he.seal_words import save_bytes

FLOAT32 = 4.0


def _median(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def encrypt_complex(context: ts.Context, vector: np.ndarray) -> list[bytes]:
    """Seeded SEAL ciphertexts of N values each (real parts, then imaginary parts)."""
    seal_context = context.seal_context().data
    encoder = sealapi.CKKSEncoder(seal_context)
    encryptor = sealapi.Encryptor(seal_context, context.secret_key().data)
    degree = 2 * encoder.slot_count()
    chunks = []
    for start in range(0, len(vector), degree):
        piece = np.zeros(degree)
        piece[: len(vector[start : start + degree])] = vector[start : start + degree]
        plain = sealapi.Plaintext()
        slots = piece[: degree // 2] + 1j * piece[degree // 2 :]
        encoder.encode(slots.tolist(), context.global_scale, plain)
        chunks.append(save_bytes(encryptor.encrypt_symmetric(plain)))
    return chunks


_fork_state: tuple | None = None


def _sum_range(packed: PackedFormat, uploads, start: int, stop: int) -> list[bytes]:
    total = PackedSum(packed, stop - start)
    for upload in uploads:
        total.add(upload[start:stop])
    return total.download()


def _c0_range(packed: PackedFormat, uploads, start: int, stop: int) -> bytes:
    """The server's work if seeds went down: parse, add c0 as integers, pack the sum's c0."""
    words = None
    for upload in uploads:
        parsed = packed.parse_upload(upload[start:stop])
        words = parsed.words if words is None else _add_wide(words, parsed.words)
    packer = packed.packer
    c0 = packer.reduce(packer.restore(packer.reduce(words), packed.d_up))
    return packer.pack(packer.round_off(c0, packed.d_down), packed.d_down).tobytes()


def _in_fork(bounds: tuple[int, int]):
    function, packed, uploads = _fork_state
    return function(packed, uploads, *bounds)


def split_over(function, packed: PackedFormat, uploads, workers: int):
    """``function`` over chunk ranges: this process the first, forked workers the rest."""
    chunks = len(uploads[0])
    if workers == 1:
        return [function(packed, uploads, 0, chunks)]
    bounds = np.linspace(0, chunks, workers + 1).astype(int).tolist()
    ranges = list(zip(bounds[:-1], bounds[1:], strict=True))
    global _fork_state
    _fork_state = (function, packed, uploads)
    pool = get_context("fork").Pool(workers - 1)
    try:
        pending = pool.map_async(_in_fork, ranges[1:])
        return [function(packed, uploads, *ranges[0]), *pending.get()]
    finally:
        _fork_state = None
        pool.close()
        pool.join()


def main() -> None:
    """Encrypt, pack, sum and load; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--uploads", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    secret = create_secret_context(CKKSParams())
    public = ts.context_from(public_context_bytes(secret))
    client, server = PackedFormat(secret), PackedFormat(public)
    degree = client.ring.degree
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 0.05, args.params) for _ in range(args.uploads)]
    start = time.perf_counter()
    seeded = [encrypt_complex(secret, update) for update in updates]
    encrypt_s = (time.perf_counter() - start) / args.uploads
    chunks = len(seeded[0])
    uploads = [client.pack_upload(s) for s in seeded]
    print(
        f"{args.params:,} values, {chunks} chunks of N = {degree} values, {args.uploads} uploads, "
        f"d_up = {client.d_up}, d_down = {client.d_down}; medians of {args.repeats}"
    )
    rows = []

    def row(name, seconds, per=None):
        rows.append((name, seconds, per))

    row("encrypt one update (SEAL, complex slots)", encrypt_s, encrypt_s / chunks)
    pack_s = _median(lambda: client.pack_upload(seeded[0]), args.repeats)
    row("client: pack one update (pack_upload)", pack_s, pack_s / chunks)
    parse_s = _median(lambda: server.parse_upload(uploads[0], chunks), args.repeats)
    row("server: parse one update (unpack + check)", parse_s, parse_s / chunks)
    words = server.parse_upload(uploads[0]).words
    packer = server.packer
    unpack_blob = packer.pack(words, server.d_up)
    seconds = _median(lambda: packer.pack(words, server.d_up), args.repeats)
    row("  bit-pack c0 alone (CoefficientPacker.pack)", seconds, seconds / chunks)
    seconds = _median(lambda: packer.unpack(unpack_blob, server.d_up), args.repeats)
    row("  bit-unpack c0 alone (CoefficientPacker.unpack)", seconds, seconds / chunks)
    seeds = server.parse_upload(uploads[0]).seeds
    expand_s = _median(lambda: [server.ring.seeded(seed) for seed in seeds], args.repeats)
    row("server: expand one update's seeds (SEAL)", expand_s, expand_s / chunks)
    for workers in (1, 2):
        seconds = _median(lambda w=workers: split_over(_sum_range, server, uploads, w), 3)
        row(f"server: aggregate {args.uploads} uploads + download, {workers} core(s)", seconds)
    for workers in (1, 2):
        seconds = _median(lambda w=workers: split_over(_c0_range, server, uploads, w), 3)
        row(f"  without seed expansion (seeds down), {workers} core(s)", seconds)
    row(f"  a client expanding {args.uploads} uploads' seeds", expand_s * args.uploads)
    download = [c for part in split_over(_sum_range, server, uploads, 1) for c in part]
    load_s = _median(lambda: client.load_download(download, chunks), args.repeats)
    row("client: load the download (load_download)", load_s, load_s / chunks)

    for name, seconds, per in rows:
        per_text = f"{per * 1e3:8.3f} ms a polynomial" if per is not None else ""
        print(f"{name:62s} {seconds:8.3f} s  {per_text}")
    values = args.params * FLOAT32
    up = chunks * server.upload_chunk_bytes / values
    down = chunks * server.download_chunk_bytes / values
    seeds_down = chunks * (server.download_c0_bytes + SEED_BYTES * args.uploads) / values
    print(
        f"bytes per float32: up {up:.2f}x (c0 {server.upload_c0_bytes:,} + seed {SEED_BYTES} a "
        f"chunk), down {down:.2f}x (c0 {server.download_c0_bytes:,} + c1 "
        f"{packer.residue_bytes():,} a chunk); seeds down instead of c1: {seeds_down:.2f}x"
    )


if __name__ == "__main__":
    main()
