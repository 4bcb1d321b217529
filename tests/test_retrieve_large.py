"""C-MOVE and C-GET of large studies and unusual archives: cancels, aborts, two
sub-associations, PDUs that must not interleave, more than 128 presentation contexts,
every stored pydicom file, the send CLI. One source server for the module holds a study
for each test (fresh UIDs) and knows a peer for each; every test looks only at its own
study and peer, and the server keeps serving through all of them."""

import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from conftest import TEST_FILES
from conftest import Server
from conftest import free_port
from conftest import minipacs
from conftest import run
from conftest import wait_until
from dicom_files import dataset_bytes
from dicom_files import storable
from make_study import make_study
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom import AllStoragePresentationContexts
from pynetdicom import build_role
from pynetdicom import evt
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove
from test_retrieve import StoreSCP

from pacs import scu

# The source's peers by AE title, one per test that needs one (DEST is a second minipacs).
PEERS = ("STORESCP", "COUNTER", "ABORTER", "CANCELLED")


@dataclass
class Source:
    server: Server
    studies: dict[str, list[Path]]  # what each test retrieves: the files imported
    ports: dict[str, int]  # peer AE title → port
    dest: Server


def many_classes(folder: Path) -> list[Path]:
    """CT_small as 70 storage classes × 2 transfer syntaxes, in a new study and series (the
    pydicom files include CT_small itself): 140 presentation contexts for one C-MOVE."""
    folder.mkdir(parents=True)
    template = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    template.StudyInstanceUID, template.SeriesInstanceUID = generate_uid(), generate_uid()
    paths = []
    classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts][:70]
    for n, sop_class in enumerate(classes):
        for implicit in (False, True):
            ds = template.copy()
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.file_meta.TransferSyntaxUID = (
                "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
            )
            paths.append(folder / f"{n}-{int(implicit)}.dcm")
            ds.save_as(paths[-1], implicit_vr=implicit, little_endian=True)
    return paths


def pydicom_files(folder: Path) -> list[Path]:
    """A copy of every storable file that ships with pydicom."""
    folder.mkdir(parents=True)
    paths = []
    for n, sample in enumerate(storable()):
        paths.append(folder / f"{n:03d}-{sample.path.name}")
        paths[-1].write_bytes(sample.path.read_bytes())
    return paths


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Source:
    """Every test's study imported in one go, a server with a peer for each (and a DIMSE
    timeout of 600 s, which the aborting peer must not make anyone wait for)."""
    root = tmp_path_factory.mktemp("large")
    incoming = root / "incoming"
    studies = {
        "cancel": make_study(incoming / "cancel", 300, size=64),
        "two": make_study(incoming / "two", 200, size=16),
        "abort": make_study(incoming / "abort", 40, size=16),
        "large": make_study(incoming / "large", 160, size=256),
        "classes": many_classes(incoming / "classes"),
        "pydicom": pydicom_files(incoming / "pydicom"),
    }
    minipacs("import", "--data", str(root / "data"), str(incoming), "--no-fsync")
    # The destination of the 140 contexts: a second minipacs, it accepts every storage class
    # (storescp does not). Its indexer places the files after each Success, at its own pace.
    dest = Server(root / "dest", "--aet", "DEST").start()
    ports = {aet: free_port() for aet in PEERS}
    peers = [arg for aet, port in ports.items() for arg in ("--peer", f"{aet}=127.0.0.1:{port}")]
    server = Server(
        root / "data",
        *peers,
        "--peer",
        f"DEST=127.0.0.1:{dest.port}",
        env={"MINIPACS_DIMSE_TIMEOUT": "600"},
    ).start()
    yield Source(server, studies, ports, dest)
    server.kill()
    dest.kill()


def study_of(source: Source, name: str) -> str:
    return pydicom.dcmread(source.studies[name][0], stop_before_pixels=True).StudyInstanceUID


def stored(source: Source, study: str) -> dict[str, bytes]:
    """The dataset bytes of each instance the source stores for `study`, by SOP UID."""
    return {p.stem: dataset_bytes(p) for p in (source.server.data / study).glob("*/*.dcm")}


@pytest.fixture
def storage_peer():
    """Factory: storage_peer(aet, port, on_store, ends=None) starts a pynetdicom CT storage
    SCP on `port` calling `on_store(event)` for each C-STORE, and appending to `ends`
    "established", "released" or "aborted" as its associations go; shut down at teardown."""
    servers = []

    def start(aet: str, port: int, on_store, ends: list | None = None) -> None:
        peer = AE(ae_title=aet)
        peer.add_supported_context(CTImageStorage)
        handlers = [(evt.EVT_C_STORE, on_store)]
        if ends is not None:
            for event, name in [
                (evt.EVT_ESTABLISHED, "established"),
                (evt.EVT_RELEASED, "released"),
                (evt.EVT_ABORTED, "aborted"),
            ]:
                handlers.append((event, lambda _, name=name: ends.append(name)))
        servers.append(peer.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers))

    yield start
    for scp in servers:
        scp.shutdown()


