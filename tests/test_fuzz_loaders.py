"""Fuzz every loader a reply or a model file reaches: only ``CiphertextError`` escapes.

Issue 18, item 3: a ciphertext whose scale field was -1 raised a ``ValueError`` while the
server formatted it, and ended the run. Here thousands of seeded mutations of each input
go through its loader: packed ciphertexts (byte flips, truncations, insertions, extreme
words, on uploads, sums and downloads: :mod:`lepton_flwr.he.packed`, whose fixed layout
leaves a sender the length, the words and the seed to get wrong), encrypted-model headers
(bytes, and JSON fields of other types, nested, huge, negative, NaN), and the zip files
``load_encrypted`` reads. A mutation either loads or raises ``CiphertextError``; any
other exception fails the test with the mutation that caused it. A sample also goes
through the strategies' path (``EncryptedSum.add``), where a mutation that does not load
is a rejected reply naming its node.
"""

import io
import json
import logging
import random
import struct
import zipfile

import numpy as np
import pytest
from conftest import client_message
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from lepton_flwr.strategies.encrypted_sum import EncryptedSum

from lepton_flwr.he import CKKSParams
from lepton_flwr.he.codec import CiphertextError, CkksAdder, CkksEncoder, TensorSpec, load
from lepton_flwr.he.keys import create_secret_context, fingerprint
from lepton_flwr.he.records import (
    FORMAT_VERSION,
    META_KEY,
    EncryptedModel,
    load_encrypted,
    parse_header,
    save_encrypted,
)

SEED = 18
VALUES = np.linspace(-1.0, 1.0, 10)
U64 = (0, 1, 2, 3, 2**31, 2**32 + 2, 2**63, 2**64 - 1)


# ---- byte-level mutations ----------------------------------------------------------------


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One random byte-level mutation of ``data``, with what it did."""
    n = len(data)
    kind = rng.choice(("flip", "truncate", "insert", "delete", "overwrite", "word", "dup"))
    at = rng.randrange(n) if n else 0
    if kind == "flip":
        flips = rng.randint(1, 8)
        out = bytearray(data)
        for _ in range(flips if n else 0):
            out[rng.randrange(n)] ^= rng.randint(1, 255)
        return f"flip {flips} bytes", bytes(out)
    if kind == "truncate":
        return f"truncate at {at}", data[:at]
    if kind == "insert":
        extra = rng.randbytes(rng.choice((1, 2, 8, 100)))
        return f"insert {len(extra)} at {at}", data[:at] + extra + data[at:]
    if kind == "delete":
        length = rng.choice((1, 8, 100))
        return f"delete {length} at {at}", data[:at] + data[at + length :]
    if kind == "overwrite":
        length = rng.choice((1, 4, 16))
        noise = rng.randbytes(length)
        return f"overwrite {length} at {at}", data[:at] + noise + data[at + length :]
    if kind == "word":  # a little-endian word set to an extreme value
        word = struct.pack("<Q", rng.choice(U64))[: rng.choice((1, 2, 4, 8))]
        return f"word {word.hex()} at {at}", data[:at] + word + data[at + len(word) :]
    piece = data[at : at + rng.choice((8, 64))]
    return f"duplicate {len(piece)} at {at}", data[:at] + piece + data[at:]


def _loads_or_is_refused(load, data: bytes, what: str) -> bool:
    """Whether ``load(data)`` loaded; raises AssertionError if it raised anything else."""
    try:
        load(data)
    except CiphertextError:
        return False
    except Exception as err:  # noqa: BLE001 - the failure this test looks for
        raise AssertionError(f"{what}: {type(err).__name__} escaped: {err}") from err
    return True


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckks():
    """A secret context, the server's public one, an honest upload, sum and download chunk."""
    secret = create_secret_context(CKKSParams())
    public = secret.copy()
    public.make_context_public()
    upload = CkksEncoder(secret, workers=1).encrypt(VALUES)[0]
    adder = CkksAdder(public)
    total = adder.encrypt_public(VALUES)[0]
    download = adder.download([total], 1)[0]
    return secret, public, upload, total, download


