"""Encrypted models as Flower records: ciphertext Arrays plus a JSON header, and files."""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Array, ArrayRecord

from lepton_flwr.files import write_atomically
from lepton_flwr.he.codec import CiphertextError, TensorSpec
from lepton_flwr.numbers import is_int, real

CKKS_STYPE = "lepton.ckks"  # one packed CKKS ciphertext (lepton_flwr.he.codec: its kinds)
META_STYPE = "lepton.ckks-meta"  # the JSON header of an encrypted model
META_KEY = "ckks-meta"
# 3: packed ciphertexts (lepton_flwr.he.packed), N values each in complex slots, and
#    the count of uploads summed. Older versions are refused, not misread:
# 2: SEAL's serialized ciphertexts, N values each in complex slots;
# 1: SEAL's serialized ciphertexts, N/2 values each in the slots' real parts.
FORMAT_VERSION = 3
FORMATS = {
    1: "SEAL ciphertexts of N/2 values, in the real parts of the CKKS slots",
    2: "SEAL ciphertexts of N values, two to each complex CKKS slot",
    3: "packed ciphertexts of N values, two to each complex CKKS slot",
}
MAX_SUMMED_FIELD = 1 << 40  # far past what the flooding covers (publish.summed_limit)
MAX_HEADER_BYTES = 1 << 20  # 1 MiB: a manifest of ~20,000 tensors; refused unparsed beyond
MAX_CHUNK_BYTES = 1 << 24  # 16 MiB: far above a ciphertext at N = 32768 (about 4 MiB)
MAX_CHUNKS = 1 << 20  # a billion values at N = 4096
MAX_VALUES = 1 << 34  # values a manifest may describe (16 billion)
MAX_DIMS = 64  # numpy's limit on a tensor's dimensions
HEADER_FIELDS = (
    "version",
    "fingerprint",
    "weight",
    "max_abs",
    "num_chunks",
    "manifest",
    "summed",
)
# The dtypes a manifest may name: numpy's numeric types, as str(array.dtype) writes them.
NUMERIC_DTYPES = frozenset(
    ("bool", "float16", "float32", "float64", "int8", "int16", "int32", "int64")
    + ("uint8", "uint16", "uint32", "uint64")
)


def chunk_key(index: int) -> str:
    """Record key of the ``index``-th ciphertext."""
    return f"ckks-{index:05d}"


def _bytes_array(data: bytes, stype: str) -> Array:
    return Array(dtype="uint8", shape=(len(data),), stype=stype, data=data)


def is_encrypted(record: ArrayRecord) -> bool:
    """Whether an ArrayRecord holds an encrypted model rather than plaintext tensors."""
    return META_KEY in record


