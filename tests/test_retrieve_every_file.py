"""Every shipped pydicom file the archive stores comes back through every retrieve route
in the default transfer syntax (Explicit VR Little Endian): WADO-URI application/dicom,
WADO-RS instance, and C-GET to a requestor that takes only that syntax. Big endian files
are byte-swapped (pydicom's save_as refuses to, and write_dataset leaves OW values
swapped), compressed ones decompressed; the pixels are the stored ones either way."""

import io
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import Server
from conftest import minipacs
from dicom_files import storable
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom import build_role
from pynetdicom import evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """One server holding every storable shipped file; the stored files by SOP UID.
    Several files share a SOP Instance UID in different encodings (MR_small and its big
    endian, deflated, RLE… copies): those after the first get a UID of their own,
    written by pydicom in the file's own encoding."""
    root = tmp_path_factory.mktemp("every")
    folder = root / "files"
    folder.mkdir()
    seen: set[str] = set()
    samples = storable()
    for n, sample in enumerate(samples):
        target = folder / f"{n:03d}-{sample.path.name}"
        if sample.sop_uid in seen:
            ds = pydicom.dcmread(sample.path)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(target)
        else:
            target.write_bytes(sample.path.read_bytes())
        seen.add(sample.sop_uid)
    minipacs("import", "--data", str(root / "data"), str(folder), "--no-fsync")
    server = Server(root / "data").start()
    stored = {p.stem: p for p in (root / "data").glob("*/*/*.dcm")}
    assert len(stored) == len(samples)
    yield server, stored
    server.kill()


def pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """The decoded pixels, or None when there are none or pydicom cannot decode them."""
    if "PixelData" not in ds:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ds.pixel_array
    except Exception:
        return None


def check(stored: Path, status: int, body: bytes) -> str | None:
    """What is wrong with one answer (None: nothing): 200 with the stored instance in
    Explicit VR Little Endian and the same pixels, or 422 when its pixels do not decode."""
    original = pydicom.dcmread(stored)
    expected = pixels(original)
    must_decode = original.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian
    if status == 422 and must_decode and expected is None and "PixelData" in original:
        return None  # no decoder here either: refused, not sent half-converted
    if status != 200:
        return f"{stored.name}: {status} {body[:200]!r}"
    got = pydicom.dcmread(io.BytesIO(body))
    if got.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
        return f"{stored.name}: sent as {got.file_meta.TransferSyntaxUID}"
    if got.SOPInstanceUID != original.SOPInstanceUID:
        return f"{stored.name}: another SOP Instance UID"
    if expected is not None and not np.array_equal(pixels(got), expected):
        return f"{stored.name}: pixels differ"
    return None


def http_get(url: str, accept: str = "*/*") -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def uids(path: Path) -> tuple[str, str, str]:
    return path.parent.parent.name, path.parent.name, path.stem


def test_wado_uri_application_dicom(archive):
    server, stored = archive
    problems = []
    for path in stored.values():
        study, series, sop = uids(path)
        query = urllib.parse.urlencode(
            {
                "requestType": "WADO",
                "studyUID": study,
                "seriesUID": series,
                "objectUID": sop,
                "contentType": "application/dicom",
            }
        )
        problems.append(check(path, *http_get(f"{server.url}/wado?{query}")))
    assert "\n".join(p for p in problems if p) == ""


def test_wado_rs_instance(archive):
    server, stored = archive
    problems = []
    for path in stored.values():
        study, series, sop = uids(path)
        url = f"{server.url}/dicom-web/studies/{study}/series/{series}/instances/{sop}"
        problems.append(check(path, *http_get(url, "application/dicom")))
    assert "\n".join(p for p in problems if p) == ""


def test_c_get_to_a_requestor_taking_explicit_little_endian_only(archive):
    server, stored = archive
    classes = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in stored.values()
    }
    received: dict[str, bytes] = {}

    def store(event) -> int:
        received[event.request.AffectedSOPInstanceUID] = event.encoded_dataset()
        return 0x0000

    ae = AE(ae_title="LEONLY")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in sorted(classes):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    roles = [build_role(c, scp_role=True) for c in sorted(classes)]
    assoc = ae.associate(
        "127.0.0.1",
        server.port,
        ae_title="MINIPACS",
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, store)],
    )
    assert assoc.is_established
    failed: set[str] = set()
    try:
        for study in sorted({uids(p)[0] for p in stored.values()}):
            query = pydicom.Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = study
            for status, identifier in assoc.send_c_get(
                query, StudyRootQueryRetrieveInformationModelGet
            ):
                if status.Status in (0xB000, 0xA702) and identifier is not None:
                    listed = identifier.get("FailedSOPInstanceUIDList", [])
                    failed |= {listed} if isinstance(listed, str) else set(listed)
    finally:
        assoc.release()
    problems = []
    for sop, path in stored.items():
        if sop in received:
            problems.append(check(path, 200, received[sop]))
        elif sop in failed:
            problems.append(check(path, 422, b"failed sub-operation"))
        else:
            problems.append(f"{path.name}: neither sent nor reported failed")
    assert "\n".join(p for p in problems if p) == ""
