"""The C-STORE engine (pacs.store_scp, storage.journal, storage.indexer): storage-only
associations on our own upper layer, acknowledged once durable, indexed right after."""

import socket
import struct
import time
import zlib
from pathlib import Path

import pydicom
import pytest
from conftest import TEST_FILES
from conftest import Server
from conftest import run
from conftest import storescu
from dicom_files import dataset_bytes
from make_study import make_study
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom import _config
from pynetdicom.sop_class import CTImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from pynetdicom.sop_class import Verification
from scu import echo

from storage.journal import file_meta

CT = TEST_FILES / "CT_small.dcm"
DEFLATED = "1.2.840.10008.1.2.1.99"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the tests that only add what they check (fresh UIDs, their own log
    lines): each ends with it serving and clean, so it also survives all of them."""
    running = Server(tmp_path_factory.mktemp("ingest") / "data").start()
    yield running
    running.kill()


def fresh_ct(folder) -> tuple[str, "pydicom.Dataset"]:
    """CT_small under new UIDs, as a file in `folder`."""
    ds = pydicom.dcmread(CT)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return str(path), ds


def journal_left(server, timeout: float = 10) -> list:
    """What is still in the journal once it had `timeout` seconds to empty (an entry is
    unlinked just after its row commits; a .part or entry left behind stays)."""
    deadline = time.monotonic() + timeout
    while True:
        left = list((server.data / ".queue").iterdir())
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def indexed(server, sop_uids: set[str], timeout: float = 30) -> set[str]:
    """Which of `sop_uids` are in the index, once all are (or the time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {uid for (uid,) in server.rows("SELECT sop_uid FROM instance")} & sop_uids
        if found == sop_uids or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def queryable(server, count: int, timeout: float = 30) -> list[tuple]:
    """Index rows, once `count` instances are there (or the time is up)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = server.rows("SELECT sop_uid FROM instance")
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_released_at_once_and_queryable_right_after(start_server, tmp_path):
    server = start_server(env={"MINIPACS_INDEX_WAIT": "0"})  # the default
    paths = make_study(tmp_path / "study", 40, size=64)
    storescu(server.port, *paths)
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    assert {uid for (uid,) in queryable(server, len(paths))} == sent
    # An entry is unlinked just after its row commits: the journal empties right after.
    assert journal_left(server) == []
    assert "pacs.store_scp" in server.log()  # served by our own engine, not pynetdicom


def test_a_release_waits_until_what_it_stored_is_queryable(server, tmp_path):
    assert server.env is None  # Server's own MINIPACS_INDEX_WAIT=30
    paths = make_study(tmp_path / "study", 30, size=64)
    storescu(server.port, *paths)
    stored = server.rows("SELECT sop_uid FROM instance")  # no waiting here
    sent = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}
    assert sent <= {uid for (uid,) in stored}


def test_store_then_find_on_one_association_goes_through_pynetdicom(server, tmp_path):
    """An association that also asks for C-FIND is pynetdicom's: a C-STORE's Success
    there means queryable, so the C-FIND right after finds it."""
    path, ct = fresh_ct(tmp_path)
    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(path).Status == 0x0000
        query = pydicom.Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ct.StudyInstanceUID
        answers = [
            answer
            for status, answer in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            )
            if status.Status == 0xFF00
        ]
    finally:
        assoc.release()
    assert [a.StudyInstanceUID for a in answers] == [ct.StudyInstanceUID]
    ours = [line for line in server.log().splitlines() if "WORKSTATION" in line]
    assert ours and not [line for line in ours if "pacs.store_scp" in line]


def test_a_silent_connection_does_not_hold_up_others(server, tmp_path):
    path, ct = fresh_ct(tmp_path)
    silent = socket.create_connection(("127.0.0.1", server.port))
    half = socket.create_connection(("127.0.0.1", server.port))
    half.sendall(b"\x01\x00\x00\x00\x10\x00")  # an A-ASSOCIATE-RQ header, then nothing
    try:
        assert echo(server.port) == 0
        run("echoscu", "-aec", "MINIPACS", "127.0.0.1", str(server.port))
        storescu(server.port, path)
    finally:
        silent.close()
        half.close()
    assert indexed(server, {ct.SOPInstanceUID}) == {ct.SOPInstanceUID}


def test_rejections_follow_the_standard(server):
    """Called AE not ours: A-ASSOCIATE-RJ, permanent, service user, reason 7 (PS3.8
    9.3.4); a context for a class we do not store is refused, the others accepted."""
    wrong = run("echoscu", "-aec", "SOMEONE", "127.0.0.1", str(server.port), check=False)
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stderr
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context("1.2.3.4.5.6")  # no storage class
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
        assert accepted == {Verification, CTImageStorage}
        assert "1.2.3.4.5.6" in rejected
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_a_dataset_fragment_without_a_request_aborts(server):
    """P-DATA out of order (a dataset before any C-STORE-RQ): A-ABORT, and the server
    keeps serving with nothing left behind."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    sock = assoc.dul.socket.socket
    fragment = b"\x08\x00\x18\x00UI\x02\x001\x00"
    pdu = struct.pack(">BBIIBB", 4, 0, len(fragment) + 6, len(fragment) + 2, context_id, 2)
    sock.sendall(pdu + fragment)
    assert _aborted(assoc, sock)
    assert echo(server.port) == 0
    assert journal_left(server) == []


def _established(server):
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    assert assoc.is_established
    return assoc


def _aborted(assoc, sock: socket.socket) -> bool:
    """Whether the server aborted it (our raw writes on `sock` went around pynetdicom's
    state machine, which may then leave the socket to the garbage collector)."""
    deadline = time.monotonic() + 10
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    sock.close()
    return assoc.is_aborted


def test_a_silent_storage_association_is_dropped(start_server, tmp_path):
    """network_timeout on our upper layer (a receive timeout on a blocking socket): an
    established storage association that then says nothing is dropped; others go on."""
    config = tmp_path / "timeout.toml"
    config.write_text("network_timeout = 2\n")
    server = start_server("--config", str(config))
    silent = _established(server)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    talking = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    deadline = time.monotonic() + 1.5  # under the timeout: C-ECHOs keep this one alive
    while time.monotonic() < deadline:
        assert talking.send_c_echo().Status == 0x0000
        time.sleep(0.3)
    deadline = time.monotonic() + 15
    while silent.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not silent.is_established
    assert talking.is_established
    talking.release()
    assert echo(server.port) == 0


def test_absurd_release_and_endless_commands_abort(server):
    """An A-RELEASE-RQ claiming 1 GB, and a command set that never ends, are aborted
    without the server holding what they announce."""
    assoc = _established(server)
    sock = assoc.dul.socket.socket
    sock.sendall(struct.pack(">BBI", 5, 0, 1 << 30))
    assert _aborted(assoc, sock)
    assoc = _established(server)
    sock = assoc.dul.socket.socket
    context_id = assoc.accepted_contexts[0].context_id
    chunk = b"\0" * 16000
    pdu = struct.pack(">BBIIBB", 4, 0, len(chunk) + 6, len(chunk) + 2, context_id, 1) + chunk
    try:
        for _ in range(8):  # a command fragment, never the last, 128 KB in all
            sock.sendall(pdu)
    except OSError:
        pass  # aborted already
    assert _aborted(assoc, sock)
    assert echo(server.port) == 0


def test_a_deflate_bomb_is_refused(server, tmp_path):
    """A deflated dataset of ~300 KB that inflates to 300 MiB of zeros: 0xC000 before
    anything is acknowledged; the inflating stops at its ceiling (256 MiB)."""
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = generate_uid()
    del ds.PixelData
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plain = tmp_path / "plain.dcm"
    ds.save_as(plain, enforce_file_format=True)
    raw = plain.read_bytes()
    body = raw[144 + struct.unpack_from("<I", raw, 140)[0] :]  # after the File Meta
    pixels = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 300 << 20)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = packer.compress(body + pixels)
    zeros = b"\0" * (1 << 20)
    stream += b"".join(packer.compress(zeros) for _ in range(300)) + packer.flush()
    bomb = tmp_path / "bomb.dcm"
    bomb.write_bytes(file_meta(ds.SOPClassUID, ds.SOPInstanceUID, DEFLATED, "") + stream)
    assert bomb.stat().st_size < 1 << 20
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, DEFLATED)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        _config.STORE_SEND_CHUNKED_DATASET = True
        response = assoc.send_c_store(bomb)
    finally:
        assoc.release()
    assert response.Status == 0xC000
    assert "inflates beyond" in response.ErrorComment
    assert server.rows("SELECT count(*) FROM instance WHERE sop_uid = ?", ds.SOPInstanceUID) == [
        (0,)
    ]
    assert journal_left(server) == []


