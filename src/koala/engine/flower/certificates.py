"""TLS certificates for a Flower deployment (`koala certs`): a certificate authority, and a
SuperLink server certificate signed by it whose subjectAltName lists every address the SuperLink
is reached at. Without that extension gRPC refuses the connection, and `flwr` only reports that
the SuperLink is unavailable (the cause is in the SuperLink's log). Written with `cryptography`,
which Flower installs."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from koala.errors import ConfigError

FILES = ("ca.pem", "ca.key", "server.pem", "server.key")


def _subject_alternative_names(addresses: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for address in addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            names.append(x509.DNSName(address))
    return names


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def write_certificates(directory: Path, addresses: Sequence[str], days: int = 365) -> dict[str, Path]:
    """Write ca.pem/ca.key and server.pem/server.key for a SuperLink reached at `addresses` (IP
    addresses or host names) into `directory`, valid for `days`; refuses to overwrite any of them.
    Keys are written readable by their owner only."""
    if not addresses:
        raise ConfigError("koala certs needs the SuperLink's address(es): --address HOST_OR_IP (as many as it is reached at)")
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name.replace(".", "-"): directory / name for name in FILES}
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing:
        raise ConfigError(f"{', '.join(existing)} already exist: choose another --out, or remove them to make new ones")
    now = datetime.datetime.now(datetime.timezone.utc)
    validity = {"not_valid_before": now - datetime.timedelta(minutes=5), "not_valid_after": now + datetime.timedelta(days=days)}
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "koala-fl deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(validity["not_valid_before"])
          .not_valid_after(validity["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, addresses[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(validity["not_valid_before"]).not_valid_after(validity["not_valid_after"])
              .add_extension(x509.SubjectAlternativeName(_subject_alternative_names(addresses)), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths["ca-pem"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["server-pem"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    for name, key in (("ca-key", ca_key), ("server-key", server_key)):
        descriptor = os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(_pem_key(key))
    return {"ca": paths["ca-pem"], "ca-key": paths["ca-key"], "cert": paths["server-pem"], "key": paths["server-key"]}
