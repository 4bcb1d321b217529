"""C-STORE into the archive with real clients: bit-preserving, indexed, policed."""

import hashlib
from pathlib import Path

import pydicom
import pytest
from conftest import STORESCU_PROPOSE
from conftest import Server
from conftest import storescu
from conftest import storescu_concurrently
from dicom_files import dataset_bytes
from dicom_files import malformed
from dicom_files import storable
from pydicom.uid import generate_uid
from scu import store_dataset
from scu import store_files

# Every test runs on SQLite and PostgreSQL: on `shared`, one server per engine for the
# tests that only add what they check, or on a fresh one (`engine`) where the point is an
# empty archive, a setting, or the process's own memory.
STORABLE = storable()


@pytest.fixture(scope="module")
def shared(tmp_path_factory, module_engine) -> Server:
    """A server kept for the module (`replace`: a later file with an earlier one's SOP
    Instance UID becomes the stored one, so each test sees its own bytes)."""
    data = tmp_path_factory.mktemp("store") / "data"
    server = Server(data, "--duplicates", "replace", index=module_engine).start()
    yield server
    server.kill()


def archive_tree(data: Path) -> list[Path]:
    """Every folder and file of the archive's studies (the dot folders and the index aside)."""
    tops = [p for p in data.iterdir() if not p.name.startswith((".", "index.sqlite"))]
    return sorted([*tops, *(p for top in tops if top.is_dir() for p in top.rglob("*"))])


def stored_path(data: Path, sample) -> Path:
    return data / sample.study_uid / sample.series_uid / f"{sample.sop_uid}.dcm"


@pytest.mark.usefixtures("engine")
def test_every_storable_pydicom_file_is_stored_bit_for_bit(start_server):
    # Several shipped files share a SOP Instance UID in different encodings: `replace`
    # makes each one's bytes the stored ones, checked right after its own C-STORE.
    server = start_server("--duplicates", "replace")
    for sample in STORABLE:
        (response,) = store_files(
            server.port, [sample.path], [(sample.sop_class_uid, sample.transfer_syntax)]
        )
        if sample.meta_sop_uid != sample.sop_uid:
            # pynetdicom announces the File Meta's UID; the dataset carries another.
            assert response.Status == 0xA900, sample.path.name
            assert "SOP Instance UID differs" in response.ErrorComment
            continue
        assert response.Status == 0x0000, f"{sample.path.name}: {response}"
        stored = stored_path(server.data, sample)
        assert dataset_bytes(stored) == dataset_bytes(sample.path), sample.path.name
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.TransferSyntaxUID == sample.transfer_syntax
        assert meta.MediaStorageSOPInstanceUID == sample.sop_uid
        ((study, series, syntax, size),) = server.rows(
            "SELECT st.study_uid, se.series_uid, i.transfer_syntax, i.size FROM instance i "
            "JOIN series se ON se.id = i.series_id JOIN study st ON st.id = se.study_id "
            "WHERE i.sop_uid = ?",
            sample.sop_uid,
        )
        assert (study, series, syntax) == (
            sample.study_uid,
            sample.series_uid,
            sample.transfer_syntax,
        )
        assert size == stored.stat().st_size
    distinct = {s.sop_uid for s in STORABLE if s.meta_sop_uid == s.sop_uid}
    assert server.rows("SELECT count(*) FROM instance") == [(len(distinct),)]


