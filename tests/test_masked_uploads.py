"""Masked uploads (issue 20): a ring mask added inside the encoder, removed on the server.

What a key holder sees of a masked upload is read here with the secret key, as an
attacker holding it would: the exact decryption as a SEAL plaintext, its words in NTT
form (as SEAL holds them) and in coefficient form (where a small plaintext shows as small
integers mod each prime: the form that tells masked from unmasked; in NTT form even the
encryption noise alone looks uniform). Masks come from fixed seeds, so each statistic on
coefficient words is fixed up to the encryption noise, a few units out of 2^40. NTT words
carry the NTT of fresh noise, spread over [0, q): their p-values are uniform at random
under the claim, hence the threshold of 1e-6 (a false failure: one in a million checks).
"""

import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as sealapi
from conftest import client_message
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from lepton_flwr.strategies.encrypted_sum import EncryptedSum
from scipy import stats

from lepton_flwr.he.codec import (
    PARALLEL_MIN_CHUNKS,
    CkksAdder,
    CkksEncoder,
    Formats,
    load,
    ring_of,
)
from lepton_flwr.he.keys import create_secret_context, fingerprint, public_context_bytes
from lepton_flwr.he.params import CKKSParams
from lepton_flwr.he.ring_masks import add_mod, ring_mask, sub_mod
from lepton_flwr.he.seal_words import (
    _unframed,
    ciphertext_from_words,
    ciphertext_words,
    plaintext_from_words,
    plaintext_words,
    seal_version,
)
from lepton_flwr.mods.he_mod import encrypt_update

CHUNKS = 4  # 4 x 4096 words per prime and upload: 256 per chi-square bucket
UNIFORM_P = 1e-6  # what a uniform sample passes
CAUGHT_P = 1e-10  # what the unmasked controls must fail by
MASK_OF = {"small": 1, "large": 2}  # each upload its own self-mask seed


@pytest.fixture(scope="module")
def ckks():
    secret = create_secret_context(CKKSParams())
    public = ts.context_from(public_context_bytes(secret))
    primes, degree = ring_of(secret)
    return secret, public, primes, degree


def seed(*label) -> bytes:
    return bytes(str(label).encode()).ljust(32, b".")[:32]


def self_mask(client: int, ring):
    primes, degree = ring
    return lambda chunk: ring_mask(seed("self", client), b"self", 1, chunk, primes, degree)


def secagg_mask(client: int, clients: int, ring):
    """b_u + Σ_{v > u} s_uv − Σ_{v < u} s_vu: cancels in the sum over all clients."""
    primes, degree = ring

    def mask(chunk: int) -> np.ndarray:
        total = self_mask(client, ring)(chunk)
        for other in range(clients):
            if other == client:
                continue
            low, high = min(client, other), max(client, other)
            pair = ring_mask(seed("pair", low, high), b"pair", 1, chunk, primes, degree)
            total = add_mod(total, pair, primes) if client < other else sub_mod(total, pair, primes)
        return total

    return mask


def pair_mask(low: int, high: int, ring):
    primes, degree = ring
    return lambda chunk: ring_mask(seed("pair", low, high), b"pair", 1, chunk, primes, degree)


def summed(masks, primes):
    def mask(chunk: int) -> np.ndarray:
        total = masks[0](chunk)
        for other in masks[1:]:
            total = add_mod(total, other(chunk), primes)
        return total

    return mask


def negated(mask, primes):
    return lambda chunk: sub_mod(np.zeros_like(mask(chunk)), mask(chunk), primes)


def ciphertext_of(context: ts.Context, chunk: bytes) -> sealapi.Ciphertext:
    """One packed chunk (upload, sum or download) as a SEAL ciphertext, checked on load."""
    return load(Formats(context), [chunk])[0]


def saved(obj) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "obj"
        obj.save(str(path))
        return path.read_bytes()


def decrypted_ntt_words(secret: ts.Context, ciphertext: sealapi.Ciphertext) -> np.ndarray:
    """The exact decryption's words, (primes, N), NTT form, as the key holder gets them."""
    seal = secret.seal_context().data
    plain = sealapi.Plaintext()
    sealapi.Decryptor(seal, secret.secret_key().data).decrypt(ciphertext, plain)
    return plaintext_words(plain, ciphertext.poly_modulus_degree())


