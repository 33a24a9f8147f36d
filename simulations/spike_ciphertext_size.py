"""Spike (issue 22, goal 4): what each lever does to ciphertext bytes, times and errors.

``python -m simulations.spike_ciphertext_size [--params 1000000] [--uploads 10]`` prints,
side by side in one run, for one client update of ``--params`` values and a server sum of
``--uploads`` of them, the bytes per float32 up and down and the one-core seconds to
encrypt one update, add the uploads (deserialisation included) and decrypt the sum
(flooding included), for:

- ``today``: the pack's codec (SEAL's seeded, zstd-compressed ciphertexts, real slots);
- ``complex``: the same container with values in the real *and* imaginary parts of the
  CKKS slots (``CKKSEncoder.encode(list[complex])`` / ``decode_complex``);
- ``packed d=..``: c0 sent in coefficient form as one integer mod Q per coefficient,
  bit-packed, its ``d`` low-order bits dropped (rounded to nearest), plus the 64-byte seed
  of c1; the server adds c0 words mod each prime in numpy and sends the sum's c0 (its
  ``d_down`` low bits dropped) with the uploads' seeds, from which a client rebuilds c1;
- their combinations (``complex`` + ``packed``).

Column ``+c1 x`` is the download if the server sent the sum's c1 packed instead of the
seeds. Each row also has the exact decryption's error of the sum (RMS and largest, in value
units; ``err/flood``: against the flooding that every published decryption gets,
``lepton_flwr.he.publish.flooding_std`` for the whole update) and per polynomial coefficient
(``coef sd``: against ``COEFF_STD``, the bound the flooding assumes); CKKS's own error
is the ``today`` row's. Times are medians: whole operations repeated for the SEAL
rows, per-chunk medians times the chunk count for the packed rows. This is a measurement,
not a codec: it never publishes an exact decryption.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections import defaultdict
from itertools import count

import numpy as np
import tenseal as ts
import tenseal.sealapi as sealapi

from lepton_flwr.he import CkksAdder, CkksEncoder, CKKSParams, create_secret_context
from lepton_flwr.he.codec import load_fresh
from lepton_flwr.he.keys import public_context_bytes, scratch_dir
from lepton_flwr.he.publish import COEFF_STD, MAX_SUMMED, flooding_std, publishable
from lepton_flwr.he.seal_words import _unframed, ciphertext_from_words

FLOAT32 = 4.0
SEED_BYTES = 64  # SEAL's PRNG seed (8 x u64) that replaces c1 in a seeded ciphertext
CHUNK_HEADER_BYTES = 8  # a chunk index and a length per packed chunk, generously
_names = count()


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---- SEAL rows: today's codec, and the same container with complex slots ----------------


class ComplexSealCodec:
    """Today's container (seeded SEAL ciphertexts) with two values per CKKS slot."""

    def __init__(self, context: ts.Context):
        self.context = context
        seal_context = context.seal_context().data
        self.seal_context = seal_context
        self.encoder = sealapi.CKKSEncoder(seal_context)
        self.encryptor = sealapi.Encryptor(seal_context, context.secret_key().data)
        self.decryptor = sealapi.Decryptor(seal_context, context.secret_key().data)
        self.slots, self.scale = self.encoder.slot_count(), context.global_scale

    def encrypt(self, vector: np.ndarray) -> list[bytes]:
        """Seeded ciphertexts of 2 * slots values each: half real parts, half imaginary."""
        out, per = [], 2 * self.slots
        for start in range(0, len(vector), per):
            piece = np.pad(vector[start : start + per], (0, per - len(vector[start : start + per])))
            values = piece[: self.slots] + 1j * piece[self.slots :]
            plain = sealapi.Plaintext()
            self.encoder.encode(values.tolist(), self.scale, plain)
            out.append(_save(self.encryptor.encrypt_symmetric(plain)))
        return out

    def decrypt_exact(self, chunks: list[bytes], length: int) -> np.ndarray:
        """The exact decryption (never published: :func:`publishable` floods it)."""
        vector = load_fresh(self.context, chunks, self.slots)
        parts = []
        for ciphertext in vector.ciphertext():
            plain = sealapi.Plaintext()
            self.decryptor.decrypt(ciphertext, plain)
            values = np.asarray(self.encoder.decode_complex(plain))
            parts += [values.real, values.imag]
        return np.concatenate(parts)[:length]


def _save(obj) -> bytes:
    path = str(scratch_dir() / f"spike-{os.getpid()}-{next(_names)}")
    obj.save(path)
    try:
        with open(path, "rb") as handle:
            return handle.read()
    finally:
        os.unlink(path)


