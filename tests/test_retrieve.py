"""C-MOVE and C-GET of the query corpus on both engines: real peers (dcmtk storescp as
destination, movescu, getscu) and ours. Large studies, cancels, aborts and unusual
archives are in test_retrieve_large.py (one server of their own)."""

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
from pynetdicom import AE
from pynetdicom import build_role
from pynetdicom import evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from pacs import scu

StudyRootMove = StudyRootQueryRetrieveInformationModelMove
StudyRootGet = StudyRootQueryRetrieveInformationModelGet


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
def destination(tmp_path_factory, module_engine) -> Server:
    """DEST, not started yet: a second minipacs (duplicates = reject, an index of its own)
    that the corpus server knows as a peer."""
    folder = tmp_path_factory.mktemp("dest")
    return Server(folder / "data", "--aet", "DEST", "--duplicates", "reject")


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory, module_engine, destination):
    """The query corpus, plus compressed instances, on a server that knows STORESCP and
    DEST; once per index engine, for the module: retrievals only read it."""
    root = tmp_path_factory.mktemp("corpus")
    made = build(root / "corpus")
    for name in ("JPEG2000.dcm", "MR_small_RLE.dcm"):
        (root / "corpus" / name).write_bytes((TEST_FILES / name).read_bytes())
    data = root / "data"
    minipacs("import", "--data", str(data), *index_args(module_engine), str(root / "corpus"),
             "--no-fsync")  # fmt: skip
    destination_port = free_port()
    peers = ("--peer", f"STORESCP=127.0.0.1:{destination_port}", "--peer", "DOWN=127.0.0.1:1")
    peers += ("--peer", f"DEST=127.0.0.1:{destination.port}")
    server = Server(data, *peers, index=module_engine).start()
    yield server, made, destination_port
    server.kill()


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


def test_final_move_and_get_responses_carry_no_remaining_count(corpus_server, tmp_path):
    # PS3.4 C.4.2.1.6 and C.4.3.1.6: Number of Remaining Sub-operations (0000,1020) in
    # Pending responses, never in Success (pynetdicom reuses its last pending response).
    server, made, port = corpus_server
    study = made["A"]["uid"]  # five instances: at least one pending response each way
    query = pydicom.Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study
    classes = {pydicom.dcmread(p).SOPClassUID for p in server.data.glob(f"{study}/*/*.dcm")}

    def responses(retrieve) -> list[pydicom.Dataset]:
        """Over an association of its own: the pending interval is per association."""
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(StudyRootMove)
        ae.add_requested_context(StudyRootGet)
        for sop_class in classes:
            ae.add_requested_context(sop_class)
        assoc = ae.associate(
            "127.0.0.1", server.port, ae_title="MINIPACS",
            evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)],
            ext_neg=[build_role(c, scp_role=True) for c in classes],
        )  # fmt: skip
        try:
            return [status for status, _ in retrieve(assoc)]
        finally:
            assoc.release()

    dest = StoreSCP(port, tmp_path / "moved")
    try:
        moved = responses(lambda assoc: assoc.send_c_move(query, "STORESCP", StudyRootMove))
    finally:
        dest.stop()
    got = responses(lambda assoc: assoc.send_c_get(query, StudyRootGet))
    for *pending, final in (moved, got):
        assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 5
        assert "NumberOfRemainingSuboperations" not in final
        assert pending and all(p.Status == 0xFF00 for p in pending)
        assert all("NumberOfRemainingSuboperations" in p for p in pending)


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
    result = minipacs(
        "find", "--port", port, "--csv", "PatientID=PID1", "StudyInstanceUID", "StudyDate"
    )
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "PatientID,StudyInstanceUID,StudyDate"
    assert sorted(lines[1:]) == sorted(
        [f"PID1,{made['A']['uid']},20200105", f"PID1,{made['B']['uid']},20210310"]
    )


def test_echo_cli_exit_status_when_nobody_listens():
    result = minipacs("echo", "--port", str(free_port()), check=False)
    assert result.returncode == 3


@pytest.fixture(scope="module")
def conflicts(corpus_server, destination, tmp_path_factory) -> dict[str, list[str]]:
    """DEST started, already holding different bytes under the first instance of study A
    and every instance of study C: {study label: those SOP Instance UIDs}."""
    server, made, _ = corpus_server
    chosen = {
        "A": made["A"]["series"][0][1][:1],
        "C": [uid for _, sops in made["C"]["series"] for uid in sops],
    }
    folder = tmp_path_factory.mktemp("conflicts")
    for uid in chosen["A"] + chosen["C"]:
        ds = pydicom.dcmread(next(server.data.glob(f"*/*/{uid}.dcm")))
        ds.StudyDescription = "something else"
        ds.save_as(folder / f"{uid}.dcm")
    destination.start()
    sent = scu.send(scu.Remote(port=destination.port, aet="DEST"), sorted(folder.iterdir()))
    assert sent.ok and sent.completed == 4, sent
    yield chosen
    destination.kill()


@pytest.mark.parametrize(
    ("label", "status"), [("A", 0xB000), ("C", 0xA702)], ids=["some-fail-b000", "all-fail-a702"]
)
def test_failed_sub_operations_are_reported(corpus_server, conflicts, label, status):
    # DEST already holds different bytes under some of the UIDs (one of A's five, all
    # three of C's): those C-STOREs fail with 0x0111.
    server, made, _ = corpus_server
    sops = [uid for _, uids in made[label]["series"] for uid in uids]
    conflicting = conflicts[label]
    outcome = scu.move(scu.Remote(port=server.port), "STUDY", [made[label]["uid"]], "DEST")
    assert outcome.failed == len(conflicting)
    assert outcome.completed == len(sops) - len(conflicting)
    assert sorted(outcome.failed_uids) == sorted(conflicting)
    assert outcome.status == status


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