def coefficient_words(secret: ts.Context, ntt_words: np.ndarray) -> np.ndarray:
    """The same ring element in coefficient form (SEAL's inverse NTT, on a ciphertext)."""
    seal = secret.seal_context().data
    holder = ciphertext_from_words(
        seal, np.stack([ntt_words, ntt_words]), seal.first_parms_id(), 1.0
    )
    sealapi.Evaluator(seal).transform_from_ntt_inplace(holder)
    return ciphertext_words(holder)[0]


def key_holder_view(secret, chunks, multiply_by=None):
    """Per prime, the NTT and coefficient words of the chunks' exact decryptions."""
    ntt, coefficients = [], []
    for chunk in chunks:
        ciphertext = ciphertext_of(secret, chunk)
        if multiply_by is not None:
            sealapi.Evaluator(secret.seal_context().data).multiply_plain_inplace(
                ciphertext, multiply_by
            )
        words = decrypted_ntt_words(secret, ciphertext)
        ntt.append(words)
        coefficients.append(coefficient_words(secret, words))
    return np.concatenate(ntt, axis=1), np.concatenate(coefficients, axis=1)


def uniformity_p(words: np.ndarray, prime: int) -> float:
    """Chi-square p-value of the words against uniform on [0, prime), 64 buckets."""
    buckets = np.bincount((words.astype(np.float64) * 64 / prime).astype(int), minlength=64)
    return float(stats.chisquare(buckets).pvalue)


