"""A study or series downloaded as a ZIP with a DICOMDIR (GET /studies/{uid}/archive, issue
20), read by real clients: Python's zipfile and Info-ZIP's unzip, dcmtk's dcmdump and
pydicom's FileSet. One study of pydicom's files (CT, MR RLE, an SR, an RT Dose, a Key
Object Selection), and a larger synthetic one for memory; the study list's link in
Chromium."""

import json
import re
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pydicom
import pytest
from conftest import Server
from conftest import import_files
from conftest import run
from dicom_files import TEST_FILES
from playwright.sync_api import sync_playwright
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid

CHROMIUM = "/usr/bin/chromium"
KEY_OBJECT = "1.2.840.10008.5.1.4.1.1.88.59"
# (file, how many, SOP Class to give it or None) → its directory record type
SERIES = [
    ("CT_small.dcm", 3, None, "IMAGE"),
    ("MR_small_RLE.dcm", 1, None, "IMAGE"),
    ("test-SR.dcm", 1, None, "SR DOCUMENT"),
    ("rtdose.dcm", 1, None, "RT DOSE"),
    ("test-SR.dcm", 1, KEY_OBJECT, "KEY OBJECT DOC"),
]
BIG_COUNT, BIG_SIZE = 24, 1024  # 24 CT slices of 1024² × 2 bytes: 48 MiB of pixels
FILE_ID_PART = re.compile(r"^[A-Z0-9_]{1,8}$")


def write_study(out: Path) -> tuple[str, list[str], dict[str, str]]:
    """The mixed study under `out`: its UID, its series' UIDs (in SERIES order) and
    {SOP Instance UID: record type}."""
    study, series_uids, kinds = generate_uid(), [], {}
    out.mkdir(parents=True)
    for name, count, sop_class, kind in SERIES:
        series = generate_uid()
        series_uids.append(series)
        for number in range(1, count + 1):
            ds = pydicom.dcmread(TEST_FILES / name)
            ds.PatientID, ds.PatientName = "ZIP1", "Zip^Archive"
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            if sop_class:
                ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
            if count > 1:
                ds.InstanceNumber = number
            ds.save_as(out / f"{ds.SOPInstanceUID}.dcm")
            kinds[ds.SOPInstanceUID] = kind
    return study, series_uids, kinds


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from make_study import make_study

    root = tmp_path_factory.mktemp("archive-zip")
    study, series, kinds = write_study(root / "mixed")
    big = make_study(root / "big", BIG_COUNT, size=BIG_SIZE, patient_id="ZIPBIG")
    import_files(root / "data", root / "mixed", root / "big")
    running = Server(root / "data").start()
    running.study, running.series, running.kinds = study, series, kinds
    running.big = pydicom.dcmread(big[0], stop_before_pixels=True).StudyInstanceUID
    yield running
    running.kill()


def download(url: str, to: Path) -> tuple[dict[str, str], Path]:
    """GET url into `to`, a chunk at a time: the response headers and the file."""
    with urllib.request.urlopen(url, timeout=120) as response, open(to, "wb") as out:
        headers = dict(response.headers)
        while chunk := response.read(1 << 20):
            out.write(chunk)
    return headers, to


def stored_file(server: Server, sop_uid: str) -> Path:
    return next(server.data.glob(f"*/*/{sop_uid}.dcm"))


@pytest.fixture(scope="module")
def study_zip(server, tmp_path_factory) -> tuple[dict[str, str], Path, Path]:
    """The mixed study downloaded and extracted: headers, the ZIP, the folder."""
    folder = tmp_path_factory.mktemp("study-zip")
    headers, path = download(f"{server.url}/studies/{server.study}/archive", folder / "a.zip")
    with zipfile.ZipFile(path) as archive:
        archive.extractall(folder / "media")
    return headers, path, folder / "media"


