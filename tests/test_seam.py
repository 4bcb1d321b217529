"""pacs.seam: its replacements act for our server's AE only, it is checked against the
pynetdicom it was written for, and pacs.scu never installs it."""

import pickle
import queue
import socket
import subprocess
import sys
import threading
import time

import pydicom
import pytest
from conftest import ROOT
from conftest import TEST_FILES
from conftest import run
from dicom_files import dataset_bytes
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket

from pacs import dimse
from pacs import seam
from pacs.config import Config

CT = TEST_FILES / "CT_small.dcm"  # Explicit VR Little Endian
SEAM_ATTRIBUTES = ("_sending", "_reading", "_held", "_wake_recv", "_wake_send")


def test_check_passes_on_the_pynetdicom_installed():
    seam.check()


def test_check_names_what_is_missing_or_changed_in_one_line():
    expected = {
        **seam.EXPECTED,
        (DULServiceProvider, "_gone_in_a_later_version"): "(self)",
        (AssociationSocket, "recv"): "(self, nr_bytes, flags)",
    }
    with pytest.raises(seam.SeamMismatch) as raised:
        seam.check(expected)
    message = str(raised.value)
    assert "\n" not in message
    assert "DULServiceProvider._gone_in_a_later_version is missing" in message
    assert "AssociationSocket.recv is (self, nr_bytes), expected (self, nr_bytes, flags)" in message
    assert "~=3.0.4" in message


def test_serve_refuses_to_start_on_a_pynetdicom_the_seam_does_not_know(tmp_path):
    """The same check as the server process (pacs.boot pacs.server) runs it, against a
    table that expects one more attribute (pynetdicom itself is left as it is)."""
    code = (
        "import sys\n"
        "from pynetdicom.dul import DULServiceProvider\n"
        "from pacs import seam, server\n"
        "seam.EXPECTED[DULServiceProvider, '_gone_in_a_later_version'] = '(self)'\n"
        "server.main([])\n"
    )
    data = tmp_path / "data"
    config = pickle.dumps(Config(data=data, port=0, http_port=0))
    result = subprocess.run(
        [sys.executable, "-c", code], input=config, cwd=ROOT, capture_output=True, timeout=60
    )
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DULServiceProvider._gone_in_a_later_version is missing" in lines[0]
    assert not data.exists()  # nothing was opened