def test_cancel_mid_move(source, tmp_path):
    dest = StoreSCP(source.ports["STORESCP"], tmp_path / "moved")
    try:
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", source.server.port, ae_title="MINIPACS")
        query = scu.identifier("STUDY", {"StudyInstanceUID": study_of(source, "cancel")})
        statuses = []
        for status, _ in assoc.send_c_move(
            query, "STORESCP", StudyRootQueryRetrieveInformationModelMove, msg_id=9
        ):
            statuses.append(status)
            if len(statuses) == 1:  # pending responses come at most every 100 ms
                assoc.send_c_cancel(9, query_model=StudyRootQueryRetrieveInformationModelMove)
        assoc.release()
        final = statuses[-1]
        assert final.Status == 0xFE00
        assert 0 < final.NumberOfCompletedSuboperations < 300
        assert final.NumberOfRemainingSuboperations > 0
    finally:
        dest.stop()


def test_move_sends_over_two_associations_when_the_peer_takes_them(source, storage_peer):
    """A pynetdicom storage SCP as destination, counting what arrives over which
    association: with move_associations = 2 both carry instances, each exactly once. (A
    peer that takes one association at a time, storescp without --fork, gets everything
    over one: the tests of test_retrieve.py.)"""
    received: dict[int, list[str]] = {}
    originators: set[tuple] = set()

    def store(event):
        received.setdefault(id(event.assoc), []).append(event.request.AffectedSOPInstanceUID)
        request = event.request
        originators.add(
            (request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID)
        )
        return 0x0000

    storage_peer("COUNTER", source.ports["COUNTER"], store)
    study = study_of(source, "two")
    outcome = scu.move(scu.Remote(port=source.server.port), "STUDY", [study], "COUNTER")
    assert outcome.ok and outcome.completed == 200 and outcome.failed == 0
    everything = [uid for uids in received.values() for uid in uids]
    paths = source.studies["two"]
    assert sorted(everything) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in paths)
    assert len(received) == 2
    # PS3.7 9.3.1.1: the AE that asked for the move, and its C-MOVE's Message ID
    assert originators == {(scu.Remote().calling_aet, 1)}


def test_move_to_a_peer_that_aborts_midway_counts_the_rest_as_failed(source, storage_peer):
    """A destination that aborts an association after storing a few instances: the move
    ends without waiting for the server's DIMSE timeout (600 s here: our SCU would give
    up after its own 30 s and the counts would be missing), each instance counted exactly
    once, those not stored as failed, and the server keeps serving."""
    stored_by_peer: list[str] = []

    def store(event):
        if len(stored_by_peer) >= 5:
            event.assoc.abort()
            return 0xA700
        stored_by_peer.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    storage_peer("ABORTER", source.ports["ABORTER"], store)
    study = study_of(source, "abort")
    outcome = scu.move(scu.Remote(port=source.server.port), "STUDY", [study], "ABORTER")
    assert not outcome.ok
    assert outcome.completed == len(stored_by_peer) >= 5
    assert outcome.completed + outcome.failed == 40
    assert len(outcome.failed_uids) == outcome.failed
    assert scu.echo(scu.Remote(port=source.server.port)) == 0


def test_more_than_128_sop_class_and_syntax_combinations(source):
    study = study_of(source, "classes")
    try:
        outcome = scu.move(scu.Remote(port=source.server.port), "STUDY", [study], "DEST")
    except scu.AssociationError as exc:  # both servers' logs say where it stalled
        pytest.fail(
            f"{exc}\nsource:\n{source.server.log()[-4000:]}\ndest:\n{source.dest.log()[-4000:]}"
        )
    assert outcome.ok, (outcome, source.server.log()[-2000:])
    assert outcome.completed == 140

    # Filed by the destination's indexer after its Successes: polled.
    def filed() -> int:
        return len(list((source.dest.data / study).glob("*/*.dcm")))

    assert wait_until(lambda: filed() == 140), (filed(), source.dest.log()[-3000:])


def test_send_cli_in_parallel_is_bit_preserving(source, tmp_path):
    server = source.server
    paths = make_study(tmp_path / "study", 24, size=32)
    result = minipacs(
        "send", "--port", str(server.port), "--parallel", "4", str(tmp_path / "study")
    )
    assert "completed: 24  failed: 0" in result.stdout
    for path in paths:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(next(server.data.glob(f"*/*/{uid}.dcm"))) == dataset_bytes(path)


def test_send_cli_skips_a_file_that_is_not_dicom_and_sends_the_others(source, tmp_path):
    server = source.server
    paths = make_study(tmp_path / "mixed", 2, size=32)
    (tmp_path / "mixed" / "README.txt").write_text("not an image\n")
    result = minipacs("send", "--port", str(server.port), str(tmp_path / "mixed"), check=False)
    assert result.returncode == 1, result
    assert "completed: 2  failed: 1" in result.stdout
    readme = str(tmp_path / "mixed" / "README.txt")
    assert f"failed: {readme}: not sent: not a DICOM Part 10 file" in result.stdout
    for path in paths:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert list(server.data.glob(f"*/*/{uid}.dcm")), uid


