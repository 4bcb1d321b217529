"""Hostile and broken input: full disk, garbage on the port, absurd PDUs, cut-off peers.

Each case ends with the same checks: the server still answers, nothing partial was
left in the archive, nothing was written outside it.
"""

import http.client
import io
import json
import random
import resource
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from conftest import Server
from conftest import children
from conftest import minipacs
from conftest import wait_until
from make_study import make_study
from scu import echo
from scu import store_files

VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT_LE = b"1.2.840.10008.1.2"
JSON = "application/dicom+json"
CT_IMAGE = b"1.2.840.10008.5.1.4.1.1.2"
RELEASE_RQ = bytes.fromhex("05000000000400000000")  # A-RELEASE-RQ (PS3.8 9.3.6)


def assert_still_serving_and_clean(server) -> None:
    assert server.proc.poll() is None, server.log()
    assert echo(server.port) == 0
    deadline = time.monotonic() + 5  # the association's thread cleans up as it ends
    while leftovers(server.data) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(server.data) == []


def leftovers(data: Path) -> list[str]:
    """Temporary files: a half-received dataset in .incoming or the journal (.queue)."""
    return [p.name for p in (data / ".incoming").iterdir()] + [
        p.name for p in (data / ".queue").iterdir() if p.suffix == ".part"
    ]


# -- full disk -----------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 4 MiB tmpfs; mounting needs root. CI runs as root, so there this test runs;
    test_file_size_limit_gives_a700_without_root covers the same path for anyone."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_full_disk_gives_a700_and_keeps_serving(start_server, small_disk, tmp_path):
    """C-STOREs are refused (0xA700) once less than disk_reserve_mb is free, so every one
    acknowledged is indexed: `verify` is clean however far the indexer had fallen behind
    (with no reserve, a lagging indexer found no room for the rows of what was
    acknowledged)."""
    server = start_server(data=small_disk / "data", env={"MINIPACS_DISK_RESERVE_MB": "1"})
    paths = make_study(tmp_path / "study", 12, size=512)  # 12 × 530 kB > 4 MiB
    sop_class = "1.2.840.10008.5.1.4.1.1.2"
    responses = store_files(server.port, paths, [(sop_class, "1.2.840.10008.1.2.1")])
    statuses = [r.Status for r in responses]
    stored = statuses.index(0xA700)
    assert stored >= 1
    assert set(statuses[:stored]) == {0}
    assert set(statuses[stored:]) == {0xA700}
    assert "no space" in responses[stored].ErrorComment.lower()
    assert "refused (0xA700)" in server.log()
    assert_still_serving_and_clean(server)
    server.stop()
    result = minipacs("verify", "--data", str(server.data), "--json", check=False)
    assert result.returncode == 0, result.stdout
    assert f'"instances": {stored}' in result.stdout


def test_full_disk_fails_a_stow_part_alone(start_server, small_disk, tmp_path):
    """STOW-RS on a full disk: the part with no room (larger than the whole 4 MiB disk)
    fails with FailureReason 0xA700, nothing partial is left, and the part after it is
    stored (each part is spooled once the one before has been; waitress spools the
    request body under TMPDIR, off the small disk)."""
    server = start_server(data=small_disk / "data")
    assert echo(server.port) == 0  # its audit key is made (on the first event) with room
    huge = make_study(tmp_path / "huge", 1, size=1600)[0]  # ~5 MiB
    small = make_study(tmp_path / "small", 1, size=64)[0]
    head = b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n"
    body = b"".join(head + path.read_bytes() + b"\r\n" for path in (huge, small))
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    media = 'multipart/related; type="application/dicom"; boundary=b0undary'
    connection.request(
        "POST", "/dicom-web/studies", body + b"--b0undary--\r\n",
        {"Content-Type": media, "Accept": JSON},
    )  # fmt: skip
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 202, (answer, server.log()[-3000:])
    (failed,) = answer["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA700]
    (stored,) = answer["00081199"]["Value"]
    assert stored["00081155"]["Value"] == [pydicom.dcmread(small).SOPInstanceUID]
    assert "no space" in server.log()
    assert_still_serving_and_clean(server)


def test_full_disk_at_commit_of_an_in_memory_dataset(start_server, small_disk, tmp_path):
    """A dataset under journal.MEMORY is held in memory and written to its `.part` file
    only at commit, in one write: when that write meets a full disk (no reserve to refuse
    it earlier) the C-STORE gets 0xA700, neither a `.part` nor an entry is left in the
    journal, and a store once the disk has room again succeeds."""
    server = start_server(data=small_disk / "data", env={"MINIPACS_DISK_RESERVE_MB": "0"})
    assert echo(server.port) == 0  # its audit key is made (on the first event) with room
    path = make_study(tmp_path / "study", 1, size=256)[0]  # ~130 kB: held in memory
    filler = small_disk / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(small_disk).free - (48 << 10)))
    assert shutil.disk_usage(small_disk).free < path.stat().st_size // 2
    context = [("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")]
    (refused,) = store_files(server.port, [path], context)
    assert refused.Status == 0xA700, server.log()[-3000:]
    assert "no space" in refused.ErrorComment.lower()
    assert "refused (0xA700)" in server.log()
    assert [p.name for p in (server.data / ".queue").iterdir()] == []
    filler.unlink()
    (stored,) = store_files(server.port, [path], context)
    assert stored.Status == 0
    assert_still_serving_and_clean(server)


