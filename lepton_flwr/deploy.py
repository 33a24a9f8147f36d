"""The files of a secure deployment: a CA, the SuperLink's TLS certificate, SuperNode keys.

``lepton-flwr certs --out <folder> --host <name or IP> ... [--ca-dir <folder>]`` makes a
certificate authority (or reuses the one in the CA folder) and, signed by it, the
SuperLink's TLS certificate for those hosts; ``lepton-flwr node-key --out <folder>
--name <node>`` makes one SuperNode's authentication key pair (ECDSA P-384 in OpenSSH
format, what Flower's ``--auth-supernode-private-key`` and ``flwr supernode register``
read). Private keys are written atomically with mode 600. The CA key never goes into the
SuperLink's folder (``--out``): it goes into the CA folder, by default ``<out>-ca`` next
to it. Who holds what:

=================================  ===============================================
file                               held by
=================================  ===============================================
``<out>/ca.crt``                   everyone (SuperLink, SuperNodes, ``flwr`` CLI)
``<out>/superlink.crt/.key``       the SuperLink only (``deploy/superlink.sh <out>``)
``<ca-dir>/ca.key``                whoever signs certificates; offline, never sent
``<node>.key``                     that SuperNode only
``<node>.pub``                     the SuperLink's operator (``flwr supernode register``)
=================================  ===============================================
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shlex
import stat
from pathlib import Path
from typing import BinaryIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lepton_flwr.files import UnsafeFileError, open_regular, write_atomically

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SUPERLINK_CERT, SUPERLINK_KEY = "superlink.crt", "superlink.key"
MAX_KEY_BYTES = 1 << 16  # a PEM or OpenSSH key is a few hundred bytes
MAX_DAYS = 3650
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def open_private_file(path: str | Path, what: str) -> BinaryIO:
    """Open a private key file for reading, if only its owner has access and it is no link.

    The file is opened without following a link (``O_NOFOLLOW``) and checked on the open
    descriptor, so what is checked is what is read.

    Parameters
    ----------
    path : str | Path
        The key file.
    what : str
        What it is, for the messages (``"auth key"``).

    Returns
    -------
    BinaryIO
        The open file; the caller closes it.

    Raises
    ------
    ValueError
        If ``path`` is a symbolic link (naming its target), not a regular file, or open to
        its group or others (naming the mode and the ``chmod 600`` fix).
    OSError
        If it cannot be opened (``FileNotFoundError`` if missing).
    """
    path = Path(path)
    try:
        fd = open_regular(path)
    except UnsafeFileError:
        if path.is_symlink():
            raise ValueError(
                f"{what} {path} is a symbolic link to {os.readlink(path)}: give the key file "
                f"itself (whoever can change the link chooses the key)"
            ) from None
        raise ValueError(f"{what} {path} is not a regular file") from None
    handle = os.fdopen(fd, "rb")
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    if mode & 0o077:
        handle.close()
        raise ValueError(
            f"{what} {path} has mode {mode:04o}: users other than its owner have access to "
            f"it; run chmod 600 {shlex.quote(str(path))}"
        )
    return handle


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _der(public_key) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def host_name(host: str) -> x509.GeneralName:
    """A SuperLink host as a certificate names it: an IP address or a DNS name.

    Raises
    ------
    ValueError
        If ``host`` is empty, a wildcard, an IPv6 address with a zone, or not a DNS name
        (labels of 1-63 letters, digits and inner dashes, 253 characters in all, the last
        label not all digits).
    """
    if not host:
        raise ValueError("--host '': give a host name or IP address")
    if "*" in host:
        raise ValueError(
            f"--host {host!r}: wildcards are refused; a SuperLink certificate names its own hosts"
        )
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if getattr(address, "scope_id", None):
            raise ValueError(f"--host {host!r}: give the IPv6 address without its zone")
        return x509.IPAddress(address)
    labels = host.lower().split(".")
    if len(host) > 253 or labels[-1].isdigit() or not all(map(_DNS_LABEL.fullmatch, labels)):
        raise ValueError(
            f"--host {host!r} is neither an IP address nor a DNS name (labels of letters, "
            f"digits and inner dashes, separated by dots)"
        )
    return x509.DNSName(host.lower())


def _certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name | None,
    signing_key: ec.EllipticCurvePrivateKey,
    days: int,
    names: list[x509.GeneralName] | None = None,
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
    if names is None:  # the CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), False)
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
    return builder.sign(signing_key, hashes.SHA384())


def _ca_folder(folder: Path, ca_dir: str | Path | None) -> Path:
    """The CA's folder: ``ca_dir``, or ``<folder>-ca``; never ``folder`` nor inside it."""
    if ca_dir is None:
        absolute = Path(os.path.abspath(folder))
        if not absolute.name:
            raise ValueError("give the CA folder (--ca-dir) for a SuperLink folder of /")
        ca_dir = absolute.with_name(f"{absolute.name}-ca")
    ca_dir = Path(ca_dir)
    if ca_dir.resolve() == folder.resolve() or folder.resolve() in ca_dir.resolve().parents:
        raise ValueError(
            f"--ca-dir {ca_dir} is the SuperLink's folder {folder} or inside it: the CA key "
            f"must not go where the SuperLink reads (whoever holds it can issue certificates)"
        )
    return ca_dir