def test_every_stored_pydicom_file_comes_back_byte_identical(source, tmp_path):
    studies = sorted({sample.study_uid for sample in storable()})
    wanted = {}
    for study in studies:
        wanted |= {p.stem: p for p in (source.server.data / study).glob("*/*.dcm")}
    outcome = scu.get(scu.Remote(port=source.server.port), "STUDY", studies, tmp_path / "got")
    assert outcome.ok, outcome
    assert outcome.completed == len(wanted)
    for uid, path in wanted.items():
        assert dataset_bytes(tmp_path / "got" / f"{uid}.dcm") == dataset_bytes(path), path.name


STRESS_ROUNDS, STRESS_SECONDS = 4, 60  # at most so many rounds; none begun after so long


def test_get_of_a_large_study_interleaves_no_pdus(source, tmp_path):
    """C-GET of a large study, repeated: the server writes each C-STORE (many PDUs) straight
    to the socket from the handler's thread while pynetdicom's DUL thread sends pending
    responses (every 100 ms) on the same socket. A PDU of one inside the other's breaks
    the stream: every instance must arrive whole and the association end in a release.
    pynetdicom and dcmtk's getscu take turns as the client."""
    port = source.server.port
    study = study_of(source, "large")
    expected = stored(source, study)
    assert len(expected) == 160
    deadline = time.monotonic() + STRESS_SECONDS
    for round_ in range(STRESS_ROUNDS):
        if round_ and time.monotonic() > deadline:
            break
        if round_ % 2:
            received = _get_with_getscu(port, study, tmp_path / f"got-{round_}")
        else:
            received, pending = _get_with_pynetdicom(port, study)
            assert pending > 0  # the pending responses did go out in between
        assert sorted(received) == sorted(expected)
        assert [uid for uid in expected if received[uid] != expected[uid]] == []
    assert scu.echo(scu.Remote(port=port)) == 0


def _get_with_pynetdicom(port: int, study: str) -> tuple[dict[str, bytes], int]:
    """The study's instances (dataset bytes by SOP Instance UID), and how many pending
    responses came."""
    received: dict[str, bytes] = {}

    def store(event):
        received[event.request.AffectedSOPInstanceUID] = event.encoded_dataset(False)
        return 0x0000

    ae = AE(ae_title="STRESS")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # as stored
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="MINIPACS",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, store)],
    )
    assert assoc.is_established
    query = scu.identifier("STUDY", {"StudyInstanceUID": study})
    statuses = [
        int(status.Status)
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
    ]
    assoc.release()
    assert assoc.is_released and not assoc.is_aborted
    assert statuses[-1] == 0x0000
    return received, statuses.count(0xFF00)


def _get_with_getscu(port: int, study: str, out: Path) -> dict[str, bytes]:
    out.mkdir()
    result = run(
        "getscu", "-v", "+B", "-aec", "MINIPACS", "-od", str(out),
        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
        "127.0.0.1", str(port),
    )  # fmt: skip
    assert "Received C-GET Response (Success)" in result.stderr
    assert "Releasing Association" in result.stderr and "Abort" not in result.stderr
    return {
        pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID: dataset_bytes(path)
        for path in out.iterdir()
    }


def test_move_cancelled_midway_ends_cleanly_every_time(source, storage_peer):
    """C-MOVE with a C-CANCEL after the first pending response, repeated: the senders'
    direct writes on two sub-associations, the cancel and the releases meet differently
    each time. What the destination got is whole and is what was counted completed, and
    every association (the requestor's, the sub-associations) ends in a release."""
    received: dict[str, bytes] = {}
    ends: list[str] = []

    def store(event):
        received[event.request.AffectedSOPInstanceUID] = event.encoded_dataset(False)
        return 0x0000

    storage_peer("CANCELLED", source.ports["CANCELLED"], store, ends)
    study = study_of(source, "cancel")
    expected = stored(source, study)
    query = scu.identifier("STUDY", {"StudyInstanceUID": study})
    model = StudyRootQueryRetrieveInformationModelMove
    deadline = time.monotonic() + STRESS_SECONDS
    for round_ in range(STRESS_ROUNDS):
        if round_ and time.monotonic() > deadline:
            break
        received.clear()
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(model)
        assoc = ae.associate("127.0.0.1", source.server.port, ae_title="MINIPACS")
        statuses = []
        for status, _ in assoc.send_c_move(query, "CANCELLED", model, msg_id=9):
            statuses.append(status)
            if len(statuses) == 1:
                assoc.send_c_cancel(9, query_model=model)
        assoc.release()
        assert assoc.is_released and not assoc.is_aborted
        final = statuses[-1]
        assert final.Status == 0xFE00
        assert final.get("NumberOfFailedSuboperations", 0) == 0
        assert 0 < final.NumberOfCompletedSuboperations == len(received) < 300
        assert [uid for uid in received if received[uid] != expected[uid]] == []
        until = time.monotonic() + 30  # the sub-associations are released after the answer
        while ends.count("established") > ends.count("released") + ends.count("aborted"):
            assert time.monotonic() < until, ends
            time.sleep(0.05)
        assert "aborted" not in ends
    assert scu.echo(scu.Remote(port=source.server.port)) == 0