# ---- ciphertexts -------------------------------------------------------------------------


def test_the_honest_chunks_load_and_decrypt(ckks):
    secret, public, upload, total, download = ckks
    CkksAdder(public).check([upload])
    encoder = CkksEncoder(secret, workers=1)
    for chunk in (upload, total, download):
        assert np.abs(encoder._decrypt_exact([chunk], len(VALUES)) - VALUES).max() < 1e-9


def _words(chunk: bytes, at: int, word: int) -> bytes:
    """``chunk`` with the 8 bytes at ``at`` set to ``word`` (little-endian)."""
    return chunk[:at] + struct.pack("<Q", word) + chunk[at + 8 :]


def test_every_extreme_word_in_c0_is_refused_or_loads_and_any_seed_loads(ckks):
    """A c0 word past ceil(Q / 2^d) is refused; the seed's 64 bytes are any seed."""
    secret, public, upload, *_ = ckks
    adder = CkksAdder(public)
    high_words = len(upload) - 64 - 8  # the last 8 bytes of c0's high parts
    for at in (0, 8 * 4095, 8 * 4096, high_words):
        for word in U64:
            data = _words(upload, at, word)
            _loads_or_is_refused(lambda d: adder.check([d]), data, f"word {word} at {at}")
    with pytest.raises(CiphertextError, match="not below"):
        adder.check([b"\xff" * (len(upload) - 64) + upload[-64:]])
    for seed in (bytes(64), b"\xff" * 64, bytes(range(64))):
        adder.check([upload[:-64] + seed])
        CkksEncoder(secret, workers=1)._decrypt_exact([upload[:-64] + seed], len(VALUES))


@pytest.mark.parametrize("kind", ["upload", "sum", "download"])
def test_mutated_ciphertext_bytes_raise_only_ciphertext_error(ckks, kind):
    """2,000 byte-level mutations per kind of chunk, through the server's check (uploads)
    and the key holder's loader (every kind)."""
    secret, public, upload, total, download = ckks
    data = {"upload": upload, "sum": total, "download": download}[kind]
    adder, encoder = CkksAdder(public), CkksEncoder(secret, workers=1)
    rng = random.Random(f"{SEED}-{kind}")
    outcomes = {True: 0, False: 0}
    for trial in range(2000):
        what, mutated = mutate(data, rng)
        what = f"#{trial} {what}"
        loaded = _loads_or_is_refused(lambda d: load(encoder.formats, [d]), mutated, what)
        if kind == "upload":
            assert _loads_or_is_refused(lambda d: adder.check([d]), mutated, what) == loaded
        outcomes[loaded] += 1
    assert outcomes[False] > 800  # every change of length; none raised anything else


def test_sum_updates_reports_each_bad_upload_and_adds_the_others(ckks):
    """Mutated uploads between honest ones: only they are reported, the sum is of the rest."""
    secret, public, upload, total, download = ckks
    adder = CkksAdder(public)
    rng = random.Random(SEED)
    for trial in range(300):
        what, mutated = mutate(rng.choice((upload, total, download)), rng)
        sums, failed = adder.sum_updates([[upload], [mutated], [upload]], workers=1)
        assert set(failed) <= {1}, f"#{trial} {what}: {failed}"
        assert all(isinstance(reason, str) and reason for reason in failed.values())
        if trial % 50 == 0 and failed:
            exact = CkksEncoder(secret, workers=1)._decrypt_exact(sums, len(VALUES))
            assert np.abs(exact - 2 * VALUES).max() < 1e-9


