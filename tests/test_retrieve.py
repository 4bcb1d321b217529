"""C-MOVE and C-GET: real peers (dcmtk storescp as destination, movescu, getscu) and ours."""

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import TEST_FILES
from conftest import Server
from conftest import free_port
from conftest import index_args
from conftest import minipacs
from conftest import run
from corpus import build
from dicom_files import dataset_bytes
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import build_role
from pynetdicom import evt
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from pacs import scu


class StoreSCP:
    """dcmtk storescp as a C-MOVE destination, writing what it receives bit for bit (+B);
    `accept_all` takes compressed syntaxes too, else only uncompressed ones."""

    def __init__(self, port: int, out: Path, accept_all: bool = True) -> None:
        self.port, self.out = port, out
        out.mkdir(parents=True, exist_ok=True)
        args = ["storescp", "+B", "-aet", "STORESCP", "-od", str(out)]
        args += ["+xa"] if accept_all else []
        self.proc = subprocess.Popen(
            [*args, str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        deadline = time.monotonic() + 10
        while run("echoscu", "127.0.0.1", str(port), check=False).returncode:
            assert time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.1)

    def files(self) -> list[Path]:
        return sorted(self.out.iterdir())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory, module_engine):
    """The query corpus, plus compressed instances, on a server that knows STORESCP; once
    per index engine, for the module: retrievals only read it."""
    root = tmp_path_factory.mktemp("corpus")
    made = build(root / "corpus")
    for name in ("JPEG2000.dcm", "MR_small_RLE.dcm"):
        (root / "corpus" / name).write_bytes((TEST_FILES / name).read_bytes())
    data = root / "data"
    minipacs("import", "--data", str(data), *index_args(module_engine), str(root / "corpus"),
             "--no-fsync")  # fmt: skip
    destination_port = free_port()
    peers = ("--peer", f"STORESCP=127.0.0.1:{destination_port}", "--peer", "DOWN=127.0.0.1:1")
    server = Server(data, *peers, index=module_engine).start()
    yield server, made, destination_port
    server.kill()


def imported_study(tmp_path: Path, count: int, size: int) -> list[Path]:
    """A synthetic study (scripts/make_study.py) imported into tmp_path / "data"."""
    from make_study import make_study

    paths = make_study(tmp_path / "study", count, size=size)
    minipacs("import", "--data", str(tmp_path / "data"), str(tmp_path / "study"), "--no-fsync")
    return paths


@pytest.fixture
def storage_peer():
    """Factory: storage_peer(aet, on_store, ends=None) → the port of a pynetdicom CT
    storage SCP calling `on_store(event)` for each C-STORE, and appending to `ends`
    "established", "released" or "aborted" as its associations go; shut down at teardown."""
    servers = []

    def start(aet: str, on_store, ends: list | None = None) -> int:
        peer = AE(ae_title=aet)
        peer.add_supported_context(CTImageStorage)
        port = free_port()
        handlers = [(evt.EVT_C_STORE, on_store)]
        if ends is not None:
            for event, name in [
                (evt.EVT_ESTABLISHED, "established"),
                (evt.EVT_RELEASED, "released"),
                (evt.EVT_ABORTED, "aborted"),
            ]:
                handlers.append((event, lambda _, name=name: ends.append(name)))
        servers.append(peer.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers))
        return port

    yield start
    for scp in servers:
        scp.shutdown()


def test_movescu_moves_a_study_byte_identical(corpus_server, tmp_path):
    server, made, port = corpus_server
    dest = StoreSCP(port, tmp_path / "moved")
    try:
        result = run(
            "movescu",
            "-v",
            "-S",
            "-aec",
            "MINIPACS",
            "-aem",
            "STORESCP",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={made['A']['uid']}",
            "127.0.0.1",
            str(server.port),
        )
        assert "Received Final Move Response (Success)" in result.stderr
        files = dest.files()
        assert len(files) == 5
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            stored = next(server.data.glob(f"*/*/{ds.SOPInstanceUID}.dcm"))
            assert dataset_bytes(path) == dataset_bytes(stored)
    finally:
        dest.stop()