def test_datasets_held_in_memory_or_spilled_to_the_file_are_stored_whole(server, tmp_path):
    """A dataset up to storage.journal.MEMORY is checked in memory and written at once; a
    larger one goes to its file as it arrives (from just over the limit to twice it):
    either way the stored dataset is the sent one, byte for byte."""
    from storage.dataset import open_dataset
    from storage.journal import MEMORY

    sizes = {64: "in memory", 725: "just over", 1024: "spilled"}  # 725² × 2 B > 1 MiB
    sent = {}
    for size, what in sizes.items():
        (path,) = make_study(tmp_path / what.replace(" ", "-"), 1, size=size)
        sent[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID] = path
    lengths = sorted(path.stat().st_size for path in sent.values())
    assert lengths[0] < MEMORY < lengths[1] < lengths[2]
    storescu(server.port, *sent.values())
    assert indexed(server, set(sent)) == set(sent)
    for sop_uid, source in sent.items():
        (rel,) = server.rows("SELECT path FROM instance WHERE sop_uid = ?", sop_uid)[0]
        datasets = []
        for path in (source, server.data / rel):  # the raw bytes after each File Meta
            fp, _, _ = open_dataset(path)
            with fp:
                datasets.append(fp.read())
        assert datasets[0] == datasets[1], sizes


