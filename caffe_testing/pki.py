"""A throwaway certificate authority for a test control plane (python `cryptography`).

A real API server wants TLS and authenticates clients by certificate: the CA made here signs the
API server's serving certificate and one client certificate per identity (CN = user, O = groups),
as kubeadm does, e.g. `admin` in `system:masters`, `system:node:gpu-1` in `system:nodes`.
EC P-256 keys: quick to make, accepted by every Kubernetes component.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID = datetime.timedelta(days=2)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str, orgs: list[str] | tuple[str, ...] = ()) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
                     + [x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class CA:
    """A CA in `folder` (ca.crt, ca.key); `issue` writes NAME.crt / NAME.key beside them."""

    def __init__(self, folder: Path, cn: str = "caffe-serving-test-ca") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = _key()
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_path = self.folder / "ca.crt"
        self.key_path = self.folder / "ca.key"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.key_path.write_bytes(_pem_key(self.key))

    def issue(self, name: str, cn: str, orgs: list[str] | tuple[str, ...] = (), *, server: bool = False,
              hosts: list[str] | tuple[str, ...] = ()) -> tuple[Path, Path]:
        """A certificate for `cn` (a client's user name, or a server's name) and its key: (crt, key)."""
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = (x509.CertificateBuilder().subject_name(_name(cn, orgs)).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALID)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
        if hosts:
            sans: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        crt_path, key_path = self.folder / f"{name}.crt", self.folder / f"{name}.key"
        crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        return crt_path, key_path


def service_account_keys(folder: Path) -> tuple[Path, Path]:
    """The key pair that signs service-account tokens (the API server's signing key, the public half
    for verification): (sa.key, sa.pub)."""
    key = _key()
    key_path, pub_path = Path(folder) / "sa.key", Path(folder) / "sa.pub"
    key_path.write_bytes(_pem_key(key))
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return key_path, pub_path


def write_secret_volume(folder: Path, files: dict[str, bytes]) -> None:
    """Write `files` into `folder` as the kubelet writes a Secret volume, and on each later call
    replace them the same way: a fresh timestamped folder, then one atomic rename of the `..data`
    symlink to it; each name is a symlink through `..data` (kubelet's AtomicWriter)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
    fresh = folder / stamp
    fresh.mkdir()
    for name, data in files.items():
        (fresh / name).write_bytes(data)
    old = (folder / "..data").resolve() if (folder / "..data").is_symlink() else None
    tmp = folder / "..data_tmp"
    tmp.symlink_to(stamp)
    tmp.rename(folder / "..data")  # the one atomic step: every file changes at once
    for name in files:
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    if old is not None:
        for f in old.iterdir():
            f.unlink()
        old.rmdir()