def test_move_decompresses_for_a_peer_taking_only_uncompressed(corpus_server, tmp_path):
    server, made, port = corpus_server
    dest = StoreSCP(port, tmp_path / "plain", accept_all=False)
    try:
        original = pydicom.dcmread(TEST_FILES / "JPEG2000.dcm")
        outcome = scu.move(
            scu.Remote(port=server.port), "IMAGE", [original.SOPInstanceUID], "STORESCP"
        )
        assert outcome.ok and outcome.completed == 1
        (received,) = dest.files()
        ds = pydicom.dcmread(received)
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        assert ds.SOPInstanceUID == original.SOPInstanceUID  # pydicom would mint a new one
        assert np.array_equal(ds.pixel_array, original.pixel_array)
    finally:
        dest.stop()


def test_move_to_unknown_destination_is_a801(corpus_server):
    server, made, _ = corpus_server
    logged = len(server.log())  # the server is the module's: only what this test adds
    outcome = scu.move(scu.Remote(port=server.port), "STUDY", [made["A"]["uid"]], "NOBODY")
    assert outcome.status == 0xA801
    assert "unknown AE 'NOBODY'" in server.log()[logged:]


def test_move_to_a_destination_that_is_down_fails_and_server_keeps_serving(corpus_server):
    server, made, _ = corpus_server
    logged = len(server.log())
    outcome = scu.move(scu.Remote(port=server.port), "STUDY", [made["A"]["uid"]], "DOWN")
    assert not outcome.ok
    assert outcome.status & 0xF000 == 0xC000  # unable to process: known AE, not reachable
    assert "DOWN at 127.0.0.1:1 is not reachable" in server.log()[logged:]
    assert scu.echo(scu.Remote(port=server.port)) == 0


def test_cancel_mid_move(start_server, tmp_path):
    paths = imported_study(tmp_path, 300, size=64)
    port = free_port()
    server = start_server("--peer", f"STORESCP=127.0.0.1:{port}", data=tmp_path / "data")
    dest = StoreSCP(port, tmp_path / "moved")
    try:
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
        query = scu.identifier(
            "STUDY", {"StudyInstanceUID": pydicom.dcmread(paths[0]).StudyInstanceUID}
        )
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


def test_move_sends_over_two_associations_when_the_peer_takes_them(
    start_server, storage_peer, tmp_path
):
    """A pynetdicom storage SCP as destination, counting what arrives over which
    association: with move_associations = 2 both carry instances, each exactly once. (A
    peer that takes one association at a time, storescp without --fork, gets everything
    over one: the tests above.)"""
    paths = imported_study(tmp_path, 200, size=16)
    received: dict[int, list[str]] = {}
    originators: set[tuple] = set()

    def store(event):
        received.setdefault(id(event.assoc), []).append(event.request.AffectedSOPInstanceUID)
        request = event.request
        originators.add(
            (request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID)
        )
        return 0x0000

    port = storage_peer("COUNTER", store)
    server = start_server("--peer", f"COUNTER=127.0.0.1:{port}", data=tmp_path / "data")
    study = pydicom.dcmread(paths[0]).StudyInstanceUID
    outcome = scu.move(scu.Remote(port=server.port), "STUDY", [study], "COUNTER")
    assert outcome.ok and outcome.completed == 200 and outcome.failed == 0
    everything = [uid for uids in received.values() for uid in uids]
    assert sorted(everything) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in paths)
    assert len(received) == 2
    # PS3.7 9.3.1.1: the AE that asked for the move, and its C-MOVE's Message ID
    assert originators == {(scu.Remote().calling_aet, 1)}