def test_a_series_stored_under_another_study_is_refused(server, tmp_path):
    """A series belongs to one study (PS3.3 C.7.3.1): an instance naming a stored series
    but another study is refused with 0xA900 and a comment, on our own upper layer and on
    pynetdicom's (an association that also queries), and nothing of it is filed."""
    path, ds = fresh_ct(tmp_path)
    storescu(server.port, path)
    assert indexed(server, {ds.SOPInstanceUID}) == {ds.SOPInstanceUID}
    strays = []
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    for also_query in (False, True):
        if also_query:
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        stray = pydicom.dcmread(CT)
        stray.SeriesInstanceUID = ds.SeriesInstanceUID
        stray.StudyInstanceUID, stray.SOPInstanceUID = generate_uid(), generate_uid()
        strays.append(stray)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
        assert assoc.is_established
        try:
            status = assoc.send_c_store(stray)
        finally:
            assoc.release()
        assert status.Status == 0xA900, also_query
        assert status.ErrorComment.startswith("series stored under another study")
    assert journal_left(server) == []
    series = server.rows(
        "SELECT num_instances FROM series WHERE series_uid = ?", ds.SeriesInstanceUID
    )
    assert series == [(1,)]
    for stray in strays:
        assert not (server.data / stray.StudyInstanceUID).exists()
        assert server.rows("SELECT 1 FROM study WHERE study_uid = ?", stray.StudyInstanceUID) == []


def test_the_indexer_sets_aside_a_series_another_receipt_filed_under_another_study(tmp_path):
    """Receivers that meet a series before the indexer has filed it accept it: then the
    indexer files the first study's instance and sets the others aside (kept in
    `.unindexed`, nothing placed), in a batch and alone, and indexes on."""
    from storage import Archive

    archive = Archive(tmp_path / "data", fsync=False).open()
    try:
        entries, studies = [], []
        series = generate_uid()
        for _ in range(3):
            ds = pydicom.dcmread(CT)
            ds.SeriesInstanceUID = series
            ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
            studies.append(ds.StudyInstanceUID)
            entries.append(accepted(archive, ds, tmp_path))
        assert archive.index_entries(entries[:2]) == 2  # in one batch
        assert archive.index_entries(entries[2:]) == 1  # alone: no exception, no retry loop
        assert archive.catalog.stats()["instances"] == 1
        aside = sorted(p.name for p in (archive.root / ".unindexed").iterdir())
        assert aside == sorted(p.name for p in entries[1:])
        assert [p for p in entries if p.exists()] == []
        filed = [len(list((archive.root / study).glob("*/*.dcm"))) for study in studies]
        assert filed == [1, 0, 0]
    finally:
        archive.close()


