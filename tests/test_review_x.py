"""Review X: can a ciphertext's bytes raise this machine's failures (MemoryError, OSError)?

Commit 30cf830 lets ``codec.LOCAL_FAILURES`` propagate where a ciphertext's errors are
caught, promising that "a ciphertext's bytes cannot cause them: every length is checked
before SEAL or a scratch file sees it". The strategies' reply path holds (a reply's chunk
count is checked against the global model before anything is sized from it); the four
findings below did not, and are fixed (their tests now pass):

- X1 a model file of a few hundred kB (deflated members) was read into a thousand times
  its size: ``load_encrypted`` bounded each member (16 MiB), not the file's expansion;
  now only stored members are read;
- X2 ``CkksAdder.sum_updates`` sized its sum (and the parallel sum's shared memory) from
  an upload's chunk count before any chunk's length was checked: an upload of 2^20 empty
  chunks raised MemoryError / OSError instead of being reported; every chunk is now
  checked first (``packed.check_chunks``);
- X3 a header manifest numpy cannot build (a zero-size tensor of huge dimensions)
  raised ValueError from ``decrypt_model`` after the decryption; such a shape is now
  refused when the header is read;
- X4 and the client's ledger then did not count that decryption: a server sent model
  after model for one round and each was decrypted; now whatever is raised once a model
  is decrypted counts it (``decryptions.decrypt_once``).

The memory tests run in a child process whose address space is capped a little above
what it holds (``RLIMIT_AS``): an allocation sized from the input fails there at once,
whatever the machine.
"""

import json
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from conftest import client_message
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from lepton_flwr import protocol
from lepton_flwr.he import CkksAdder, CkksEncoder, CKKSParams, EncryptedModel, TensorSpec
from lepton_flwr.he.codec import CiphertextError
from lepton_flwr.he.keyholder import decrypt_model
from lepton_flwr.he.keys import create_secret_context, fingerprint, secret_context_bytes
from lepton_flwr.he.records import FORMAT_VERSION, MAX_CHUNK_BYTES, chunk_key, load_encrypted
from lepton_flwr.mods import make_he_mod

# A tensor of no values whose other dimensions numpy cannot multiply out.
UNBUILDABLE = TensorSpec("z", (0,) + (2**31 - 1,) * 20, "float32")

_CAPPED = """
import resource
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), resource.RLIM_INFINITY))
"""


def _run_capped(setup: str, body: str) -> str:
    """Run ``setup``, cap the address space 2 GiB above it, run ``body``; its stdout."""
    script = textwrap.dedent(setup) + _CAPPED + textwrap.dedent(body)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    secret = create_secret_context(CKKSParams())
    public = ts.context_from(secret.serialize(save_secret_key=False))
    path = tmp_path_factory.mktemp("keys") / "secret.ctx"
    path.write_bytes(secret_context_bytes(secret))
    return secret, public, path


def _sum_of(secret, public, values) -> list[bytes]:
    upload = CkksEncoder(secret, workers=1).encrypt(np.asarray(values, dtype=np.float64))
    chunks, _ = CkksAdder(public).sum_updates([upload], workers=1)
    return chunks


# ---- X1: model files ---------------------------------------------------------------------


def test_a_model_file_is_never_read_into_much_more_than_its_own_size(tmp_path):
    """save_encrypted stores its members; a file whose members expand (deflate: about
    1,000 to 1) makes the key holder's ``lepton-flwr decrypt`` hold a thousand times the
    file: 2^20 members of 16 MiB each are allowed, so a file of about 25 MB fills 23 GiB
    (the OOM killer, not a refusal). Here 4 members of 16 MiB from a file of 65 kB."""
    header = {
        "version": FORMAT_VERSION,
        "fingerprint": "f",
        "weight": 1.0,
        "max_abs": 0.0,
        "num_chunks": 4,
        "manifest": [["w", [1], "float32"]],
        "summed": 1,
    }
    path = tmp_path / "expanding.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("header.json", json.dumps(header))
        for index in range(4):
            archive.writestr(f"{chunk_key(index)}.seal", bytes(MAX_CHUNK_BYTES))
    assert path.stat().st_size < 100_000
    with pytest.raises(CiphertextError):
        model = load_encrypted(path)
        held = sum(map(len, model.chunks))
        raise AssertionError(f"{held} bytes held from a file of {path.stat().st_size}")


