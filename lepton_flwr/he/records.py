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
        except (KeyError, TypeError, ValueError) as err:
            raise CiphertextError(f"malformed ciphertext header ({err!r})") from err
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
        try:
            header = json.loads(meta.data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CiphertextError(f"malformed ciphertext header ({err})") from err
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


def save_encrypted(model: EncryptedModel, path: str | Path) -> Path:
    """Write an encrypted model to a zip file: ``header.json`` and one file per chunk."""
    path = Path(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("header.json", json.dumps(model.header(), indent=1))
        for i, chunk in enumerate(model.chunks):
            archive.writestr(f"{chunk_key(i)}.seal", chunk)
    return path


def load_encrypted(path: str | Path) -> EncryptedModel:
    """Read a file written by :func:`save_encrypted`."""
    with zipfile.ZipFile(path) as archive:
        header = json.loads(archive.read("header.json"))
        chunks = [archive.read(f"{chunk_key(i)}.seal") for i in range(int(header["num_chunks"]))]
    return EncryptedModel.from_header(header, chunks)
