"""DICOM over TLS (PS3.15 B.1, BCP 195): the SSL contexts of our listener and our clients.

The listener needs `tls_cert` and `tls_key`; with `tls_ca` it also requires a client
certificate signed by that CA (mutual TLS). As a client (SCU commands, C-MOVE to a peer
marked `tls=yes`) we check the peer's certificate against `tls_ca` (else the system's
CAs) and its host name, and present our own certificate when we have one.
"""

import ssl
from pathlib import Path


def server_context(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=ca)
    return context


def client_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        context.load_cert_chain(cert, key or None)
    return context


def check_files(*paths: str) -> list[str]:
    """The given paths that are not readable files (for a clear start-up error)."""
    return [p for p in paths if p and not Path(p).is_file()]