def test_file_size_limit_gives_a700_without_root(server, tmp_path):
    """What a full disk does, without mounting one: RLIMIT_FSIZE (set on the running server
    and its workers) makes the write that crosses it fail with EFBIG, a "no room" errno,
    through the same receive path as ENOSPC. Python ignores SIGXFSZ, so nobody dies."""
    limit = 1 << 20
    for pid in {server.proc.pid, *children(server.proc.pid)}:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, limit))
    small = make_study(tmp_path / "small", 3, size=256)  # ~130 kB each
    big = make_study(tmp_path / "big", 2, size=1024)  # ~2 MiB each: over the limit
    sop_class = "1.2.840.10008.5.1.4.1.1.2"
    responses = store_files(server.port, small + big, [(sop_class, "1.2.840.10008.1.2.1")])
    assert [r.Status for r in responses] == [0, 0, 0, 0xA700, 0xA700]
    assert "no space" in responses[3].ErrorComment.lower()
    assert "refused (0xA700)" in server.log()
    assert_still_serving_and_clean(server)
    server.stop()
    result = minipacs("verify", "--data", str(server.data), "--json", check=False)
    assert result.returncode == 0, result.stdout
    assert '"instances": 3' in result.stdout


# -- garbage and absurd PDUs ---------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Server:
    """One server takes every kind of garbage below in turn; each test still ends with it
    answering and clean, so it must survive all of them."""
    running = Server(tmp_path_factory.mktemp("faults") / "data").start()
    yield running
    running.kill()


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def associate_rq(max_pdu: int, abstract: bytes = VERIFICATION) -> bytes:
    """A hand-built A-ASSOCIATE-RQ (PS3.8 9.3.2) with the given maximum PDU length."""
    context = _item(0x30, abstract) + _item(0x40, IMPLICIT_LE)
    items = _item(0x10, b"1.2.840.10008.3.1.1.1")
    items += _item(0x20, bytes([1, 0, 0, 0]) + context)
    user = _item(0x51, struct.pack(">I", max_pdu)) + _item(0x52, b"1.2.3.4")
    items += _item(0x50, user)
    body = struct.pack(">HH", 1, 0) + b"MINIPACS".ljust(16) + b"PARROT".ljust(16)
    body += bytes(32) + items
    return struct.pack(">BBI", 1, 0, len(body)) + body


def c_echo_pdata() -> bytes:
    """P-DATA-TF carrying a C-ECHO-RQ command on context 1."""
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    command = Dataset()
    command.AffectedSOPClassUID = VERIFICATION.decode()
    command.CommandField = 0x0030
    command.MessageID = 1
    command.CommandDataSetType = 0x0101
    encoded = encode(command, True, True)
    command.CommandGroupLength = len(encoded)
    encoded = encode(command, True, True)
    pdv = struct.pack(">IB", len(encoded) + 2, 1) + b"\x03" + encoded
    return struct.pack(">BBI", 4, 0, len(pdv)) + pdv


def converse(port: int, *messages: bytes, wait: float = 2.0) -> bytes:
    """Send each message, then read until the answer to it is whole (`answered`), the
    server hangs up, or `wait` s pass without a byte (garbage may get no answer at all);
    all that came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        received = b""
        for message in messages:
            sock.sendall(message)
            answer = b""
            try:
                while not answered(answer) and (chunk := sock.recv(65536)):
                    answer += chunk
            except (TimeoutError, ConnectionResetError):
                pass
            received += answer
        return received


def answered(data: bytes) -> bool:
    """`data` is whole PDUs and, when the last is a P-DATA-TF, its last PDV ends a command
    (control header bits: command, last fragment; PS3.8 E.2)."""
    last = b""
    while len(data) >= 6 and len(data) >= (end := 6 + int.from_bytes(data[2:6], "big")):
        last, data = data[:end], data[end:]
    if data or not last:
        return False
    pdv = last[6:]
    while len(pdv) > (end := 4 + int.from_bytes(pdv[:4], "big")):
        pdv = pdv[end:]
    return last[0] != 0x04 or len(pdv) >= 6 and (pdv[5] & 3) == 3


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU from the peer: its 6-byte header, then the length that gives."""
    head = recv_exactly(sock, 6)
    return head + recv_exactly(sock, int.from_bytes(head[2:6], "big"))


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"the server hung up after {len(data)} of {size} bytes"
        data += chunk
    return data


