"""Socket behaviour pynetdicom leaves out, installed for both our SCP and our SCU.

- TCP_NODELAY on every association socket: a DIMSE message is a small command PDU
  followed by the dataset; with Nagle's algorithm the second write waits for the peer's
  delayed ACK (~40 ms a message).
- PDUs read up to 1 MiB per recv call instead of 4 KiB, and a PDU longer than the maximum
  we announced (PS3.8 9.3.1) is treated as a broken connection, not buffered.
- A dataset carrying its stored bytes (`StoredDataset`) is sent as those bytes when the
  negotiated transfer syntax is the stored one: C-MOVE/C-GET send exactly what was
  received, where pydicom's re-encoding would drop group lengths or re-deflate.
- `send_find_answer`: a C-FIND pending response written straight to the socket as
  P-DATA-TF PDUs, the identifier encoded from the index's DICOM JSON. pynetdicom's path
  (pydicom Dataset, DIMSE primitives, a queue, its polling DUL thread) cost ~0.9 ms an
  answer; this costs a few tens of µs. Only while a handler runs, when pynetdicom has
  nothing of its own to send on that association.
- `wait_to_send`: pynetdicom queues outgoing PDUs without bound, and its DUL thread sends
  everything queued before it reads the socket again. A handler that answers faster than
  the socket drains would queue a whole result in memory and read a C-CANCEL only after
  the last answer; handlers wait here before each answer instead.
See docs/decisions.md (2026-11-25).
"""

import socket
import struct
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


C_FIND_RSP = 0x8020
NO_DATASET, DATASET = 0x0101, 0x0000


def send_find_answer(
    assoc: association.Association, context_id: int, request, status: int, identifier: bytes
) -> None:
    """One C-FIND-RSP (pending, with its identifier) on the association's socket."""
    command = _command(
        (0x00000002, _ui(request.AffectedSOPClassUID)),
        (0x00000100, struct.pack("<H", C_FIND_RSP)),
        (0x00000120, struct.pack("<H", request.MessageID)),
        (0x00000800, struct.pack("<H", DATASET)),
        (0x00000900, struct.pack("<H", status)),
    )
    pdus = _pdata(context_id, command, True, _peer_max_pdu(assoc))
    pdus += _pdata(context_id, identifier, False, _peer_max_pdu(assoc))
    assoc.dul.socket.send(pdus)


def _ui(uid: str) -> bytes:
    data = str(uid).encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def _command(*elements: tuple[int, bytes]) -> bytes:
    """A command set (implicit VR little endian, PS3.7 6.3.1) with its group length."""
    body = b"".join(struct.pack("<HHI", t >> 16, t & 0xFFFF, len(v)) + v for t, v in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _peer_max_pdu(assoc: association.Association) -> int:
    peer = assoc.requestor if assoc.is_acceptor else assoc.acceptor
    return peer.maximum_length or 0


def _pdata(context_id: int, data: bytes, command: bool, max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying `data` as one message part (PS3.8 9.3.5, E.2): one PDV
    each, fragments no longer than the peer's maximum."""
    size = max_pdu - 6 if max_pdu else max(len(data), 1)
    out = bytearray()
    for start in range(0, max(len(data), 1), size):
        fragment = data[start : start + size]
        last = start + size >= len(data)
        header = (1 if command else 0) | (2 if last else 0)
        item = struct.pack(">IBB", len(fragment) + 2, context_id, header) + fragment
        out += struct.pack(">BBI", 0x04, 0, len(item)) + item
    return bytes(out)


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
