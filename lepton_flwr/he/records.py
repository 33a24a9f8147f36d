"""Encrypted models as Flower records: ciphertext Arrays plus a JSON header, and files."""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Array, ArrayRecord

from lepton_flwr.he.codec import CiphertextError, TensorSpec

CKKS_STYPE = "lepton.ckks"  # one serialized CKKS ciphertext (seeded or full)
META_STYPE = "lepton.ckks-meta"  # the JSON header of an encrypted model
META_KEY = "ckks-meta"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # 1 MiB: a manifest of ~20,000 tensors; refused unparsed beyond
MAX_CHUNK_BYTES = 1 << 24  # 16 MiB: far above a ciphertext at N = 32768 (about 4 MiB)
MAX_CHUNKS = 1 << 20  # a billion values at N = 4096
MAX_VALUES = 1 << 34  # values a manifest may describe (16 billion)


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
        Serialized ciphertexts, N/2 values each.
    weight : float
        The weight the values are multiplied by (a client's own, or the sum of them):
        the model is ``decrypt(chunks) / weight``.
    fingerprint : str
        Fingerprint of the key the chunks are encrypted under.
    max_abs : float
        Bound on the magnitude of the encrypted values (added up when sums are taken),
        checked against the CKKS headroom.
    """

    manifest: list[TensorSpec]
    chunks: list[bytes]
    weight: float
    fingerprint: str
    max_abs: float

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
        }

    def to_record(self) -> ArrayRecord:
        """Pack into an ArrayRecord: the header and one raw-bytes Array per ciphertext."""
        arrays = {META_KEY: _bytes_array(json.dumps(self.header()).encode(), META_STYPE)}
        for i, chunk in enumerate(self.chunks):
            arrays[chunk_key(i)] = _bytes_array(chunk, CKKS_STYPE)
        return ArrayRecord(arrays)

    @classmethod
    def from_header(cls, header: dict, chunks: list[bytes]) -> EncryptedModel:
        """Rebuild from a header and chunks, checking the header's fields.

        Raises
        ------
        CiphertextError
            If a field is missing or malformed, or the chunk count disagrees.
        """
        try:
            if header["version"] != FORMAT_VERSION:
                raise CiphertextError(f"unsupported format version {header['version']}")
            manifest = [
                TensorSpec(str(n), tuple(int(d) for d in shape), str(dt))
                for n, shape, dt in header["manifest"]
            ]
            weight, max_abs = float(header["weight"]), float(header["max_abs"])
            fingerprint, num_chunks = str(header["fingerprint"]), int(header["num_chunks"])
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise CiphertextError(f"malformed ciphertext header ({err!r})"[:300]) from err
        if any(not 0 <= d < 2**31 for spec in manifest for d in spec.shape) or (
            sum(spec.size for spec in manifest) > MAX_VALUES
        ):
            raise CiphertextError("manifest shapes out of range (malformed header)")
        if not (math.isfinite(weight) and weight > 0):
            raise CiphertextError(f"weight must be finite and > 0, got {weight}")
        if not (math.isfinite(max_abs) and max_abs >= 0):
            raise CiphertextError(f"max_abs must be finite and >= 0, got {max_abs}")
        if num_chunks != len(chunks):
            raise CiphertextError(f"header announces {num_chunks} chunks, {len(chunks)} arrived")
        return cls(manifest, chunks, weight, fingerprint, max_abs)

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


def parse_header(data: bytes) -> dict:
    """Parse a header's JSON, refusing oversized or malformed input before it costs much.

    Raises
    ------
    CiphertextError
        If it is over ``MAX_HEADER_BYTES``, not JSON, not an object, or holds an integer
        too long to convert (Python's limit, 4,300 digits).
    """
    if len(data) > MAX_HEADER_BYTES:
        raise CiphertextError(f"header of {len(data)} bytes, over the {MAX_HEADER_BYTES} allowed")
    try:
        header = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, and int digits limit
        raise CiphertextError(f"malformed ciphertext header ({err})"[:300]) from err
    if not isinstance(header, dict):
        raise CiphertextError(f"header is a {type(header).__name__}, not an object")
    return header


def save_encrypted(model: EncryptedModel, path: str | Path) -> Path:
    """Write an encrypted model to a zip file: ``header.json`` and one file per chunk."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("header.json", json.dumps(model.header(), indent=1))
        for i, chunk in enumerate(model.chunks):
            archive.writestr(f"{chunk_key(i)}.seal", chunk)
    return path


def load_encrypted(path: str | Path) -> EncryptedModel:
    """Read a file written by :func:`save_encrypted`, refusing what does not fit the format.

    Raises
    ------
    CiphertextError
        Naming the file and the reason: not a zip, a missing or oversized member, a
        header that announces chunks the file lacks, or more than ``MAX_CHUNKS``.
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
    except (zipfile.BadZipFile, OSError) as err:
        raise CiphertextError(f"{path}: not a readable encrypted model ({err})") from err
    except CiphertextError as err:
        raise CiphertextError(f"{path}: {err}") from err
    return EncryptedModel.from_header(header, chunks)


def _member(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """One member's bytes, checked against ``limit`` before and while reading (zip bombs)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise CiphertextError(f"the file has no '{name}'") from None
    if info.file_size > limit:
        raise CiphertextError(f"'{name}' holds {info.file_size} bytes, over the {limit} allowed")
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise CiphertextError(f"'{name}' expands past the {limit} bytes allowed")
    return data