def test_move_to_a_peer_that_aborts_midway_counts_the_rest_as_failed(
    start_server, storage_peer, tmp_path
):
    """A destination that aborts an association after storing a few instances: the move
    ends without waiting for the server's DIMSE timeout (600 s here: our SCU would give
    up after its own 30 s and the counts would be missing), each instance counted exactly
    once, those not stored as failed, and the server keeps serving."""
    paths = imported_study(tmp_path, 40, size=16)
    stored: list[str] = []

    def store(event):
        if len(stored) >= 5:
            event.assoc.abort()
            return 0xA700
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    port = storage_peer("ABORTER", store)
    server = start_server(
        "--peer",
        f"ABORTER=127.0.0.1:{port}",
        data=tmp_path / "data",
        env={"MINIPACS_DIMSE_TIMEOUT": "600"},
    )
    study = pydicom.dcmread(paths[0]).StudyInstanceUID
    outcome = scu.move(scu.Remote(port=server.port), "STUDY", [study], "ABORTER")
    assert not outcome.ok
    assert outcome.completed == len(stored) >= 5
    assert outcome.completed + outcome.failed == 40
    assert len(outcome.failed_uids) == outcome.failed
    assert scu.echo(scu.Remote(port=server.port)) == 0


def test_getscu_gets_a_series_byte_identical(corpus_server, tmp_path):
    server, made, _ = corpus_server
    series_uid, sops = made["C"]["series"][0]
    out = tmp_path / "got"
    out.mkdir()
    result = run(
        "getscu",
        "-v",
        "-S",
        "+B",
        "-aec",
        "MINIPACS",
        "-od",
        str(out),
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={made['C']['uid']}",
        "-k",
        f"SeriesInstanceUID={series_uid}",
        "127.0.0.1",
        str(server.port),
    )
    assert "Received C-GET Response (Success)" in result.stderr
    got = sorted(out.iterdir())
    assert len(got) == len(sops)
    for path in got:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert uid in sops
        assert dataset_bytes(path) == dataset_bytes(next(server.data.glob(f"*/*/{uid}.dcm")))


def test_our_get_keeps_compressed_instances_compressed(corpus_server, tmp_path):
    server, _, _ = corpus_server
    original = pydicom.dcmread(TEST_FILES / "MR_small_RLE.dcm", stop_before_pixels=True)
    outcome = scu.get(
        scu.Remote(port=server.port), "STUDY", [original.StudyInstanceUID], tmp_path / "got"
    )
    assert outcome.ok and outcome.completed >= 1
    received = tmp_path / "got" / f"{original.SOPInstanceUID}.dcm"
    assert pydicom.dcmread(received).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    assert dataset_bytes(received) == dataset_bytes(TEST_FILES / "MR_small_RLE.dcm")


def test_get_and_move_cli_exit_statuses(corpus_server, tmp_path):
    server, made, _ = corpus_server
    port = str(server.port)
    result = minipacs("get", "--port", port, "--out", str(tmp_path / "cli"), made["B"]["uid"])
    assert "completed: 2  failed: 0" in result.stdout
    result = minipacs("move", "--port", port, "--dest", "NOBODY", made["B"]["uid"], check=False)
    assert result.returncode == 1
    assert "0xA801" in result.stdout
    result = minipacs("echo", "--port", str(free_port()), check=False)
    assert result.returncode == 3
    result = minipacs(
        "find", "--port", port, "--csv", "PatientID=PID1", "StudyInstanceUID", "StudyDate"
    )
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "PatientID,StudyInstanceUID,StudyDate"
    assert sorted(lines[1:]) == sorted(
        [f"PID1,{made['A']['uid']},20200105", f"PID1,{made['B']['uid']},20210310"]
    )


