"""Hostile input from files and headers: refused with a reason, never a crash or a leak."""

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from flwr.app import Array, ArrayRecord

from lepton_flwr.he import CiphertextError, CKKSParams, EncryptedModel, load_encrypted, write_keys
from lepton_flwr.he.records import FORMAT_VERSION, MAX_HEADER_BYTES, META_KEY, META_STYPE


def _record_with_header(text: bytes) -> ArrayRecord:
    return ArrayRecord(
        {META_KEY: Array(dtype="uint8", shape=(len(text),), stype=META_STYPE, data=text)}
    )


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (b'{"version": 1, "num_chunks": 1' + b"0" * 5000 + b"}", "malformed ciphertext header"),
        (
            json.dumps(
                {
                    "version": FORMAT_VERSION,
                    "fingerprint": "f",
                    "weight": 1e400,
                    "max_abs": 0,
                    "num_chunks": 0,
                    "manifest": [],
                    "summed": 1,
                }
            ).encode(),
            "weight must be finite",
        ),
        (
            json.dumps(
                {
                    "version": FORMAT_VERSION,
                    "fingerprint": "f",
                    "weight": 1,
                    "max_abs": 0,
                    "num_chunks": 0,
                    "manifest": [["w", [10**400], "float32"]],
                    "summed": 1,
                }
            ).encode(),
            "malformed",
        ),
        (b"[1, 2]", "not an object"),
        (b"x" * (MAX_HEADER_BYTES + 1), "over the"),
    ],
)
def test_hostile_headers_are_refused_with_a_reason(header, reason):
    with pytest.raises(CiphertextError, match=reason):
        EncryptedModel.from_record(_record_with_header(header))