@pytest.mark.parametrize(
    "sample",
    [s for s in STORABLE if s.transfer_syntax in STORESCU_PROPOSE],
    ids=lambda s: s.path.name,
)
def test_dcmtk_storescu_stores_each_transfer_syntax(shared, sample):
    server = shared
    result = storescu(
        server.port, sample.path, extra=(STORESCU_PROPOSE[sample.transfer_syntax],), check=False
    )
    for limitation in ("No presentation context for", "No SOP Class or Instance UID in file"):
        if limitation in result.stderr:  # dcmtk cannot send this file; pynetdicom did above
            pytest.skip(f"storescu cannot send it: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    stored = pydicom.dcmread(stored_path(server.data, sample))
    original = pydicom.dcmread(sample.path)
    assert stored.file_meta.TransferSyntaxUID == sample.transfer_syntax
    # dcmtk re-encodes what it sends (group lengths, OB/OW): compare values, not bytes.
    for tag in original.keys():  # noqa: SIM118 (iterating a Dataset yields elements)
        if tag.element != 0 and tag != 0xFFFCFFFC:  # dcmtk drops trailing padding
            assert stored[tag].value == original[tag].value, original[tag].name


def test_index_keys_and_decoded_text(shared):
    server = shared
    charset = [
        s for s in STORABLE if s.path.parent.name == "charset_files" and s.meta_sop_uid == s.sop_uid
    ]
    assert len(charset) >= 10
    store_files(
        server.port,
        [s.path for s in charset],
        sorted({(s.sop_class_uid, s.transfer_syntax) for s in charset}),
    )
    for sample in charset:
        ds = pydicom.dcmread(sample.path, stop_before_pixels=True)
        rows = server.rows(
            "SELECT p.patient_id, p.patient_name, st.study_date, se.modality FROM instance i "
            "JOIN series se ON se.id = i.series_id JOIN study st ON st.id = se.study_id "
            "JOIN patient p ON p.id = st.patient_id WHERE i.sop_uid = ?",
            sample.sop_uid,
        )
        assert rows == [
            (
                str(ds.get("PatientID", "")),
                str(ds.get("PatientName", "")),
                str(ds.get("StudyDate", "")),
                str(ds.get("Modality", "")),
            )
        ], sample.path.name
    # ISO 2022 Japanese, read back as text, not as escape sequences.
    names = {row[0] for row in server.rows("SELECT patient_name FROM patient")}
    assert "Yamada^Tarou=山田^太郎=やまだ^たろう" in names
    assert any("\x1b" not in name and "김희중" in name for name in names)


def test_counts_and_modalities_are_maintained(shared, tmp_path):
    server = shared
    from make_study import make_study

    paths = make_study(tmp_path / "study", 12, size=64)
    storescu(server.port, *paths)
    ds = pydicom.dcmread(paths[0])
    assert server.rows(
        "SELECT num_series, num_instances, modalities, sop_classes FROM study WHERE study_uid = ?",
        ds.StudyInstanceUID,
    ) == [(1, 12, "CT", ds.SOPClassUID)]
    assert server.rows(
        "SELECT num_instances FROM series WHERE series_uid = ?", ds.SeriesInstanceUID
    ) == [(12,)]


@pytest.mark.usefixtures("engine")
def test_identical_duplicate_is_success_and_not_duplicated(server):
    sample = next(s for s in STORABLE if s.path.name == "CT_small.dcm")
    context = [(sample.sop_class_uid, sample.transfer_syntax)]
    responses = store_files(server.port, [sample.path, sample.path], context)
    assert [r.Status for r in responses] == [0, 0]
    assert server.rows("SELECT count(*) FROM instance") == [(1,)]
    assert "duplicate" in server.log()


def _changed_copy(sample) -> pydicom.Dataset:
    ds = pydicom.dcmread(sample.path)
    ds.StudyDescription = "changed bytes, same UID"
    return ds


@pytest.mark.usefixtures("engine")
@pytest.mark.parametrize(
    ("policy", "status", "kept"),
    [("keep", 0x0000, True), ("replace", 0x0000, False), ("reject", 0x0111, True)],
)
def test_duplicate_policy_for_different_bytes(start_server, policy, status, kept):
    server = start_server("--duplicates", policy)
    sample = next(s for s in STORABLE if s.path.name == "CT_small.dcm")
    store_files(server.port, [sample.path], [(sample.sop_class_uid, sample.transfer_syntax)])
    response = store_dataset(server.port, _changed_copy(sample), sample.transfer_syntax)
    assert response.Status == status
    stored = stored_path(server.data, sample)
    assert (dataset_bytes(stored) == dataset_bytes(sample.path)) is kept
    ((sha,),) = server.rows("SELECT sha256 FROM instance")  # one row
    assert sha == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert not list((server.data / ".incoming").iterdir())


@pytest.mark.parametrize("sample", malformed(), ids=lambda s: s.path.name)
def test_malformed_dataset_cannot_be_understood(shared, sample):
    # Each shares its UIDs with a good file another test may have stored: that one stays.
    server = shared
    stored = stored_path(server.data, sample)
    before = stored.read_bytes() if stored.exists() else None
    (response,) = store_files(
        server.port, [sample.path], [(sample.sop_class_uid, sample.transfer_syntax)]
    )
    assert response.Status == 0xC000
    assert "ErrorComment" in response
    assert (stored.read_bytes() if stored.exists() else None) == before
    assert not list((server.data / ".incoming").iterdir())
    assert f"{sample.meta_sop_uid} from PYNETDICOM refused (0xC000)" in server.log()


@pytest.mark.parametrize(
    ("meta_key", "value", "comment"),
    [
        ("MediaStorageSOPInstanceUID", "1.2.3.4.5.6.7.8", "SOP Instance UID differs"),
        ("MediaStorageSOPClassUID", "1.2.840.10008.5.1.4.1.1.4", "SOP Class UID differs"),
    ],
)
def test_request_and_dataset_uids_must_agree(shared, tmp_path, meta_key, value, comment):
    # pynetdicom announces the File Meta's UIDs in the C-STORE request and sends the
    # dataset as it is: a file whose meta disagrees with its dataset is a mismatch.
    server = shared
    sample = next(s for s in STORABLE if s.path.name == "CT_small.dcm")
    ds = pydicom.dcmread(sample.path)
    ds.StudyInstanceUID = generate_uid()  # UIDs no other test stores
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    setattr(ds.file_meta, meta_key, value)
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path)
    sop_class = ds.file_meta.MediaStorageSOPClassUID
    (response,) = store_files(server.port, [path], [(sop_class, sample.transfer_syntax)])
    assert response.Status == 0xA900
    assert comment in response.ErrorComment
    assert server.rows(
        "SELECT count(*) FROM instance WHERE sop_uid IN (?, ?)", ds.SOPInstanceUID, value
    ) == [(0,)]
    assert server.rows("SELECT count(*) FROM study WHERE study_uid = ?", ds.StudyInstanceUID) == [
        (0,)
    ]
    assert not (server.data / ds.StudyInstanceUID).exists()


