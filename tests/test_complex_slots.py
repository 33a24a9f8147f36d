"""Complex slots (issue 22, goal 4 step 1): N values per ciphertext, two to each CKKS slot.

A chunk of N values is encoded as ``piece[:N/2] + 1j * piece[N/2:]``: twice the values per
ciphertext, the same flooding per released value, a headroom sqrt(2) lower, and encrypted
models of the real-slot format (version 1) refused rather than misread.
"""

import hashlib
import json
import math
import zipfile

import numpy as np
import pytest
import tenseal.sealapi as sealapi
from conftest import client_message
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from lepton_flwr.strategies.checkpoint import KEY_ENV, MAC_MEMBER, STATE_MEMBER, _mac
from lepton_flwr.strategies.encrypted_sum import EncryptedSum

from lepton_flwr.he import CKKSParams
from lepton_flwr.he.codec import (
    CiphertextError,
    TensorSpec,
    complex_slots,
    load,
    ring_of,
)
from lepton_flwr.he.keyholder import ModelOutOfBoundError, check_bound
from lepton_flwr.he.keys import fingerprint
from lepton_flwr.he.params import headroom
from lepton_flwr.he.publish import flooding_std, precision
from lepton_flwr.he.records import (
    FORMAT_VERSION,
    EncryptedModel,
    load_encrypted,
    save_encrypted,
)

N = 4096


# ---- layout and chunk counts -----------------------------------------------------------