def _words_of(ciphertext) -> np.ndarray:
    """A (non-seeded) ciphertext's words, shape (2, k, N), read from SEAL's own save."""
    body = _unframed(_save(ciphertext))
    # parms_id (32), NTT flag (1), size, N, k (24), scale (8), correction factor (8)
    size, degree, primes = np.frombuffer(body[33:57], dtype="<u8")
    words = np.frombuffer(_unframed(body[73:]), dtype="<u8", offset=8)
    return words.reshape(int(size), int(primes), int(degree)).astype(np.uint64)


# ---- the packed rows: c0 as integers mod Q, low bits dropped, bit-packed ----------------


def _mulmod(a: np.ndarray, b: int, q: int) -> np.ndarray:
    """(a * b) mod q for a < q < 2^40 and a constant b < q, in uint64 without overflow."""
    lo, hi = np.uint64(b & ((1 << 20) - 1)), np.uint64(b >> 20)
    qq = np.uint64(q)
    part_hi = ((a * hi) % qq) * np.uint64(1 << 20) % qq
    return (part_hi + (a * lo) % qq) % qq


class Packer:
    """c0 <-> bytes: CRT of two 40-bit residues into x < Q, x >> d, bit-packed."""

    def __init__(self, primes: list[int], degree: int):
        if len(primes) != 2 or max(primes) >= 1 << 40:
            raise ValueError("the spike packs two data primes below 2^40")
        self.q1, self.q2, self.degree = primes[0], primes[1], degree
        self.inv = pow(self.q1, -1, self.q2)
        self.modulus_bits = (self.q1 * self.q2).bit_length()
        self.two64 = [pow(2, 64, q) for q in primes]

    def compose(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Residues (2, N) -> x = r1 + q1 * t as (hi, lo) uint64 halves of a 128-bit word."""
        r1, r2 = rows[0], rows[1]
        q1, q2 = np.uint64(self.q1), np.uint64(self.q2)
        t = _mulmod((r2 + q2 - r1 % q2) % q2, self.inv, self.q2)
        s1 = q1 * (t & np.uint64((1 << 24) - 1))  # < 2^64
        product_hi = q1 * (t >> np.uint64(24))  # < 2^56, weight 2^24
        a = s1 + r1
        carry_a = (a < s1).astype(np.uint64)
        b = (product_hi & np.uint64((1 << 40) - 1)) << np.uint64(24)
        lo = a + b
        carry_b = (lo < a).astype(np.uint64)
        return (product_hi >> np.uint64(40)) + carry_a + carry_b, lo

    def residues(self, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """(hi, lo) with hi < 2^16 -> residues (2, N) mod q1, q2."""
        rows = []
        for q, two64 in zip((self.q1, self.q2), self.two64, strict=True):
            qq = np.uint64(q)
            rows.append((hi * np.uint64(two64) % qq + lo % qq) % qq)
        return np.stack(rows)

    def drop(self, hi: np.ndarray, lo: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
        """round(x / 2^bits), as (hi, lo)."""
        if bits == 0:
            return hi, lo
        half = np.uint64(1 << (bits - 1))
        lo2 = lo + half
        hi = hi + (lo2 < lo).astype(np.uint64)
        b = np.uint64(bits)
        return hi >> b, (lo2 >> b) | (hi << np.uint64(64 - bits))

    def restore(self, hi: np.ndarray, lo: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
        """Undo :meth:`drop` up to the rounding: y * 2^bits, mod 2^128 (then reduced mod Q)."""
        if bits == 0:
            return hi, lo
        b = np.uint64(bits)
        return (hi << b) | (lo >> np.uint64(64 - bits)), lo << b

    def pack(self, rows: np.ndarray, bits: int) -> bytes:
        """Residues (2, N) of c0 in coefficient form -> ceil(N (log2 Q - bits) / 8) bytes."""
        hi, lo = self.drop(*self.compose(rows), bits)
        width = self.modulus_bits - bits
        words = np.stack([lo, hi], axis=1).astype("<u8").view(np.uint8)
        flags = np.unpackbits(words.reshape(self.degree, 16), axis=1, bitorder="little")
        return np.packbits(flags[:, :width], bitorder="little").tobytes()

    def unpack(self, blob: bytes, bits: int) -> np.ndarray:
        """Inverse of :meth:`pack`, up to the dropped bits; refuses a word >= Q / 2^bits."""
        width = self.modulus_bits - bits
        if len(blob) != -(-self.degree * width // 8):
            raise ValueError(f"a packed chunk has {len(blob)} bytes")
        flags = np.unpackbits(np.frombuffer(blob, dtype=np.uint8), bitorder="little")
        flags = flags[: self.degree * width].reshape(self.degree, width)
        full = np.zeros((self.degree, 128), dtype=np.uint8)
        full[:, :width] = flags
        words = np.packbits(full, axis=1, bitorder="little").view("<u8").astype(np.uint64)
        hi, lo = words[:, 1], words[:, 0]
        limit = -(-(self.q1 * self.q2) // (1 << bits))  # round() may reach ceil(Q / 2^d)
        too_big = (hi > np.uint64(limit >> 64)) | (
            (hi == np.uint64(limit >> 64)) & (lo > np.uint64(limit & ((1 << 64) - 1)))
        )
        if too_big.any():
            raise ValueError("a packed word is past Q / 2^bits")
        return self.residues(*self.restore(hi, lo, bits))


class PackedPipeline:
    """One client's chunks encrypted, then c0 packed for each ``d``; server sums mod q."""

    def __init__(self, context: ts.Context, complex_slots: bool):
        seal_context = context.seal_context().data
        self.context, self.seal_context = context, seal_context
        self.encoder = sealapi.CKKSEncoder(seal_context)
        self.encryptor = sealapi.Encryptor(seal_context, context.secret_key().data)
        self.decryptor = sealapi.Decryptor(seal_context, context.secret_key().data)
        self.evaluator = sealapi.Evaluator(seal_context)
        parms = seal_context.first_context_data().parms()
        self.primes = [m.value() for m in parms.coeff_modulus()]
        self.parms_id = seal_context.first_parms_id()
        self.degree = parms.poly_modulus_degree()
        self.packer = Packer(self.primes, self.degree)
        self.scale, self.complex_slots = context.global_scale, complex_slots
        self.per_chunk = self.degree if complex_slots else self.degree // 2

    def encrypt_coefficients(self, values: np.ndarray) -> np.ndarray:
        """Encode, encrypt (secret key), leave NTT form: words (2, k, N), coefficient form."""
        plain = sealapi.Plaintext()
        if self.complex_slots:
            half = self.degree // 2
            padded = np.pad(values, (0, self.degree - len(values)))
            self.encoder.encode((padded[:half] + 1j * padded[half:]).tolist(), self.scale, plain)
        else:
            self.encoder.encode(values.tolist(), self.scale, plain)
        ciphertext = sealapi.Ciphertext(self.seal_context)
        self.encryptor.encrypt_symmetric(plain, ciphertext)
        self.evaluator.transform_from_ntt_inplace(ciphertext)
        return _words_of(ciphertext)

    def decrypt_exact(self, c0: np.ndarray, c1: np.ndarray, length: int) -> np.ndarray:
        """Exact decryption of (c0, c1) in coefficient form (never published)."""
        words = np.stack([c0, c1])
        ciphertext = ciphertext_from_words(
            self.seal_context, words, self.parms_id, self.scale, ntt_form=False
        )
        self.evaluator.transform_to_ntt_inplace(ciphertext)
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(ciphertext, plain)
        if self.complex_slots:
            values = np.asarray(self.encoder.decode_complex(plain))
            return np.concatenate([values.real, values.imag])[:length]
        return np.asarray(self.encoder.decode_double(plain))[:length]


def add_mod(a: np.ndarray, b: np.ndarray, primes: list[int]) -> np.ndarray:
    """Row-wise (a + b) mod primes[j] for words below their primes."""
    q = np.asarray(primes, dtype=np.uint64)[:, None]
    total = a + b
    return np.where(total >= q, total - q, total)


def run_packed(
    context: ts.Context,
    updates: list[np.ndarray],
    complex_slots: bool,
    drops: list[int],
    drops_down: list[int],
    seeded_load_s: float,
) -> list[dict]:
    """Rows for packed c0 at each (d up, d down); per-chunk medians x chunk count."""
    pipe = PackedPipeline(context, complex_slots)
    n, per = len(updates[0]), pipe.per_chunk
    chunks = -(-n // per)
    truth = np.sum(updates, axis=0)
    stage = defaultdict(list)  # (stage, d) -> per-chunk seconds (first upload / the sum)
    errors = {(d, dd): [] for d in drops for dd in drops_down}
    sizes_up = {d: 0 for d in drops}
    sizes_down = {(d, dd): 0 for d in drops for dd in drops_down}
    for index in range(chunks):
        sl = slice(index * per, min(n, (index + 1) * per))
        sums = {d: None for d in drops}
        c1_sum = None
        for k, update in enumerate(updates):
            start = time.perf_counter()
            words = pipe.encrypt_coefficients(update[sl])
            encrypt_s = time.perf_counter() - start
            c1_sum = words[1] if c1_sum is None else add_mod(c1_sum, words[1], pipe.primes)
            for d in drops:
                start = time.perf_counter()
                blob = pipe.packer.pack(words[0], d)
                pack_s = time.perf_counter() - start
                if k == 0:
                    stage["encrypt", d].append(encrypt_s + pack_s)
                    sizes_up[d] += len(blob) + SEED_BYTES + CHUNK_HEADER_BYTES
                start = time.perf_counter()  # the server: unpack (range check), add mod q
                rows = pipe.packer.unpack(blob, d)
                sums[d] = rows if sums[d] is None else add_mod(sums[d], rows, pipe.primes)
                stage["add", d].append(time.perf_counter() - start)
        for d in drops:
            for dd in drops_down:
                start = time.perf_counter()
                blob = pipe.packer.pack(sums[d], dd)
                pack_s = time.perf_counter() - start
                sizes_down[d, dd] += len(blob) + SEED_BYTES * len(updates) + CHUNK_HEADER_BYTES
                start = time.perf_counter()
                c0 = pipe.packer.unpack(blob, dd)
                # c1 stands in for the sum of the seeds' expansions (timed separately)
                exact = pipe.decrypt_exact(c0, c1_sum, sl.stop - sl.start)
                stage["decrypt", d, dd].append(time.perf_counter() - start)
                stage["add_pack", d, dd].append(pack_s)
                errors[d, dd].append(exact - truth[sl])
    rows = []
    flood = flooding_std(pipe.degree, pipe.scale, n)
    for d in drops:
        for dd in drops_down:
            err = np.concatenate(errors[d, dd])
            rebuild_c1 = seeded_load_s * len(updates) * chunks
            rows.append(
                {
                    "name": f"{'complex + ' if complex_slots else ''}packed d={d} down={dd}",
                    "up_x": sizes_up[d] / n / FLOAT32,
                    "down_x": sizes_down[d, dd] / n / FLOAT32,
                    # c1 of the sum sent packed (log2 Q bits a coefficient) instead of seeds
                    "down_c1_x": (
                        sizes_down[d, dd]
                        + chunks * (-(-pipe.degree * pipe.packer.modulus_bits // 8))
                        - chunks * SEED_BYTES * len(updates)
                    )
                    / n
                    / FLOAT32,
                    "encrypt_s": statistics.median(stage["encrypt", d]) * chunks,
                    "add_s": statistics.median(stage["add", d]) * chunks * len(updates)
                    + statistics.median(stage["add_pack", d, dd]) * chunks,
                    # rebuilding c1 from the seeds: one seeded SEAL load per upload and chunk
                    "decrypt_s": statistics.median(stage["decrypt", d, dd]) * chunks
                    + rebuild_c1
                    + _flood_time(n, pipe.degree, pipe.scale),
                    "err_rms": float(np.sqrt(np.mean(err**2))),
                    "err_max": float(np.abs(err).max()),
                    "flooding_std": flood,
                }
            )
    return rows


def _flood_time(n: int, degree: int, scale: float) -> float:
    vector = np.zeros(n)
    return _median_time(lambda: publishable(vector, 1.0, degree, scale), 3)


def seeded_load_seconds(context: ts.Context, public: ts.Context) -> float:
    """Median seconds to load one seeded chunk (SEAL expands c1 from its seed) minus a full one."""
    encoder = CkksEncoder(context, workers=1)
    seeded = encoder.encrypt(np.zeros(encoder.slots))[0]
    full = CkksEncoder(context, workers=1, seeded=False).encrypt(np.zeros(encoder.slots))[0]
    slots = encoder.slots

    def load(blob):
        return lambda: [load_fresh(public, [blob], slots) for _ in range(50)]

    return max(0.0, (_median_time(load(seeded), 5) - _median_time(load(full), 5)) / 50)


# ---- the SEAL rows ------------------------------------------------------------------------


def run_seal(context, public, updates, complex_slots: bool, repeats: int) -> dict:
    """Today's codec, or its container with complex slots: bytes, medians, error."""
    n = len(updates[0])
    adder = CkksAdder(public)
    if complex_slots:
        codec = ComplexSealCodec(context)
        encrypt, exact = codec.encrypt, codec.decrypt_exact
        slots = codec.slots
    else:
        codec = CkksEncoder(context, workers=1)
        encrypt, exact = codec.encrypt, codec._decrypt_exact  # measurement only
        slots = codec.slots
    uploads = [encrypt(u) for u in updates]
    sums, errs = adder.sum_updates(uploads, workers=1)
    assert not errs, errs
    truth = np.sum(updates, axis=0)
    err = exact(sums, n) - truth
    scale, degree = context.global_scale, 2 * slots
    return {
        "name": "complex (SEAL seeded)" if complex_slots else "today (SEAL seeded)",
        "up_x": sum(map(len, uploads[0])) / n / FLOAT32,
        "down_x": sum(map(len, sums)) / n / FLOAT32,
        "down_c1_x": sum(map(len, sums)) / n / FLOAT32,
        "encrypt_s": _median_time(lambda: encrypt(updates[0]), repeats),
        "add_s": _median_time(lambda: adder.sum_updates(uploads, workers=1), repeats),
        "decrypt_s": _median_time(lambda: publishable(exact(sums, n), 1.0, degree, scale), repeats),
        "err_rms": float(np.sqrt(np.mean(err**2))),
        "err_max": float(np.abs(err).max()),
        "flooding_std": flooding_std(degree, scale, n),
    }


def print_table(rows: list[dict], base: dict) -> None:
    """Bytes (multiples of float32), one-core seconds and errors, one row per lever."""
    head = (
        f"{'lever':34s} {'up x f32':>8s} {'down x':>7s} {'+c1 x':>6s} {'enc s':>6s} "
        f"{'add10 s':>7s} {'dec s':>6s} {'err rms':>9s} {'err max':>9s} {'err/flood':>9s} "
        f"{'coef sd':>7s}"
    )
    print(head)
    print("-" * len(head))
    for row in rows:
        print(
            f"{row['name']:34s} {row['up_x']:8.2f} {row['down_x']:7.2f} "
            f"{row['down_c1_x']:6.2f} {row['encrypt_s']:6.2f} "
            f"{row['add_s']:7.2f} {row['decrypt_s']:6.2f} {row['err_rms']:9.2e} "
            f"{row['err_max']:9.2e} {row['err_rms'] / row['flooding_std']:9.1e} "
            f"{row['err_rms'] * base['scale'] / math.sqrt(base['degree'] / 2):7.1f}"
        )
    print(
        f"(today: up {base['up_x']:.2f}x, down {base['down_x']:.2f}x; flooding std for "
        f"{base['n']:,} values: {base['flooding_std']:.2e}; coef sd: the sum's error per "
        f"coefficient, err rms * scale / sqrt(N/2), which the flooding bounds by "
        f"{COEFF_STD:g} * sqrt(uploads) = {COEFF_STD * math.sqrt(base['uploads']):.0f} "
        f"at this sum, {COEFF_STD * math.sqrt(MAX_SUMMED):.0f} at MAX_SUMMED)"
    )


def main() -> None:
    """Run every lever on the same updates and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--uploads", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--drops", default="0,4,5,8,12")
    parser.add_argument("--drops-down", default="0,12")
    args = parser.parse_args()
    drops = [int(d) for d in args.drops.split(",")]
    drops_down = [int(d) for d in args.drops_down.split(",")]

    context = create_secret_context(CKKSParams())
    public = ts.context_from(public_context_bytes(context))
    rng = np.random.default_rng(0)
    # clamped, weighted updates of the size HE-FedAvg sums (weight ~ 10 examples, |v| < 1)
    updates = [10 * np.clip(rng.normal(0, 0.05, args.params), -1, 1) for _ in range(args.uploads)]
    print(f"{args.params:,} values, {args.uploads} uploads, one core, N=4096, Q ~ 2^80, 2^58")
    rows = [run_seal(context, public, updates, False, args.repeats)]
    rows.append(run_seal(context, public, updates, True, args.repeats))
    seeded = seeded_load_seconds(context, public)
    print(f"rebuilding c1 from a seed (a seeded SEAL load minus a full one): {seeded * 1e3:.3f} ms")
    for complex_slots in (False, True):
        rows += run_packed(context, updates, complex_slots, drops, drops_down, seeded)
    base = dict(
        rows[0],
        n=args.params,
        uploads=args.uploads,
        scale=context.global_scale,
        degree=CKKSParams().poly_modulus_degree,
    )
    print_table(rows, base)


if __name__ == "__main__":
    main()