def same_distribution_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov p-value."""
    return float(stats.ks_2samp(a.astype(np.float64), b.astype(np.float64)).pvalue)


def updates(count: int):
    """Two very different updates: all zeros, and large Gaussian values."""
    rng = np.random.default_rng(20)
    return np.zeros(count), rng.normal(0.0, 1.0, count)


# ---- one upload, a subset, an upload times a one-slot plaintext ----------------------


def test_one_masked_upload_decrypts_to_uniform_words_independent_of_the_update(ckks):
    """The key holder's exact decryption of one masked upload: coefficient words uniform
    mod each prime, the same for a zero and a large update, decoded values uncorrelated
    with the update. The unmasked controls fail each of these checks."""
    secret, _, primes, degree = ckks
    encoder = CkksEncoder(secret, workers=1)
    small, large = updates(CHUNKS * encoder.slots)
    views = {}
    for masked in (True, False):
        for name, update in (("small", small), ("large", large)):
            mask = self_mask(MASK_OF[name], (primes, degree)) if masked else None
            chunks = encoder.encrypt(update, mask=mask)
            views[masked, name] = key_holder_view(secret, chunks)
            decoded = encoder._decrypt_exact(chunks, len(update))
            if name == "large":
                correlation = np.corrcoef(decoded, update)[0, 1]
                if masked:
                    assert abs(correlation) < 5 / np.sqrt(len(update))
                    assert np.median(np.abs(decoded)) > 1e6  # the mask, on Q / scale
                else:
                    assert correlation > 0.999
    for row, prime in enumerate(primes):
        for name in ("small", "large"):
            ntt, coefficients = views[True, name]
            assert uniformity_p(ntt[row], prime) > UNIFORM_P
            assert uniformity_p(coefficients[row], prime) > UNIFORM_P
        masked_p = same_distribution_p(views[True, "small"][1][row], views[True, "large"][1][row])
        assert masked_p > UNIFORM_P
        # Controls: unmasked, the zero update's coefficients are small, near 0 and q_j.
        assert uniformity_p(views[False, "small"][1][row], prime) < CAUGHT_P
        plain_p = same_distribution_p(views[False, "small"][1][row], views[False, "large"][1][row])
        assert plain_p < CAUGHT_P


def test_a_subset_of_masked_uploads_decrypts_to_uniform_words(ckks):
    """Two of three clients' uploads summed: their pairwise mask cancels, the others
    (s_02, s_12 and both self-masks) remain, and the sum is as uniform as one upload."""
    secret, public, primes, degree = ckks
    ring = (primes, degree)
    encoder, adder = CkksEncoder(secret, workers=1), CkksAdder(public)
    small, large = updates(CHUNKS * encoder.slots)
    views = {}
    for name, update in (("small", small), ("large", large)):
        uploads = [encoder.encrypt(update, mask=secagg_mask(u, 3, ring)) for u in (0, 1)]
        subset, failed = adder.sum_updates(uploads, workers=1)
        assert not failed
        views[name] = key_holder_view(secret, subset)
        decoded = encoder._decrypt_exact(subset, len(update))
        if name == "large":
            assert abs(np.corrcoef(decoded, 2 * update)[0, 1]) < 5 / np.sqrt(len(update))
    for row, prime in enumerate(primes):
        for name in ("small", "large"):
            assert uniformity_p(views[name][0][row], prime) > UNIFORM_P
            assert uniformity_p(views[name][1][row], prime) > UNIFORM_P
        assert same_distribution_p(views["small"][1][row], views["large"][1][row]) > UNIFORM_P
    # Control: the two pairwise masks alone (self-masks and s_02, s_12 left out) cancel.
    pairs_only = [pair_mask(0, 1, ring), negated(pair_mask(0, 1, ring), primes)]
    uploads = [encoder.encrypt(small, mask=pairs_only[u]) for u in (0, 1)]
    subset, _ = adder.sum_updates(uploads, workers=1)
    _, coefficients = key_holder_view(secret, subset)
    assert uniformity_p(coefficients[0], primes[0]) < CAUGHT_P


def one_slot_plaintext(secret: ts.Context, slot: int) -> sealapi.Plaintext:
    """A plaintext whose slots are all 0 but one (scale 2^20: the product's 2^78 < Q)."""
    seal = secret.seal_context().data
    values = np.zeros(seal.first_context_data().parms().poly_modulus_degree() // 2)
    values[slot] = 1.0
    plain = sealapi.Plaintext()
    sealapi.CKKSEncoder(seal).encode(values.tolist(), 2.0**20, plain)
    return plain


def test_a_masked_upload_times_a_one_slot_plaintext_stays_uniform(ckks):
    """The decryption-oracle move: multiply an upload by a plaintext that keeps one slot.
    Where that plaintext's NTT words are non-zero (multiplication by them is a bijection
    mod q_j), the product's words are uniform, and they are the same for a zero and a
    large update. Unmasked, the zero update's product has small coefficients."""
    secret, _, primes, degree = ckks
    encoder = CkksEncoder(secret, workers=1)
    selector = one_slot_plaintext(secret, slot=7)
    selector_words = np.tile(plaintext_words(selector, degree), CHUNKS)
    nonzero = selector_words != 0
    assert nonzero.all()  # then the product is uniform in coefficient form too
    small, large = updates(CHUNKS * encoder.slots)
    views = {}
    for masked in (True, False):
        for name, update in (("small", small), ("large", large)):
            mask = self_mask(7 + MASK_OF[name], (primes, degree)) if masked else None
            chunks = encoder.encrypt(update, mask=mask)
            views[masked, name] = key_holder_view(secret, chunks, multiply_by=selector)
    for row, prime in enumerate(primes):
        for name in ("small", "large"):
            ntt, coefficients = views[True, name]
            assert uniformity_p(ntt[row][nonzero[row]], prime) > UNIFORM_P
            assert uniformity_p(coefficients[row], prime) > UNIFORM_P
        masked_p = same_distribution_p(views[True, "small"][1][row], views[True, "large"][1][row])
        assert masked_p > UNIFORM_P
        plain_p = same_distribution_p(views[False, "small"][1][row], views[False, "large"][1][row])
        assert plain_p < CAUGHT_P


# ---- masks come off ---------------------------------------------------------------------


def test_masks_cancel_or_come_off_and_the_sum_is_the_unmasked_sum(ckks):
    """Three clients with pairwise and self-masks. All survive: the server removes the
    self-masks. Client 2 drops after masking: the server removes the survivors'
    self-masks and client 2's pairwise masks with them (+s_02 in upload 0, +s_12 in
    upload 1). Either way the result decrypts to the unmasked uploads' sum."""
    secret, public, primes, degree = ckks
    ring = (primes, degree)
    encoder, adder = CkksEncoder(secret, workers=1), CkksAdder(public)
    rng = np.random.default_rng(3)
    values = [rng.normal(0.0, 0.1, 5000) for _ in range(3)]
    masked = [encoder.encrypt(v, mask=secagg_mask(u, 3, ring)) for u, v in enumerate(values)]
    plain = [encoder.encrypt(v) for v in values]
    cases = {
        "all survive": ([0, 1, 2], summed([self_mask(u, ring) for u in (0, 1, 2)], primes)),
        "2 dropped": (
            [0, 1],
            summed(
                [
                    self_mask(0, ring),
                    self_mask(1, ring),
                    pair_mask(0, 2, ring),
                    pair_mask(1, 2, ring),
                ],
                primes,
            ),
        ),
    }
    for case, (survivors, to_remove) in cases.items():
        masked_sum, failed = adder.sum_updates([masked[u] for u in survivors], workers=1)
        assert not failed
        still_masked = encoder._decrypt_exact(masked_sum, 5000)
        truth = sum(values[u] for u in survivors)
        assert np.abs(still_masked - truth).max() > 1e3, case
        unmasked = encoder._decrypt_exact(adder.remove_mask(masked_sum, to_remove), 5000)
        plain_sum, _ = adder.sum_updates([plain[u] for u in survivors], workers=1)
        reference = encoder._decrypt_exact(plain_sum, 5000)
        error, reference_error = np.abs(unmasked - truth).max(), np.abs(reference - truth).max()
        print(f"{case}: max error masked {error:.3g}, unmasked {reference_error:.3g}")
        assert error < 1e-12 and np.abs(unmasked - reference).max() < 1e-12, case


def test_removing_a_mask_is_exact_word_for_word(ckks):
    """(pt + m) − m == pt for plaintexts, and (c0 + m, c1) − m == (c0, c1) through
    ``remove_mask``: nothing is lost or rounded."""
    secret, public, primes, degree = ckks
    seal = secret.seal_context().data
    mask = self_mask(0, (primes, degree))(0)
    plain = sealapi.Plaintext()
    sealapi.CKKSEncoder(seal).encode(
        np.linspace(-1, 1, degree // 2).tolist(), secret.global_scale, plain
    )
    words = plaintext_words(plain, degree)
    masked = plaintext_from_words(seal, add_mod(words, mask, primes), plain.parms_id(), plain.scale)
    assert not np.array_equal(plaintext_words(masked, degree), words)
    np.testing.assert_array_equal(sub_mod(plaintext_words(masked, degree), mask, primes), words)

    adder = CkksAdder(public)
    chunk = adder.encrypt_public(np.linspace(-1, 1, 100))  # a sum: c0 exact, c1 whole
    c0, c1 = adder.formats.sum_parts(chunk)
    shifted = adder.formats.sum_chunks(add_mod(c0[0], mask, primes)[None], c1)
    assert shifted != chunk
    restored = adder.remove_mask(shifted, lambda _: mask)
    assert restored == chunk


def test_the_worker_pool_masks_as_the_calling_process_does(ckks):
    """Above PARALLEL_MIN_CHUNKS chunks, workers encrypt; the masks are the caller's."""
    secret, public, primes, degree = ckks
    encoder = CkksEncoder(secret, workers=2)
    values = np.random.default_rng(5).normal(0.0, 0.1, PARALLEL_MIN_CHUNKS * encoder.slots)
    mask = self_mask(5, (primes, degree))
    chunks = encoder.encrypt(values, mask=mask)
    assert len(chunks) == PARALLEL_MIN_CHUNKS
    assert np.abs(encoder._decrypt_exact(chunks, len(values)) - values).max() > 1e3
    adder = CkksAdder(public)
    unmasked = adder.remove_mask(adder.sum_updates([chunks], workers=1)[0], mask)
    assert np.abs(encoder._decrypt_exact(unmasked, len(values)) - values).max() < 1e-12


# ---- the upload on the wire ---------------------------------------------------------------


def test_a_masked_upload_stays_seeded_and_passes_the_servers_checks(ckks):
    secret, public, primes, degree = ckks
    encoder = CkksEncoder(secret, workers=1)
    values = np.random.default_rng(1).normal(0.0, 0.1, (3 * encoder.slots,)).astype(np.float32)
    mask = self_mask(1, (primes, degree))
    plain_chunks = encoder.encrypt(values)
    masked_chunks = encoder.encrypt(values, mask=mask)
    assert [len(c) for c in masked_chunks] == [len(c) for c in plain_chunks]
    assert len(masked_chunks[0]) == encoder.formats.wire.upload_chunk_bytes  # c0 and a seed
    CkksAdder(public).check(masked_chunks)

    record = ArrayRecord({"w": Array(values)})
    own = fingerprint(public)
    upload = encrypt_update(record, 1.0, encoder, own, bound=10.0, mask=mask)
    incoming = client_message(ArrayRecord())
    reply = Message(
        RecordDict({"arrays": upload, "metrics": MetricRecord({"num-examples": 10})}),
        reply_to=incoming,
    )
    accepted, total = EncryptedSum(public, workers=1, name="Masked").add(1, [reply])
    assert accepted == [reply] and total is not None
    unmasked = CkksAdder(public).remove_mask(total.chunks, mask)
    np.testing.assert_allclose(encoder._decrypt_exact(unmasked, len(values)), values, atol=1e-9)


# ---- hostile masks ---------------------------------------------------------------------------


def bad_masks(primes, degree):
    good = ring_mask(seed("bad"), b"self", 1, 0, primes, degree)
    over = good.copy()
    over[1, 17] = primes[1]
    return {
        "a list, not a numpy array": good.tolist(),
        "dtype int64, not uint64": good.astype(np.int64),
        "dtype float64, not uint64": good.astype(np.float64),
        f"shape ({len(primes)}, {degree - 1})": good[:, :-1],
        f"shape ({len(primes) + 1}, {degree})": np.vstack([good, good[:1]]),
        f"row 1, word 17, value {primes[1]} >= {primes[1]}": over,
    }


@pytest.mark.parametrize("where", ["encoder", "encoder with workers", "server"])
def test_a_bad_mask_is_refused_naming_the_chunk_and_the_fault(ckks, where):
    secret, public, primes, degree = ckks
    good = ring_mask(seed("bad"), b"self", 1, 0, primes, degree)
    encoder = CkksEncoder(secret, workers=2 if where == "encoder with workers" else 1)
    chunks = PARALLEL_MIN_CHUNKS if where == "encoder with workers" else 3
    values = np.zeros(chunks * encoder.slots)
    sums, _ = CkksAdder(public).sum_updates([encoder.encrypt(values[: 3 * encoder.slots])], 1)
    for fault, bad in bad_masks(primes, degree).items():

        def mask(chunk, bad=bad):
            return bad if chunk == 2 else good

        with pytest.raises(ValueError, match="chunk 2") as raised:
            if where == "server":
                CkksAdder(public).remove_mask(sums, mask)
            else:
                encoder.encrypt(values, mask=mask)
        assert fault.split(",")[0] in str(raised.value), (fault, str(raised.value))


def test_words_are_built_under_the_librarys_own_serialization_version():
    header = sealapi.Serialization.SEALHeader()
    assert seal_version() == (header.version_major, header.version_minor)
    assert saved(sealapi.Plaintext())[3:5] == bytes(seal_version())


def test_a_plaintexts_words_read_in_bulk_are_its_words_one_by_one():
    """plaintext_words reads SEAL's own (zstd) save: the same words as the slow read."""
    context = ts.context(ts.SCHEME_TYPE.CKKS, 4096, coeff_mod_bit_sizes=[40, 20, 40])
    encoder = sealapi.CKKSEncoder(context.seal_context().data)
    for values in (np.zeros(2048), np.random.default_rng(0).normal(size=2048)):
        plain = sealapi.Plaintext()
        encoder.encode(list(values), 2.0**20, plain)
        count = plain.coeff_count()
        one_by_one = np.fromiter(map(plain.__getitem__, range(count)), np.uint64, count)
        assert np.array_equal(plaintext_words(plain, 4096), one_by_one.reshape(-1, 4096))
    with pytest.raises(ValueError, match="not a SEAL serialization"):
        _unframed(bytes(32))


# ---- cost (printed, run with -s) -------------------------------------------------------------


def test_masking_cost_per_chunk(ckks):
    """Per chunk, encode + read + add + load + encrypt (seeded), masked vs unmasked, with
    the masks expanded beforehand (their AES expansion is printed apart). Median of 5.

    ``FLWR_TELEMETRY_ENABLED=0 OMP_NUM_THREADS=1 .venv/bin/pytest -q -s
    tests/test_masked_uploads.py -k cost``
    """
    secret, public, primes, degree = ckks
    encoder = CkksEncoder(secret, workers=1)
    chunks = 8
    values = np.random.default_rng(2).normal(0.0, 0.1, chunks * encoder.slots)
    started = time.perf_counter()
    masks = [ring_mask(seed("cost"), b"self", 1, c, primes, degree) for c in range(chunks)]
    expansion = (time.perf_counter() - started) / chunks
    timings = {"unmasked": [], "masked": []}
    for _ in range(5):
        for name, mask in (("unmasked", None), ("masked", masks.__getitem__)):
            started = time.perf_counter()
            out = encoder.encrypt(values, mask=mask)
            timings[name].append((time.perf_counter() - started) / chunks)
    plain, masked = (1e3 * np.median(timings[k]) for k in ("unmasked", "masked"))
    print(
        f"\nper chunk (N={degree}, {len(primes)} primes): unmasked {plain:.2f} ms, "
        f"masked {masked:.2f} ms (+{masked - plain:.2f} ms); mask expansion "
        f"{1e3 * expansion:.2f} ms"
    )
    adder = CkksAdder(public)
    unmasked = adder.remove_mask(adder.sum_updates([out], workers=1)[0], masks.__getitem__)
    assert np.abs(encoder._decrypt_exact(unmasked, len(values)) - values).max() < 1e-12