@dataclass
class EncryptedModel:
    """A model (or weighted update, or sum of updates) under CKKS.

    Attributes
    ----------
    manifest : list[TensorSpec]
        Names, shapes and dtypes of the tensors, in packing order.
    chunks : list[bytes]
        Packed ciphertexts, N values each (:mod:`lepton_flwr.he.codec`: uploads, sums
        or downloads).
    weight : float
        The weight the values are multiplied by (a client's own, or the sum of them):
        the model is ``decrypt(chunks) / weight``.
    fingerprint : str
        Fingerprint of the key the chunks are encrypted under.
    max_abs : float
        Bound on the magnitude of the encrypted values (added up when sums are taken),
        checked against the CKKS headroom.
    summed : int
        Uploads and public-key encryptions summed in the chunks (1 for an upload): the
        server counts them against what the flooding covers
        (:func:`lepton_flwr.he.publish.check_summed`). The server counts a client's
        upload as one, whatever its header says.
    """

    manifest: list[TensorSpec]
    chunks: list[bytes]
    weight: float
    fingerprint: str
    max_abs: float
    summed: int = 1

    @property
    def num_values(self) -> int:
        """Number of model values packed into the chunks."""
        return sum(spec.size for spec in self.manifest)

    def header(self) -> dict:
        """The JSON-able header (everything but the ciphertexts)."""
        return {
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "weight": self.weight,
            "max_abs": self.max_abs,
            "num_chunks": len(self.chunks),
            "manifest": [[s.name, list(s.shape), s.dtype] for s in self.manifest],
            "summed": self.summed,
        }

    def to_record(self) -> ArrayRecord:
        """Pack into an ArrayRecord: the header and one raw-bytes Array per ciphertext."""
        arrays = {META_KEY: _bytes_array(json.dumps(self.header()).encode(), META_STYPE)}
        for i, chunk in enumerate(self.chunks):
            arrays[chunk_key(i)] = _bytes_array(chunk, CKKS_STYPE)
        return ArrayRecord(arrays)

    @classmethod
    def from_header(cls, header: dict, chunks: list[bytes]) -> EncryptedModel:
        """Rebuild from a header and chunks, checking every field's type and range.

        Raises
        ------
        CiphertextError
            If a field is missing, of another type (a bool, a string or a list where a
            number is expected), out of range, or the chunk count disagrees.
        """
        if not isinstance(header, dict):
            raise CiphertextError(f"header is a {type(header).__name__}, not an object")
        version = header.get("version")
        if "version" in header and not (is_int(version) and version == FORMAT_VERSION):
            raise CiphertextError(_unsupported(version))  # before the fields it may lack
        missing = [key for key in HEADER_FIELDS if key not in header]
        if missing:
            raise _malformed(f"no {', '.join(missing)}")
        fingerprint = header["fingerprint"]
        if not isinstance(fingerprint, str):
            raise _malformed(_wrong_type("fingerprint", "a string", fingerprint))
        weight, max_abs = _number(header, "weight"), _number(header, "max_abs")
        if not (math.isfinite(weight) and weight > 0):
            raise CiphertextError(f"weight must be finite and > 0, got {weight}")
        if not (math.isfinite(max_abs) and max_abs >= 0):
            raise CiphertextError(f"max_abs must be finite and >= 0, got {max_abs}")
        num_chunks = header["num_chunks"]
        if not is_int(num_chunks):
            raise _malformed(_wrong_type("num_chunks", "an integer", num_chunks))
        if num_chunks != len(chunks):
            raise CiphertextError(
                f"header announces {str(num_chunks)[:30]} chunks, {len(chunks)} arrived"
            )
        summed = header["summed"]
        if not is_int(summed):
            raise _malformed(_wrong_type("summed", "an integer", summed))
        if not 1 <= summed <= MAX_SUMMED_FIELD:
            raise CiphertextError(f"summed must be in 1..{MAX_SUMMED_FIELD}, got {summed}")
        manifest = _manifest(header["manifest"])
        return cls(manifest, chunks, weight, fingerprint, max_abs, summed)

    @classmethod
    def from_record(cls, record: ArrayRecord) -> EncryptedModel:
        """Unpack an ArrayRecord made by :meth:`to_record`.

        Raises
        ------
        CiphertextError
            For plaintext tensors where ciphertexts are expected, a malformed header,
            Arrays of the wrong kind, or missing or extra chunks.
        """
        if not is_encrypted(record):
            raise CiphertextError(
                "plaintext reply where a ciphertext is expected "
                f"(arrays {list(record.keys())[:3]}... carry no '{META_KEY}')"
            )
        meta = record[META_KEY]
        if meta.stype != META_STYPE:
            raise CiphertextError(f"'{META_KEY}' has stype '{meta.stype}', expected '{META_STYPE}'")
        header = parse_header(meta.data)
        keys = [k for k in record.keys() if k != META_KEY]
        expected = [chunk_key(i) for i in range(len(keys))]
        if sorted(keys) != expected:
            raise CiphertextError(
                f"chunk keys {sorted(keys)[:3]}... are not ckks-00000..ckks-{len(keys) - 1:05d}"
            )
        wrong = [k for k in expected if record[k].stype != CKKS_STYPE]
        if wrong:
            raise CiphertextError(
                f"arrays {wrong[:3]} are not ciphertexts (stype '{record[wrong[0]].stype}')"
            )
        return cls.from_header(header, [record[k].data for k in expected])


def _unsupported(version: object) -> str:
    """Why an encrypted model of another format version is refused, naming both formats."""
    ours = f"this lepton-flwr reads format {FORMAT_VERSION} only ({FORMATS[FORMAT_VERSION]})"
    if is_int(version) and version in FORMATS:
        return (
            f"encrypted model of format version {version} ({FORMATS[version]}): {ours}, "
            f"and would misread it; decrypt it with the lepton-flwr release that wrote it, "
            f"or start the run again"
        )
    return f"unsupported format version {str(version)[:30]}: {ours}"


def _malformed(reason: str) -> CiphertextError:
    return CiphertextError(f"malformed ciphertext header ({reason})")


def _wrong_type(field: str, expected: str, value: object) -> str:
    return f"'{field}' must be {expected}, got {type(value).__name__}"


def _number(header: dict, field: str) -> float:
    """A header field that must be a number (int or float, not a bool), as a float."""
    value = header[field]
    try:
        number = real(value)
    except OverflowError:  # an integer past float's range
        raise _malformed(f"'{field}' is out of range") from None
    if number is None:
        raise _malformed(_wrong_type(field, "a number", value))
    return number


