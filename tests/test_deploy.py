"""The deployment kit's files: private keys readable by their owner only, a valid chain."""

import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from lepton_flwr.deploy import make_certificates, make_node_key


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_private_keys_are_600_and_the_certificate_is_the_cas_for_those_hosts(tmp_path):
    link_folder = tmp_path / "certs"
    files = make_certificates(link_folder, ["127.0.0.1", "link.example.org"])
    assert _mode(files["ca.key"]) == 0o600 and _mode(files["superlink.key"]) == 0o600
    # The CA key is in its own folder (<out>-ca, 700), not in the SuperLink's.
    assert files["ca.key"] == tmp_path / "certs-ca" / "ca.key"
    assert _mode(files["ca.key"].parent) == 0o700
    assert sorted(p.name for p in link_folder.iterdir()) == [
        "ca.crt",
        "superlink.crt",
        "superlink.key",
    ]
    ca = x509.load_pem_x509_certificate(files["ca.crt"].read_bytes())
    assert files["ca.crt"].read_bytes() == (tmp_path / "certs-ca" / "ca.crt").read_bytes()
    link = x509.load_pem_x509_certificate(files["superlink.crt"].read_bytes())
    link.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = link.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["link.example.org"]
    # A second call reuses the CA: SuperNodes that trust ca.crt keep trusting the link.
    again = make_certificates(link_folder, ["127.0.0.1"])
    assert again["ca.crt"].read_bytes() == files["ca.crt"].read_bytes()


def test_node_keys_are_600_and_what_flower_reads(tmp_path):
    private, public = make_node_key(tmp_path, "hospital-a")
    assert _mode(private) == 0o600
    key = load_ssh_public_key(public.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    with pytest.raises(ValueError, match="node name"):
        make_node_key(tmp_path, "../escape")
