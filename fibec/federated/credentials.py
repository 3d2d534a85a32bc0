"""Credentials for a secure Flower federation: a CA, the SuperLink's TLS certificate, SuperNode keys.

Everything is made by the `cryptography` package (Flower's own dependency); nothing here does
cryptography by hand. The SuperLink serves TLS with a certificate signed by the CA; SuperNodes and
the `flwr` CLI trust that CA (`--root-certificates`). Each SuperNode signs its requests with an EC
key (NIST P-384, OpenSSH format, as Flower reads them); the SuperLink admits only SuperNodes whose
public key was registered with `flwr supernode register` (docs/DESIGN.md, "Threat model").

    python -m fibec.federated.credentials ca DIR                      # DIR/ca.crt, DIR/ca.key
    python -m fibec.federated.credentials superlink DIR HOST [HOST...] # DIR/superlink.crt, .key (signed by DIR/ca.*)
    python -m fibec.federated.credentials supernode DIR NAME           # DIR/NAME.key, DIR/NAME.pub

Private keys are written readable by their owner only. A throwaway set for one machine:
`make_local(DIR, nodes)`.
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

VALID_DAYS = 365


def _write(path: Path, data: bytes, *, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:  # created owner-only: never readable by others, even for an instant
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=VALID_DAYS))


def make_ca(directory: Path, name: str = "fibec federation CA") -> tuple[Path, Path]:
    """A self-signed CA: (ca.crt, ca.key) under `directory`."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    certificate = (_validity(x509.CertificateBuilder()).subject_name(subject).issuer_name(subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False, encipher_only=False,
                                                decipher_only=False), critical=True)
                   .sign(key, hashes.SHA384()))
    directory = Path(directory)
    return (_write(directory / "ca.crt", certificate.public_bytes(serialization.Encoding.PEM)),
            _write(directory / "ca.key", _pem_key(key), private=True))


def _subject_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_superlink_certificate(directory: Path, hosts: list[str]) -> tuple[Path, Path]:
    """The SuperLink's TLS certificate for `hosts` (names or IP addresses it is reached at), signed
    by directory/ca.crt and ca.key: (superlink.crt, superlink.key)."""
    if not hosts:
        raise ValueError("hosts: name at least one host name or IP address the SuperLink is reached at")
    directory = Path(directory)
    ca_certificate = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    certificate = (_validity(x509.CertificateBuilder())
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                   .issuer_name(ca_certificate.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA384()))
    return (_write(directory / "superlink.crt", certificate.public_bytes(serialization.Encoding.PEM)),
            _write(directory / "superlink.key", _pem_key(key), private=True))


def make_supernode_key(directory: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's EC key pair in OpenSSH format: (NAME.key, NAME.pub) under `directory`."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    directory = Path(directory)
    return (_write(directory / f"{name}.key", private, private=True),
            _write(directory / f"{name}.pub", public + f" {name}\n".encode()))


@dataclass(frozen=True)
class LocalCredentials:
    """A throwaway set for a federation on this machine (127.0.0.1 and localhost)."""

    ca: Path
    superlink_certificate: Path
    superlink_key: Path
    supernode_keys: list[tuple[Path, Path]]  # (private, public) per SuperNode


def make_local(directory: Path, nodes: int) -> LocalCredentials:
    """A CA, the SuperLink's certificate for 127.0.0.1 and localhost, and `nodes` SuperNode keys."""
    ca, _ = make_ca(directory)
    certificate, key = make_superlink_certificate(directory, ["127.0.0.1", "localhost"])
    return LocalCredentials(ca, certificate, key, [make_supernode_key(directory, f"supernode-{i}")
                                                   for i in range(nodes)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fibec.federated.credentials",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("ca", help="a self-signed CA: DIR/ca.crt, DIR/ca.key").add_argument("dir", type=Path)
    link = sub.add_parser("superlink", help="the SuperLink's TLS certificate, signed by DIR/ca.*")
    link.add_argument("dir", type=Path)
    link.add_argument("hosts", nargs="+", help="host names or IP addresses the SuperLink is reached at")
    node = sub.add_parser("supernode", help="a SuperNode's key pair: DIR/NAME.key, DIR/NAME.pub")
    node.add_argument("dir", type=Path)
    node.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.what == "ca":
            written = make_ca(args.dir)
        elif args.what == "superlink":
            written = make_superlink_certificate(args.dir, args.hosts)
        else:
            written = make_supernode_key(args.dir, args.name)
    except (OSError, ValueError) as err:
        print(f"credentials: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