def load_file_set(dicomdir: Path) -> list[tuple[object, pydicom.Dataset]]:
    """(pydicom FileInstance, the dataset its record references) for each instance of the
    DICOMDIR; a record that the offsets leave unreachable is an error."""
    fs = FileSet()
    try:
        fs.load(dicomdir, raise_orphans=True)
        return [(instance, pydicom.dcmread(instance.path)) for instance in fs]
    finally:
        fs._stage["t"].cleanup()  # its staging folder, or a ResourceWarning at exit


def test_members_are_the_stored_files_under_conformant_file_ids(server, study_zip):
    headers, path, _ = study_zip
    assert headers["Content-Type"] == "application/zip"
    disposition = f'attachment; filename="study-{server.study}.zip"'
    assert headers["Content-Disposition"] == disposition
    assert "Content-Length" not in headers  # streamed: the size is not known up front
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert names[0] == "DICOMDIR"
        seen = set()
        for name in names[1:]:
            parts = name.split("/")
            assert len(parts) <= 8 and all(FILE_ID_PART.match(p) for p in parts), name
            data = archive.read(name)
            sop = pydicom.dcmread(archive.open(name), stop_before_pixels=True).SOPInstanceUID
            assert data == stored_file(server, sop).read_bytes(), name
            seen.add(sop)
    assert seen == set(server.kinds)
    run("unzip", "-tq", str(path))  # Info-ZIP reads the data descriptors too


def test_dcmdump_reads_the_dicomdir(server, study_zip):
    media = study_zip[2]
    result = run("dcmdump", str(media / "DICOMDIR"))
    assert result.stderr == ""
    assert "MediaStorageDirectoryStorage" in result.stdout
    records = re.findall(r'"Directory Record" ([A-Z ]+?) #', result.stdout)
    assert records[:2] == ["PATIENT", "STUDY"]
    assert records.count("SERIES") == len(SERIES)
    assert sorted(r for r in records[2:] if r != "SERIES") == sorted(server.kinds.values())


def test_pydicom_finds_every_instance_where_its_record_says(server, study_zip):
    media = study_zip[2]
    found = {}
    for instance, ds in load_file_set(media / "DICOMDIR"):
        assert Path(instance.path) == media.joinpath(*instance.ReferencedFileID)
        assert instance.ReferencedSOPInstanceUIDInFile == ds.SOPInstanceUID
        assert instance.ReferencedSOPClassUIDInFile == ds.SOPClassUID
        assert instance.ReferencedTransferSyntaxUIDInFile == ds.file_meta.TransferSyntaxUID
        # the series and study records above it (reached by the offsets) are its own
        assert instance.SeriesInstanceUID == ds.SeriesInstanceUID
        assert instance.StudyInstanceUID == server.study
        assert instance.PatientID == "ZIP1"
        found[ds.SOPInstanceUID] = instance.DirectoryRecordType
        if instance.DirectoryRecordType == "SR DOCUMENT" and ds.VerificationFlag == "VERIFIED":
            # Type 1C in the record, at the top; in the file, in each observer's item
            verified = [o.VerificationDateTime for o in ds.VerifyingObserverSequence]
            assert instance.VerificationDateTime == max(verified)
    assert found == server.kinds
    assert "SR DOCUMENT" in found.values()


def test_a_series_archive_holds_that_series_only(server, tmp_path):
    series = server.series[0]  # the three CT slices
    headers, path = download(
        f"{server.url}/studies/{server.study}/series/{series}/archive", tmp_path / "s.zip"
    )
    assert headers["Content-Disposition"] == f'attachment; filename="series-{series}.zip"'
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path / "media")
    instances = load_file_set(tmp_path / "media" / "DICOMDIR")
    stored = {p.stem for p in server.data.glob(f"{server.study}/{series}/*.dcm")}
    assert {ds.SOPInstanceUID for _, ds in instances} == stored
    assert {instance.SeriesInstanceUID for instance, _ in instances} == {series}
    assert len(instances) == 3


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/studies/1.2.3.999999/archive", 404),
        ("/studies/{study}/series/1.2.3.999999/archive", 404),
        ("/studies/1.2.x/archive", 400),
        ("/studies/{study}/series/1.2.x/archive", 400),
    ],
)
def test_unknown_is_404_invalid_is_400(server, path, status):
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(server.url + path.format(study=server.study), timeout=30)
    assert refused.value.code == status
    assert "error" in json.loads(refused.value.read())


