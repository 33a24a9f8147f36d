"""Fuzz every loader a reply or a model file reaches: only ``CiphertextError`` escapes.

Issue 18, item 3: a ciphertext whose scale field was -1 raised a ``ValueError`` while the
server formatted it, and ended the run. Here thousands of seeded mutations of each input
go through its loader: ciphertexts (byte flips, truncations, insertions on seeded and
full ciphertexts, and every field of SEAL's serialization set to hostile values),
encrypted-model headers (bytes, and JSON fields of other types, nested, huge, negative,
NaN), and the zip files ``load_encrypted`` reads. A mutation either loads or raises
``CiphertextError``; any other exception fails the test with the mutation that caused
it. A sample also goes through the strategies' path (``EncryptedSum.add``), where a
mutation that does not load is a rejected reply naming its node.

SEAL writes ciphertexts compressed (zstd); its loader also reads uncompressed ones, whose
layout :func:`uncompressed` writes (checked by decrypting it): the field mutations
address that layout.
"""

import io
import json
import logging
import math
import random
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tenseal.sealapi as sealapi
from conftest import ciphertext_with_scale, client_message
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from lepton_flwr.strategies.encrypted_sum import EncryptedSum

from lepton_flwr.he import CKKSParams
from lepton_flwr.he.codec import CiphertextError, CkksAdder, CkksEncoder, TensorSpec
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

# ---- SEAL's serialization (SEAL 4, as TenSEAL builds it) -------------------------------
# Header (16 bytes): magic 0xA15E, header size 16, version major, minor, compression
# mode (0 none, 1 zlib, 2 zstd), 2 reserved bytes, total size (uint64).
# Ciphertext members: parms_id (4 x uint64), NTT form (1 byte), size (polynomials),
# poly_modulus_degree, coeff_modulus_size (uint64 each), scale (double), correction
# factor (uint64); then its coefficients as a DynArray: a header of its own, a count
# (uint64) and the values (uint64 each).
SEAL_MAGIC = b"\x5e\xa1"
HEADER = struct.Struct("<2sBBBBHQ")
MEMBERS = struct.Struct("<4QBQQQdQ")
FIELDS = {  # field: (offset in an uncompressed ciphertext, struct format)
    "header-size": (2, "<B"),
    "version-major": (3, "<B"),
    "compression": (5, "<B"),
    "total-size": (8, "<Q"),
    "parms-id": (16, "<4Q"),
    "ntt-form": (48, "<B"),
    "size": (49, "<Q"),
    "poly-modulus-degree": (57, "<Q"),
    "coeff-modulus-size": (65, "<Q"),
    "scale": (73, "<d"),
    "correction-factor": (81, "<Q"),
    "array-total-size": (HEADER.size + MEMBERS.size + 8, "<Q"),
    "array-count": (2 * HEADER.size + MEMBERS.size, "<Q"),
}
U64 = (0, 1, 2, 3, 2**31, 2**32 + 2, 2**63, 2**64 - 1)
HOSTILE = {
    "header-size": (0, 15, 17, 255),
    "version-major": (0, 3, 5, 255),
    "compression": (0, 1, 2, 3, 128, 255),
    "total-size": U64,
    "ntt-form": (0, 2, 255),
    "size": U64,
    "poly-modulus-degree": (*U64, 2048, 8192),
    "coeff-modulus-size": U64,
    "scale": (-1.0, 0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, 5e-324, 2.0**57),
    "correction-factor": U64,
    "array-total-size": U64,
    "array-count": U64,
}


def uncompressed(chunk: bytes, seal_context) -> bytes:
    """The ciphertext serialized without compression, field by field (layout above)."""
    ciphertext = sealapi.Ciphertext(seal_context)
    with tempfile.TemporaryDirectory() as folder:  # SEAL's binding loads from files only
        path = Path(folder) / "ciphertext"
        path.write_bytes(chunk)
        ciphertext.load(seal_context, str(path))
    coefficients = ciphertext.dyn_array()
    data = np.array([coefficients[i] for i in range(coefficients.size())], dtype=np.uint64)
    members = MEMBERS.pack(
        *ciphertext.parms_id(),
        int(ciphertext.is_ntt_form()),
        ciphertext.size(),
        ciphertext.poly_modulus_degree(),
        ciphertext.coeff_modulus_size(),
        ciphertext.scale,
        1,  # CKKS keeps the correction factor at 1
    )
    array = struct.pack("<Q", data.size) + data.tobytes()
    members += _seal_header(len(array)) + array
    return _seal_header(len(members)) + members