@pytest.mark.parametrize(
    "length", [1, N // 2 - 1, N // 2, N // 2 + 1, N - 1, N, N + 1, 2 * N + 2051]
)
def test_odd_lengths_round_trip_in_ceil_n_over_n_chunks(ckks, length):
    """A last chunk whose imaginary half is partly or wholly empty decrypts to the values;
    client and server encryptions both take ceil(length / N) chunks."""
    _, _, encoder, adder = ckks
    values = np.random.default_rng(length).normal(0.0, 1.0, length)
    chunks, public_chunks = encoder.encrypt(values), adder.encrypt_public(values)
    assert encoder.slots == adder.slots == N
    assert len(chunks) == len(public_chunks) == math.ceil(length / N)
    sums, failed = adder.sum_updates([chunks], workers=1, sums=[public_chunks])
    assert failed == {}
    assert np.abs(encoder._decrypt_exact(sums, length) - 2 * values).max() < 1e-9


def test_a_chunk_holds_its_first_half_in_real_parts_and_its_second_in_imaginary_parts(ckks):
    secret, _, encoder, _ = ckks
    values = np.arange(N, dtype=np.float64) / N
    (chunk,) = encoder.encrypt(values)
    (ciphertext,) = load(encoder.formats, [chunk])
    seal = secret.seal_context().data
    plain = sealapi.Plaintext()
    sealapi.Decryptor(seal, secret.secret_key().data).decrypt(ciphertext, plain)
    slots = np.asarray(sealapi.CKKSEncoder(seal).decode_complex(plain))
    assert len(slots) == N // 2
    np.testing.assert_allclose(slots.real, values[: N // 2], atol=1e-9)
    np.testing.assert_allclose(slots.imag, values[N // 2 :], atol=1e-9)
    np.testing.assert_array_equal(complex_slots(np.arange(6.0), 8), [4j, 1 + 5j, 2, 3])


def test_the_real_slot_chunk_count_is_refused(ckks):
    """An upload cut as before (N/2 values a chunk) has twice the chunks: refused by count."""
    _, _, encoder, _ = ckks
    values = np.ones(3 * N)
    old_count = encoder.encrypt(values) + encoder.encrypt(values)
    with pytest.raises(CiphertextError, match="6 ciphertext chunks for 12288 values, expected 3"):
        encoder._decrypt_exact(old_count, len(values))


# ---- headroom --------------------------------------------------------------------------


def _worst_case(v: float) -> np.ndarray:
    """N values of magnitude v whose slots (±v + iv) add up in phase in one coefficient.

    SEAL puts slot k at the root ζ^(3^k) (ζ = exp(iπ/N)); coefficient N/4 of the encoded
    polynomial is (2/N) Re Σ_k z_k ζ^(-3^k N/4), and 3^k mod 8 alternates 1, 3, so
    z_k = v (±1 + i) makes every term sqrt(2) v: the coefficient reaches sqrt(2) v.
    """
    half = N // 2
    real = np.where(np.arange(half) % 2 == 0, v, -v)
    return np.concatenate([real, np.full(half, v)])


def test_headroom_is_the_real_slot_bound_over_sqrt_2():
    assert headroom((40, 40), 58) == pytest.approx(2.0**19 / math.sqrt(2), rel=1e-12)
    assert CKKSParams().headroom == headroom((40, 40), 58)


def test_a_sum_within_the_headroom_decrypts_and_one_past_the_complex_limit_wraps(ckks):
    """Values two to a slot wrap at (Q/2) / (sqrt(2) Δ), not at (Q/2) / Δ: the headroom is
    below the former; the same magnitude in real slots alone does not wrap.

    The wrapped sum below is wrong by about Q / (sqrt(2) Δ) per value yet stays within its
    bound (the in-phase coefficient loses Q, so values shrink): no decryptor could tell,
    which is why the server keeps sums within the headroom (next test)."""
    secret, _, encoder, adder = ckks
    primes, _ = ring_of(secret)
    wraps_at = math.prod(primes) / 2 / (math.sqrt(2) * secret.global_scale)
    assert CKKSParams().headroom < wraps_at < math.sqrt(2) * wraps_at < 2.0**21

    def summed(per_upload: np.ndarray, uploads: int = 3) -> np.ndarray:
        # SEAL refuses to encode one value past about Q/4: the sum is what wraps
        sums, _ = adder.sum_updates([encoder.encrypt(per_upload)] * uploads, workers=1)
        return encoder._decrypt_exact(sums, N)

    at_headroom = _worst_case(CKKSParams().headroom / 3)
    decrypted = summed(at_headroom)
    assert np.abs(decrypted - 3 * at_headroom).max() < 1e-6
    check_bound(decrypted, _model(CKKSParams().headroom))

    below = _worst_case(0.98 * wraps_at / 3)
    assert np.abs(summed(below) - 3 * below).max() < 1e-6
    past = _worst_case(1.02 * wraps_at / 3)
    assert np.abs(summed(past) - 3 * past).max() > 1e6
    real_only = np.concatenate([np.full(N // 2, 1.02 * wraps_at / 3), np.zeros(N // 2)])
    assert np.abs(summed(real_only) - 3 * real_only).max() < 1e-6


def _model(bound: float) -> EncryptedModel:
    return EncryptedModel([TensorSpec("w", (N,), "float64")], [], 1.0, "f", bound)


def test_the_wrap_detector_reads_the_imaginary_halves_too(ckks):
    """An upload past its declared bound in the imaginary half only is caught."""
    _, _, encoder, _ = ckks
    values = np.zeros(N)
    values[N // 2 + 7] = 1e3  # slot 7's imaginary part
    decrypted = encoder._decrypt_exact(encoder.encrypt(values), N)
    with pytest.raises(ModelOutOfBoundError, match="reaches 1e"):
        check_bound(decrypted, _model(1.0))
    check_bound(decrypted, _model(1e3))


def _reply(bound: float, chunks: list[bytes], own: str) -> Message:
    model = EncryptedModel([TensorSpec("w", (10,), "float64")], chunks, 1.0, own, bound)
    metrics = MetricRecord({"num-examples": 10})
    return Message(
        RecordDict({"arrays": model.to_record(), "metrics": metrics}),
        reply_to=client_message(ArrayRecord()),
    )


def test_the_server_refuses_replies_past_the_complex_headroom(ckks):
    """A sum up to headroom_fraction x 2^19 / sqrt(2) is accepted; 2 % past it, the larger
    reply is left out (with real slots' 2^19 it would have been accepted)."""
    _, public, encoder, _ = ckks
    summer = EncryptedSum(public, headroom_fraction=0.5, workers=1, name="Complex")
    assert summer.headroom == pytest.approx(0.5 * 2.0**19 / math.sqrt(2), rel=1e-12)
    chunks, own = encoder.encrypt(np.ones(10)), fingerprint(public)
    half = summer.headroom / 2
    fits = [_reply(half, chunks, own), _reply(half, chunks, own)]
    accepted, total = summer.add(1, fits)
    assert accepted == fits and total.max_abs == pytest.approx(summer.headroom)
    over = [_reply(half, chunks, own), _reply(1.04 * half, chunks, own)]
    assert 2.04 * half < 0.5 * 2.0**19  # within the real-slot headroom
    accepted, _ = summer.add(1, over)
    assert accepted == over[:1]


# ---- flooding --------------------------------------------------------------------------


def test_both_halves_of_every_used_slot_are_flooded(ckks):
    """decrypt - exact has variance σ_f² (+ the rounding's) on the real parts and on the
    imaginary parts alike, σ_f sized for the number of values released."""
    _, _, encoder, adder = ckks
    length = 2 * N - 100  # the last chunk's imaginary half is partly empty
    values = np.random.default_rng(3).normal(0.0, 0.1, length)
    chunks = encoder.encrypt(values)
    exact = encoder._decrypt_exact(chunks, length)
    sigma = flooding_std(N, encoder.scale, length)
    expected = sigma**2 + precision(sigma) ** 2 / 12
    noise = np.concatenate([encoder.decrypt(chunks, length) - exact for _ in range(4)])
    released = noise.reshape(4, length)
    assert released.shape[1] == length  # the unused tail is never released
    halves = {
        "real": np.concatenate([released[:, :2048], released[:, N : N + 2048]], axis=1),
        "imaginary": np.concatenate([released[:, 2048:N], released[:, N + 2048 :]], axis=1),
    }
    for part, errors in halves.items():
        ratio = errors.var() / expected
        assert 0.9 < ratio < 1.1, f"{part}: variance {ratio:.3f} x σ_f²"


# ---- the real-slot format is refused, not misread ---------------------------------------


def _version_1(model: EncryptedModel) -> dict:
    return model.header() | {"version": 1}


def test_an_encrypted_model_of_format_1_is_refused_naming_the_format(ckks, tmp_path):
    _, public, encoder, _ = ckks
    assert FORMAT_VERSION == 3
    model = EncryptedModel(
        [TensorSpec("w", (10,), "float64")], encoder.encrypt(np.ones(10)), 1.0, "f", 1.0
    )
    path = save_encrypted(model, tmp_path / "model.zip")
    assert load_encrypted(path).chunks == model.chunks
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members["header.json"] = json.dumps(_version_1(model)).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(CiphertextError, match=r"format version 1 \(SEAL ciphertexts of N/2"):
        load_encrypted(path)
    with pytest.raises(CiphertextError, match="reads format 3 only"):
        EncryptedModel.from_header(_version_1(model), model.chunks)
    version_2 = model.header() | {"version": 2}
    del version_2["summed"]  # a field version 2 did not have: the version is named first
    with pytest.raises(CiphertextError, match=r"format version 2 \(SEAL ciphertexts of N values"):
        EncryptedModel.from_header(version_2, model.chunks)


def test_a_checkpoint_of_the_real_slot_format_is_refused_on_resume(tmp_path, monkeypatch):
    """An HE + DP checkpoint whose encrypted model says format 1 (re-signed with the key, as a
    checkpoint written before this change would be) ends the resume naming the format."""
    from test_checkpoint import NODES, ROUNDS, CrashingGrid, ServerCrashError, _app, _he_dp, _start

    from lepton_flwr.he import write_keys
    from lepton_flwr.mods import make_he_dp_mod

    key = tmp_path / "server" / "checkpoint.key"
    monkeypatch.setenv(KEY_ENV, str(key))
    keys = write_keys(CKKSParams(), tmp_path / "keys")
    mods = [make_he_dp_mod(keys[0], workers=1)]
    folder = tmp_path / "run"
    with pytest.raises(ServerCrashError):
        _he_dp(keys).start(
            CrashingGrid(_app(mods), NODES, crash_at=3), _start(), ROUNDS, checkpoint_dir=folder
        )
    path = folder / "checkpoint.zip"
    with zipfile.ZipFile(path) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    state = json.loads(contents[STATE_MEMBER])
    (index,) = [i for i, spec in enumerate(state["arrays"]) if spec["name"] == "ckks-meta"]
    member = f"array-{index:05d}"
    header = json.loads(contents[member]) | {"version": 1}
    contents[member] = json.dumps(header).encode()
    state["arrays"][index]["sha256"] = hashlib.sha256(contents[member]).hexdigest()
    contents[STATE_MEMBER] = json.dumps(state).encode()
    contents[MAC_MEMBER] = _mac(key.read_bytes(), contents[STATE_MEMBER]).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in contents.items():
            archive.writestr(name, data)
    with pytest.raises(CiphertextError, match="format version 1"):
        _he_dp(keys).start(CrashingGrid(_app(mods), NODES), _start(), ROUNDS, checkpoint_dir=folder)