def test_more_than_128_sop_class_and_syntax_combinations(start_server, tmp_path):
    from pynetdicom import AllStoragePresentationContexts

    template = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    folder = tmp_path / "many"
    folder.mkdir()
    classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts][:70]
    for n, sop_class in enumerate(classes):
        for implicit in (False, True):
            ds = template.copy()
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
                f"1.2.3.{n}.{int(implicit)}"
            )
            ds.file_meta.TransferSyntaxUID = (
                "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
            )
            ds.save_as(
                folder / f"{n}-{int(implicit)}.dcm", implicit_vr=implicit, little_endian=True
            )
    minipacs("import", "--data", str(tmp_path / "data"), str(folder), "--no-fsync")
    # The destination is a second minipacs: it accepts every storage class (storescp does not).
    dest = start_server("--aet", "DEST", data=tmp_path / "dest")
    server = start_server("--peer", f"DEST=127.0.0.1:{dest.port}", data=tmp_path / "data")
    outcome = scu.move(scu.Remote(port=server.port), "STUDY", [template.StudyInstanceUID], "DEST")
    assert outcome.ok, (outcome, server.log()[-2000:])
    assert outcome.completed == 140
    assert len(list((tmp_path / "dest").glob("*/*/*.dcm"))) == 140


def test_send_cli_in_parallel_is_bit_preserving(server, tmp_path):
    from make_study import make_study

    paths = make_study(tmp_path / "study", 24, size=32)
    result = minipacs(
        "send", "--port", str(server.port), "--parallel", "4", str(tmp_path / "study")
    )
    assert "completed: 24  failed: 0" in result.stdout
    for path in paths:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(next(server.data.glob(f"*/*/{uid}.dcm"))) == dataset_bytes(path)


@pytest.mark.parametrize("conflicts", [1, 5], ids=["some-fail-b000", "all-fail-a702"])
def test_failed_sub_operations_are_reported(corpus_server, start_server, tmp_path, conflicts):
    # The destination (a second minipacs, duplicates = reject) already holds different
    # bytes under some of the UIDs: those C-STOREs fail with 0x0111.
    server, made, _ = corpus_server
    (series_a1, sops_a1), (series_a2, sops_a2) = made["A"]["series"]
    conflicting = (sops_a1 + sops_a2)[:conflicts]
    folder = tmp_path / "conflicts"
    folder.mkdir()
    for uid in conflicting:
        ds = pydicom.dcmread(next(server.data.glob(f"*/*/{uid}.dcm")))
        ds.StudyDescription = "something else"
        ds.save_as(folder / f"{uid}.dcm")
    minipacs("import", "--data", str(tmp_path / "dest"), str(folder))
    dest = start_server("--aet", "DEST", "--duplicates", "reject", data=tmp_path / "dest")
    relay = start_server(
        "--peer", f"DEST=127.0.0.1:{dest.port}", data=server.data, index=server.index
    )
    outcome = scu.move(scu.Remote(port=relay.port), "STUDY", [made["A"]["uid"]], "DEST")
    assert outcome.failed == conflicts
    assert outcome.completed == 5 - conflicts
    assert sorted(outcome.failed_uids) == sorted(conflicting)
    assert outcome.status == (0xB000 if conflicts < 5 else 0xA702)


def test_move_a_list_of_studies(corpus_server, tmp_path):
    server, made, port = corpus_server
    dest = StoreSCP(port, tmp_path / "moved")
    try:
        outcome = scu.move(
            scu.Remote(port=server.port), "STUDY", [made["B"]["uid"], made["D"]["uid"]], "STORESCP"
        )
        assert outcome.ok and outcome.completed == 3
        assert len(dest.files()) == 3
    finally:
        dest.stop()


def test_every_stored_pydicom_file_comes_back_byte_identical(start_server, tmp_path):
    from dicom_files import storable

    folder = tmp_path / "all"
    folder.mkdir()
    for n, sample in enumerate(storable()):
        (folder / f"{n:03d}-{sample.path.name}").write_bytes(sample.path.read_bytes())
    minipacs("import", "--data", str(tmp_path / "data"), str(folder), "--no-fsync")
    server = start_server(data=tmp_path / "data")
    stored = {p.stem: p for p in (tmp_path / "data").glob("*/*/*.dcm")}
    studies = {p.parent.parent.name for p in stored.values()}
    outcome = scu.get(scu.Remote(port=server.port), "STUDY", sorted(studies), tmp_path / "got")
    assert outcome.ok, outcome
    assert outcome.completed == len(stored)
    for uid, path in stored.items():
        assert dataset_bytes(tmp_path / "got" / f"{uid}.dcm") == dataset_bytes(path), path.name


