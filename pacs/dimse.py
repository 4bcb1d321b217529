"""DIMSE command sets and the PDUs that carry them, encoded and decoded by hand.

Used where minipacs writes to a socket itself (pacs.store_scp, pacs.seam): a command
set is a handful of implicit VR little endian elements (PS3.7 6.3.1, E.1), and a
P-DATA-TF PDU a header around PDV items (PS3.8 9.3.5, E.2); pydicom's general encoder
costs far more than the bytes.
"""

import struct
from collections.abc import Iterator

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA, RELEASE_RQ, RELEASE_RP, ABORT = 0x04, 0x05, 0x06, 0x07
# Command Field values (PS3.7 E.1)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_FIND_RSP = 0x8020
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
C_CANCEL_RQ = 0x0FFF
DATASET, NO_DATASET = 0x0000, 0x0101  # Command Data Set Type
# Command elements
AFFECTED_SOP_CLASS_UID = 0x00000002
COMMAND_FIELD = 0x00000100
MESSAGE_ID = 0x00000110
MESSAGE_ID_BEING_RESPONDED_TO = 0x00000120
COMMAND_DATASET_TYPE = 0x00000800
STATUS = 0x00000900
ERROR_COMMENT = 0x00000902
AFFECTED_SOP_INSTANCE_UID = 0x00001000


def ui(uid: str) -> bytes:
    """A UI value: ASCII, padded with NUL to an even length."""
    data = str(uid).encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def text(value: str, limit: int = 64) -> bytes:
    """An AE/SH/LO value: ASCII (others replaced), padded with a space to an even length."""
    data = value.encode("ascii", "replace")[:limit]
    return data + b" " if len(data) % 2 else data


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def command(*elements: tuple[int, bytes]) -> bytes:
    """A command set with its group length (0000,0000)."""
    body = b"".join(struct.pack("<HHI", t >> 16, t & 0xFFFF, len(v)) + v for t, v in elements)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def fields(data: bytes | bytearray) -> dict[int, bytes]:
    """Element values of a command set, by tag."""
    found, offset = {}, 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, offset)
        found[(group << 16) | element] = bytes(data[offset + 8 : offset + 8 + length])
        offset += 8 + length
    return found


def pdata(context_id: int, data: bytes | bytearray, is_command: bool, max_pdu: int) -> bytes:
    """P-DATA-TF PDUs carrying `data` as one message part: one PDV each, fragments no
    longer than the peer's maximum (0: no maximum)."""
    out = bytearray()
    for start, length, header in pdata_headers(context_id, len(data), is_command, max_pdu):
        out += header
        out += data[start : start + length]
    return bytes(out)


def pdata_headers(
    context_id: int, size: int, is_command: bool, max_pdu: int
) -> Iterator[tuple[int, int, bytes]]:
    """How a message part of `size` bytes goes out as P-DATA-TF PDUs of one PDV each, no
    longer than `max_pdu` (0: no maximum, one PDU): each fragment's start, length, and
    the PDU and PDV headers that go before it (PS3.8 9.3.5, E.2). The one place a P-DATA
    is framed; a sender with the bytes elsewhere (a file, by sendfile) sends each header
    and then its fragment."""
    step = max(max_pdu - 6, 1) if max_pdu else max(size, 1)
    for start in range(0, max(size, 1), step):
        length = min(step, size - start)
        control = (1 if is_command else 0) | (2 if start + length >= size else 0)
        yield start, length, struct.pack(">BBIIBB", P_DATA, 0, length + 6, length + 2,
                                         context_id, control)  # fmt: skip