def _seal_header(length: int) -> bytes:
    return HEADER.pack(SEAL_MAGIC, HEADER.size, 4, 3, 0, 0, HEADER.size + length)


def with_field(data: bytes, field: str, *value) -> bytes:
    """An uncompressed ciphertext with one field set."""
    offset, fmt = FIELDS[field]
    packed = struct.pack(fmt, *value)
    return data[:offset] + packed + data[offset + len(packed) :]


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
    """A secret context, the server's public one, and honest seeded and full chunks."""
    secret = create_secret_context(CKKSParams())
    public = secret.copy()
    public.make_context_public()
    seeded = CkksEncoder(secret, workers=1).encrypt(VALUES)[0]
    full = CkksEncoder(secret, workers=1, seeded=False).encrypt(VALUES)[0]
    raw = uncompressed(full, public.seal_context().data)
    return secret, public, seeded, full, raw


def test_the_uncompressed_layout_is_what_seal_reads(ckks):
    """The layout the field mutations address: it loads and decrypts to the values."""
    secret, public, _, full, raw = ckks
    CkksAdder(public).load([raw])
    decrypted = CkksEncoder(secret, workers=1)._decrypt_exact([raw], len(VALUES))
    assert np.abs(decrypted - VALUES).max() < 1e-9
    assert struct.unpack_from("<d", raw, FIELDS["scale"][0])[0] == public.global_scale


# ---- ciphertexts -------------------------------------------------------------------------


@pytest.mark.parametrize("field", sorted(HOSTILE))
def test_every_hostile_field_value_is_refused_or_loads(ckks, field):
    """Each field of SEAL's ciphertext set to hostile values: only CiphertextError escapes.

    Every other scale or size, and a ciphertext out of NTT form, are refused (another
    nonzero NTT byte reads as 1)."""
    _, public, *_, raw = ckks
    adder = CkksAdder(public)
    offset, fmt = FIELDS[field]
    honest = struct.unpack_from(fmt, raw, offset)
    for value in HOSTILE[field]:
        if (value,) == honest:
            continue
        data = with_field(raw, field, value)
        loaded = _loads_or_is_refused(lambda d: adder.load([d]), data, f"{field}={value}")
        if field in ("scale", "size") or (field, value) == ("ntt-form", 0):
            assert not loaded, f"{field}={value} was accepted"


def test_a_scale_set_through_seal_is_refused(ckks):
    """The review's attack: no key needed, it used to end the run with a ValueError."""
    _, public, seeded, full, _ = ckks
    adder = CkksAdder(public)
    for chunk in (seeded, full):
        with pytest.raises(CiphertextError, match="scale -1,"):
            adder.load([ciphertext_with_scale(chunk, public, -1.0)])
        for scale in (0.0, -0.0, math.nan, math.inf, -math.inf, 1e300, 2.0**57):
            with pytest.raises(CiphertextError):  # SEAL's loader refuses some itself
                adder.load([ciphertext_with_scale(chunk, public, scale)])


def test_parms_id_of_another_level_or_random_is_refused(ckks):
    _, public, *_, raw = ckks
    adder = CkksAdder(public)
    seal = public.seal_context().data
    next_level = seal.first_context_data().next_context_data().parms_id()
    rng = random.Random(SEED)
    candidates = [next_level, seal.key_parms_id(), [0, 0, 0, 0]]
    candidates += [[rng.getrandbits(64) for _ in range(4)] for _ in range(20)]
    for parms_id in candidates:
        data = with_field(raw, "parms-id", *parms_id)
        assert not _loads_or_is_refused(lambda d: adder.load([d]), data, f"parms_id {parms_id}")