# ---- X2 and what held: the server's sum --------------------------------------------------

_ADDER_SETUP = """
import numpy as np, tenseal as ts
from lepton_flwr.he import CkksAdder, CkksEncoder, CKKSParams
from lepton_flwr.he.keys import create_secret_context, public_context_bytes
secret = create_secret_context(CKKSParams())
adder = CkksAdder(ts.context_from(public_context_bytes(secret)))
honest = CkksEncoder(secret, workers=1).encrypt(np.full(10, 0.5))
"""


def test_an_upload_of_many_empty_chunks_is_reported_not_allocated_for():
    """``CkksAdder.sum_updates`` promises that an upload with a chunk that does not check,
    whatever the error, is reported and left out. An upload of 2^20 empty chunks (8 MiB
    of list, a few MB on the wire) alone, or first of a tie, sets the chunk count: the
    sum allocates 2 x 32 GiB (MemoryError, workers=1) or maps (2^20 - first) downloads
    of shared memory (OSError ENOMEM, workers=2) before any chunk's length is checked."""
    out = _run_capped(
        _ADDER_SETUP,
        """
        hostile = [b""] * (1 << 20)
        for uploads in ([hostile], [hostile, honest]):
            for workers in (1, 2):
                try:
                    _, errors = adder.sum_updates(uploads, workers=workers)
                    print("reported" if 0 in errors else "kept")
                except (MemoryError, OSError) as err:
                    print("raised", type(err).__name__)
        """,
    )
    assert out.split("\n")[:-1] == ["reported"] * 4, out


def test_the_strategies_check_a_replys_chunk_count_before_the_sum_is_sized(keys):
    """What held: through ``EncryptedSum.add`` (both HE strategies) the same hostile reply,
    2^16 empty chunks under the global model's manifest, arriving first, is rejected by
    its count alone and the honest reply is summed, with the address space capped 2 GiB
    above the process (a sum sized from the hostile count needs 4 GiB). Fails if the
    count check moved after the sum (or the chunk count were voted among replies)."""
    out = _run_capped(
        """
        import numpy as np, tenseal as ts
        from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
        from conftest import client_message
        from lepton_flwr.he import CkksEncoder, CKKSParams, EncryptedModel, TensorSpec
        from lepton_flwr.he.keys import create_secret_context, fingerprint, public_context_bytes
        from lepton_flwr.strategies.encrypted_sum import EncryptedSum
        secret = create_secret_context(CKKSParams())
        public = ts.context_from(public_context_bytes(secret))
        summer, own = EncryptedSum(public, workers=1, name="X"), fingerprint(public)
        manifest = [TensorSpec("w", (10,), "float32")]
        summer.manifest = manifest  # what configure_train remembers
        honest = CkksEncoder(secret, workers=1).encrypt(np.full(10, 0.5))

        def reply(chunks, number):
            record = EncryptedModel(manifest, chunks, 1.0, own, 1.0).to_record()
            metrics = MetricRecord({"num-examples": 10})
            incoming = client_message(ArrayRecord(), number=number)
            return Message(RecordDict({"arrays": record, "metrics": metrics}), reply_to=incoming)

        replies = [reply([b""] * (1 << 16), 1), reply(honest, 2)]
        """,
        """
        accepted, total = summer.add(1, replies)
        print(len(accepted), accepted[0] is replies[1], total.summed)
        """,
    )
    assert out.split() == ["1", "True", "1"], out


# ---- X3, X4: a client's decryption -------------------------------------------------------


