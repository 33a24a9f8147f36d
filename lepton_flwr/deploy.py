"""The files of a secure deployment: a CA, the SuperLink's TLS certificate, SuperNode keys.

``lepton-flwr certs --out <folder> --host <name or IP> ...`` makes a certificate
authority and, signed by it, the SuperLink's TLS certificate for those hosts;
``lepton-flwr node-key --out <folder> --name <node>`` makes one SuperNode's
authentication key pair (ECDSA P-384 in OpenSSH format, what Flower's
``--auth-supernode-private-key`` and ``flwr supernode register`` read). Private keys
are written atomically with mode 600. Who holds what:

===========================  ===============================================
file                         held by
===========================  ===============================================
``ca.crt``                   everyone (SuperLink, SuperNodes, ``flwr`` CLI)
``ca.key``                   whoever signs certificates; offline, never sent
``superlink.crt/.key``       the SuperLink only
``<node>.key``               that SuperNode only
``<node>.pub``               the SuperLink's operator (``flwr supernode register``)
===========================  ===============================================
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lepton_flwr.files import write_atomically

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SUPERLINK_CERT, SUPERLINK_KEY = "superlink.crt", "superlink.key"


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name | None,
    signing_key: ec.EllipticCurvePrivateKey,
    days: int,
    hosts: list[str] | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    if hosts is None:  # the CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
    return builder.sign(signing_key, hashes.SHA384())


def make_certificates(folder: str | Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """Make a CA (or reuse the one in ``folder``) and the SuperLink's certificate for ``hosts``.

    Parameters
    ----------
    folder : str | Path
        Where ``ca.crt``, ``ca.key``, ``superlink.crt`` and ``superlink.key`` go.
    hosts : list[str]
        Names and IP addresses the SuperNodes and the CLI reach the SuperLink at.
    days : int
        Validity.

    Returns
    -------
    dict[str, Path]
        The four files by name.

    Raises
    ------
    ValueError
        If no host is given.
    """
    if not hosts:
        raise ValueError("give the SuperLink's host names or IP addresses (--host)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / CA_CERT).is_file() and (folder / CA_KEY).is_file():
        ca_key = serialization.load_pem_private_key((folder / CA_KEY).read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((folder / CA_CERT).read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_cert = _certificate("lepton-flwr CA", ca_key.public_key(), None, ca_key, days)
        write_atomically(folder / CA_KEY, _pem_key(ca_key), 0o600)
        write_atomically(folder / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    link_key = ec.generate_private_key(ec.SECP384R1())
    link_cert = _certificate(
        hosts[0], link_key.public_key(), ca_cert.subject, ca_key, days, hosts=hosts
    )
    write_atomically(folder / SUPERLINK_KEY, _pem_key(link_key), 0o600)
    write_atomically(
        folder / SUPERLINK_CERT, link_cert.public_bytes(serialization.Encoding.PEM), 0o644
    )
    return {name: folder / name for name in (CA_CERT, CA_KEY, SUPERLINK_CERT, SUPERLINK_KEY)}


def make_node_key(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Make a SuperNode's authentication key pair: ``<name>.key`` (600) and ``<name>.pub``."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"node name {name!r}: use letters, digits and dashes")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    write_atomically(folder / f"{name}.key", private, 0o600)
    write_atomically(folder / f"{name}.pub", public + b"\n", 0o644)
    return folder / f"{name}.key", folder / f"{name}.pub"


def connection_toml(name: str, address: str, ca_cert: str | Path) -> str:
    """The ``$FLWR_HOME/config.toml`` entry that lets ``flwr`` reach the SuperLink over TLS."""
    return (
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
        f'root-certificates = "{Path(ca_cert).resolve()}"\n'
    )