def accepted(archive, ds: "pydicom.Dataset", folder) -> Path:
    """Receive `ds` as a C-STORE receiver does, in process: its journal entry."""
    receipt = archive.receive(
        ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "MODALITY", "::1"
    )
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(folder / "ct.dcm", enforce_file_format=True)
    receipt.write(dataset_bytes(folder / "ct.dcm"))
    return archive.accept(receipt, ds.SOPClassUID, ds.SOPInstanceUID).path


def moved(ds: "pydicom.Dataset", study: bool = False) -> "pydicom.Dataset":
    """`ds` re-sent under a new Series (and Study) Instance UID, its SOP Instance UID kept."""
    again = pydicom.dcmread(CT)
    again.StudyInstanceUID = generate_uid() if study else ds.StudyInstanceUID
    again.SeriesInstanceUID = generate_uid()
    again.SOPInstanceUID = again.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return again


@pytest.mark.parametrize("policy", ["keep", "reject", "replace"])
def test_an_instance_sent_again_under_another_series_leaves_no_orphan(tmp_path, policy):
    """An instance stored once and sent again with another Series Instance UID (or Study)
    is never filed twice: `keep` keeps the stored one and drops the arrival; `reject` and
    `replace` (a move is no replacement of bytes) refuse it (0xA900: on receipt once
    indexed, else the indexer sets it aside); a new instance beside is indexed."""
    from storage import Archive
    from storage.errors import InstanceConflict

    archive = Archive(tmp_path / "data", fsync=False, duplicates=policy).open()
    try:
        _, ds = fresh_ct(tmp_path)
        _, fresh = fresh_ct(tmp_path)
        first = accepted(archive, ds, tmp_path)
        if policy != "keep":  # both acknowledged before the first is indexed
            again = accepted(archive, moved(ds, study=True), tmp_path)
            assert archive.index_entries([first, again, accepted(archive, fresh, tmp_path)]) == 3
            with pytest.raises(InstanceConflict, match="^instance stored in another series"):
                accepted(archive, moved(ds), tmp_path)  # indexed: refused on receipt
        else:
            assert archive.index_entries([first]) == 1
            again = accepted(archive, moved(ds), tmp_path)
            assert archive.index_entries([again, accepted(archive, fresh, tmp_path)]) == 2
        assert archive.catalog.stats()["instances"] == 2
        stored = archive.root / ds.StudyInstanceUID / ds.SeriesInstanceUID
        stored /= f"{ds.SOPInstanceUID}.dcm"
        assert list(archive.root.glob(f"*/*/{ds.SOPInstanceUID}.dcm")) == [stored]
        assert archive.catalog.instance_file(ds.SOPInstanceUID) == stored
        aside = [p.name for p in (archive.root / ".unindexed").glob("*")]
        assert aside == ([] if policy == "keep" else [again.name])
        assert list((archive.root / ".queue").iterdir()) == []
    finally:
        archive.close()


def test_import_of_an_instance_stored_under_another_series(tmp_path):
    """Import (and STOW-RS, the same ingest) of an instance stored under another series:
    `keep` answers kept, named where it is stored, and files nothing; `reject` fails it
    with InstanceConflict (a UIDMismatch: 0xA900 in STOW-RS) and files nothing."""
    from storage import Archive
    from storage.archive import Outcome
    from storage.errors import InstanceConflict
    from storage.errors import UIDMismatch

    for policy in ("keep", "reject"):
        archive = Archive(tmp_path / policy, fsync=False, duplicates=policy).open()
        try:
            path, ds = fresh_ct(tmp_path)
            assert archive.import_file(path).outcome is Outcome.STORED
            again = moved(ds, study=True)
            again.save_as(tmp_path / "again.dcm", enforce_file_format=True)
            if policy == "keep":
                kept = archive.import_file(tmp_path / "again.dcm")
                assert kept.outcome is Outcome.KEPT
                assert (kept.study_uid, kept.series_uid) == (
                    ds.StudyInstanceUID,
                    ds.SeriesInstanceUID,
                )
            else:
                with pytest.raises(InstanceConflict) as refused:
                    archive.import_file(tmp_path / "again.dcm")
                assert isinstance(refused.value, UIDMismatch)
            filed = archive.root.glob(f"*/*/{ds.SOPInstanceUID}.dcm")
            assert [p.parent.name for p in filed] == [ds.SeriesInstanceUID]
        finally:
            archive.close()