def test_a_header_layout_numpy_cannot_build_is_refused_before_decrypting(keys):
    """A server's header may name a tensor of no values whose dimensions overflow numpy
    (the manifest checks each below 2^31 and the total of values only): ``decrypt_model``
    decrypts, then ``unflatten`` raises ValueError ("array is too big"), neither a
    CiphertextError nor before the decryption is counted."""
    secret, public, _ = keys
    manifest = [TensorSpec("w", (12,), "float32"), UNBUILDABLE]
    chunks = _sum_of(secret, public, np.full(12, 0.5))
    record = EncryptedModel(manifest, chunks, 1.0, fingerprint(public), 1.0).to_record()
    counted = []
    encoder, own = CkksEncoder(secret, workers=1), fingerprint(public)
    with pytest.raises(CiphertextError):
        decrypt_model(record, encoder, own, count=lambda: counted.append(1))
    assert not counted  # refused before the decryption would be counted


def _train_app(path) -> ClientApp:
    app = ClientApp(mods=[make_he_mod(path, workers=1)])

    @app.train()
    def train(msg, context):
        arrays = ArrayRecord({"w": Array(msg.content["arrays"]["w"].numpy())})
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def test_a_client_decrypts_at_most_one_model_per_round_whatever_fails_after(keys, monkeypatch):
    """A client decrypts at most one model per round (``decryptions`` module). Before its
    first training reply it takes the layout from the server's header; with X3's layout
    the decryption happens, the handler never runs, and ``decrypt_once`` leaves the
    ledger as it was (it is written only when ``decrypt`` returns or refuses the model):
    the server sends three different models for round 1 and the client decrypts all
    three, learning for each whether its decryption stayed within the header's bound
    (ValueError) or not (the refusal), none counted in the run's budget."""
    secret, public, path = keys
    decryptions = []
    exact = CkksEncoder._decrypt_exact

    def spy(self, chunks, length):
        decryptions.append(length)
        return exact(self, chunks, length)

    monkeypatch.setattr(CkksEncoder, "_decrypt_exact", spy)
    app = _train_app(path)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    manifest = [TensorSpec("w", (12,), "float32"), UNBUILDABLE]
    config = {protocol.SERVER_ROUND: 2, protocol.VALUE_BOUND: 100.0}
    for number in range(3):
        chunks = _sum_of(secret, public, np.full(12, 0.25 * number))
        record = EncryptedModel(manifest, chunks, 1.0, fingerprint(public), 1.0).to_record()
        try:
            app(client_message(record, config, number + 1, "train"), context)
        except ValueError:
            pass  # X3: Flower turns it into an error reply quoting the text
    assert len(decryptions) <= 1, f"{len(decryptions)} models decrypted for round 1"


@pytest.mark.parametrize("failure", [MemoryError, ValueError])
def test_a_decryption_that_fails_after_decrypting_is_counted(keys, monkeypatch, failure):
    """X4's fix, its failure after the decryption made directly (X3's layout is now
    refused before decrypting): whatever the key holder raises once a model is
    decrypted, the round's model is spent; three models for one round give one
    decryption, and models refused before decrypting (another key's) are not counted."""
    import importlib

    from lepton_flwr.mods.decryptions import LEDGER

    he_mod = importlib.import_module("lepton_flwr.mods.he_mod")  # the package exports a function

    secret, public, path = keys
    decryptions = []
    exact, real = CkksEncoder._decrypt_exact, he_mod.decrypt_model

    def spy(self, chunks, length):
        decryptions.append(length)
        return exact(self, chunks, length)

    def then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise failure("after decrypting")

    monkeypatch.setattr(CkksEncoder, "_decrypt_exact", spy)
    monkeypatch.setattr(he_mod, "decrypt_model", then_fail)
    app = _train_app(path)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    manifest = [TensorSpec("w", (12,), "float32")]
    config = {protocol.SERVER_ROUND: 2, protocol.VALUE_BOUND: 100.0}
    foreign = EncryptedModel(manifest, _sum_of(secret, public, np.ones(12)), 1.0, "other", 1.0)
    app(client_message(foreign.to_record(), config, 1, "train"), context)  # refused: no key
    assert LEDGER not in context.state.config_records
    for number in range(3):
        chunks = _sum_of(secret, public, np.full(12, 0.25 * number))
        record = EncryptedModel(manifest, chunks, 1.0, fingerprint(public), 1.0).to_record()
        try:
            app(client_message(record, config, number + 2, "train"), context)
        except failure:
            pass
    assert len(decryptions) == 1
    assert int(context.state.config_records[LEDGER]["count"]) == 1