def test_using_pacs_scu_leaves_pynetdicom_stock(server):
    """A script that uses our SCU API gets pynetdicom as it is (a fresh process)."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pynetdicom import association, dul\n"
        "from pynetdicom.association import Association\n"
        "from pynetdicom.transport import AssociationSocket\n"
        "from pacs import scu\n"
        "remote = scu.Remote(port=int(sys.argv[1]))\n"
        "assert scu.echo(remote) == 0\n"
        "outcome = scu.send(remote, [Path(sys.argv[2])])\n"
        "assert outcome.ok and outcome.completed == 1, outcome\n"
        "print(Association.send_c_store.__module__, AssociationSocket.recv.__module__,\n"
        "      dul.time.__name__, association.time.__name__)\n"
    )
    result = run(sys.executable, "-c", code, str(server.port), str(CT), cwd=ROOT)
    stock = ["pynetdicom.association", "pynetdicom.transport", "time", "time"]
    assert result.stdout.split() == stock
    stored = next(server.data.glob("*/*/*.dcm"))
    assert dataset_bytes(stored) == dataset_bytes(CT)  # sent as the file's bytes


@pytest.fixture
def servers():
    """Factory: servers(ae, **make_server kwargs) → a listening server, shut down after."""
    started = []

    def start(ae: AE, **kwargs):
        server = ae.make_server(("127.0.0.1", 0), **kwargs)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        ae._servers.append(server)  # as AE.start_server does, for shutdown()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()


def _requestor(ae: AE, port: int, sent: list):
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    handlers = [(evt.EVT_DIMSE_SENT, lambda event: sent.append(type(event.message).__name__))]
    assoc = ae.associate("127.0.0.1", port, evt_handlers=handlers)
    assert assoc.is_established
    return assoc


def _stock(provider: DULServiceProvider) -> bool:
    return (
        not any(hasattr(provider, name) for name in SEAM_ATTRIBUTES)
        and type(provider.to_provider_queue) is queue.Queue
        and "do_action" not in vars(provider.state_machine)
    )


def _seamed(provider: DULServiceProvider) -> bool:
    return (
        all(hasattr(provider, name) for name in SEAM_ATTRIBUTES)
        and type(provider.to_provider_queue) is not queue.Queue
        and "do_action" in vars(provider.state_machine)
    )


def test_installed_seam_acts_for_our_server_ae_only(servers):
    """With the seam installed in this process, a plain pynetdicom AE's associations (as
    requestor and as acceptor) are stock: none of our attributes on their DUL, and
    send_c_store goes pynetdicom's way (an encoded C-STORE-RQ through its DIMSE layer).
    A ServerAE's associations, here in this same process, have the seam: its C-STORE of
    a file is written directly, the file's dataset bytes as they are."""
    seam.install()
    received: dict[str, bytes] = {}

    def store(event):
        received[event.assoc.requestor.ae_title] = event.encoded_dataset(include_meta=False)
        return 0x0000

    plain_scp = AE(ae_title="PLAINSCP")
    plain_scp.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    plain_scp.add_supported_context(Verification)
    plain_server = servers(plain_scp, evt_handlers=[(evt.EVT_C_STORE, store)])
    our_scp = seam.ServerAE(ae_title="OURSCP")
    our_scp.add_supported_context(Verification)
    our_server = servers(our_scp, server_class=seam.Server)

    plain_sent: list[str] = []
    plain = _requestor(AE(ae_title="PLAIN"), plain_server.server_address[1], plain_sent)
    ours_sent: list[str] = []
    ours = _requestor(seam.ServerAE(ae_title="OURS"), plain_server.server_address[1], ours_sent)
    try:
        assert plain.send_c_store(pydicom.dcmread(CT)).Status == 0x0000
        assert ours.send_c_store(CT).Status == 0x0000
        assert plain_sent == ["C_STORE_RQ"]  # pynetdicom's own path
        assert ours_sent == []  # written straight to the socket
        assert received["OURS"] == dataset_bytes(CT)
        assert "PLAIN" in received
        assert _stock(plain.dul)
        assert all(_stock(a.dul) for a in plain_server.active_associations)
        assert type(plain._reactor_checkpoint) is threading.Event
        assert _seamed(ours.dul)
        assert isinstance(ours._reactor_checkpoint, seam._Checkpoint)
        # Our server's acceptor side, with a plain requestor.
        visitor = _requestor(AE(ae_title="VISITOR"), our_server.server_address[1], [])
        assert visitor.send_c_echo().Status == 0x0000
        (accepted,) = our_server.active_associations
        assert _seamed(accepted.dul)
        assert _stock(visitor.dul)
        visitor.release()
    finally:
        plain.release()
        ours.release()
    assert plain.is_released and ours.is_released


def test_a_sender_sees_the_reactor_paused_only_once_it_stops():
    """pynetdicom's reactor turn: `_is_paused = True`, `_reactor_checkpoint.wait()`,
    `_is_paused = False`, then a look at the DIMSE queue. A sender pauses it by clearing
    the checkpoint and waiting for `_is_paused`. With pynetdicom's Event, a clear that
    comes just after the reactor's wait passed leaves `_is_paused` True while that turn
    goes on to take the sender's answer off the queue (a C-MOVE stalled for its DIMSE
    timeout in CI). Ours: the sender sees it paused only when its next wait stops it.
    The interleaving, step by step, on a real association of a ServerAE."""
    seam.install()
    assoc = Association(seam.ServerAE(ae_title="OURS"), "requestor")
    checkpoint = assoc._reactor_checkpoint
    for end in (assoc.dul._wake_recv, assoc.dul._wake_send):  # its DUL never runs
        end.close()
    # With a stock threading.Event the same steps leave `_is_paused` True after the
    # clear, so the sender goes ahead while that turn still reads the queue: the race.
    # Nothing in the stock Event itself can show it, so only ours is checked here.
    assoc._is_paused = True  # the reactor, about to wait
    assert checkpoint.wait(0)  # not paused: it passes, and goes on with its turn
    checkpoint.clear()  # a sender, at that moment
    assert not assoc._is_paused  # the sender does not take it for paused yet
    assoc._is_paused = True  # the turn looked at the queue; the next one begins
    assert not checkpoint.wait(0.01)  # stops here: now it is paused
    assert assoc._is_paused
    checkpoint.set()  # the sender is done: it goes on
    assert checkpoint.wait(0)


