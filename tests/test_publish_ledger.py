"""The key holder's published decryptions are counted per key and refused past the budget.

The flooding of lepton_flwr.he.publish is sized for DECRYPTIONS decryptions of a model
under one key; clients count theirs in their state-dir (test_no_oracle.py), the key
holder's paths (decrypt_arrays, keyholder_evaluate_fn, ``lepton-flwr decrypt``) in the
same kind of file (lepton_flwr.he.ledger), beside the secret context by default.
"""

import json

import numpy as np
import pytest
import tenseal as ts
from flwr.app import MetricRecord

from lepton_flwr.he import CkksAdder, CkksEncoder, CKKSParams, EncryptedModel, TensorSpec
from lepton_flwr.he.keyholder import decrypt_arrays, keyholder_evaluate_fn
from lepton_flwr.he.keys import fingerprint, load_context, write_keys
from lepton_flwr.he.ledger import DecryptionCountError, read_count, spend_one
from lepton_flwr.he.publish import DECRYPTIONS


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    secret_path, _ = write_keys(CKKSParams(), folder)
    return secret_path, load_context(secret_path, expect_secret=True)


def _record(secret, values, max_abs=None):
    """An honest encrypted model of ``values`` (weight 1) under ``secret``'s key."""
    encoder = CkksEncoder(secret, workers=1)
    public = ts.context_from(secret.serialize(save_secret_key=False))
    sums, _ = CkksAdder(public).sum_updates([encoder.encrypt(values)], workers=1)
    bound = float(np.abs(values).max()) if max_abs is None else max_abs
    spec = [TensorSpec("w", (len(values),), "float32")]
    return EncryptedModel(spec, sums, 1.0, fingerprint(secret), bound).to_record()


def _count_path(folder, secret):
    return folder / f"he-decryptions-{fingerprint(secret)}.json"


def test_each_key_holder_decryption_is_counted_beside_the_secret(keys):
    secret_path, secret = keys
    record = _record(secret, np.linspace(-1, 1, 10))
    path = _count_path(secret_path.parent, secret)
    before = read_count(path)
    for _ in range(2):
        decrypt_arrays(record, secret_path)
    assert read_count(path) == before + 2


def test_past_the_budget_nothing_is_decrypted(keys, tmp_path, monkeypatch):
    secret_path, secret = keys
    record = _record(secret, np.linspace(-1, 1, 10))
    path = _count_path(tmp_path, secret)
    path.write_text(json.dumps({"count": DECRYPTIONS - 1}))
    decrypt_arrays(record, secret_path, count_in=tmp_path)  # the last one the budget allows
    assert read_count(path) == DECRYPTIONS

    def must_not_decrypt(*args, **kwargs):
        raise AssertionError("decrypted past the budget")

    monkeypatch.setattr(CkksEncoder, "decrypt", must_not_decrypt)
    with pytest.raises(DecryptionCountError, match=f"most .* flooded for \\({DECRYPTIONS}\\)"):
        decrypt_arrays(record, secret_path, count_in=tmp_path)
    assert read_count(path) == DECRYPTIONS


def test_a_count_that_cannot_be_read_refuses_rather_than_restart(keys, tmp_path):
    secret_path, secret = keys
    record = _record(secret, np.linspace(-1, 1, 10))
    path = _count_path(tmp_path, secret)
    path.write_text("{not json")
    with pytest.raises(DecryptionCountError, match="rather than restart the count"):
        decrypt_arrays(record, secret_path, count_in=tmp_path)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text(json.dumps({"count": 0}))
    with pytest.raises(DecryptionCountError, match="cannot read"):
        decrypt_arrays(record, secret_path, count_in=tmp_path)


def test_a_model_under_another_key_is_refused_before_it_is_counted(keys, tmp_path):
    from lepton_flwr.he import CiphertextError
    from lepton_flwr.he.keys import create_secret_context

    secret_path, secret = keys
    other = create_secret_context(CKKSParams())
    with pytest.raises(CiphertextError, match="different key pairs"):
        decrypt_arrays(_record(other, np.ones(4)), secret_path, count_in=tmp_path)
    assert read_count(_count_path(tmp_path, secret)) == 0


def test_the_key_holders_evaluation_counts_and_skips_past_the_budget(keys, tmp_path):
    secret_path, secret = keys
    record = _record(secret, np.linspace(-1, 1, 10))
    seen = []

    def evaluate(server_round, arrays):
        seen.append(server_round)
        return MetricRecord({"accuracy": 1.0})

    evaluate_fn = keyholder_evaluate_fn(evaluate, secret_path, count_in=tmp_path)
    path = _count_path(tmp_path, secret)
    path.write_text(json.dumps({"count": DECRYPTIONS - 1}))
    assert evaluate_fn(1, record) is not None
    assert evaluate_fn(2, record) is None  # the budget is spent: not tested, the run goes on
    assert seen == [1] and read_count(path) == DECRYPTIONS


def test_the_command_line_counts_and_refuses_past_the_budget(keys, tmp_path, capsys):
    from lepton_flwr.cli import main
    from lepton_flwr.he import save_encrypted

    secret_path, secret = keys
    model = save_encrypted(
        EncryptedModel.from_record(_record(secret, np.linspace(-1, 1, 10))),
        tmp_path / "model.ckks.zip",
    )
    args = ["decrypt", "--secret-context", str(secret_path), "--model", str(model)]
    args += ["--out", str(tmp_path / "plain.pt"), "--count-in", str(tmp_path)]
    main(args)
    assert f"decryption 1 of {DECRYPTIONS}" in capsys.readouterr().out
    _count_path(tmp_path, secret).write_text(json.dumps({"count": DECRYPTIONS}))
    with pytest.raises(SystemExit, match="nothing more is decrypted"):
        main(args)


def test_spending_counts_every_call_and_stops_at_the_budget(tmp_path):
    path = tmp_path / "he-decryptions-00ff.json"
    assert [spend_one(path, 3) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(DecryptionCountError):
        spend_one(path, 3)
    assert read_count(path) == 3


def test_values_at_their_bound_are_not_refused_for_the_flooding(keys, tmp_path):
    """The wrap detector allows the flooding's tail: 8,192 values at their bound decrypt
    with noise of std 5.5e-4, which passes the old fixed slack (1e-3) in some value
    almost surely."""
    secret_path, secret = keys
    values = np.full(4 * 2048, 0.5)
    record = _record(secret, values, max_abs=0.5)
    plain = decrypt_arrays(record, secret_path, count_in=tmp_path)["w"].numpy()
    assert np.abs(plain - 0.5).max() > 1e-3  # the flooding passes the fixed slack here