@pytest.mark.parametrize(
    ("uid", "reason"),
    [("../../x", "not a valid UID"), ("1." + "2" * 80, "not a valid UID"), ("", "missing")],
)
def test_bad_uids_never_become_paths(shared, uid, reason):
    server = shared
    sample = next(s for s in STORABLE if s.path.name == "CT_small.dcm")
    ds = pydicom.dcmread(sample.path)
    ds.StudyInstanceUID = uid
    ds.SOPInstanceUID = generate_uid()  # an instance no other test stores
    before = archive_tree(server.data)
    response = store_dataset(server.port, ds, sample.transfer_syntax)
    assert response.Status == 0xC000
    assert reason in response.ErrorComment
    assert archive_tree(server.data) == before  # not a file nor a folder more
    assert not list((server.data / ".incoming").iterdir())
    assert not (server.data.parent / "x").exists()
    assert server.rows("SELECT count(*) FROM instance WHERE sop_uid = ?", ds.SOPInstanceUID) == [
        (0,)
    ]


def test_unknown_sop_class_refused_unless_configured(shared, start_server, tmp_path, request):
    """Refused by default (the module's server), accepted by a server configured to (on
    the same engine)."""
    sample = next(s for s in STORABLE if s.path.name == "CT_small.dcm")
    ds = pydicom.dcmread(sample.path)
    ds.SOPClassUID = "1.2.826.0.1.3680043.9.9999.1"  # a private class
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    from pynetdicom import AE

    (tmp_path / "c.toml").write_text("accept_unknown_sop_classes = true\n")
    index = request.getfixturevalue("postgres").database() if shared.index else ""
    accepting = start_server("--config", str(tmp_path / "c.toml"), index=index)
    for server, accepted in ((shared, False), (accepting, True)):
        ae = AE(ae_title="PYNETDICOM")
        ae.add_requested_context(ds.SOPClassUID, sample.transfer_syntax)
        assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
        if accepted:
            assert assoc.is_established
            assert assoc.send_c_store(ds).Status == 0
            assoc.release()
        else:
            assert not assoc.is_established or not assoc.accepted_contexts
            if assoc.is_established:
                assoc.release()
    stored = [server.rows("SELECT count(*) FROM instance WHERE sop_uid = ?", ds.SOPInstanceUID)
              for server in (shared, accepting)]  # fmt: skip
    assert stored == [[(0,)], [(1,)]]


