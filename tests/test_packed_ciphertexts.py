"""The packed wire format (lepton_flwr.he.packed): exact where it says so, rounded within
2^(d-1) where it drops bits, refusing what a sender can get wrong, and within the error
the flooding assumes (lepton_flwr.he.publish).

Ciphertexts are made here with SEAL directly (seeded secret-key encryption, real slots),
as the codec makes them, so these tests do not depend on how the codec encodes values.
"""

import math

import numpy as np
import pytest
import tenseal.sealapi as sealapi

from lepton_flwr.he import CKKSParams, create_secret_context
from lepton_flwr.he.codec import CiphertextError
from lepton_flwr.he.keys import public_context_bytes
from lepton_flwr.he.packed import (
    SEED_BYTES,
    CoefficientPacker,
    PackedFormat,
    PackedSum,
    _pack_fields,
)
from lepton_flwr.he.publish import (
    COEFF_STD,
    MAX_DOWNLOAD_DROP,
    MAX_SUMMED,
    MAX_UPLOAD_DROP,
    TooManySummedError,
    check_summed,
    rounding_variance,
    summed_limit,
    upload_coefficient_std,
)
from lepton_flwr.he.seal_words import ciphertext_words, load_bytes, plaintext_words, save_bytes

PRIMES = [1099511390209, 1099511480321]  # the default context's two 40-bit data primes
N = 4096


@pytest.fixture(scope="module")
def secret():
    return create_secret_context(CKKSParams())


@pytest.fixture(scope="module")
def public(secret):
    import tenseal as ts

    return ts.context_from(public_context_bytes(secret))


class _Seal:
    """Seeded secret-key encryption and exact decryption with SEAL (real slots)."""

    def __init__(self, context):
        seal_context = context.seal_context().data
        self.seal_context, self.scale = seal_context, context.global_scale
        self.encoder = sealapi.CKKSEncoder(seal_context)
        self.encryptor = sealapi.Encryptor(seal_context, context.secret_key().data)
        self.decryptor = sealapi.Decryptor(seal_context, context.secret_key().data)

    def plain(self, values):
        plain = sealapi.Plaintext()
        self.encoder.encode(list(values), self.scale, plain)
        return plain

    def encrypt(self, values):
        """One seeded ciphertext per N/2 values: SEAL's save, as the codec sends it."""
        half = N // 2
        return [
            save_bytes(self.encryptor.encrypt_symmetric(self.plain(values[i : i + half])))
            for i in range(0, len(values), half)
        ]

    def load(self, blob):
        return load_bytes(sealapi.Ciphertext(self.seal_context), self.seal_context, blob)

    def decrypt_words(self, ciphertext):
        """The exact decryption's plaintext words (k, N), NTT form (never published)."""
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(ciphertext, plain)
        return plaintext_words(plain, N)

    def decode(self, ciphertext):
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(ciphertext, plain)
        return np.asarray(self.encoder.decode_double(plain))


def _as_int(hi, lo):
    return [(int(h) << 64) | int(w) for h, w in zip(hi.ravel(), lo.ravel(), strict=True)]


