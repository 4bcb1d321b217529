"""TLS: DICOM over TLS (PS3.15 B.1, BCP 195) and HTTPS for the web side.

The DICOM listener needs `tls_cert` and `tls_key`; with `tls_ca` it also requires a client
certificate signed by that CA (mutual TLS). As a client (SCU commands, C-MOVE to a peer
marked `tls=yes`) we check the peer's certificate against `tls_ca` (else the system's
CAs) and its host name, and present our own certificate when we have one.

HTTPS: waitress speaks plain HTTP only, so `TLSChannel` runs TLS inside waitress's event
loop over memory buffers (`ssl.MemoryBIO`, as asyncio does). Why not another server:
docs/decisions.md, 2026-11-26.
"""

import contextlib
import logging
import ssl
import threading
import time
from pathlib import Path

from waitress.channel import HTTPChannel

log = logging.getLogger(__name__)
WIRE_CHUNK = 1 << 18  # ciphertext handed to the socket per send()
PLAIN_HTTP_ANSWER = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 30\r\n"
    b"Connection: close\r\n\r\nThis port speaks HTTPS only.\r\n"
)


def server_context(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=ca)
    return context


def https_context(cert: str, key: str) -> ssl.SSLContext:
    """The web side's: no client certificates, HTTP/1.1 announced by ALPN."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key or None)
    context.set_alpn_protocols(["http/1.1"])
    return context


def peer_tls_args(config, peer) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's `tls_args` for an association we open to a configured peer: our client
    context and the host name to check, or None for a peer without `tls=yes`."""
    if not peer.tls:
        return None
    return client_context(config.tls_ca, config.tls_cert, config.tls_key), peer.host


def client_context(ca: str = "", cert: str = "", key: str = "") -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        context.load_cert_chain(cert, key or None)
    return context


def check_files(*paths: str) -> list[str]:
    """The given paths that are not readable files (for a clear start-up error)."""
    return [p for p in paths if p and not Path(p).is_file()]


class TLSChannel(HTTPChannel):
    """One HTTPS connection in waitress: bytes from the socket are decrypted before waitress
    parses them, its answers encrypted before they reach the socket.

    The handshake is fed by the event loop like a request head: it holds no thread, and a
    client that stalls in it is closed after `channel_timeout` like any idle one. Task
    threads write (encrypt) while the event loop reads (decrypts): `_tls_lock` guards the
    TLS state and the ciphertext not yet sent, and nothing that takes waitress's
    `outbuf_lock` (handle_close) runs while it is held — a task thread holds that one
    when it comes to send(). A close waits until the ciphertext is out (or the channel
    timeout has passed): waitress counts data as sent once we have encrypted it. The
    server object carries the context as `tls_context`.
    """

    def __init__(self, server, sock, addr, adj, map=None) -> None:
        super().__init__(server, sock, addr, adj, map)
        self._tls_in = ssl.MemoryBIO()
        self._tls_out = ssl.MemoryBIO()
        self._tls = server.tls_context.wrap_bio(self._tls_in, self._tls_out, server_side=True)
        self._tls_lock = threading.Lock()
        self._wire = bytearray()  # ciphertext the socket has not taken yet
        self._shaken = False
        self._broken = False  # the socket failed: nothing more goes out
        self._close_by: float | None = None  # a close waiting for the wire to drain

    def handle_read(self) -> None:
        try:
            raw = self.socket.recv(self.adj.recv_bytes)
        except BlockingIOError:
            return
        except OSError:
            self._close_now()
            return
        if not raw:
            self._close_now()
            return
        failed = None
        with self._tls_lock:
            self._tls_in.write(raw)
            try:
                data, closed = self._decrypt()
            except ssl.SSLError as exc:
                failed = exc
                # The alert that says why; to a plain HTTP request, a plain HTTP answer.
                self._wire += PLAIN_HTTP_ANSWER if exc.reason == "HTTP_REQUEST" else b""
                data, closed = b"", True
            self._wire += self._tls_out.read()
            self._send_wire()
        if failed is not None:
            log.info("TLS with %s failed: %s", self.addr[0], failed.reason or failed)
            self._close_now()
            return
        if data:
            self.last_activity = time.time()
            self.received(data)
        if closed:
            self.handle_close()

    def _decrypt(self) -> tuple[bytes, bool]:
        """Application data decrypted so far, and whether the client said close_notify."""
        if not self._shaken:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                return b"", False
            self._shaken = True
        chunks = []
        while True:
            try:
                chunk = self._tls.read(1 << 16)
            except ssl.SSLWantReadError:
                return b"".join(chunks), False
            except ssl.SSLZeroReturnError:
                return b"".join(chunks), True
            if not chunk:
                return b"".join(chunks), True
            chunks.append(chunk)

    def send(self, data, do_close: bool = True) -> int:
        """Encrypt what waitress flushes; 0 (try later) while earlier ciphertext waits for
        the socket or the handshake is not over."""
        with self._tls_lock:
            if self._broken or self._send_wire() or not self._shaken:
                written = 0
            else:
                written = self._tls.write(data)
                self._wire += self._tls_out.read()
                self._send_wire()
            broken = self._broken
        if broken and do_close:
            self._close_now()
        return written

    def _send_wire(self) -> int:
        """Hand pending ciphertext to the socket (with `_tls_lock` held); what is left."""
        while self._wire and not self._broken:
            try:
                sent = self.socket.send(bytes(self._wire[:WIRE_CHUNK]))
            except BlockingIOError:
                break
            except OSError:  # reset, broken pipe: the caller closes, outside the lock
                self._broken = True
                self._wire.clear()
                break
            if not sent:
                break
            del self._wire[:sent]
        return len(self._wire)

    def writable(self) -> bool:
        return bool(self._wire) or super().writable()

    def handle_write(self) -> None:
        with self._tls_lock:
            left = self._send_wire()
            broken = self._broken
        if broken:
            self._close_now()
        elif left:
            if self._close_by is not None and time.time() > self._close_by:
                self._close_now()  # the client stopped reading: give up on the rest
        elif self._close_by is not None:
            self._close_now()  # all out: the close that waited
        else:
            super().handle_write()

    def handle_close(self) -> None:
        """Once the ciphertext waiting for the socket is out (within the channel timeout),
        with our close_notify; at once when the connection is broken."""
        with self._tls_lock:
            if self._shaken and not self._broken and self.connected and self._close_by is None:
                with contextlib.suppress(ssl.SSLError):  # the client's is not awaited
                    self._tls.unwrap()  # queues our close_notify
                self._wire += self._tls_out.read()
            waiting = self._send_wire() and not self._broken
        if waiting:
            if self._close_by is None:
                self._close_by = time.time() + self.adj.channel_timeout
            return
        self._close_now()

    def _close_now(self) -> None:
        with self._tls_lock:
            self._wire.clear()
        super().handle_close()