def test_divert_sees_plain_connections_first(servers):
    """`Server.divert` takes a connection before pynetdicom makes an Association of it;
    when it declines, the association goes on as usual."""
    seam.install()
    ae = seam.ServerAE(ae_title="OURSCP")
    ae.add_supported_context(Verification)
    server = servers(ae, server_class=seam.Server)
    taken: list[socket.socket] = []
    server.divert = lambda connection, address: taken.append(connection) or True
    with socket.create_connection(server.server_address) as client:
        deadline = time.monotonic() + 10
        while not taken and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(taken) == 1 and server.active_associations == []
        taken[0].sendall(b"diverted")  # the connection is the diverter's now
        client.settimeout(10)
        assert client.recv(8) == b"diverted"
        taken[0].close()
    server.divert = lambda connection, address: False
    requestor = AE(ae_title="VISITOR")
    requestor.add_requested_context(Verification)
    assoc = requestor.associate(*server.server_address)
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_a_direct_write_waits_for_the_send_pynetdicom_has_begun(servers):
    """In pynetdicom 3.0.x a queued PDU is taken off the queue and sent inside a state
    machine action (DT-1), after the reactor has peeked at it. A direct write
    (`seam._write`) must wait for that action to end, or the two go out interleaved. The
    action is made slow here by a handler of its own transition event."""
    seam.install()
    scp = AE(ae_title="PLAINSCP")
    scp.add_supported_context(Verification)
    server = servers(scp)
    in_action, armed = threading.Event(), threading.Event()
    ended: list[float] = []

    def slow(event):
        if armed.is_set() and event.action == "DT-1":
            armed.clear()
            in_action.set()
            time.sleep(0.3)
            ended.append(time.monotonic())

    ae = seam.ServerAE(ae_title="OURS")
    ae.add_requested_context(Verification)
    assoc = ae.associate(*server.server_address, evt_handlers=[(evt.EVT_FSM_TRANSITION, slow)])
    context_id = assoc.accepted_contexts[0].context_id
    # A C-CANCEL-RQ (PS3.7 9.3.2.3): the peer does not answer it.
    cancel = dimse.command(
        (0x00000100, (0x0FFF).to_bytes(2, "little")),
        (0x00000120, (77).to_bytes(2, "little")),
        (0x00000800, (0x0101).to_bytes(2, "little")),
    )
    armed.set()
    echo = threading.Thread(target=assoc.send_c_echo)
    echo.start()
    assert in_action.wait(10)
    seam._write(assoc, dimse.pdata(context_id, cancel, True, 0))
    written = time.monotonic()
    echo.join(10)
    assert ended and written >= ended[0]
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert assoc.is_released


@pytest.mark.parametrize("timeout", [None, 5.0], ids=["blocking", "with-timeout"])
def test_a_stored_dataset_goes_from_its_file_in_pdus_within_the_peers_maximum(timeout):
    """`_send_dataset` (C-MOVE/C-GET sub-operations, the router): the command, then the
    file's dataset bytes behind one PDV header per P-DATA-TF PDU, none longer than the
    peer's maximum (0: no limit), only the last marked last; on a socket with a timeout
    too (socket.sendfile then waits for it). Read back over real TCP."""
    expected = dataset_bytes(CT)
    command = dimse.pdata(1, dimse.command((0x00000100, b"\x01\x00")), True, 0)
    for max_pdu in (0, 16384, 1000):
        with socket.create_server(("127.0.0.1", 0)) as listener:
            sender = socket.create_connection(listener.getsockname())
            receiver, _ = listener.accept()
        sender.settimeout(timeout)
        stored = seam.StoredFile(CT)
        try:
            seam._send_dataset(command, 1, stored, max_pdu, sender)
        finally:
            stored.close()
            sender.close()
        with receiver:
            pdvs = _pdvs(receiver, max_pdu)
        assert pdvs[0] == (0x03, command[12:])  # the command, whole and last
        data = pdvs[1:]
        assert [h for h, _ in data] == [0x00] * (len(data) - 1) + [0x02], max_pdu
        assert b"".join(fragment for _, fragment in data) == expected, max_pdu
        assert len(data) == (1 if not max_pdu else -(-len(expected) // (max_pdu - 6)))


def _pdvs(sock: socket.socket, max_pdu: int) -> list[tuple[int, bytes]]:
    """(message control header, fragment) of each P-DATA-TF PDU until the sender closes,
    each checked to be one PDV within `max_pdu`."""
    stream, pdvs = b"", []
    while chunk := sock.recv(1 << 16):
        stream += chunk
    while stream:
        kind, length = stream[0], int.from_bytes(stream[2:6], "big")
        assert kind == 0x04 and (not max_pdu or length <= max_pdu)
        assert int.from_bytes(stream[6:10], "big") == length - 4  # one PDV a PDU
        pdvs.append((stream[11], stream[12 : 6 + length]))
        stream = stream[6 + length :]
    return pdvs