STRESS_ROUNDS, STRESS_SECONDS = 4, 60  # at most so many rounds; none begun after so long


def test_get_of_a_large_study_interleaves_no_pdus(start_server, tmp_path):
    """C-GET of a large study, repeated: the server writes each C-STORE (many PDUs) straight
    to the socket from the handler's thread while pynetdicom's DUL thread sends pending
    responses (every 100 ms) on the same socket. A PDU of one inside the other's breaks
    the stream: every instance must arrive whole and the association end in a release.
    pynetdicom and dcmtk's getscu take turns as the client."""
    paths = imported_study(tmp_path, 160, size=256)
    server = start_server(data=tmp_path / "data")
    study = pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    stored = {p.stem: dataset_bytes(p) for p in (tmp_path / "data").glob("*/*/*.dcm")}
    deadline = time.monotonic() + STRESS_SECONDS
    for round_ in range(STRESS_ROUNDS):
        if round_ and time.monotonic() > deadline:
            break
        if round_ % 2:
            received = _get_with_getscu(server.port, study, tmp_path / f"got-{round_}")
        else:
            received, pending = _get_with_pynetdicom(server.port, study)
            assert pending > 0  # the pending responses did go out in between
        assert sorted(received) == sorted(stored)
        assert [uid for uid in stored if received[uid] != stored[uid]] == []
    assert scu.echo(scu.Remote(port=server.port)) == 0


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


def test_move_cancelled_midway_ends_cleanly_every_time(start_server, storage_peer, tmp_path):
    """C-MOVE with a C-CANCEL after the first pending response, repeated: the senders'
    direct writes on two sub-associations, the cancel and the releases meet differently
    each time. What the destination got is whole and is what was counted completed, and
    every association (the requestor's, the sub-associations) ends in a release."""
    paths = imported_study(tmp_path, 300, size=64)
    received: dict[str, bytes] = {}
    ends: list[str] = []

    def store(event):
        received[event.request.AffectedSOPInstanceUID] = event.encoded_dataset(False)
        return 0x0000

    port = storage_peer("COUNTER", store, ends)
    server = start_server("--peer", f"COUNTER=127.0.0.1:{port}", data=tmp_path / "data")
    stored = {p.stem: dataset_bytes(p) for p in (tmp_path / "data").glob("*/*/*.dcm")}
    query = scu.identifier(
        "STUDY", {"StudyInstanceUID": pydicom.dcmread(paths[0]).StudyInstanceUID}
    )
    model = StudyRootQueryRetrieveInformationModelMove
    deadline = time.monotonic() + STRESS_SECONDS
    for round_ in range(STRESS_ROUNDS):
        if round_ and time.monotonic() > deadline:
            break
        received.clear()
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(model)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
        statuses = []
        for status, _ in assoc.send_c_move(query, "COUNTER", model, msg_id=9):
            statuses.append(status)
            if len(statuses) == 1:
                assoc.send_c_cancel(9, query_model=model)
        assoc.release()
        assert assoc.is_released and not assoc.is_aborted
        final = statuses[-1]
        assert final.Status == 0xFE00
        assert final.get("NumberOfFailedSuboperations", 0) == 0
        assert 0 < final.NumberOfCompletedSuboperations == len(received) < 300
        assert [uid for uid in received if received[uid] != stored[uid]] == []
        until = time.monotonic() + 30  # the sub-associations are released after the answer
        while ends.count("established") > ends.count("released") + ends.count("aborted"):
            assert time.monotonic() < until, ends
            time.sleep(0.05)
        assert "aborted" not in ends
    assert scu.echo(scu.Remote(port=server.port)) == 0