@pytest.mark.parametrize("form", ["seeded", "full", "uncompressed"])
def test_mutated_ciphertext_bytes_raise_only_ciphertext_error(ckks, form):
    """2,000 byte-level mutations (and one field set at random) per form of ciphertext."""
    _, public, seeded, full, raw = ckks
    data = {"seeded": seeded, "full": full, "uncompressed": raw}[form]
    adder = CkksAdder(public)
    rng = random.Random(f"{SEED}-{form}")
    outcomes = {True: 0, False: 0}
    for trial in range(2000):
        what, mutated = mutate(data, rng)
        if rng.random() < 0.5:  # and a header field (the body is compressed but for raw)
            field = rng.choice(["header-size", "compression", "total-size", "version-major"])
            if form == "uncompressed":
                field = rng.choice(sorted(HOSTILE))
            value = rng.choice(HOSTILE[field])
            what += f", {field}={value}"
            mutated = with_field(mutated, field, value) if len(mutated) > 100 else mutated
        loaded = _loads_or_is_refused(lambda d: adder.load([d]), mutated, f"#{trial} {what}")
        outcomes[loaded] += 1
    assert outcomes[False] > 1000  # most mutations are refused; none raised anything else


def test_sum_updates_reports_each_bad_upload_and_adds_the_others(ckks):
    """Mutated uploads between honest ones: only they are reported, the sum is of the rest."""
    secret, public, seeded, full, raw = ckks
    adder = CkksAdder(public)
    rng = random.Random(SEED)
    for trial in range(300):
        what, mutated = mutate(rng.choice((seeded, full, raw)), rng)
        if trial % 3 == 0:
            field = rng.choice(sorted(HOSTILE))
            value = rng.choice(HOSTILE[field])
            what, mutated = f"{field}={value}", with_field(raw, field, value)
        sums, failed = adder.sum_updates([[seeded], [mutated], [full]], workers=1)
        assert set(failed) <= {1}, f"#{trial} {what}: {failed}"
        assert all(isinstance(reason, str) and reason for reason in failed.values())
        if trial % 50 == 0 and failed:
            exact = CkksEncoder(secret, workers=1)._decrypt_exact(sums, len(VALUES))
            assert np.abs(exact - 2 * VALUES).max() < 1e-9


def test_sum_range_rejects_an_upload_whatever_its_loader_raises(ckks, monkeypatch):
    """Every failure while loading or adding one upload rejects that upload only."""
    _, public, seeded, full, _ = ckks
    adder = CkksAdder(public)
    honest_load = adder.load

    def load(chunks):
        if chunks == [b"boom"]:
            raise ValueError("math domain error")  # what log2(-1) raised
        return honest_load(chunks)

    monkeypatch.setattr(adder, "load", load)
    sums, failed = adder.sum_range([[seeded], [b"boom"], [full]], 0, 1)
    assert list(failed) == [1] and "math domain error" in failed[1]
    assert len(sums) == 1


def _reply(model: EncryptedModel, count: int = 10) -> Message:
    incoming = client_message(ArrayRecord(), number=count)
    metrics = MetricRecord({"num-examples": count})
    return Message(RecordDict({"arrays": model.to_record(), "metrics": metrics}), reply_to=incoming)


def test_the_strategies_path_rejects_each_mutated_upload_naming_the_node(ckks, caplog):
    """EncryptedSum.add (both HE strategies): a mutation that does not load is one rejection."""
    caplog.set_level(logging.WARNING, logger="flwr")
    _, public, seeded, full, raw = ckks
    adder_sum = EncryptedSum(public, workers=1, name="Fuzz")
    manifest = [TensorSpec("w", (len(VALUES),), "float32")]
    own = fingerprint(public)
    rng = random.Random(SEED)
    rejected = 0
    for trial in range(60):
        what, mutated = mutate(rng.choice((seeded, full, raw)), rng)
        if trial % 2 == 0:
            mutated = ciphertext_with_scale(full, public, rng.choice(HOSTILE["scale"]))
            what = "scale"
        replies = [_reply(EncryptedModel(manifest, [c], 1.0, own, 1.0)) for c in (seeded, mutated)]
        caplog.clear()
        accepted, total = adder_sum.add(1, replies)
        assert replies[0] in accepted, f"#{trial} {what}"
        if replies[1] not in accepted:
            rejected += 1
            assert "Fuzz round 1: rejected the reply of node 1" in caplog.text, what
    assert rejected >= 30  # every scale forgery, and most byte mutations


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
    *_, full, _ = ckks
    model = EncryptedModel.from_header(_header() | {"num_chunks": 2}, [full, full])
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
