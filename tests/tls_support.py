"""TLS for tests: a throwaway certificate authority (``trustme``), a certificate for the loopback address,
and the two SSL contexts a test needs, the server's built exactly as ``jobledger serve --tls-cert`` builds it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme

from api.cli import server_ssl_context

# The names the certificate is issued for: the SDK connects to 127.0.0.1 (an IP SAN; hostname checks apply).
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TestTls:
    """A CA and a loopback certificate it signed, as files and as SSL contexts."""

    __test__ = False  # not a test class, whatever pytest makes of its name

    ca_file: Path  # the CA certificate (PEM): what a client that verifies must trust
    cert_file: Path  # the server's certificate chain (PEM), for --tls-cert
    key_file: Path  # the server's private key (PEM), for --tls-key
    server: ssl.SSLContext
    client: ssl.SSLContext  # trusts the CA, and nothing else


def make_tls(folder: Path) -> TestTls:
    """A fresh CA and a certificate for 127.0.0.1/localhost, written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="jobledger tests")
    leaf = ca.issue_cert(*LOOPBACK_NAMES)
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    for blob in leaf.cert_chain_pems:
        blob.write_to_path(str(cert_file), append=True)
    leaf.private_key_pem.write_to_path(str(key_file))
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    return TestTls(ca_file, cert_file, key_file, server_ssl_context(cert_file, key_file), client)