NOISE = random.Random(18).randbytes  # the same "random" bytes on every run and worker


@pytest.mark.parametrize(
    "garbage",
    [
        NOISE(4096),
        b"\x01\x00\xff\xff\xff\xff" + NOISE(64),  # A-ASSOCIATE-RQ claiming 4 GiB
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x04\x00\x00\x00\x00\x10" + NOISE(16),  # P-DATA before any association
    ],
    ids=["random", "huge-length", "http", "pdata-first"],
)
def test_garbage_on_the_port(shared, garbage):
    server = shared
    converse(server.port, garbage)
    assert_still_serving_and_clean(server)
    assert list(server.data.glob("*/*/*.dcm")) == []


def pdus(data: bytes) -> list[tuple[int, bytes]]:
    """(type, body) of each PDU in what a peer sent."""
    found = []
    while data:
        length = int.from_bytes(data[2:6], "big")
        found.append((data[0], data[6 : 6 + length]))
        data = data[6 + length :]
    return found


def command_in(pdata_bodies: list[bytes]):
    """The command set carried by P-DATA-TF bodies, its fragments joined (PS3.8 E.2)."""
    from pynetdicom.dsutils import decode

    fragments = b""
    for body in pdata_bodies:
        while body:
            length, control = int.from_bytes(body[:4], "big"), body[5]
            assert control & 1, "a dataset fragment where only a command was due"
            fragments += body[6 : 4 + length]
            body = body[4 + length :]
    assert control & 2, "the command's last fragment never came"
    return decode(io.BytesIO(fragments), True, True)


@pytest.mark.parametrize("max_pdu", [0xFFFFFFFF, 0, 1, 7, 100])
def test_absurd_maximum_pdu_sizes(shared, max_pdu):
    server = shared
    # A PDU of 1 or 7 bytes holds no whole PDV header: the answer comes a byte a PDU.
    reply = pdus(converse(server.port, associate_rq(max_pdu), c_echo_pdata(), RELEASE_RQ))
    assert reply[0][0] == 0x02  # A-ASSOCIATE-AC
    assert {kind for kind, _ in reply[1:-1]} == {0x04}  # then P-DATA-TF only
    assert reply[-1][0] == 0x06  # and A-RELEASE-RP: no abort after the answer
    response = command_in([body for _, body in reply[1:-1]])
    assert (response.CommandField, response.Status) == (0x8030, 0x0000)  # C-ECHO-RSP Success
    assert_still_serving_and_clean(server)


def test_peer_vanishing_mid_dataset_leaves_nothing(shared, tmp_path):
    server = shared
    (path,) = make_study(tmp_path / "study", 1, size=512)
    body = path.read_bytes()
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    command = Dataset()
    command.AffectedSOPClassUID = CT_IMAGE.decode()
    command.CommandField = 0x0001
    command.MessageID = 1
    command.Priority = 0
    command.CommandDataSetType = 0x0000
    command.AffectedSOPInstanceUID = "1.2.3.4"
    encoded = encode(command, True, True)
    command.CommandGroupLength = len(encoded)
    encoded = encode(command, True, True)
    pdv = struct.pack(">IB", len(encoded) + 2, 1) + b"\x03" + encoded
    fragment = body[300:100_300]  # part of the dataset, never the last fragment
    pdv += struct.pack(">IB", len(fragment) + 2, 1) + b"\x00" + fragment
    rq = associate_rq(0, CT_IMAGE)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(rq)
        assert read_pdu(sock)[:1] == b"\x02"  # A-ASSOCIATE-AC
        sock.sendall(struct.pack(">BBI", 4, 0, len(pdv)) + pdv)
        # Vanish once the server holds part of the dataset: a check of "clean" before it
        # got there would pass whatever the server leaves behind.
        assert wait_until(lambda: leftovers(server.data), 10), "no partial dataset in 10 s"
    assert_still_serving_and_clean(server)
    assert list(server.data.glob("*/*/*.dcm")) == []


def test_pdu_longer_than_our_maximum_is_refused(shared):
    server = shared
    # We announce 1 MiB; a P-DATA claiming 512 MiB is a protocol violation, not a buffer.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(associate_rq(0, CT_IMAGE))
        assert read_pdu(sock)[:1] == b"\x02"  # A-ASSOCIATE-AC
        sock.sendall(struct.pack(">BBI", 4, 0, 512 << 20) + NOISE(65536))
        try:  # without the limit the server would sit waiting for 512 MiB: a timeout here
            answer = sock.recv(65536)
        except ConnectionResetError:
            answer = b""
    # A-ABORT from the service provider (source 2), invalid PDU parameter value (reason 6).
    assert answer == bytes.fromhex("07000000000400000206")
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    peak_kib = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1])
    assert peak_kib < 200 * 1024
    assert_still_serving_and_clean(server)
