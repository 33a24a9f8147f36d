"""Review V: attacks on the key holder's cache of the last download's exact decryption
(``CkksEncoder._decrypt_exact``, keyed by the chunks' bytes since a5634a6) and on
``EncryptedSum.for_clients``'s last download copy, from a hostile server, a concurrent
writer or a careless caller.

One confirmed finding, fixed since (V1): the key was a snapshot of the chunks taken
before they were loaded, but the chunks themselves were loaded; a bytearray rewritten in
between was decrypted, and its values kept under the snapshot's bytes, then served for
those bytes (now the snapshot is what is loaded). The other tests are regression tests
for what held: the cache serves the same released values (flooded afresh, of the asked
length, distributed as a fresh encoder's), makes the same checks (chunk count, buffer
types), never aliases a caller's bytearray or array, and leaves the counting and the
bound check alone.
"""

from dataclasses import replace

import numpy as np
import pytest
import tenseal as ts
from lepton_flwr.strategies.encrypted_sum import EncryptedSum

from lepton_flwr.he import CKKSParams, codec, create_secret_context, public_context_bytes
from lepton_flwr.he.codec import CiphertextError, CkksAdder, CkksEncoder, TensorSpec
from lepton_flwr.he.keyholder import ModelOutOfBoundError, decrypt_model
from lepton_flwr.he.keys import fingerprint
from lepton_flwr.he.publish import TooManySummedError, summed_limit
from lepton_flwr.he.records import EncryptedModel

N = 4096


@pytest.fixture(scope="module")
def ckks():
    secret = create_secret_context(CKKSParams())
    public = ts.context_from(public_context_bytes(secret))
    adder = CkksAdder(public)
    first = adder.download(adder.encrypt_public(np.full(2 * N, 0.25)), 1)
    second = adder.download(adder.encrypt_public(np.full(2 * N, -0.5)), 1)
    return secret, first, second


def test_v1_a_bytearray_rewritten_while_it_is_loaded_is_not_kept_under_its_old_bytes(
    ckks, monkeypatch
):
    """Finding V1 (low: needs a writer to the caller's own bytearray, e.g. another thread
    of a key holder that reuses a receive buffer; a server cannot do it): the key is
    ``same_chunks(chunks)``, a copy of the bytes, but ``load`` reads ``chunks``. A write
    between the two (simulated at the worst moment: as ``load`` starts) gets the new
    bytes decrypted and kept as the values of the old bytes: every later decryption of
    the old bytes, by any client sharing the encoder (``keyholder.encoder_for``), gets
    the other model's values. Fix: load the snapshot, ``load(self.formats, key if key
    is not None else chunks)``, so the kept values are those of the kept bytes."""
    secret, first, second = ckks
    encoder = CkksEncoder(secret, workers=1)
    expected = CkksEncoder(secret, workers=1)._decrypt_exact(list(first), 2 * N)
    buffers = [bytearray(chunk) for chunk in first]
    real_load = codec.load

    def rewritten_as_loaded(formats, chunks):
        for buffer, chunk in zip(buffers, second, strict=True):
            buffer[:] = chunk
        return real_load(formats, chunks)

    monkeypatch.setattr(codec, "load", rewritten_as_loaded)
    encoder._decrypt_exact(buffers, 2 * N)  # either model is a fair answer to this call
    monkeypatch.setattr(codec, "load", real_load)
    np.testing.assert_array_equal(encoder._decrypt_exact(list(first), 2 * N), expected)


def test_a_bytearray_rewritten_after_the_call_is_decrypted_as_its_new_bytes(ckks):
    """Held: the key copies a bytearray, so rewriting the caller's buffer after the call
    (a reused receive buffer) is a new download: decrypted afresh, and the old bytes still
    get their own values. Would fail if the key kept the bytearray itself (it would equal
    itself, rewritten, and serve the old model)."""
    secret, first, second = ckks
    encoder, fresh = CkksEncoder(secret, workers=1), CkksEncoder(secret, workers=1)
    buffers = [bytearray(chunk) for chunk in first]
    np.testing.assert_allclose(encoder._decrypt_exact(buffers, 2 * N), 0.25, atol=1e-3)
    for buffer, chunk in zip(buffers, second, strict=True):
        buffer[:] = chunk
    np.testing.assert_array_equal(
        encoder._decrypt_exact(buffers, 2 * N), fresh._decrypt_exact(list(second), 2 * N)
    )
    np.testing.assert_allclose(encoder._decrypt_exact(list(first), 2 * N), 0.25, atol=1e-3)


def test_the_kept_chunks_with_another_length_are_counted_and_cut_as_fresh_ones(ckks):
    """Held: the kept values are all of the chunks' 2N values, but a later call with the
    same chunks and another ``length`` is checked for its chunk count first and gets
    exactly ``length`` values, as a fresh encoder gives them; :meth:`decrypt` releases
    that many (a last chunk's unused values never leave). Would fail if the lookup
    came before the count check, or served the kept array uncut."""
    secret, first, _ = ckks
    encoder, fresh = CkksEncoder(secret, workers=1), CkksEncoder(secret, workers=1)
    encoder._decrypt_exact(list(first), 2 * N)  # kept whole
    for wrong in (N, 2 * N + 1, 0):
        with pytest.raises(CiphertextError, match="expected"):
            encoder._decrypt_exact(list(first), wrong)
    for length in (N + 1, 2 * N - 1, 2 * N):
        got = encoder._decrypt_exact(list(first), length)
        assert got.shape == (length,)
        np.testing.assert_array_equal(got, fresh._decrypt_exact(list(first), length))
        assert encoder.decrypt(list(first), length).shape == (length,)