def _manifest(entries: object) -> list[TensorSpec]:
    """The header's manifest: [name, shape, dtype] per tensor, every field checked.

    Names are strings, shapes lists of integers in [0, 2^31) whose product, a zero
    counted as one, is at most ``MAX_VALUES`` (numpy builds no larger array, even an
    empty one), dtypes numeric numpy dtype names, and the tensors hold at most
    ``MAX_VALUES`` values together.
    """
    if not isinstance(entries, list):
        raise _malformed(_wrong_type("manifest", "a list", entries))
    manifest, total = [], 0
    for index, entry in enumerate(entries):
        if not (isinstance(entry, list) and len(entry) == 3):
            raise _malformed(f"manifest entry {index} is not [name, shape, dtype]")
        name, shape, dtype = entry
        if not (isinstance(name, str) and isinstance(shape, list) and isinstance(dtype, str)):
            raise _malformed(f"manifest entry {index} is not [name, shape, dtype]")
        if len(shape) > MAX_DIMS or not all(is_int(d) and 0 <= d < 2**31 for d in shape):
            raise _malformed(f"manifest entry {index}: shape out of range")
        if math.prod(max(d, 1) for d in shape) > MAX_VALUES:  # numpy builds no such array,
            raise _malformed(f"manifest entry {index}: shape out of range")  # even empty
        if dtype not in NUMERIC_DTYPES:
            raise _malformed(f"manifest entry {index}: dtype {dtype[:30]!r} is not numeric")
        spec = TensorSpec(name, tuple(shape), dtype)
        total += spec.size  # at most 64 factors below 2^31: cheap whatever the values
        if total > MAX_VALUES:
            raise _malformed(f"the manifest describes more than {MAX_VALUES} values")
        manifest.append(spec)
    return manifest


def parse_header(data: bytes) -> dict:
    """Parse a header's JSON, refusing oversized or malformed input before it costs much.

    Raises
    ------
    CiphertextError
        If it is over ``MAX_HEADER_BYTES``, not JSON, not an object, holds an integer
        too long to convert (Python's limit, 4,300 digits) or nests too deep.
    """
    if len(data) > MAX_HEADER_BYTES:
        raise CiphertextError(f"header of {len(data)} bytes, over the {MAX_HEADER_BYTES} allowed")
    try:
        header = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        # JSONDecodeError, Python's limit on integer digits, and arrays nested too deep
        raise CiphertextError(f"malformed ciphertext header ({err})"[:300]) from err
    if not isinstance(header, dict):
        raise CiphertextError(f"header is a {type(header).__name__}, not an object")
    return header


def save_encrypted(model: EncryptedModel, path: str | Path) -> Path:
    """Write an encrypted model to a zip file: ``header.json`` and one file per chunk.

    Written atomically: a link planted at ``path`` is replaced, never written through.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("header.json", json.dumps(model.header(), indent=1))
        for i, chunk in enumerate(model.chunks):
            archive.writestr(f"{chunk_key(i)}.seal", chunk)
    return write_atomically(path, buffer.getvalue(), 0o644)


def load_encrypted(path: str | Path) -> EncryptedModel:
    """Read a file written by :func:`save_encrypted`, refusing what does not fit the format.

    Raises
    ------
    CiphertextError
        Naming the file and the reason: not a zip (or a damaged one), a missing or
        oversized member, a malformed header (:meth:`EncryptedModel.from_header`), a
        header that announces chunks the file lacks, or more than ``MAX_CHUNKS``; never
        another exception, whatever the file holds.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            header = parse_header(_member(archive, "header.json", MAX_HEADER_BYTES))
            count = header.get("num_chunks")
            if not isinstance(count, int) or not 0 <= count <= MAX_CHUNKS:
                raise CiphertextError(f"num_chunks {str(count)[:30]} is not in 0..{MAX_CHUNKS}")
            chunks = [
                _member(archive, f"{chunk_key(i)}.seal", MAX_CHUNK_BYTES) for i in range(count)
            ]
    except CiphertextError as err:
        raise CiphertextError(f"{path}: {err}") from err
    except Exception as err:  # noqa: BLE001 - zipfile raises many kinds on a damaged file
        raise CiphertextError(f"{path}: not a readable encrypted model ({err!r})"[:300]) from err
    try:
        return EncryptedModel.from_header(header, chunks)
    except CiphertextError as err:
        raise CiphertextError(f"{path}: {err}") from err


def _member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """One member's bytes, checked against ``limit`` before and while reading (zip bombs).

    Only members stored whole are read (:func:`save_encrypted` compresses none): what is
    read never exceeds the file's own size, however many members it has.
    """
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CiphertextError(f"the file has no '{name}'") from None
    if info.file_size > limit:
        raise CiphertextError(f"'{name}' holds {info.file_size} bytes, over the {limit} allowed")
    if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
        raise CiphertextError(f"'{name}' is compressed; encrypted model files store members")
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise CiphertextError(f"'{name}' expands past the {limit} bytes allowed")
    return data