def test_eight_concurrent_associations(shared, tmp_path):
    from make_study import make_study

    server = shared
    studies = [make_study(tmp_path / f"s{n}", 15, size=64) for n in range(8)]
    errors = storescu_concurrently(server.port, studies)
    assert errors == []
    uids = [
        pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID for paths in studies
    ]
    marks = ", ".join("?" * len(uids))
    assert server.rows(
        "SELECT count(*), count(DISTINCT i.sop_uid) FROM instance i JOIN series se ON "
        f"se.id = i.series_id JOIN study st ON st.id = se.study_id WHERE st.study_uid IN ({marks})",
        *uids,
    ) == [(120, 120)]
    assert server.rows(
        f"SELECT count(*), sum(num_instances) FROM study WHERE study_uid IN ({marks})", *uids
    ) == [(8, 120)]
    assert "locked" not in server.log()


def _write_big_instance(path: Path, frames: int) -> str:
    """A multi-frame 512×512 16-bit instance written in chunks (never whole in memory)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(next(s.path for s in STORABLE if s.path.name == "CT_small.dcm"))
    del ds.PixelData
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    frame = bytes(range(256)) * (512 * 512 * 2 // 256)
    with open(path, "ab") as fp:
        fp.write(b"\xe0\x7f\x10\x00OW\x00\x00" + (len(frame) * frames).to_bytes(4, "little"))
        for _ in range(frames):
            fp.write(frame)
    return ds.SOPInstanceUID


@pytest.mark.usefixtures("engine")
def test_big_instance_is_received_to_disk_not_memory(server, tmp_path):
    path = tmp_path / "big.dcm"
    sop_uid = _write_big_instance(path, frames=600)  # 300 MiB of pixel data
    (response,) = store_files(
        server.port, [path], [("1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.1.2.1")]
    )
    assert response.Status == 0
    (stored,) = server.data.glob(f"*/*/{sop_uid}.dcm")
    assert dataset_bytes(stored) == dataset_bytes(path)
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    peak_kib = int(
        next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]
    )
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib} KiB while receiving a 300 MiB instance"


def test_every_transfer_syntax_pydicom_knows_is_accepted(shared):
    server = shared
    from pydicom.uid import HTJ2K
    from pydicom.uid import MPEG4HP41
    from pydicom.uid import AllTransferSyntaxes
    from pynetdicom import AE

    assert HTJ2K in AllTransferSyntaxes and MPEG4HP41 in AllTransferSyntaxes
    ae = AE(ae_title="PYNETDICOM")
    for syntax in AllTransferSyntaxes:
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.77.1.4.1", syntax)  # video photographic
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    accepted = {cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    assoc.release()
    assert accepted == set(AllTransferSyntaxes)