def test_a_release_from_the_kept_values_is_distributed_as_a_fresh_encoders(ckks):
    """Held: :meth:`decrypt` of the kept values is flooded afresh each time, with the
    noise a fresh encoder adds for the same length: two releases differ, neither is
    the exact decryption, and the spread around it matches a fresh encoder's within
    10 % (4,097 values each: the sample std's own error is about 1 %). Would fail if
    the cache served an unflooded copy, one flooded once, or flooded for another size."""
    secret, first, _ = ckks
    encoder, fresh = CkksEncoder(secret, workers=1), CkksEncoder(secret, workers=1)
    length = N + 1
    exact = fresh._decrypt_exact(list(first), length)
    encoder._decrypt_exact(list(first), 2 * N)  # kept, at another length
    cached = [encoder.decrypt(list(first), length) for _ in range(2)]
    afresh = CkksEncoder(secret, workers=1).decrypt(list(first), length)
    assert not np.array_equal(cached[0], cached[1])
    assert not np.array_equal(cached[0], exact)
    spreads = [float(np.std(release - exact)) for release in (*cached, afresh)]
    assert spreads[0] > 0
    for spread in spreads[:2]:
        assert 0.9 < spread / spreads[2] < 1.1


@pytest.mark.parametrize("view", [memoryview, lambda chunk: np.frombuffer(chunk, np.uint8)])
def test_a_view_of_the_kept_bytes_is_refused_as_a_fresh_encoder_refuses_it(ckks, view):
    """Held: a chunk that is a view (memoryview, numpy array) of the very bytes kept is
    not looked up (``same_chunks`` gives None) and is refused when loaded, as by a fresh
    encoder. Would fail if ``same_chunks`` turned any buffer into bytes: the cache would
    serve what a fresh decryption refuses."""
    secret, first, _ = ckks
    encoder = CkksEncoder(secret, workers=1)
    encoder._decrypt_exact(list(first), 2 * N)
    for chunks in ([first[0], view(first[1])], [view(first[0]), first[1]]):
        with pytest.raises(CiphertextError):
            CkksEncoder(secret, workers=1)._decrypt_exact(chunks, 2 * N)
        with pytest.raises(CiphertextError):
            encoder._decrypt_exact(chunks, 2 * N)


def test_the_kept_values_are_counted_and_bound_checked_on_every_use(ckks):
    """Held: ``decrypt_model`` counts every decryption of the same model (the second one
    served from the kept values) and a model past its bound is refused each time, after
    being counted; another key's model is refused before either. Would fail if the kept
    values bypassed the count or the bound check."""
    secret, first, _ = ckks
    encoder, own = CkksEncoder(secret, workers=1), fingerprint(secret)
    manifest = [TensorSpec("w", (2 * N,), "float32")]
    honest = EncryptedModel(manifest, list(first), 1.0, own, 0.25).to_record()
    past = EncryptedModel(manifest, list(first), 1.0, own, 0.1).to_record()
    other = EncryptedModel(manifest, list(first), 1.0, "another-key", 0.25).to_record()
    counted = []
    for _ in range(2):
        plain = decrypt_model(honest, encoder, own, count=lambda: counted.append(1))
        np.testing.assert_allclose(plain["w"].numpy(), 0.25, atol=1e-2)
    for _ in range(2):
        with pytest.raises(ModelOutOfBoundError):
            decrypt_model(past, encoder, own, count=lambda: counted.append(1))
    with pytest.raises(CiphertextError, match="another-key"):
        decrypt_model(other, encoder, own, count=lambda: counted.append(1))
    assert len(counted) == 4


def test_the_kept_download_copy_goes_with_each_models_own_header_and_count(ckks):
    """Held: ``for_clients`` keys its copy by (summed, chunks): the same chunks under
    another header go with that header (the copy depends on the chunks alone), and the
    same chunks with a count past what the flooding covers are refused even though a copy
    of them is kept. Would fail if the key left out ``summed`` or the header came from
    the kept model."""
    secret, _, _ = ckks
    public = ts.context_from(public_context_bytes(secret))
    summer = EncryptedSum(public, workers=1)
    sums = summer.adder.encrypt_public(np.full(2 * N, 0.25))
    manifest = [TensorSpec("w", (2 * N,), "float32")]
    model = EncryptedModel(manifest, sums, 1.0, summer.fingerprint, 0.25, summed=1)
    sent = EncryptedModel.from_record(summer.for_clients(model.to_record()))
    other = replace(model, weight=4.0, max_abs=1.0, summed=3)
    again = EncryptedModel.from_record(summer.for_clients(other.to_record()))
    assert again == replace(other, chunks=sent.chunks)
    with pytest.raises(TooManySummedError):
        summer.for_clients(replace(model, summed=summed_limit(12) + 1).to_record())
