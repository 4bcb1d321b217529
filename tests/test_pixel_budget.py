"""Decompression bombs (issue 17): a few KB of RLE declaring 16000×16000 16-bit pixels
(488 MiB decoded), made from pydicom's MR_small_RLE.dcm. Over `pixel_budget_mb` it is
refused at ingest (C-STORE and STOW-RS 0xC000); one stored before the budget was lowered
answers 422 on every route that would decode it, and the server's peak memory stays far
below the bomb's size. And a JPEG 2000 file whose header is within the budget but whose
codestream says 20000×20000 (JPEG2000.dcm, its SIZ marker edited) is never decoded."""

import http.client
import json
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from conftest import TEST_FILES
from conftest import Server
from conftest import children
from conftest import minipacs
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import RLELossless
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom import build_role
from pynetdicom.sop_class import MRImageStorage
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from scu import store_files

SIDE = 16000  # 16000² samples of 2 bytes: 488 MiB to decode
BOMB_MIB = SIDE * SIDE * 2 >> 20
BUDGET_MB = 256  # the server's; the stored bomb was imported under a larger one
STORED = generate_uid()
LIAR = generate_uid()


def bomb(path: Path, sop_uid: str) -> Path:
    """MR_small_RLE.dcm (64×64, 6 KB) declaring SIDE × SIDE: its segments decode to
    far fewer bytes, but a decoder allocates for what Rows and Columns say first."""
    ds = pydicom.dcmread(TEST_FILES / "MR_small_RLE.dcm")
    ds.Rows = ds.Columns = SIDE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.save_as(path)
    assert path.stat().st_size < 10_000
    return path


def liar(path: Path, sop_uid: str) -> Path:
    """JPEG2000.dcm (1024×256) with its codestream's SIZ saying 20000×20000: Rows and
    Columns are within any budget, the decoder would allocate for 4×10⁸ pixels."""
    ds = pydicom.dcmread(TEST_FILES / "JPEG2000.dcm")
    data = bytearray(ds.PixelData)
    siz = data.find(b"\xff\x4f\xff\x51")
    data[siz + 8 : siz + 16] = (20000).to_bytes(4, "big") * 2  # Xsiz, Ysiz
    ds.PixelData = bytes(data)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    paths = [bomb(root / "stored-bomb.dcm", STORED), liar(root / "liar.dcm", LIAR)]
    budget = {"MINIPACS_PIXEL_BUDGET_MB": "1024"}
    minipacs("import", "--data", str(root / "data"), *map(str, paths), env=budget)
    running = Server(root / "data", env={"MINIPACS_PIXEL_BUDGET_MB": str(BUDGET_MB)}).start()
    yield running
    running.kill()


def peak_mib(pid: int) -> int:
    """The process's peak resident memory (VmHWM), MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) >> 10


def refused_answers(server, requests: list[tuple[str, str]]) -> tuple[int, list]:
    """Each (URL, Accept) asked for, each refused with an HTTP error: how much the web
    process's peak memory grew meanwhile (MiB), and (url, status, body) of each."""
    before = peak_mib(server.proc.pid)
    answers = []
    for url, accept in requests:
        request = urllib.request.Request(url, headers={"Accept": accept})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        answers.append((url, refused.value.code, refused.value.read()))
    return peak_mib(server.proc.pid) - before, answers


def test_c_store_of_a_bomb_is_refused(server, tmp_path):
    sop = generate_uid()
    path = bomb(tmp_path / "bomb.dcm", sop)
    (response,) = store_files(server.port, [path], [(MRImageStorage, RLELossless)])
    assert response.Status == 0xC000
    assert "pixel budget" in response.ErrorComment
    assert server.rows("SELECT count(*) FROM instance WHERE sop_uid = ?", sop) == [(0,)]
    assert not list(server.data.glob(f"*/*/{sop}.dcm"))