def _zip(path: Path, members: dict[str, bytes], deflated: tuple[str, ...] = ()) -> Path:
    """A zip of ``members``, stored as the library writes them, those ``deflated`` not."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            kind = zipfile.ZIP_DEFLATED if name in deflated else zipfile.ZIP_STORED
            archive.writestr(name, data, compress_type=kind)
    return path


def test_model_files_that_lie_or_expand_are_refused(tmp_path):
    header = {
        "version": FORMAT_VERSION,
        "fingerprint": "f",
        "weight": 1.0,
        "max_abs": 0.0,
        "num_chunks": 3,
        "manifest": [["w", [1], "float32"]],
        "summed": 1,
    }
    lying = _zip(tmp_path / "lying.zip", {"header.json": json.dumps(header).encode()})
    with pytest.raises(CiphertextError, match="no 'ckks-00000.seal'"):
        load_encrypted(lying)
    bomb = _zip(
        tmp_path / "bomb.zip",
        {
            "header.json": json.dumps(header | {"num_chunks": 1}).encode(),
            "ckks-00000.seal": b"\0" * (1 << 25),
        },  # 32 MiB of zeros, a few KiB zipped
        deflated=("ckks-00000.seal",),
    )
    assert bomb.stat().st_size < 100_000
    with pytest.raises(CiphertextError, match="over the"):
        load_encrypted(bomb)
    with pytest.raises(CiphertextError, match="not a readable encrypted model"):
        load_encrypted(_zip(tmp_path / "x.zip", {}).with_name("missing.zip"))
    # The command line says so in one line, no traceback.
    keys = write_keys(CKKSParams(), tmp_path / "keys")
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "lepton-flwr"),
            "decrypt",
            "--secret-context",
            str(keys[0]),
            "--model",
            str(lying),
            "--out",
            str(tmp_path / "m.pt"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no 'ckks-00000.seal'" in proc.stderr


def test_keygen_never_leaves_the_secret_readable_nor_follows_a_planted_link(tmp_path):
    folder = tmp_path / "keys"
    folder.mkdir()
    (folder / "secret.ctx").write_bytes(b"old")
    os.chmod(folder / "secret.ctx", 0o644)  # world-readable before
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not a key")
    (folder / "public.ctx").symlink_to(elsewhere)
    secret, public = write_keys(CKKSParams(), folder)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert not public.is_symlink() and elsewhere.read_text() == "not a key"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp left


def test_seal_scratch_folders_are_removed_when_the_process_exits(tmp_path):
    code = (
        "from lepton_flwr.he import CKKSParams, create_secret_context, fingerprint\n"
        "from lepton_flwr.he.keys import scratch_dir\n"
        "fingerprint(create_secret_context(CKKSParams()))\n"
        "print(scratch_dir())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder.name.startswith("lepton-he-") and not folder.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous files: Linux")
def test_a_killed_process_leaves_nothing_where_seal_scratch_files_are_made():
    """On Linux SEAL's scratch files are anonymous and need no folder: a process killed
    after encrypting, summing, decrypting and fingerprinting (``os._exit``: no finalizer
    runs, as under SIGKILL) leaves nothing named after it."""
    code = (
        "import os\n"
        "import numpy as np\n"
        "from lepton_flwr.he import CKKSParams, CkksEncoder, CkksAdder, create_secret_context\n"
        "from lepton_flwr.he import fingerprint\n"
        "from lepton_flwr.he.keys import scratch_base\n"
        "context = create_secret_context(CKKSParams())\n"
        "encoder = CkksEncoder(context, workers=1)\n"
        "sums, _ = CkksAdder(context).sum_updates([encoder.encrypt(np.ones(5))] * 2, workers=1)\n"
        "encoder.decrypt(CkksAdder(context).download(sums, 2), 5)\n"
        "fingerprint(context)\n"
        "print(os.getpid(), scratch_base(), flush=True)\n"
        "os._exit(0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    pid, base = proc.stdout.split()[-2:]
    assert not [name for name in os.listdir(base) if name.startswith(f"lepton-he-{pid}-")]


def test_a_threads_seal_scratch_file_is_private_and_goes_with_the_thread(tmp_path):
    """Each thread saves and loads SEAL objects through a file of its own (mode 0600; on
    Linux anonymous, named in no folder), closed when the thread ends; a forked child
    makes its own and leaves its parent's alone."""
    code = (
        "import os, threading\n"
        "from lepton_flwr.he import CKKSParams, CkksEncoder, create_secret_context\n"
        "from lepton_flwr.he import seal_words\n"
        "from lepton_flwr.he.keys import scratch_dir\n"
        "import numpy as np\n"
        "encoder = CkksEncoder(create_secret_context(CKKSParams()), workers=1)\n"
        "encoder.encrypt(np.ones(5))\n"
        "main = seal_words._scratch()\n"
        "mode = oct(os.fstat(main.fd).st_mode & 0o777)\n"
        "named = os.listdir(scratch_dir())\n"
        "inodes = []\n"
        "def work():\n"
        "    encoder.encrypt(np.ones(5))\n"
        "    inodes.append(os.fstat(seal_words._scratch().fd).st_ino)\n"
        "fds = len(os.listdir('/proc/self/fd'))\n"
        "thread = threading.Thread(target=work)\n"
        "thread.start(); thread.join()\n"
        "closed = len(os.listdir('/proc/self/fd')) == fds\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    child = encoder._decrypt_exact(encoder.encrypt(np.full(5, 3.0)), 5)\n"
        "    os._exit(0 if np.allclose(child, 3.0, atol=1e-3) else 1)\n"
        "child_ok = os.waitpid(pid, 0)[1] == 0\n"
        "again = encoder._decrypt_exact(encoder.encrypt(np.full(5, 2.0)), 5)\n"
        "print(mode, named, inodes[0] != os.fstat(main.fd).st_ino, closed, child_ok,\n"
        "      np.allclose(again, 2.0, atol=1e-3))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "0o600 [] True True True True"


def test_a_chunk_of_another_kind_is_rejected_alone():
    """A sum (whose c1 is not a seed's expansion) or bytes of another layout sent as an
    upload: refused by its length, that upload alone, the others added."""
    import numpy as np
    import tenseal as ts

    from lepton_flwr.he import CkksAdder, CkksEncoder, create_secret_context
    from lepton_flwr.he.keys import public_context_bytes

    context = create_secret_context(CKKSParams())
    good = CkksEncoder(context, workers=1).encrypt(np.ones(10))
    adder = CkksAdder(ts.context_from(public_context_bytes(context)))
    for bad in (adder.encrypt_public(np.ones(10))[0], bytes(range(256)) * 152):
        with pytest.raises(CiphertextError, match="bytes, not"):
            adder.check([bad])
        sums, failed = adder.sum_updates([good, [bad], good], workers=1)
        assert list(failed) == [1] and "bytes, not" in failed[1]
        total = CkksEncoder(context, workers=1)._decrypt_exact(sums, 10)
        assert np.allclose(total, 2.0, atol=1e-5)  # the two good uploads, added


def test_no_decryption_passes_through_the_seal_scratch_files(monkeypatch):
    """The running guide's promise: SEAL's scratch files hold ciphertexts and public
    parameters, never a decryption. Every object the library saves or loads through
    them on a whole round (keys' fingerprints, masked encryption, the server's sum and
    mask removal, the download copy, the key holder's decryption) is recorded."""
    import numpy as np
    import tenseal as ts
    import tenseal.sealapi as sealapi

    from lepton_flwr.he import (
        CkksAdder,
        CkksEncoder,
        codec,
        create_secret_context,
        fingerprint,
        packed,
        seal_words,
    )
    from lepton_flwr.he.keys import public_context_bytes
    from lepton_flwr.he.ring_masks import ring_mask

    passed = []
    save, load = seal_words.save_bytes, seal_words.load_bytes
    prefixed = seal_words.load_prefixed

    def recording_save(obj):
        passed.append(type(obj).__name__)
        return save(obj)

    def recording_load(obj, seal_context, blob):
        passed.append(type(obj).__name__)
        return load(obj, seal_context, blob)

    def recording_prefixed(obj, seal_context, prefix, tail):
        passed.append(type(obj).__name__)
        return prefixed(obj, seal_context, prefix, tail)

    recorders = {
        "save_bytes": recording_save,
        "load_bytes": recording_load,
        "load_prefixed": recording_prefixed,
    }
    for module in (seal_words, codec, packed):
        for name, recorder in recorders.items():
            if hasattr(module, name):
                monkeypatch.setattr(module, name, recorder)
    secret = create_secret_context(CKKSParams())
    public = ts.context_from(public_context_bytes(secret))
    fingerprint(secret), fingerprint(public)
    encoder, adder = CkksEncoder(secret, workers=1), CkksAdder(public)
    primes, degree = codec.ring_of(secret)
    mask = lambda i: ring_mask(bytes(32), b"self", 1, i, primes, degree)  # noqa: E731
    uploads = [encoder.encrypt(np.full(5000, 0.5), mask), encoder.encrypt(np.full(5000, 0.25))]
    sums, failed = adder.sum_updates(uploads, workers=1)
    sums = adder.remove_mask(sums, mask)
    values = encoder.decrypt(adder.download(sums, 2), 5000)
    assert not failed and np.allclose(values, 0.75, atol=0.01)  # flooded, rounded
    kinds = set(passed)
    assert type(sealapi.Plaintext()).__name__ not in kinds, sorted(kinds)
    assert kinds == {"PublicKey", "Ciphertext", "SerializableCiphertext"}, sorted(kinds)


def test_a_full_scratch_file_system_is_this_machines_error_never_an_uploads(monkeypatch):
    """A scratch file that cannot take its bytes (``/dev/shm`` full: ENOSPC, or a short
    write) raises OSError where it happens, on the server's sum and on a client's
    decryption: it is never reported as the upload's or the download's fault (before,
    every honest upload of the round was refused as "cannot be loaded"), and the next
    call works once there is room."""
    import errno

    import numpy as np
    import tenseal as ts

    from lepton_flwr.he import CkksAdder, CkksEncoder, create_secret_context, seal_words
    from lepton_flwr.he.keys import public_context_bytes

    secret = create_secret_context(CKKSParams())
    encoder = CkksEncoder(secret, workers=1)
    adder = CkksAdder(ts.context_from(public_context_bytes(secret)))
    uploads = [encoder.encrypt(np.full(10, 0.5)) for _ in range(2)]
    sums, _ = adder.sum_updates(uploads, workers=1)
    download = adder.download(sums, 2)
    real = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    def short(fd, data, offset):
        return real(fd, data[: len(data) // 2], offset)

    for failing, message in ((full, "No space left"), (short, "took")):
        monkeypatch.setattr(seal_words.os, "pwrite", failing)
        with pytest.raises(OSError, match=message):
            adder.sum_updates(uploads, workers=1)
        with pytest.raises(OSError, match=message):
            CkksEncoder(secret, workers=1).decrypt(download, 10)
        monkeypatch.undo()
    assert adder.sum_updates(uploads, workers=1) == (sums, {})
    assert np.allclose(encoder.decrypt(download, 10, 2.0), 0.5, atol=0.01)