def test_sum_range_rejects_an_upload_whatever_its_loader_raises(ckks, monkeypatch):
    """Every failure while loading or adding one upload rejects that upload only."""
    from lepton_flwr.he.packed import PackedSum

    _, public, upload, *_ = ckks
    adder = CkksAdder(public)
    honest_add = PackedSum.add

    def add(self, chunks):
        if list(chunks) == [b"boom"]:
            raise ValueError("math domain error")  # what log2(-1) raised
        return honest_add(self, chunks)

    monkeypatch.setattr(PackedSum, "add", add)
    sums, failed = adder.sum_range([[upload], [b"boom"], [upload]], 0, 1)
    assert list(failed) == [1] and "math domain error" in failed[1]
    assert len(sums) == 1


def _reply(model: EncryptedModel, count: int = 10) -> Message:
    incoming = client_message(ArrayRecord(), number=count)
    metrics = MetricRecord({"num-examples": count})
    return Message(RecordDict({"arrays": model.to_record(), "metrics": metrics}), reply_to=incoming)


def test_the_strategies_path_rejects_each_mutated_upload_naming_the_node(ckks, caplog):
    """EncryptedSum.add (both HE strategies): a mutation that does not load is one rejection;
    so is a sum or a download sent as an upload (its c1 is not a seed's expansion)."""
    caplog.set_level(logging.WARNING, logger="flwr")
    _, public, upload, total, download = ckks
    adder_sum = EncryptedSum(public, workers=1, name="Fuzz")
    manifest = [TensorSpec("w", (len(VALUES),), "float32")]
    own = fingerprint(public)
    rng = random.Random(SEED)
    rejected = 0
    for trial in range(60):
        what, mutated = mutate(upload, rng)
        if trial % 2 == 0:
            what, mutated = "not an upload", rng.choice((total, download))
        replies = [_reply(EncryptedModel(manifest, [c], 1.0, own, 1.0)) for c in (upload, mutated)]
        caplog.clear()
        accepted, _ = adder_sum.add(1, replies)
        assert replies[0] in accepted, f"#{trial} {what}"
        if replies[1] not in accepted:
            rejected += 1
            assert "Fuzz round 1: rejected the reply of node 1" in caplog.text, what
        else:
            assert what != "not an upload"
    assert rejected >= 30  # every chunk of another kind, and most byte mutations


# ---- headers -----------------------------------------------------------------------------


def _header() -> dict:
    manifest = [["conv.weight", [4, 1, 3, 3], "float32"], ["conv.bias", [4], "float32"]]
    manifest.append(["fc.weight", [2, 16], "float64"])
    return {
        "version": FORMAT_VERSION,
        "fingerprint": "ab" * 8,
        "weight": 12.5,
        "max_abs": 1250.0,
        "num_chunks": 1,
        "manifest": manifest,
        "summed": 1,
    }


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


HOSTILE_JSON = [
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1",
    "2147483648",
    "9223372036854775808",
    "1" + "0" * 400,  # beyond float's range
    "1" + "0" * 5000,  # beyond Python's limit on integer digits
    "1.5",
    "-0.0",
    "1e308",
    "1e999",
    "-1e999",
    "NaN",
    "Infinity",
    "-Infinity",
    '""',
    '"1"',
    '"float32"',
    '"' + "x" * 10000 + '"',
    "[]",
    "{}",
    "[[]]",
    "[1, 2, 3]",
    '[["w", [10], "float32"]]',
    '[["w", [10], "object"]]',
    '[["w", [-1], "float32"]]',
    '[["w", [1e400], "float32"]]',
    '[["w", [true], "float32"]]',
    '[["w", "12", "float32"]]',
    '[["w", [2147483647, 2147483647, 2147483647], "float32"]]',
    '[["w", [' + ", ".join(["2147483647"] * 5000) + '], "float32"]]',
    '{"a": {"b": {"c": []}}}',
    _deep(100),
    _deep(100000),  # deeper than Python's recursion limit
]