def test_stow_of_a_bomb_is_refused_with_its_failure_reason(server, tmp_path):
    sop = generate_uid()
    payload = bomb(tmp_path / "bomb.dcm", sop).read_bytes()
    body = b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + payload
    body += b"\r\n--b0undary--\r\n"
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    connection.request(
        "POST",
        "/dicom-web/studies",
        body=body,
        headers={
            "Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary',
            "Accept": "application/dicom+json",
        },
    )
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    assert response.status == 409
    (failed,) = answer["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [sop]
    assert failed["00081197"]["Value"] == [0xC000]
    assert server.rows("SELECT count(*) FROM instance WHERE sop_uid = ?", sop) == [(0,)]


def test_a_stored_bomb_answers_422_everywhere_and_memory_stays_bounded(server):
    ds = pydicom.dcmread(next(server.data.glob(f"*/*/{STORED}.dcm")), stop_before_pixels=True)
    study, series = ds.StudyInstanceUID, ds.SeriesInstanceUID
    instance = f"{server.url}/dicom-web/studies/{study}/series/{series}/instances/{STORED}"
    wado = (
        f"{server.url}/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={STORED}"
    )
    requests = [
        (f"{server.url}/dicom-web/studies/{study}/series/{series}/thumbnail", "image/jpeg"),
        (f"{instance}/rendered", "image/png"),
        (f"{instance}/frames/1", 'multipart/related; type="application/octet-stream"'),
        (instance, "application/dicom"),  # Explicit VR Little Endian: decompressed
        (wado, "*/*"),  # image/jpeg
        (f"{wado}&contentType=application/dicom", "*/*"),
    ]
    grown, answers = refused_answers(server, requests)
    assert grown < BOMB_MIB // 8, f"peak memory grew {grown} MiB for a {BOMB_MIB} MiB bomb"
    for url, code, body in answers:
        assert code == 422, url
        assert b"pixel budget" in body, url  # refused before decoding, not failed during it


def test_c_get_of_a_stored_bomb_fails_its_sub_operation(server):
    ds = pydicom.dcmread(next(server.data.glob(f"*/*/{STORED}.dcm")), stop_before_pixels=True)
    ae = AE(ae_title="LEONLY")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)  # decompression needed
    assoc = ae.associate(
        "127.0.0.1",
        server.port,
        ae_title="MINIPACS",
        ext_neg=[build_role(MRImageStorage, scp_role=True)],
        evt_handlers=[],
    )
    assert assoc.is_established
    workers = children(server.proc.pid)
    before = {pid: peak_mib(pid) for pid in workers}
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID, query.SeriesInstanceUID = ds.StudyInstanceUID, ds.SeriesInstanceUID
    query.SOPInstanceUID = STORED
    try:
        *_, (status, identifier) = assoc.send_c_get(
            query, StudyRootQueryRetrieveInformationModelGet
        )
    finally:
        assoc.release()
    assert status.Status == 0xA702  # every sub-operation failed
    assert identifier.FailedSOPInstanceUIDList == STORED
    grown = max(peak_mib(pid) - before[pid] for pid in workers if Path(f"/proc/{pid}").exists())
    assert grown < BOMB_MIB // 8


def test_a_codestream_larger_than_its_header_is_not_decoded(server):
    ds = pydicom.dcmread(next(server.data.glob(f"*/*/{LIAR}.dcm")), stop_before_pixels=True)
    instance = (
        f"{server.url}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
        f"{ds.SeriesInstanceUID}/instances/{LIAR}"
    )
    requests = [
        (f"{instance}/rendered", "image/png"),
        (f"{instance}/frames/1", 'multipart/related; type="application/octet-stream"'),
        (instance, "application/dicom"),
    ]
    grown, answers = refused_answers(server, requests)
    assert grown < 50, f"peak memory grew {grown} MiB"
    for url, code, body in answers:
        assert code == 422, url
        assert b"declares 20000" in body, (url, body)