def test_a_download_is_audited_as_a_retrieval(server, tmp_path):
    download(f"{server.url}/studies/{server.study}/archive", tmp_path / "a.zip")
    deadline = time.monotonic() + 10  # the index writer commits audit events just after
    while True:
        rows = server.rows(
            "SELECT event, outcome, patient_id, detail FROM auditevent WHERE study_uid = ? "
            "AND detail LIKE ?",
            server.study,
            "%/archive%",
        )
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert rows
    event, outcome, patient, detail = rows[-1]
    assert (event, outcome, patient) == ("retrieve", "success", "ZIP1")
    assert json.loads(detail)["path"] == f"/studies/{server.study}/archive"
    assert json.loads(detail)["instances"] == len(server.kinds)


def status_kib(pid: int, field: str) -> int:
    line = next(
        x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field)
    )
    return int(line.split()[1])


def test_a_large_study_streams_in_bounded_memory(server, tmp_path):
    """48 MiB of instances through the server while its peak memory (reset first) grows
    by far less: no file and no ZIP is held whole."""
    pid = server.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) is now the current
    before = status_kib(pid, "VmHWM")
    headers, path = download(f"{server.url}/studies/{server.big}/archive", tmp_path / "b.zip")
    grown_mib = (status_kib(pid, "VmHWM") - before) >> 10
    assert headers.get("Transfer-Encoding") == "chunked"
    with zipfile.ZipFile(path) as archive:
        assert archive.testzip() is None
        sizes = sum(info.file_size for info in archive.infolist())
        assert len(archive.namelist()) == BIG_COUNT + 1
    assert sizes > BIG_COUNT * BIG_SIZE * BIG_SIZE * 2
    assert grown_mib < 16, grown_mib


def test_the_study_list_downloads_the_zip_from_the_keyboard(server):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/?id=ZIP1")
            link = page.get_by_role("link", name=f"Download study {server.study} as ZIP")
            link.focus()
            with page.expect_download() as started:
                page.keyboard.press("Enter")  # the link's Enter, not the row's (open)
            assert started.value.suggested_filename == f"study-{server.study}.zip"
            assert page.url == f"{server.url}/?id=ZIP1"
            with zipfile.ZipFile(started.value.path()) as archive:  # gone once closed
                assert len(archive.namelist()) == len(server.kinds) + 1
        finally:
            browser.close()


def test_record_types_are_the_ones_pydicom_chooses():
    """storage.fileset's own SOP Class table gives every storage class pydicom names the
    record type pydicom's FileSet would (its private choice, the oracle here only), and
    so do the Modality, document and RT Plan cases that come before the SOP Class."""
    from pydicom import uid
    from pydicom.fileset import _four_level_record_type

    from storage.fileset import RECORD_KEYS
    from storage.fileset import _leaf_type

    def both(**elements) -> tuple[str, str]:
        ds = pydicom.Dataset()
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
        return _leaf_type(ds.to_json_dict()), _four_level_record_type(ds)

    storage_classes = [
        v for v in vars(uid).values() if isinstance(v, uid.UID) and v.keyword.endswith("Storage")
    ]
    assert len(storage_classes) > 150
    kinds = set()
    for sop_class in storage_classes:
        ours, pydicoms = both(SOPClassUID=sop_class, Modality="OT")
        assert ours == pydicoms, sop_class.keyword
        kinds.add(ours)
    assert len(kinds) == 19 and kinds <= set(RECORD_KEYS)
    for elements in (
        {"Modality": "RTRAD"},
        {"Modality": "PLAN"},
        {"EncapsulatedDocument": b"%PDF", "SOPClassUID": uid.RTDoseStorage},
        {"RTPlanLabel": "P1", "SOPClassUID": uid.RTDoseStorage},
    ):
        ours, pydicoms = both(**elements)
        assert ours == pydicoms != "IMAGE"
