"""The codec on the packed format (issue 22, goal 4 steps 2-3): uploads of c0 (4 low bits
dropped) and a seed, exact sums kept by the server, downloads of c0 (12 low bits dropped)
and c1, the count of summed uploads carried and enforced."""

import math

import numpy as np
import pytest
from conftest import client_message
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from lepton_flwr.strategies.encrypted_sum import EncryptedSum

from lepton_flwr.he.codec import CiphertextError, CkksEncoder, TensorSpec
from lepton_flwr.he.keys import fingerprint
from lepton_flwr.he.publish import TooManySummedError, summed_limit
from lepton_flwr.he.records import MAX_SUMMED_FIELD, EncryptedModel

N, FLOAT32 = 4096, 4


def test_bytes_per_value_meet_issue_22s_goals(ckks):
    """Up <= 2.5x float32 (2.38x), down <= 5x (4.63x); the exact sum kept is 5.0x."""
    _, _, encoder, adder = ckks
    (upload,) = encoder.encrypt(np.ones(N))
    sums, _ = adder.sum_updates([[upload]], workers=1)
    (download,) = adder.download(sums, 1)
    assert len(upload) / N / FLOAT32 < 2.39
    assert len(download) / N / FLOAT32 < 4.63
    assert len(sums[0]) == 2 * N * 80 // 8  # c0 whole, c1 whole: 80 bits a word each


def _reply(chunks: list[bytes], own: str, summed: int = 1) -> Message:
    model = EncryptedModel([TensorSpec("w", (10,), "float64")], chunks, 1.0, own, 1.0, summed)
    return Message(
        RecordDict({"arrays": model.to_record(), "metrics": MetricRecord({"num-examples": 1})}),
        reply_to=client_message(ArrayRecord()),
    )


def test_the_server_keeps_the_exact_sum_counts_uploads_and_sends_a_rounded_copy(ckks):
    """A client's header cannot change the count; the global model (extra) adds its own;
    what clients get decrypts as the exact sum does, up to the download's rounding."""
    secret, public, encoder, adder = ckks
    summer, own = EncryptedSum(public, workers=1, name="Packed"), fingerprint(public)
    values = np.linspace(-1, 1, 10)
    replies = [_reply(encoder.encrypt(values), own, summed=1000) for _ in range(3)]
    model = summer.encrypted(ArrayRecord({"w": _array(values)}))
    assert (
        model.summed == 1
        and len(model.chunks[0]) == summer.adder.formats.exact.download_chunk_bytes
    )
    accepted, total = summer.add(1, replies, extra=model)
    assert len(accepted) == 3 and total.summed == 4
    assert len(total.chunks[0]) == adder.formats.exact.download_chunk_bytes  # exact, kept
    sent = EncryptedModel.from_record(summer.for_clients(total.to_record()))
    assert len(sent.chunks[0]) == adder.formats.wire.download_chunk_bytes
    assert sent.summed == 4 and sent.max_abs == total.max_abs
    exact = encoder._decrypt_exact(total.chunks, 10)
    rounded = encoder._decrypt_exact(sent.chunks, 10)
    assert np.abs(exact - 4 * values).max() < 1e-12
    assert 0 < np.abs(rounded - exact).max() < 1e-11  # 12 bits of c0: 2^11 / Δ per coefficient
    plain = ArrayRecord({"w": _array(values)})
    assert summer.for_clients(plain) is plain  # a plaintext model goes as it is


def _array(values):
    from flwr.app import Array

    return Array(np.asarray(values, dtype=np.float64))


def test_a_download_past_what_the_flooding_covers_is_refused(ckks):
    _, _, encoder, adder = ckks
    sums, _ = adder.sum_updates([encoder.encrypt(np.ones(10))], workers=1)
    adder.download(sums, summed_limit(12))
    with pytest.raises(TooManySummedError):
        adder.download(sums, summed_limit(12) + 1)


@pytest.mark.parametrize("summed", [0, -1, True, 1.0, "1", None, MAX_SUMMED_FIELD + 1])
def test_a_header_count_of_another_type_or_range_is_refused(ckks, summed):
    _, _, encoder, _ = ckks
    model = EncryptedModel([TensorSpec("w", (10,), "float64")], [b""], 1.0, "f", 1.0)
    with pytest.raises(CiphertextError, match="summed"):
        EncryptedModel.from_header(model.header() | {"summed": summed}, [b""])


def test_an_upload_with_a_seed_of_another_length_is_refused(ckks):
    _, _, encoder, adder = ckks
    (upload,) = encoder.encrypt(np.ones(10))
    for chunk in (upload[:-1], upload + b"\0"):
        with pytest.raises(CiphertextError, match="bytes, not"):
            adder.check([chunk])
        sums, failed = adder.sum_updates([[upload], [chunk]], workers=1)
        assert list(failed) == [1]
        assert math.isclose(encoder._decrypt_exact(sums, 1)[0], 1.0, abs_tol=1e-9)


def test_the_server_never_takes_a_sum_from_a_client(ckks):
    """A sum's c1 is whole (not a seed's expansion): from a client it would let a product
    with a plaintext through; only the server's own sums are added as sums."""
    _, _, encoder, adder = ckks
    own_sum = adder.encrypt_public(np.ones(10))
    sums, failed = adder.sum_updates([encoder.encrypt(np.ones(10)), own_sum], workers=1)
    assert list(failed) == [1] and "bytes, not" in failed[1]
    with pytest.raises(CiphertextError, match="server's own"):
        adder.sum_updates([], workers=1, sums=[encoder.encrypt(np.ones(10))])


