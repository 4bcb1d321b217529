"""Socket behaviour pynetdicom leaves out, installed for both our SCP and our SCU.

- TCP_NODELAY on every association socket: a DIMSE message is a small command PDU
  followed by the dataset; with Nagle's algorithm the second write waits for the peer's
  delayed ACK (~40 ms a message).
- PDUs read up to 1 MiB per recv call instead of 4 KiB, and a PDU longer than the maximum
  we announced (PS3.8 9.3.1) is treated as a broken connection, not buffered.
- A dataset carrying its stored bytes (`StoredDataset`) is sent as those bytes when the
  negotiated transfer syntax is the stored one: C-MOVE/C-GET send exactly what was
  received, where pydicom's re-encoding would drop group lengths or re-deflate.
- `wait_to_send`: pynetdicom queues outgoing PDUs without bound, and its DUL thread sends
  everything queued before it reads the socket again. A handler that answers faster than
  the socket drains would queue a whole result in memory and read a C-CANCEL only after
  the last answer; handlers wait here before each answer instead.
See docs/decisions.md (2026-11-25).
"""

import socket
import time

from pydicom.dataset import Dataset
from pynetdicom import association
from pynetdicom.transport import AssociationSocket
from pynetdicom.transport import ThreadedAssociationServer

SEND_QUEUE_LIMIT = 32  # PDUs an association may have waiting to be sent

_create_socket = AssociationSocket._create_socket
_encode = association.encode


class StoredDataset(Dataset):
    """A stored instance's header plus its dataset bytes as received."""

    def __init__(self, header: Dataset, raw: bytes) -> None:
        super().__init__(header)
        self.file_meta = header.file_meta
        self._stored_bytes = raw


def _encode_stored(ds: Dataset, is_implicit: bool, is_little: bool, deflated: bool = False):
    raw = getattr(ds, "_stored_bytes", None)
    if raw is not None:
        syntax = ds.file_meta.TransferSyntaxUID
        if (syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated) == (
            is_implicit,
            is_little,
            deflated,
        ):
            return raw
    return _encode(ds, is_implicit, is_little, deflated)


def wait_to_send(assoc: association.Association) -> None:
    """Block while more than SEND_QUEUE_LIMIT PDUs wait in the association's send queue."""
    pending = assoc.dul.to_provider_queue
    while pending.qsize() > SEND_QUEUE_LIMIT and assoc.is_established:
        time.sleep(0.0002)


class Server(ThreadedAssociationServer):
    """The SCP listener: accepted connections get TCP_NODELAY."""

    def get_request(self) -> tuple[socket.socket, tuple]:
        connection, address = super().get_request()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, address


class SharedPortServer(Server):
    """A listener sharing its port with the other workers (SO_REUSEPORT): the kernel
    spreads new connections over them."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def _nodelay_socket(self: AssociationSocket, address) -> socket.socket:
    sock = _create_socket(self, address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    limit = self.assoc.acceptor.maximum_length if self.assoc.is_acceptor else 0
    if limit and nr_bytes > max(limit, 1 << 16):
        raise OSError(f"peer sent a {nr_bytes}-byte PDU; our maximum is {limit}")
    stream = bytearray()
    while len(stream) < nr_bytes:
        chunk = self.socket.recv(min(nr_bytes - len(stream), 1 << 20))
        if not chunk:  # connection closed: return what we have, as pynetdicom does
            break
        stream += chunk
    return stream


def install() -> None:
    AssociationSocket.recv = _recv
    AssociationSocket._create_socket = _nodelay_socket
    association.encode = _encode_stored
