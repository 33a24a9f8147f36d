"""Review W: attacks on the server's sum of packed uploads and on SEAL's scratch files
after issue 22's speed changes (366e4d4..89a4cbb): seed-only scratch writes
(``seal_words.load_prefixed``), the uploads' words added in place and reduced once
(``PackedSum``), the byte-group unpacking and c0 read as a view (``_unpack_fields``,
``_words_of``), forked workers writing into anonymous shared memory
(``CkksAdder.sum_updates``) and anonymous scratch files made straight on ``/dev/shm``.

Findings W1-W3 (none reachable by a client's bytes; all three from the fork's set-up
that predates this stop) are fixed and their tests now pass: the workers' state travels
with the pool, a refused upload's reason comes from the whole upload, and a failed pool
start holds nothing. The other tests are regression tests for what held; each fails if
the property it names were broken.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import tenseal.sealapi as sealapi

from lepton_flwr.he import codec, seal_words
from lepton_flwr.he.packed import (
    CoefficientPacker,
    PackedFormat,
    PackedSum,
    _pack_fields,
    _unpack_fields,
)
from lepton_flwr.he.seal_words import ciphertext_words

VALUES_PER_CHUNK = 4096  # the default context's slots (complex slots: two values each)


@pytest.fixture(scope="module")
def uploads(ckks):
    """Two sets of four uploads of four chunks each, and their serial sums."""
    _, _, encoder, adder = ckks
    rng = np.random.default_rng(11)
    sets = [
        [encoder.encrypt(rng.normal(size=4 * VALUES_PER_CHUNK)) for _ in range(4)] for _ in range(2)
    ]
    return sets, [adder.sum_updates(s, workers=1)[0] for s in sets]


@pytest.fixture
def forked_when_small(monkeypatch):
    """Let sum_updates fork for a handful of chunks (it forks from 256 chunk-uploads)."""
    monkeypatch.setattr(codec, "PARALLEL_MIN_CHUNKS", 1)


# ---- findings ---------------------------------------------------------------------------------


def test_w1_two_threads_summing_in_parallel_each_get_their_own_sum(
    ckks, uploads, forked_when_small, monkeypatch
):
    """Finding W1 (medium, fixed: a silently wrong sum for a caller summing from two
    threads at once, e.g. two strategies or a server and a tool in one process):
    ``sum_updates`` handed its forked workers their state through a module global set
    before the pool forked; two threads that both set it before either forked had all
    their workers sum the last one's uploads, and the other thread read zeros past its
    own range. The state now travels with the pool (``initargs``, inherited through
    fork). Forced here: both threads make their pools at the same moment."""
    _, _, _, adder = ckks
    sets, serial = uploads
    both_ready = threading.Barrier(2)

    class BothAtOnce(codec.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            try:
                both_ready.wait(timeout=20)  # a fix that serialised the sums would time out
            except threading.BrokenBarrierError:
                pass
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(codec, "ProcessPoolExecutor", BothAtOnce)
    results: dict[int, object] = {}

    def run(which):
        try:
            results[which] = adder.sum_updates(sets[which], workers=2)
        except Exception as err:  # noqa: BLE001 - reported by the assert below
            results[which] = err

    threads = [threading.Thread(target=run, args=(which,)) for which in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for which in (0, 1):
        assert results[which] == (serial[which], {})
    assert codec._fork_state is None  # nothing global in the caller


def test_w2_a_forked_sum_names_the_bad_chunk_as_the_serial_sum_does(
    ckks, uploads, forked_when_small
):
    """Finding W2 (low, fixed: a misleading message, not a wrong sum): with workers, each
    range parsed ``chunks[start:stop]``, and the reason kept for a refused upload counted
    chunks from the range's start and by the range's length ("chunk 1 has 10 bytes" for
    chunk 3 of four). The reason now comes from the whole upload, as the serial sum's;
    an upload with another chunk count is refused before any range."""
    _, _, _, adder = ckks
    bad = [list(upload) for upload in uploads[0][0]]
    bad[1][3] = bad[1][3][:10]
    bad[2] = bad[2][:3]
    bad[3] = [*bad[3], bad[3][0]]  # one chunk too many: refused, not cut to four
    serial, serial_failed = adder.sum_updates(bad, workers=1)
    forked, forked_failed = adder.sum_updates(bad, workers=2)
    assert serial_failed[1].startswith("chunk 3 ")
    assert serial_failed[2] == "3 chunks, expected 4" and serial_failed[3] == "5 chunks, expected 4"
    assert forked_failed == serial_failed and forked == serial
    assert serial == adder.sum_updates([bad[0]], workers=1)[0]


def test_the_chunk_count_is_most_uploads_or_the_sums(ckks, uploads):
    """The count every upload must have is that of the server's own sums, or without
    sums that of most uploads: an odd first upload is refused, not taken as the rule
    (which refused every other one)."""
    _, _, _, adder = ckks
    sets, serial = uploads
    odd = [list(sets[0][0][:3]), *sets[0][1:]]
    total, failed = adder.sum_updates(odd, workers=1)
    assert failed == {0: "3 chunks, expected 4"}
    assert total == adder.sum_updates(sets[0][1:], workers=1)[0]
    _, failed = adder.sum_updates(sets[0], workers=1, sums=[serial[0][:3]])
    assert set(failed) == {0, 1, 2, 3} and failed[0] == "4 chunks, expected 3"


def _die(bounds):
    os._exit(3)  # a worker killed (a crash in SEAL, the OOM killer)


def test_a_summing_worker_that_dies_is_an_error_not_a_hang(
    ckks, uploads, forked_when_small, monkeypatch
):
    """A forked worker that dies (before this, ``Pool.map_async(...).get()`` waited for
    its result for ever): the sum raises, naming what happened, and the next sum works."""
    _, _, _, adder = ckks
    sets, serial = uploads
    monkeypatch.setattr(codec, "_sum_range_in_fork", _die)
    with pytest.raises(RuntimeError, match="a process summing uploads died"):
        adder.sum_updates(sets[0], workers=2)
    monkeypatch.undo()
    assert adder.sum_updates(sets[0], workers=2) == (serial[0], {})


def test_w3_a_pool_that_cannot_fork_leaves_no_uploads_held(
    ckks, uploads, forked_when_small, monkeypatch
):
    """Finding W3 (low: memory, fixed): the module kept every upload and the shared
    memory when the pool could not start (EAGAIN, ENOMEM). The state now travels with
    the pool: a failed start raises and holds nothing."""
    _, _, _, adder = ckks

    def cannot_fork(*args, **kwargs):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(codec, "ProcessPoolExecutor", cannot_fork)
    with pytest.raises(OSError, match="temporarily unavailable"):
        adder.sum_updates(uploads[0][0], workers=2)
    assert codec._fork_state is None


# ---- what held --------------------------------------------------------------------------------


def test_forked_sums_with_bad_uploads_in_any_range_are_the_serial_sum_of_the_rest(
    ckks, uploads, forked_when_small
):
    """Held: an upload refused in the caller's own range, in a worker's, or in the last
    chunk only, with the server's own sum added and with more workers than chunks
    (empty ranges, the caller's among them), leaves exactly the serial sum of the others,
    byte for byte, read out of the shared memory at the right offsets."""
    _, _, _, adder = ckks
    good = uploads[0][0]
    own = [adder.encrypt_public(np.linspace(-1, 1, 4 * VALUES_PER_CHUNK))]
    for bad_chunk in (0, 2, 3):
        for workers in (2, 3, 6):
            chunks = [list(upload) for upload in good]
            chunks[1][bad_chunk] = b"\xff" * len(chunks[1][bad_chunk])  # words past the limit
            chunks[3][bad_chunk] = chunks[3][bad_chunk][:-1]
            expected, _ = adder.sum_updates([good[0], good[2]], workers=1, sums=own)
            summed, failed = adder.sum_updates(chunks, workers=workers, sums=own)
            assert sorted(failed) == [1, 3], (bad_chunk, workers)
            assert summed == expected, (bad_chunk, workers)


def test_consecutive_seeded_loads_write_the_seed_alone_and_expand_as_seal(ckks):
    """Held: seeded loads one after another, with no save between them (as
    ``PackedSum.add`` makes them, one per chunk), write the 64-byte seed over the last
    one and leave the file's size alone; each loaded ciphertext's c1 is the one SEAL
    regenerates from its own seeded ciphertext. (The repository's test of
    ``load_prefixed`` reads each load's words back between loads, and that save makes
    every load write the whole file.)"""
    secret, _, _, _ = ckks
    ring = PackedFormat(secret).ring
    seal_encoder = sealapi.CKKSEncoder(ring.seal_context)
    encryptor = sealapi.Encryptor(ring.seal_context, secret.secret_key().data)
    blobs = []
    for shift in range(3):  # SEAL's own seeded ciphertexts, saved as SEAL saves them
        plain = sealapi.Plaintext()
        seal_encoder.encode([0.5 + shift] * (ring.degree // 2), ring.scale, plain)
        blobs.append(seal_words.save_bytes(encryptor.encrypt_symmetric(plain)))
    seeds = [ring.seeded_parts(blob)[1] for blob in blobs]
    assert len(set(seeds)) == 3
    expected = []
    for blob in blobs:
        empty = sealapi.Ciphertext(ring.seal_context)
        loaded = seal_words.load_bytes(empty, ring.seal_context, blob)
        expected.append(ciphertext_words(loaded)[1])
    writes = []
    real_pwrite = os.pwrite

    def counted(fd, data, offset):
        writes.append((len(data), offset))
        return real_pwrite(fd, data, offset)

    loaded = []
    os.pwrite = counted
    try:
        for seed in seeds:
            loaded.append(ring.seeded(seed))
    finally:
        os.pwrite = real_pwrite
    prefix = ring._seeded_prefix
    assert writes[1:] == [(len(seeds[0]), len(prefix))] * 2
    scratch = seal_words._scratch()
    assert os.pread(scratch.fd, len(prefix) + 2 * len(seeds[0]), 0) == prefix + seeds[2]
    for ciphertext, words in zip(loaded, expected, strict=True):
        np.testing.assert_array_equal(ciphertext_words(ciphertext)[1], words)


def _fields_by_python_integers(words: np.ndarray, bits: int, count_: int) -> np.ndarray:
    """The slow reference: each row one little-endian integer, cut into ``bits``-bit fields."""
    rows = words.reshape(-1, words.shape[-1])
    out = np.empty((len(rows), count_), dtype=np.uint64)
    for r, row in enumerate(rows):
        stream = int.from_bytes(row.astype("<u8").tobytes(), "little")
        for i in range(count_):
            out[r, i] = (stream >> (i * bits)) & ((1 << bits) - 1)
    return out.reshape(*words.shape[:-1], count_)


@pytest.mark.parametrize("lead", [(0,), (1,), (3,), (2, 2)])
def test_unpacking_fields_of_every_width_matches_python_integers(lead):
    """Held: the new byte-group unpacking (32-bit words up to four bytes, 64 above)
    cuts every width 1..63 exactly as the bitstream's integer does, words at every bit
    pattern and at their largest included, for empty, single and nested batches; the
    result is uint64 and packing it back gives the words."""
    rng = np.random.default_rng(5)
    count_ = 128
    for bits in range(1, 64):
        words = rng.integers(0, 2**64, size=(*lead, count_ * bits // 64), dtype=np.uint64)
        fields = _unpack_fields(words, bits, count_)
        assert fields.dtype == np.uint64 and fields.shape == (*lead, count_), bits
        np.testing.assert_array_equal(fields, _fields_by_python_integers(words, bits, count_))
        np.testing.assert_array_equal(_pack_fields(fields, bits), words)
        largest = np.full((*lead, count_), (1 << bits) - 1, dtype=np.uint64)
        again = _unpack_fields(_pack_fields(largest, bits), bits, count_)
        np.testing.assert_array_equal(again, largest)


# Data primes wider than the default context's, where the folding limit, not the 2^44
# cap, bounds the unreduced sum: two 63-bit primes (Q near 2^126), 62 + 50 bits, one of
# 61 bits, and the default's two of 40 for comparison.
WIDE_PRIMES = [
    [9223372036854775783, 9223372036854775643],
    [4611686018427387847, 1125899906842597],
    [2305843009213693951],
    [1099511390209, 1099511480321],
]


@pytest.mark.parametrize("primes", WIDE_PRIMES)
@pytest.mark.parametrize("d_up", [0, 4, 8])
def test_the_one_reduction_is_exact_at_the_folding_limit_for_wide_moduli(ckks, primes, d_up):
    """Held: ``PackedSum``'s folding limit keeps ``_max_unreduced`` words at their
    largest (limit(d_up) - 1 each, the most a checked upload holds), restored by 2^d_up,
    below 2^128 and within one reduction, for moduli up to 2^126, where the limit is a
    handful of uploads (the repository's own test uses the default primes, where the
    2^44 cap decides and a limit without the d_up term passes as well)."""
    secret, _, _, _ = ckks
    degree = 64
    packer = CoefficientPacker(primes, degree)
    fake = SimpleNamespace(
        packer=packer,
        d_up=d_up,
        ring=SimpleNamespace(degree=degree, seal_context=PackedFormat(secret).ring.seal_context),
    )
    total = PackedSum(fake, 1)
    count_ = total._max_unreduced
    assert count_ >= 1
    word = [count_ * (packer.limit(d_up) - 1) - i for i in range(degree)]
    total._y = (
        np.array([[w >> 64 for w in word]], dtype=np.uint64),
        np.array([[w & (2**64 - 1) for w in word]], dtype=np.uint64),
    )
    hi, lo = total._c0_of_words()
    got = [(int(h) << 64) | int(v) for h, v in zip(hi[0], lo[0], strict=True)]
    assert got == [(w << d_up) % packer.modulus for w in word]
    assert math.prod(primes) == packer.modulus


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs Linux, root and setpriv to act as another user",
)
def test_another_user_can_neither_find_nor_open_a_threads_scratch_file():
    """Held: the scratch file made straight on /dev/shm's file system (no 0700 folder
    any more) has no name (no link), mode 0600, adds nothing to /dev/shm, and another
    user (nobody, through setpriv) can open it neither through /proc nor by any name."""
    before = set(os.listdir(seal_words.scratch_base()))
    result: dict[str, object] = {}

    def in_a_thread():  # a file of its own, made now
        scratch = seal_words._scratch()
        os.pwrite(scratch.fd, b"ciphertext words", 0)
        info = os.fstat(scratch.fd)
        result["links"], result["mode"] = info.st_nlink, info.st_mode & 0o777
        path = f"/proc/{os.getpid()}/fd/{scratch.fd}"
        shell = f"cat {path} && echo READ; ls -A {seal_words.scratch_base()}"
        result["other"] = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", shell],
            capture_output=True,
            text=True,
            check=False,
        )
        result["after"] = set(os.listdir(seal_words.scratch_base()))

    thread = threading.Thread(target=in_a_thread)
    thread.start()
    thread.join()
    assert result["links"] == 0 and result["mode"] == 0o600
    assert result["after"] == before
    other = result["other"]
    assert "READ" not in other.stdout and "ciphertext words" not in other.stdout


def test_an_uploads_seeds_come_from_the_same_copy_as_its_words(ckks, uploads):
    """W noticed: ``parse_upload`` read c0 from its copy of the chunks but the seeds from
    the caller's chunks afterwards, so a bytearray rewritten in between (another thread
    of the caller's) gave a mixed upload. Both now come from the one copy: a chunk type
    whose slices differ from its bytes cannot feed other seeds."""
    _, public, _, _ = ckks
    wire = PackedFormat(public)

    class SlicesLie(bytearray):
        def __getitem__(self, key):
            if isinstance(key, slice):
                return bytes(len(range(*key.indices(len(self)))))
            return super().__getitem__(key)

    upload = uploads[0][0][0]
    honest = wire.parse_upload(upload)
    lying = wire.parse_upload([SlicesLie(chunk) for chunk in upload])
    assert lying.seeds == honest.seeds and any(any(seed) for seed in lying.seeds)