def test_a_client_refuses_a_model_whose_header_sums_more_than_the_flooding_covers(ckks):
    """The header's count is the server's: a faulty one is caught before decrypting."""
    from lepton_flwr.he.keyholder import decrypt_model

    secret, _, encoder, adder = ckks
    own = fingerprint(secret)
    sums, _ = adder.sum_updates([encoder.encrypt(np.full(10, 0.5))], workers=1)
    download = adder.download(sums, 1)
    counted = []
    for summed, chunks in ((summed_limit(12), download), (summed_limit(0), sums)):
        model = EncryptedModel([TensorSpec("w", (10,), "float64")], chunks, 1.0, own, 1.0, summed)
        decrypt_model(model.to_record(), encoder, own, count=lambda: counted.append(1))
        over = EncryptedModel(
            [TensorSpec("w", (10,), "float64")], chunks, 1.0, own, 1.0, summed + 1
        )
        with pytest.raises(CiphertextError, match="flooding"):
            decrypt_model(over.to_record(), encoder, own, count=lambda: counted.append(1))
    assert counted == [1, 1]  # the refused ones were never counted as decryptions


def test_a_client_decrypts_the_same_download_once_and_another_afresh(ckks, monkeypatch):
    """The encoder keeps the last download's exact decryption (every client of a
    simulation process decrypts the same model; SEAL's decryption is deterministic): the
    same bytes give the values a fresh encoder gives, loaded once; other bytes are
    decrypted anew; a refused download keeps nothing; each release is flooded afresh."""
    from lepton_flwr.he import codec

    secret, _, _, adder = ckks
    encoder, fresh = CkksEncoder(secret, workers=1), CkksEncoder(secret, workers=1)
    first = adder.download(adder.sum_updates([encoder.encrypt(np.full(N, 0.25))], 1)[0], 1)
    second = adder.download(adder.sum_updates([encoder.encrypt(np.full(N, -0.5))], 1)[0], 1)
    loads, real_load = [], codec.load
    monkeypatch.setattr(codec, "load", lambda f, c: loads.append(1) or real_load(f, c))
    for chunks, value in ((first, 0.25), (first, 0.25), (second, -0.5), (first, 0.25)):
        decrypted = encoder._decrypt_exact(list(chunks), N)
        np.testing.assert_array_equal(decrypted, fresh._decrypt_exact(list(chunks), N))
        np.testing.assert_allclose(decrypted, value, atol=1e-3)
    assert len(loads) == 3 + 3  # each encoder: first, second, first again
    decrypted[:] = 7.0  # a caller's copy: the kept values are not changed through it
    np.testing.assert_allclose(
        encoder._decrypt_exact([bytearray(c) for c in first], N), 0.25, atol=1e-3
    )
    assert len(loads) == 6  # bytearrays of the same bytes: the same chunks
    damaged = [first[0][:-8] + b"\xff" * 8]  # the last c1 word all ones: past its prime
    for _ in range(2):  # the same damaged bytes again: checked again
        with pytest.raises(CiphertextError):
            encoder._decrypt_exact(damaged, N)
    np.testing.assert_allclose(encoder._decrypt_exact(list(first), N), 0.25, atol=1e-3)
    assert len(loads) == 8  # the damaged bytes twice; first still kept
    a, b = encoder.decrypt(list(first), N), encoder.decrypt(list(first), N)
    assert not np.array_equal(a, b)  # flooded afresh each time


def test_the_download_copy_of_one_model_is_made_once(ckks, monkeypatch):
    """Training and evaluation of one round send the same model: its rounded copy is
    made once; another sum (or the same chunks with another count) gets its own."""
    _, public, encoder, _ = ckks
    summer = EncryptedSum(public, workers=1, name="Packed")
    made = []
    download = summer.adder.download
    monkeypatch.setattr(summer.adder, "download", lambda c, n: made.append(n) or download(c, n))
    one = summer.encrypted(ArrayRecord({"w": _array(np.linspace(-1, 1, 10))}))
    other = summer.encrypted(ArrayRecord({"w": _array(np.linspace(0, 1, 10))}))
    first, again = summer.for_clients(one.to_record()), summer.for_clients(one.to_record())
    assert made == [1] and EncryptedModel.from_record(first) == EncryptedModel.from_record(again)
    summer.for_clients(other.to_record())
    from dataclasses import replace

    summer.for_clients(replace(one, summed=2).to_record())
    assert made == [1, 1, 2]
    sent = EncryptedModel.from_record(summer.for_clients(other.to_record()))
    np.testing.assert_allclose(
        encoder._decrypt_exact(sent.chunks, 10), np.linspace(0, 1, 10), atol=1e-3
    )


def test_a_model_whose_c1_is_zero_is_refused_before_decrypting(ckks):
    """c1 = 0 makes a 'ciphertext' that is its c0 alone, under no key: no upload nor sum
    has it; the key holder refuses it (before: decrypted as the server's plaintext)."""
    _, _, encoder, adder = ckks
    c0, c1 = adder.formats.sum_parts(adder.encrypt_public(np.ones(N)))
    forged = adder.formats.sum_chunks(c0, np.zeros_like(c1))
    with pytest.raises(CiphertextError, match="transparent"):
        encoder.decrypt(forged, N)