def _ca(ca_dir: Path, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA in ``ca_dir`` (checked), or a new one written there (folder 700, key 600)."""
    key_path, cert_path = ca_dir / CA_KEY, ca_dir / CA_CERT
    has_key, has_cert = os.path.lexists(key_path), os.path.lexists(cert_path)
    if has_key != has_cert:
        found, missing = (key_path, cert_path) if has_key else (cert_path, key_path)
        raise ValueError(
            f"{found} is there without {missing.name}: restore it, or empty {ca_dir} to make "
            f"a new CA (then every SuperNode and the flwr CLI need the new ca.crt)"
        )
    if not has_key:
        ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_cert = _certificate("lepton-flwr CA", ca_key.public_key(), None, ca_key, days)
        write_atomically(key_path, _pem_key(ca_key), 0o600)
        write_atomically(cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return ca_key, ca_cert
    with open_private_file(key_path, "CA key") as handle:
        data = handle.read(MAX_KEY_BYTES + 1)
    try:
        ca_key = serialization.load_pem_private_key(data, None)
        ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (TypeError, ValueError) as err:
        raise ValueError(f"the CA in {ca_dir} is not readable ({err})") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey) or _der(ca_key.public_key()) != _der(
        ca_cert.public_key()
    ):
        raise ValueError(f"{key_path} is not the elliptic-curve key of {cert_path}")
    return ca_key, ca_cert


def make_certificates(
    folder: str | Path, hosts: list[str], days: int = 365, ca_dir: str | Path | None = None
) -> dict[str, Path]:
    """Make a CA (or reuse the one in ``ca_dir``) and the SuperLink's certificate for ``hosts``.

    Parameters
    ----------
    folder : str | Path
        The SuperLink's folder (what ``deploy/superlink.sh`` reads): ``ca.crt``,
        ``superlink.crt`` and ``superlink.key`` go there; the CA key never does.
    hosts : list[str]
        Names and IP addresses the SuperNodes and the CLI reach the SuperLink at: no
        wildcards, no empty names.
    days : int
        Validity, 1 to 3650 days.
    ca_dir : str | Path | None
        The CA's folder (``ca.key``, mode 600, and ``ca.crt``), kept offline; by default
        ``<folder>-ca``. Not ``folder`` nor inside it.

    Returns
    -------
    dict[str, Path]
        The files by name: ``ca.crt`` (the SuperLink folder's copy), ``ca.key``,
        ``superlink.crt``, ``superlink.key``.

    Raises
    ------
    ValueError
        If no host is given or one is not a host name or IP address; if ``days`` is out of
        range; if ``ca_dir`` is inside ``folder``, or ``folder`` holds a ``ca.key``; if the
        CA's key is open to others, a link, missing its certificate or not its key.
    """
    if not hosts:
        raise ValueError("give the SuperLink's host names or IP addresses (--host)")
    names = list(dict.fromkeys(host_name(host) for host in hosts))
    if not 1 <= days <= MAX_DAYS:
        raise ValueError(f"--days {days}: give 1 to {MAX_DAYS}")
    folder = Path(folder)
    ca_dir = _ca_folder(folder, ca_dir)
    if os.path.lexists(folder / CA_KEY):
        raise ValueError(
            f"{folder / CA_KEY} is in the SuperLink's folder: move it (and ca.crt) to the CA "
            f"folder, mv {shlex.quote(str(folder / CA_KEY))} {shlex.quote(str(ca_dir))}/"
        )
    ca_key, ca_cert = _ca(ca_dir, days)
    folder.mkdir(parents=True, exist_ok=True)
    link_key = ec.generate_private_key(ec.SECP384R1())
    link_cert = _certificate(
        "lepton-flwr SuperLink", link_key.public_key(), ca_cert.subject, ca_key, days, names
    )
    write_atomically(folder / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    write_atomically(folder / SUPERLINK_KEY, _pem_key(link_key), 0o600)
    write_atomically(
        folder / SUPERLINK_CERT, link_cert.public_bytes(serialization.Encoding.PEM), 0o644
    )
    return {
        CA_CERT: folder / CA_CERT,
        CA_KEY: ca_dir / CA_KEY,
        SUPERLINK_CERT: folder / SUPERLINK_CERT,
        SUPERLINK_KEY: folder / SUPERLINK_KEY,
    }


def make_node_key(folder: str | Path, name: str, force: bool = False) -> tuple[Path, Path]:
    """Make a SuperNode's authentication key pair: ``<name>.key`` (600) and ``<name>.pub``.

    Parameters
    ----------
    folder : str | Path
        Where the two files go.
    name : str
        The SuperNode's name: 1 to 64 letters, digits, dashes and underscores, starting
        with a letter or digit.
    force : bool
        Replace an existing key pair of that name.

    Raises
    ------
    ValueError
        If ``name`` is not such a name, or (without ``force``) the key pair exists: a new
        key would no longer match the public key registered for that SuperNode.
    """
    if not NODE_NAME.fullmatch(name):
        raise ValueError(
            f"node name {name!r}: use 1 to 64 letters, digits, dashes and underscores, "
            f"starting with a letter or digit"
        )
    folder = Path(folder)
    private_path, public_path = folder / f"{name}.key", folder / f"{name}.pub"
    existing = [str(p) for p in (private_path, public_path) if os.path.lexists(p)]
    if existing and not force:
        raise ValueError(
            f"{' and '.join(existing)} exist: a new key would no longer match the public key "
            f"registered for SuperNode {name} (flwr supernode register), which could not join "
            f"until the new one is registered; pass --force to replace it"
        )
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
    write_atomically(private_path, private, 0o600)
    write_atomically(public_path, public + b"\n", 0o644)
    return private_path, public_path


def connection_toml(name: str, address: str, ca_cert: str | Path) -> str:
    """The ``$FLWR_HOME/config.toml`` entry that lets ``flwr`` reach the SuperLink over TLS."""
    return (
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
        f'root-certificates = "{Path(ca_cert).resolve()}"\n'
    )