def _centered(residues_q1):
    """Small signed integers from their residues mod q1 (|value| < q1 / 2)."""
    values = residues_q1.astype(np.int64)
    return np.where(values > PRIMES[0] // 2, values - PRIMES[0], values)


def _integers(packer, values):
    """Python integers < Q as the (hi, lo) pair of shape (1, len)."""
    hi = np.array([v >> 64 for v in values], dtype=np.uint64)[None]
    lo = np.array([v & ((1 << 64) - 1) for v in values], dtype=np.uint64)[None]
    return hi, lo


# ---- integers, rounding, bitstreams -------------------------------------------------------


# The CKKS primes are 1 mod 2N, so their Q is 1 mod 2^13 and no word rounds up to Q; the
# second set (coprime, the larger first, Q = -1 mod 2^12) makes words near Q round to Q = 0.
MODULI = [PRIMES, [2**40 - 1, PRIMES[0]], [PRIMES[1]]]


@pytest.mark.parametrize("primes", MODULI, ids=["ckks", "wrapping", "one-prime"])
@pytest.mark.parametrize("drop", [0, 1, 4, 12])
def test_pack_unpack_is_exact_at_d0_and_within_half_a_step_above(drop, primes):
    """Random words and the extremes: 0, Q - 1, multiples of 2^d and their neighbours,
    the ties, and the words just below Q that round to Q (which is 0 mod Q), against a
    Python-integer rounding to the nearest multiple (ties to even), sent as 0 when that
    multiple is Q or more."""
    packer = CoefficientPacker(primes, N)
    modulus, rng = packer.modulus, np.random.default_rng(drop)
    step = 1 << drop
    special = [0, 1, modulus - 1, modulus - 2, modulus - step // 2, modulus - step // 2 - 1]
    for k in (1, 2, 3, 12345, modulus // step - 1, modulus // step):
        special += [k * step - 1, k * step, k * step + 1, k * step + step // 2]
    special = [v % modulus for v in special]
    randoms = rng.integers(0, 2**62, (N - len(special), 2), dtype=np.uint64)
    values = special + [((int(a) << 62) + int(b)) % modulus for a, b in randoms]
    x = _integers(packer, values)
    y = packer.round_off(x, drop)
    blob = packer.pack(y, drop)
    assert blob.shape == (1, N * packer.coefficient_width(drop) // 8)
    back = packer.unpack(blob, drop)
    assert not packer.out_of_range(back, drop).any()
    restored = _as_int(*packer.restore(back, drop))
    for original, got in zip(values, restored, strict=True):
        assert got < modulus
        error = (got - original) % modulus
        error = error - modulus if error > modulus // 2 else error
        assert abs(error) <= step // 2, (original, got)
        quotient, remainder = divmod(original, step)  # nearest multiple, ties to even
        if 2 * remainder > step or (2 * remainder == step and quotient % 2):
            quotient += 1
        assert got == (0 if quotient * step >= modulus else quotient * step)
    wrapping = [v for v in values if (v + step // 2) // step * step >= modulus]
    assert bool(wrapping) == (drop > 0 and modulus % step > step // 2)


def test_widths_are_the_bits_of_the_largest_word():
    packer = CoefficientPacker(PRIMES, N)
    assert packer.modulus.bit_length() == 80
    for drop, width in [(0, 80), (4, 76), (12, 68)]:
        assert packer.coefficient_width(drop) == width
        assert packer.polynomial_bytes(drop) == N * width // 8
    assert packer.residue_bytes() == N * 80 // 8


@pytest.mark.parametrize("bits", [1, 4, 7, 12, 13, 16, 36, 40, 63])
def test_fields_follow_the_documented_bitstream(bits):
    """Field i at bits [i*b, (i+1)*b) of a little-endian stream, for the grouped and the
    generic packers alike (an independent Python-integer construction)."""
    values = np.random.default_rng(bits).integers(0, 2**bits, (1, 128), dtype=np.uint64)
    stream = 0
    for index, value in enumerate(values[0]):
        stream |= int(value) << (index * bits)
    packed = _pack_fields(values, bits).astype("<u8").tobytes()
    assert packed == stream.to_bytes(128 * bits // 8, "little")


def test_reduce_is_mod_q_below_two_to_the_45_times_q():
    packer = CoefficientPacker(PRIMES, N)
    modulus, rng = packer.modulus, np.random.default_rng(3)
    values = [0, modulus - 1, modulus, modulus + 1, 2**44 * modulus - 1, 2**44 * modulus + 5]
    values += [int(a) * modulus + int(b) for a, b in rng.integers(0, 2**44, (58, 2))]
    got = _as_int(*packer.reduce(_integers(packer, values)))
    assert got == [v % modulus for v in values]


@pytest.mark.parametrize("primes", MODULI, ids=["ckks", "wrapping", "one-prime"])
def test_residues_and_crt_are_inverse(primes):
    packer = CoefficientPacker(primes, N)
    rng = np.random.default_rng(4)
    residues = np.stack([rng.integers(0, q, (10, N), dtype=np.uint64) for q in primes], axis=1)
    residues[0, :, 0] = 0
    residues[0, :, 1] = [q - 1 for q in primes]
    x = packer.compose(residues)
    integers = _as_int(*x)
    assert max(integers) < packer.modulus and integers[1] == packer.modulus - 1
    for row, q in enumerate(primes):
        assert [v % q for v in integers] == [int(r) for r in residues[:, row].ravel()]
    np.testing.assert_array_equal(packer.residues(x), residues)
    with pytest.raises(ValueError, match="one or two data primes"):
        CoefficientPacker([*PRIMES, PRIMES[0] - 2], N)


@pytest.mark.parametrize("drop", [1, 2, 12])
def test_rounding_error_is_centred_and_of_the_stated_variance(drop):
    """publish.rounding_variance: mean 0 (ties to even; rounding ties up would give a mean
    of +1/2 at d = 1), variance (2a² + 1)/6, a = 2^(d-1), never beyond a."""
    packer = CoefficientPacker(PRIMES, N)
    rng = np.random.default_rng(drop)
    lo = rng.integers(0, 2**63, (16, N), dtype=np.uint64) * np.uint64(2) + rng.integers(
        0, 2, (16, N), dtype=np.uint64
    )
    x = (np.zeros_like(lo), lo)
    restored = packer.restore(packer.round_off(x, drop), drop)
    error = (restored[1] - lo).astype(np.int64).astype(np.float64)
    half = 2 ** (drop - 1)
    assert np.abs(error).max() == half
    assert abs(error.mean()) < 0.02 * half
    assert error.var() == pytest.approx(rounding_variance(drop), rel=0.02)


# ---- the wire format against SEAL ----------------------------------------------------------


def test_seed_expansion_equals_the_c1_seal_regenerates(secret, public):
    seal = _Seal(secret)
    chunks = seal.encrypt(np.random.default_rng(5).normal(0, 1, 3 * N // 2))
    server = PackedFormat(public)
    upload = server.parse_upload(PackedFormat(secret).pack_upload(chunks), 3)
    expanded = server.expand_seeds(upload.seeds)
    for index, chunk in enumerate(chunks):
        np.testing.assert_array_equal(expanded[index], ciphertext_words(seal.load(chunk))[1])
    assert not np.array_equal(expanded[0], expanded[1])


def test_seed_loads_writing_the_seed_alone_survive_other_uses_of_the_scratch_file(secret):
    """``Ring.seeded`` writes only the seed while the rest of the scratch file repeats
    (``seal_words.load_prefixed``); a save, a full load, a seeded load of another
    context or a tail of another length in between rewrites the whole file, and every
    expansion stays SEAL's own."""
    import os

    from lepton_flwr.he import seal_words

    seal = _Seal(secret)
    chunks = seal.encrypt(np.random.default_rng(6).normal(0, 1, 3 * N // 2))
    ring = PackedFormat(secret).ring
    other = PackedFormat(create_secret_context(CKKSParams(poly_modulus_degree=8192))).ring
    seeds = [PackedFormat(secret).ring.seeded_parts(chunk)[1] for chunk in chunks]
    expected = [ciphertext_words(seal.load(chunk))[1] for chunk in chunks]

    def check(index):
        loaded = ring.seeded(seeds[index])
        scratch = seal_words._scratch()
        written = os.pread(scratch.fd, os.fstat(scratch.fd).st_size, 0)
        assert written == ring._seeded_prefix + seeds[index]  # the file is the whole blob
        np.testing.assert_array_equal(ciphertext_words(loaded)[1], expected[index])

    check(0)
    check(1)  # the seed alone written
    save_bytes(seal.load(chunks[2]))
    check(2)
    seal.load(chunks[0])
    check(0)
    other.seeded(seeds[1])
    check(1)
    with pytest.raises(ValueError, match="exceeds"):  # no seed: SEAL refuses the short file
        seal_words.load_prefixed(sealapi.Ciphertext(), ring.seal_context, ring._seeded_prefix, b"")
    check(2)
    with pytest.raises(ValueError, match="63 bytes"):
        ring.seeded(seeds[0][:63])


def test_a_packed_upload_decrypts_as_the_seal_ciphertext(secret):
    """d = 0: the very same ciphertext, word for word. d = 4: the same c1, and c0 (so the
    decrypted plaintext) off by at most 8 a coefficient, and off somewhere."""
    seal = _Seal(secret)
    values = np.random.default_rng(6).normal(0, 1, N)
    chunks = seal.encrypt(values)
    exact = PackedFormat(secret, d_up=0)
    for chunk, ciphertext in zip(
        chunks,
        exact.upload_ciphertexts(exact.parse_upload(exact.pack_upload(chunks))),
        strict=True,
    ):
        np.testing.assert_array_equal(
            ciphertext_words(ciphertext), ciphertext_words(seal.load(chunk))
        )
    rounded = PackedFormat(secret, d_up=4)
    ring = rounded.ring
    packed = rounded.upload_ciphertexts(rounded.parse_upload(rounded.pack_upload(chunks)))
    for chunk, ciphertext in zip(chunks, packed, strict=True):
        reference = seal.load(chunk)
        np.testing.assert_array_equal(
            ciphertext_words(ciphertext)[1], ciphertext_words(reference)[1]
        )
        difference = ring.transform(
            np.stack([seal.decrypt_words(ciphertext), seal.decrypt_words(reference)]),
            to_ntt=False,
        )
        error = _centered((difference[0, 0] + np.uint64(PRIMES[0]) - difference[1, 0]) % PRIMES[0])
        assert 0 < np.abs(error).max() <= 8
        np.testing.assert_allclose(seal.decode(ciphertext), seal.decode(reference), atol=1e-12)


@pytest.fixture(scope="module")
def hundred_uploads(secret):
    """100 fresh one-chunk uploads of different values, their messages and c0 (coefficient)."""
    seal, rng = _Seal(secret), np.random.default_rng(7)
    values = [rng.normal(0, 0.1, N // 2) for _ in range(100)]
    chunks = [seal.encrypt(v)[0] for v in values]
    messages = [plaintext_words(seal.plain(v), N) for v in values]
    return seal, values, chunks, messages


def _error_std_of_sum(secret, hundred_uploads, drop):
    """Std of Σ (e_i + r_i) per coefficient for 100 uploads with c0 rounded at ``drop``,
    and of Σ r_i alone: the sum decrypted, minus the same sum unrounded / the messages."""
    seal, _, chunks, messages = hundred_uploads
    packed = PackedFormat(secret, d_up=0)
    ring, packer = packed.ring, packed.packer
    parts = [ring.seeded_parts(chunk) for chunk in chunks]
    c0 = ring.transform(np.stack([words for words, _ in parts]), to_ntt=False)
    c1 = packed.expand_seeds([seed for _, seed in parts])
    primes = np.array(PRIMES, dtype=np.uint64)[:, None]

    def total(polys):
        out = np.zeros((len(PRIMES), N), dtype=np.uint64)
        for poly in polys:
            out = np.minimum(out + poly, out + poly - primes)
        return out

    rounded = packer.residues(packer.restore(packer.round_off(packer.compose(c0), drop), drop))
    decrypted = {}
    for name, first in (("exact", c0), ("rounded", rounded)):
        ciphertext = packed.ciphertexts(total(first)[None], total(c1)[None])[0]
        decrypted[name] = ring.transform(seal.decrypt_words(ciphertext)[None], False)[0]
    message = ring.transform(total(messages)[None], to_ntt=False)[0]

    def centred(a, b):
        return _centered(np.minimum(a[0] - b[0], a[0] + primes[0] - b[0]))

    whole = centred(decrypted["rounded"], message)
    rounding = centred(decrypted["rounded"], decrypted["exact"])
    return float(whole.std()), float(rounding.std())


def test_a_sum_of_100_uploads_at_d4_stays_within_the_coefficient_bound(secret, hundred_uploads):
    """publish.py: each upload's error per coefficient (e + r) is within COEFF_STD, so 100
    of them within COEFF_STD * 10; the rounding alone is uniform on ±8, std 4.6 an upload,
    and independent of the encryption's error (their variances add up).
    At d = 8 (controls) the rounding alone is 74 an upload: both checks fail there."""
    whole, rounding = _error_std_of_sum(secret, hundred_uploads, MAX_UPLOAD_DROP)
    assert whole <= COEFF_STD * math.sqrt(100)
    assert rounding / math.sqrt(100) <= upload_coefficient_std(MAX_UPLOAD_DROP) <= COEFF_STD
    assert rounding / math.sqrt(100) == pytest.approx(math.sqrt(rounding_variance(4)), rel=0.1)
    unrounded, _ = _error_std_of_sum(secret, hundred_uploads, 0)
    assert whole**2 == pytest.approx(unrounded**2 + rounding**2, rel=0.1)  # independent
    whole_8, rounding_8 = _error_std_of_sum(secret, hundred_uploads, 8)
    assert whole_8 > COEFF_STD * math.sqrt(100) and rounding_8 / math.sqrt(100) > COEFF_STD


def test_the_server_sum_and_download_decrypt_to_the_sum(secret, public, hundred_uploads):
    """Ten uploads through the real path (pack_upload, PackedSum, download at d = 12,
    load_download): the values come back, and the download's c0 differs from the exact
    sum by the d = 12 rounding only, within 16 * sqrt(2^16) a coefficient."""
    seal, values, chunks, _ = hundred_uploads
    client, server = PackedFormat(secret), PackedFormat(public)
    total = PackedSum(server, 1)
    for chunk in chunks[:10]:
        total.add(client.pack_upload([chunk]))
    assert total.count == 10
    down = total.download()
    assert len(down) == 1 and len(down[0]) == server.download_chunk_bytes
    loaded = client.load_download(down, 1)
    np.testing.assert_allclose(seal.decode(loaded[0]), np.sum(values[:10], axis=0), atol=1e-11)
    exact_c0, exact_c1 = total.exact()
    sent_c0, sent_c1 = client.parse_download(down)
    np.testing.assert_array_equal(sent_c1, exact_c1)
    sent = client.packer.residues(sent_c0)[0, 0]
    error = _centered(
        np.minimum(sent - exact_c0[0, 0], sent + np.uint64(PRIMES[0]) - exact_c0[0, 0])
    )
    assert np.abs(error).max() <= 2**11
    assert error.std() == pytest.approx(math.sqrt(rounding_variance(12)), rel=0.05)
    assert error.std() <= COEFF_STD * math.sqrt(MAX_SUMMED)


def test_masks_added_in_coefficient_form_come_off_the_sum(secret, public, hundred_uploads):
    """pack_upload(mask=...) then PackedSum.subtract(Σ masks): the exact sum of the unmasked
    uploads, word for word (masks are uniform: without the subtraction it is not)."""
    _, _, chunks, _ = hundred_uploads
    client, server = PackedFormat(secret), PackedFormat(public)
    rng = np.random.default_rng(8)
    masks = [
        np.stack([rng.integers(0, q, N, dtype=np.uint64) for q in PRIMES])[None] for _ in range(3)
    ]
    plain, masked = PackedSum(server, 1), PackedSum(server, 1)
    for chunk, mask in zip(chunks[:3], masks, strict=True):
        upload = client.pack_upload([chunk])
        plain.add(upload)
        masked.add(client.pack_upload([chunk], mask=lambda i, m=mask: m[i]))
    assert not np.array_equal(masked.exact()[0], plain.exact()[0])
    too_big = masks[0].copy()
    too_big[0, 1, 9] = PRIMES[1]
    for bad in (too_big, masks[0][:, :1], masks[0].astype(np.int64)):
        with pytest.raises(ValueError, match="the mask of chunk 0"):
            client.pack_upload([chunks[0]], mask=lambda i, m=bad: m[i])
    for mask in masks:
        masked.subtract(mask)
    # c0 of a masked upload was rounded after the mask went in: the same words only if the
    # rounding of (c0 + mask) equals that of c0 + mask, so compare within the rounding
    difference = masked.exact()[0][0, 0].astype(np.int64) - plain.exact()[0][0, 0].astype(np.int64)
    difference = np.where(difference > PRIMES[0] // 2, difference - PRIMES[0], difference)
    difference = np.where(difference < -PRIMES[0] // 2, difference + PRIMES[0], difference)
    assert np.abs(difference).max() <= 3 * 2 ** (MAX_UPLOAD_DROP - 1) * 2
    np.testing.assert_array_equal(masked.exact()[1], plain.exact()[1])


# ---- what the format refuses ------------------------------------------------------------------


def _upload(secret, values_count=N):
    seal = _Seal(secret)
    values = np.random.default_rng(9).normal(0, 1, values_count)
    return PackedFormat(secret).pack_upload(seal.encrypt(values))


def test_wrong_lengths_counts_and_types_are_refused(secret, public):
    server = PackedFormat(public)
    chunks = _upload(secret)
    assert server.parse_upload(chunks, 2).seeds
    for bad in (
        [chunks[0][:-1], chunks[1]],
        [chunks[0] + b"\0", chunks[1]],
        [chunks[0][:-SEED_BYTES] + bytes(SEED_BYTES - 1), chunks[1]],  # a 63-byte seed
        [chunks[0]],
        [chunks[0], "text"],
    ):
        with pytest.raises(CiphertextError):
            server.parse_upload(bad, 2)
    with pytest.raises(CiphertextError, match="not 64 bytes"):
        server.expand_seeds([bytes(63)])


def _with_word(packer, drop, blob, index, word):
    """A packed polynomial with coefficient ``index`` replaced by ``word`` (any < 2^width)."""
    y = packer.unpack(np.frombuffer(blob, dtype=np.uint8)[None].copy(), drop)
    hi, lo = y[0].copy(), y[1].copy()
    hi[0, index], lo[0, index] = word >> 64, word & ((1 << 64) - 1)
    return packer.pack((hi, lo), drop)[0].tobytes()


def test_words_at_or_past_the_limit_are_refused(secret, public):
    server = PackedFormat(public)
    packer, drop = server.packer, server.d_up
    chunk = _upload(secret, N // 2)[0]
    c0, seed = chunk[: server.upload_c0_bytes], chunk[server.upload_c0_bytes :]
    top = packer.limit(drop) - 1
    assert server.parse_upload([_with_word(packer, drop, c0, 7, top) + seed])
    for word in (top + 1, (1 << packer.coefficient_width(drop)) - 1):
        with pytest.raises(CiphertextError, match="chunk 0 has a word not below"):
            server.parse_upload([_with_word(packer, drop, c0, 7, word) + seed])


def test_download_words_past_q_or_a_prime_are_refused(secret, public):
    client, server = PackedFormat(secret), PackedFormat(public)
    total = PackedSum(server, 1)
    total.add(_upload(secret, N // 2))
    down = total.download()[0]
    c0, c1 = down[: server.download_c0_bytes], down[server.download_c0_bytes :]
    assert client.load_download([down], 1)
    past = _with_word(client.packer, client.d_down, c0, 3, client.packer.limit(client.d_down))
    with pytest.raises(CiphertextError, match="not below ceil"):
        client.parse_download([past + c1])
    residues = client.packer.unpack_residues(np.frombuffer(c1, dtype=np.uint8)[None])
    residues[0, 1, 5] = PRIMES[1]
    bad_c1 = client.packer.pack_residues(residues)[0].tobytes()
    with pytest.raises(CiphertextError, match="its prime"):
        client.parse_download([c0 + bad_c1])
    with pytest.raises(CiphertextError):
        client.load_download([down, down], 1)


def test_fuzz_only_ciphertext_error_escapes(secret, public):
    """Random bytes of random (and the right) lengths, and valid chunks with random bytes
    flipped: parse_upload, PackedSum.add and load_download accept or raise CiphertextError."""
    rng = np.random.default_rng(10)
    client, server = PackedFormat(secret), PackedFormat(public)
    upload = _upload(secret, N // 2)
    total = PackedSum(server, 1)
    total.add(upload)
    download = total.download()
    outcomes = set()
    for trial in range(60):
        kind = trial % 4
        if kind == 0:
            length = int(rng.choice([0, 1, 63, 64, server.upload_chunk_bytes]))
            chunks = [rng.bytes(length)]
        elif kind == 1:
            chunks = [rng.bytes(server.download_chunk_bytes)]
        else:
            source = bytearray((upload if kind == 2 else download)[0])
            for position in rng.integers(0, len(source), 4):
                source[position] = int(rng.integers(0, 256))
            chunks = [bytes(source)]
        for call in (
            lambda c=chunks: server.parse_upload(c, 1),
            lambda c=chunks: PackedSum(server, 1).add(c),
            lambda c=chunks: client.load_download(c, 1),
        ):
            try:
                call()
                outcomes.add("accepted")
            except CiphertextError:
                outcomes.add("refused")
    assert outcomes == {"accepted", "refused"}


def test_a_refused_upload_leaves_the_sum_as_it_was(secret, public):
    server = PackedFormat(public)
    good = _upload(secret, N // 2)
    total = PackedSum(server, 1)
    total.add(good)
    before = total.exact()
    with pytest.raises(CiphertextError):
        total.add([good[0][:-1]])
    assert total.count == 1
    for got, expected in zip(total.exact(), before, strict=True):
        np.testing.assert_array_equal(got, expected)


# ---- the count and drop limits ---------------------------------------------------------------


def test_the_drop_limits_are_where_the_bound_stops_covering_them(secret):
    assert upload_coefficient_std(MAX_UPLOAD_DROP) <= COEFF_STD
    assert upload_coefficient_std(MAX_UPLOAD_DROP + 1) > COEFF_STD
    assert upload_coefficient_std(4) == pytest.approx(8.6, abs=0.05)
    assert math.sqrt(rounding_variance(12)) == pytest.approx(1182.4, abs=0.1)
    with pytest.raises(ValueError, match="flooding covers"):
        PackedFormat(secret, d_up=MAX_UPLOAD_DROP + 1)
    with pytest.raises(ValueError, match="flooding covers"):
        PackedFormat(secret, d_down=MAX_DOWNLOAD_DROP + 1)


def test_max_summed_is_enforced_with_the_download_rounding_counted(secret, public):
    assert summed_limit(0) == MAX_SUMMED
    assert summed_limit(12) == MAX_SUMMED - 5462 == 60074
    assert check_summed(60074, 12) == 60074
    for count in (60075, -1):
        with pytest.raises(TooManySummedError):
            check_summed(count, 12)
    total = PackedSum(PackedFormat(public), 1)
    total.add(_upload(secret, N // 2))
    total.count = summed_limit(12) + 1
    with pytest.raises(TooManySummedError, match="covers at most 60074"):
        total.download()


def test_an_exact_sum_carries_over_and_folding_changes_nothing(secret, public, hundred_uploads):
    """exact() then add_exact() (the running sum of HE + DP) and the early reduction of the
    uploads' words (_fold, reached after 2^44 uploads) give the sum word for word."""
    _, _, chunks, _ = hundred_uploads
    client, server = PackedFormat(secret), PackedFormat(public)
    uploads = [client.pack_upload([chunk]) for chunk in chunks[:4]]
    whole, first, folding = PackedSum(server, 1), PackedSum(server, 1), PackedSum(server, 1)
    folding._max_unreduced = 1
    for upload in uploads:
        whole.add(upload)
        folding.add(upload)
    for upload in uploads[:2]:
        first.add(upload)
    carried = PackedSum(server, 1)
    carried.add_exact(*first.exact(), first.count)
    for upload in uploads[2:]:
        carried.add(upload)
    assert carried.count == folding.count == whole.count == 4
    for other in (carried, folding):
        for got, expected in zip(other.exact(), whole.exact(), strict=True):
            np.testing.assert_array_equal(got, expected)
    assert carried.download() == whole.download()


def test_the_unreduced_words_reduce_once_up_to_the_folding_limit(public):
    """The uploads' words are summed unreduced until ``_max_unreduced`` uploads, then
    restored (times 2^d_up) and reduced once: exact at that limit, with every word at
    its largest (limit(d_up) - 1), against Python's integers."""
    server = PackedFormat(public)
    packer, drop = server.packer, server.d_up
    total = PackedSum(server, 1)
    count_ = total._max_unreduced
    word = count_ * (packer.limit(drop) - 1) - np.arange(N, dtype=object)
    total._y = (
        np.array([[w >> 64 for w in word]], dtype=np.uint64),
        np.array([[w & (2**64 - 1) for w in word]], dtype=np.uint64),
    )
    hi, lo = total._c0()
    expected = [(w << drop) % packer.modulus for w in word]
    assert _as_int(hi, lo) == expected


def test_exact_chunks_are_the_exact_sum_packed_whole(secret, public, hundred_uploads):
    """PackedSum.exact_chunks (the server's sum chunks) is exact() packed by the
    format that drops nothing down; a format that rounds is refused."""
    from lepton_flwr.he.codec import Formats

    _, _, chunks, _ = hundred_uploads
    formats = Formats(public)
    total = PackedSum(formats.wire, 2)
    for index in range(0, 8, 2):
        total.add(PackedFormat(secret).pack_upload(chunks[index : index + 2]))
    assert total.exact_chunks(formats.exact) == formats.sum_chunks(*total.exact())
    with pytest.raises(ValueError, match="d_down = 0"):
        total.exact_chunks(formats.wire)


@pytest.mark.parametrize("c1_kind", ["random", "zeros", "ones", "top"])
def test_mixed_ciphertexts_are_the_transformed_words_exactly(secret, c1_kind):
    """Ring.mixed (c0 to NTT form inside SEAL) holds the words SEAL's transform gives,
    whatever c1 is: equal to NTT(1) (its shifted copy zero), or q_j - 1; c1 = 0 (a
    transparent ciphertext) is refused."""
    ring = PackedFormat(secret).ring
    rng = np.random.default_rng(11)
    primes = np.array(PRIMES, dtype=np.uint64)[:, None]
    c0 = (rng.integers(0, 2**63, (2, N), dtype=np.uint64) % primes).astype(np.uint64)
    c1 = {
        "random": rng.integers(0, 2**63, (2, N), dtype=np.uint64) % primes,
        "zeros": np.zeros((2, N), dtype=np.uint64),
        "ones": np.ones((2, N), dtype=np.uint64),
        "top": np.broadcast_to(primes - np.uint64(1), (2, N)),
    }[c1_kind].astype(np.uint64)
    if c1_kind == "zeros":
        with pytest.raises(ValueError, match="transparent"):
            ring.mixed(c0, c1)
        return
    words = ciphertext_words(ring.mixed(c0, c1))
    np.testing.assert_array_equal(words[0], ring.transform(c0[None], to_ntt=True)[0])
    np.testing.assert_array_equal(words[1], c1)


def test_mixed_refuses_words_past_their_prime(secret):
    ring = PackedFormat(secret).ring
    zeros = np.zeros((2, N), dtype=np.uint64)
    past = zeros.copy()
    past[1, 7] = PRIMES[1]
    with pytest.raises(ValueError, match="c1 has 1 words not below their prime"):
        ring.mixed(zeros, past)
    with pytest.raises((ValueError, RuntimeError)):
        ring.mixed(past, zeros)