def _paths(value, prefix=()):
    """Every path into a JSON value (dict keys and list indexes)."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _replaced(text: str, path: tuple, new: str) -> str:
    """The JSON text with the value at ``path`` replaced by the JSON text ``new``."""
    marker = "\u2603MARK\u2603"
    header = json.loads(text)
    if not path:
        return new
    parent = header
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = marker
    return json.dumps(header).replace(json.dumps(marker), new)


def header_mutations(rng: random.Random, count: int, base: dict | None = None):
    """Mutations of a header's JSON text (``base``, or ``_header()``): of its fields, of
    its bytes, or both."""
    base = base or _header()
    text = json.dumps(base)
    paths = list(_paths(base))
    for _ in range(count):
        mutated, what = text, []
        for _ in range(rng.choice((1, 1, 2, 3))):
            choice = rng.random()
            if choice < 0.6:
                path = rng.choice(paths)
                new = rng.choice(HOSTILE_JSON)
                try:
                    mutated = _replaced(mutated, path, new)
                except (ValueError, KeyError, IndexError, TypeError, RecursionError):
                    continue  # an earlier mutation removed the path
                what.append(f"{path}={new[:30]}")
            elif choice < 0.7:  # a field removed, or one added
                try:
                    header = json.loads(mutated)
                except (ValueError, RecursionError):
                    continue
                if not isinstance(header, dict):
                    continue
                key = rng.choice([*base, "extra"])
                if key in header:
                    del header[key]
                else:
                    header[key] = 1
                mutated = json.dumps(header)
                what.append(f"toggle {key}")
            else:
                step, data = mutate(mutated.encode(), rng)
                mutated = data.decode("latin-1")
                what.append(step)
        yield ", ".join(what), mutated.encode("latin-1", errors="replace")


def _load_header(data: bytes) -> EncryptedModel:
    return EncryptedModel.from_header(parse_header(data), [b"chunk"])


def test_the_honest_header_loads():
    assert _load_header(json.dumps(_header()).encode()).num_values == 36 + 4 + 32


def test_mutated_headers_raise_only_ciphertext_error():
    """4,000 header mutations through parse_header and EncryptedModel.from_header."""
    rng = random.Random(SEED)
    outcomes = {True: 0, False: 0}
    for trial, (what, data) in enumerate(header_mutations(rng, 4000)):
        outcomes[_loads_or_is_refused(_load_header, data, f"#{trial} {what}")] += 1
    assert outcomes[False] > 2000 and outcomes[True] > 10


@pytest.mark.parametrize("new", HOSTILE_JSON)
def test_each_hostile_value_in_each_field_raises_only_ciphertext_error(new):
    """Every hostile JSON value at every place of the header, one at a time."""
    text = json.dumps(_header())
    for path in _paths(_header()):
        data = _replaced(text, path, new).encode()
        _loads_or_is_refused(_load_header, data, f"{path}={new[:40]}")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", True),
        ("weight", True),
        ("weight", "2.5"),
        ("max_abs", [1.0]),
        ("num_chunks", 1.0),
        ("num_chunks", "1"),
        ("fingerprint", 42),
        ("manifest", [["w", "12", "float32"]]),
        ("manifest", [["w", [True], "float32"]]),
        ("manifest", [["w", [3], "object"]]),
        ("manifest", [[3, [3], "float32"]]),
        ("manifest", [["w", [2] * 65, "float32"]]),
    ],
)
def test_a_field_of_another_type_is_refused_not_converted(field, value):
    """Before: True passed as version 1, "12" as the shape (1, 2), 1.0 as one chunk."""
    header = _header() | {field: value}
    with pytest.raises(CiphertextError):
        _load_header(json.dumps(header).encode())


def test_mutated_records_raise_only_ciphertext_error(ckks):
    """EncryptedModel.from_record (what the strategies call on every reply) under mutation."""
    _, _, upload, *_ = ckks
    model = EncryptedModel.from_header(_header() | {"num_chunks": 2}, [upload, upload])
    rng = random.Random(SEED)
    outcomes = {True: 0, False: 0}
    for trial, (what, header) in enumerate(header_mutations(rng, 1500, model.header())):
        record = model.to_record()
        arrays = dict(record.items())
        arrays[META_KEY] = type(arrays[META_KEY])(
            dtype="uint8", shape=(len(header),), stype=arrays[META_KEY].stype, data=header
        )
        structure = rng.choice(("none", "drop", "rename", "stype", "extra"))
        chunk_keys = [k for k in arrays if k != META_KEY]
        if structure == "drop":
            arrays.pop(rng.choice(chunk_keys))
        elif structure == "rename":
            arrays["ckks-99999"] = arrays.pop(rng.choice(chunk_keys))
        elif structure == "stype":
            key = rng.choice(list(arrays))
            old = arrays[key]
            arrays[key] = type(old)(dtype="uint8", shape=old.shape, stype="other", data=old.data)
        elif structure == "extra":
            arrays["zzz"] = arrays[chunk_keys[0]]
        record = ArrayRecord(arrays)
        what = f"#{trial} {what}, {structure}"
        outcomes[_loads_or_is_refused(EncryptedModel.from_record, record, what)] += 1
    assert outcomes[False] > 750 and outcomes[True] > 10


# ---- model files (zip) -------------------------------------------------------------------


def _zip_bytes(members: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _with_compression_method(data: bytes, method: int) -> bytes:
    """Every local and central entry claims another compression method (99: unknown)."""
    out = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        at = out.find(signature)
        while at != -1:
            out[at + offset : at + offset + 2] = struct.pack("<H", method)
            at = out.find(signature, at + 4)
    return bytes(out)


def _with_encryption_flag(data: bytes) -> bytes:
    out = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = out.find(signature)
        while at != -1:
            out[at + offset] |= 1
            at = out.find(signature, at + 4)
    return bytes(out)


def test_mutated_model_files_raise_only_ciphertext_error(tmp_path):
    """3,000 damaged zip files through load_encrypted, the model-file loader."""
    chunks = [bytes(range(256)) * 8, b"\x5e\xa1" * 512]
    model = EncryptedModel.from_header(_header() | {"num_chunks": 2}, chunks)
    honest = save_encrypted(model, tmp_path / "model.zip").read_bytes()
    assert load_encrypted(tmp_path / "model.zip").chunks == chunks
    members = {"header.json": _honest_header(model)}
    members |= {f"ckks-0000{i}.seal": chunk for i, chunk in enumerate(chunks)}
    methods = (zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)
    compressed = {method: _zip_bytes(members, method) for method in methods}
    cases = [("unknown method 99", _with_compression_method(honest, 99))]
    cases += [(f"method {m} on stored data", _with_compression_method(honest, m)) for m in methods]
    cases += [("encryption flag", _with_encryption_flag(honest))]
    for name in members:
        cases.append(
            (f"without {name}", _zip_bytes({k: v for k, v in members.items() if k != name}))
        )
    rng = random.Random(SEED)
    headers = header_mutations(rng, 3000, model.header())
    for trial in range(3000):
        kind = rng.choice(("bytes", "header", "compressed"))
        if kind == "bytes":
            what, data = mutate(honest, rng)
        elif kind == "header":
            what, header = next(headers)
            data = _zip_bytes(members | {"header.json": header})
        else:
            method = rng.choice(methods)
            what, data = mutate(compressed[method], rng)
            what = f"method {method}, {what}"
        cases.append((f"#{trial} {kind}: {what}", data))
    outcomes = {True: 0, False: 0}
    path = tmp_path / "mutated.zip"
    for what, data in cases:
        path.write_bytes(data)
        outcomes[_loads_or_is_refused(load_encrypted, path, what)] += 1
        path.unlink()  # a fresh file each time: truncating one is slow on some disks
    assert outcomes[False] > 1500


def _honest_header(model: EncryptedModel) -> bytes:
    return json.dumps(model.header()).encode()
