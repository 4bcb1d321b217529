"""Cohort export (`minipacs export`, /api/exports) of a real archive on both index engines:
the files read back by real clients (nibabel for NIfTI, PIL for PNG, pydicom), the manifest
against the files, de-identification, resuming, bad input, and the HTTP job with its role."""

import csv
import gzip
import hashlib
import math
import resource
import time
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import requests
from conftest import TEST_FILES
from conftest import Server
from conftest import add_user
from conftest import children
from conftest import import_files
from conftest import index_args
from conftest import minipacs
from conftest import wait_until
from make_study import make_study
from PIL import Image

PATIENT, NAME = "EXPORT-7", "ORIGINAL^PATIENT"
SLICES, ROWS, COLUMNS = 8, 32, 24
SPACING = (0.8, 0.6)  # PixelSpacing: between rows, between columns (mm)
SLICE_GAP = 2.5
ORIGIN = np.array([-100.0, -120.0, -50.0])
PASSWORD = "correct horse battery"


def rotation(z_degrees: float, x_degrees: float) -> np.ndarray:
    z, x = math.radians(z_degrees), math.radians(x_degrees)
    rz = np.array([[math.cos(z), -math.sin(z), 0], [math.sin(z), math.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(x), -math.sin(x)], [0, math.sin(x), math.cos(x)]])
    return rz @ rx


def make_volume(folder: Path) -> list[Path]:
    """A CT series from CT_small.dcm (scripts/make_study.py), made an oblique volume:
    rows ≠ columns, PixelSpacing rows ≠ columns, slices 2.5 mm apart along the normal."""
    paths = make_study(folder, SLICES, size=ROWS, patient_id=PATIENT)
    axes = rotation(30, 20)
    for number, path in enumerate(paths, 1):
        ds = pydicom.dcmread(path)
        ds.PixelData = np.ascontiguousarray(ds.pixel_array[:, :COLUMNS]).tobytes()
        ds.Columns = COLUMNS
        ds.PatientName = NAME
        ds.PixelSpacing = [f"{v:.6f}" for v in SPACING]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*axes[:, 0], *axes[:, 1])]
        position = ORIGIN + (number - 1) * SLICE_GAP * axes[:, 2]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.SliceLocation = f"{position @ axes[:, 2]:.4f}"
        ds.save_as(path, enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def archive(tmp_path_factory, module_engine):
    """An archive holding the volume and, in a study of the same patient, CT_small.dcm
    (a single image: no volume); `cli` runs minipacs on it."""
    root = tmp_path_factory.mktemp("export")
    volume = make_volume(root / "volume")
    single = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    single.PatientID, single.PatientName = PATIENT, NAME
    single.save_as(root / "single.dcm")
    data = ["--data", str(root / "data"), *index_args(module_engine)]

    def cli(*args: str, **kwargs):
        return minipacs(*args, *data, **kwargs)

    import_files(root / "data", root / "volume", root / "single.dcm", index=module_engine)
    yield {"root": root, "cli": cli, "volume": volume, "engine": module_engine}


def manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="") as fp:
        return list(csv.DictReader(fp))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dicom_nifti_png_and_manifest(archive):
    out = archive["root"] / "full"
    result = archive["cli"](
        "export", "--to", str(out), "--format", "dicom,nifti,png", "--manifest", "csv",
        f"PatientID={PATIENT}",
    )  # fmt: skip
    assert "instances: 9  exported: 9  already done: 0  volumes: 1  problems: 0" in result.stdout
    rows = manifest(out)
    assert len(rows) == SLICES + 1
    for row in rows:
        assert row["PatientID"] == PATIENT
        assert sha256(out / row["dicom"]) == row["sha256"]
        assert pydicom.dcmread(out / row["dicom"]).SOPInstanceUID == row["SOPInstanceUID"]
        with Image.open(out / row["png"]) as png:
            png.load()
    series = {row["SeriesInstanceUID"] for row in rows if row["nifti"]}
    assert len(series) == 1
    volume_rows = [r for r in rows if r["nifti"]]
    assert len(volume_rows) == SLICES
    with Image.open(out / volume_rows[0]["png"]) as png:
        assert png.size == (COLUMNS, ROWS)
    [single] = [r for r in rows if not r["nifti"]]
    assert single["note"] == "no NIfTI: a single image"
    tree = f"{PATIENT}/{single['StudyInstanceUID']}/{single['SeriesInstanceUID']}"
    assert single["dicom"] == f"{tree}/{single['SOPInstanceUID']}.dcm"
    check_volume(out / volume_rows[0]["nifti"], [out / r["dicom"] for r in volume_rows])


def check_volume(nifti: Path, slices: list[Path]) -> None:
    """nibabel reads the volume with the series' shape, and its affine maps every voxel to
    the place the DICOM geometry gives it (PS3.3 C.7.6.2.1.1; NIfTI is RAS, DICOM LPS),
    with that pixel's value there."""
    image = nibabel.load(nifti)
    assert sorted(image.shape) == sorted((ROWS, COLUMNS, SLICES))
    stack = [pydicom.dcmread(p) for p in slices]
    stack.sort(key=lambda ds: int(ds.InstanceNumber))
    first = stack[0]
    orientation = np.array([float(v) for v in first.ImageOrientationPatient])
    row_step, column_step = (float(v) for v in first.PixelSpacing)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in stack])
    dicom = np.eye(4)  # (column, row, slice) → LPS millimetres
    dicom[:3, 0] = orientation[:3] * column_step
    dicom[:3, 1] = orientation[3:] * row_step
    dicom[:3, 2] = (positions[-1] - positions[0]) / (len(stack) - 1)
    dicom[:3, 3] = positions[0]
    dicom = np.diag([-1, -1, 1, 1]) @ dicom  # LPS → RAS
    mapping = np.linalg.inv(dicom) @ image.affine  # NIfTI voxel → DICOM (column, row, slice)
    assert np.allclose(mapping, np.round(mapping), atol=1e-3), mapping
    mapping = np.round(mapping)
    assert sorted(np.abs(mapping[:3, :3]).sum(axis=0)) == [1, 1, 1]  # a permutation
    voxels = np.indices(image.shape).reshape(3, -1)
    column, row, index = (mapping[:3, :3] @ voxels + mapping[:3, 3:]).astype(int)
    values = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                       for ds in stack])  # fmt: skip
    assert np.allclose(image.get_fdata().reshape(-1), values[index, row, column])


def test_deidentified_exports_link_up_and_hold_no_original_name(archive):
    if archive["engine"]:
        pytest.skip("nothing here depends on the index engine: SQLite only")
    folders = [archive["root"] / f"deid-{n}" for n in (1, 2)]
    for folder in folders:
        archive["cli"](
            "export", "--to", str(folder), "--deidentify", "--format", "dicom,nifti",
            "--options", "uids", "--manifest", "csv", f"PatientID={PATIENT}",
        )  # fmt: skip
    first, second = (manifest(f) for f in folders)
    assert first == second  # same pseudonym, UIDs, paths and bytes
    assert {r["PatientID"] for r in first} == {r["PatientID"] for r in second}
    assert PATIENT not in {r["PatientID"] for r in first}
    assert all(r["PatientID"].startswith("ANON") for r in first)
    for folder in folders:
        for path in (p for p in folder.rglob("*") if p.is_file()):
            content = path.read_bytes()
            if path.suffix == ".gz":
                content = gzip.decompress(content)
            assert NAME.encode() not in content, path
            assert PATIENT.encode() not in content, path
        assert any(folder.rglob("*.nii.gz"))
    # Another project key: other pseudonyms, so exports of two projects do not link up.
    # Without the dicom format the files made from them are all that stays.
    other = archive["root"] / "deid-other"
    key = archive["root"] / "other.key"
    archive["cli"](
        "export", "--to", str(other), "--deidentify", "--key-file", str(key),
        "--format", "nifti,png", f"PatientID={PATIENT}",
    )  # fmt: skip
    rows = manifest(other)
    assert {r["PatientID"] for r in rows}.isdisjoint(r["PatientID"] for r in first)
    assert all(r["png"] and not r["dicom"] for r in rows)
    assert len({r["nifti"] for r in rows if r["nifti"]}) == 1
    assert not list(other.rglob("*.dcm"))


def test_an_interrupted_export_resumes(archive):
    """A stored file that cannot be read fails its instance (and its series' volume); once
    it is back, the same command exports only what is missing and checks everything."""
    out = archive["root"] / "resumed"
    command = ("export", "--to", str(out), "--format", "dicom,nifti", f"PatientID={PATIENT}")
    stored = next((archive["root"] / "data").glob("*/*/*.dcm"))
    aside = stored.with_name("aside")
    stored.rename(aside)
    try:
        first = archive["cli"](*command, check=False)
    finally:
        aside.rename(stored)
    assert first.returncode == 1
    assert f"{stored.stem}: " in first.stdout
    assert "exported: 8  already done: 0" in first.stdout
    second = archive["cli"](*command)
    assert "instances: 9  exported: 1  already done: 8  volumes: 1  problems: 0" in second.stdout
    rows = manifest(out)
    assert len(rows) == 9
    assert all(sha256(out / r["dicom"]) == r["sha256"] for r in rows)
    # Done is done: a third run writes nothing, checks again, and --resume needs no keys.
    third = archive["cli"]("export", "--to", str(out), "--resume")
    assert "exported: 0  already done: 9" in third.stdout
    # A file changed after the export fails the check.
    (out / rows[0]["dicom"]).write_bytes(b"changed")
    fourth = archive["cli"]("export", "--to", str(out), "--resume", check=False)
    assert fourth.returncode == 1
    assert f"{rows[0]['dicom']}: missing, or not what was written" in fourth.stdout


def test_bad_requests_are_refused_with_a_reason(archive):
    if archive["engine"]:
        pytest.skip("nothing here depends on the index engine: SQLite only")
    root = archive["root"]
    (root / "a-file").write_text("")
    cases = [
        (["NoSuchKeyword=1"], 2, "NoSuchKeyword is not a DICOM keyword"),
        (["--format", "dicom,jpeg", "Modality=CT"], 2, "unknown format 'jpeg'"),
        (["Modality=CT", "--to", str(root / "a-file")], 2, "is not a folder"),
        (["PatientID=NOBODY"], 1, "no stored instance matches the query"),
        (["Modality=CT", "--to", str(root / "full")], 2, "holds another export"),
    ]
    for args, status, message in cases:
        to = [] if "--to" in args else ["--to", str(root / "refused")]
        result = archive["cli"]("export", *to, *args, check=False)
        assert (result.returncode, message in result.stderr) == (status, True), result.stderr
        assert not (root / "refused").exists()


# -- Over HTTP: jobs in the server, for researcher and admin -------------------------------


@pytest.fixture(scope="module")
def server(archive):
    data = archive["root"] / "data"
    server = Server(data, index=archive["engine"])
    server.tokens = {
        name: add_user(data, name, role, PASSWORD, archive["engine"])
        for name, role in (("rhea", "researcher"), ("ugo", "uploader"))
    }
    server.start()
    yield server
    server.kill()


def call(server, method: str, path: str, who: str = "rhea", **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {server.tokens[who]}"}
    return requests.request(method, f"{server.url}{path}", headers=headers, timeout=30, **kwargs)


def finished(server, job: str) -> dict:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = call(server, "GET", f"/api/exports/{job}").json()
        if state["state"] not in ("queued", "running"):
            return state
        time.sleep(0.1)
    raise AssertionError(f"export job {job} did not finish: {state}")


def audited(server, event: tuple[str, str]) -> bool:
    """Whether the export event (who, Patient ID) is in the trail (written just after)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if event in server.rows("SELECT who, patient_id FROM auditevent WHERE event = 'export'"):
            return True
        time.sleep(0.1)
    return False


def test_export_job_over_http(archive, request):
    if archive["engine"]:
        pytest.skip("the jobs use the index as the command does (tested on both): SQLite only")
    server = request.getfixturevalue("server")
    body = {
        "query": {"PatientID": PATIENT},
        "formats": ["dicom", "png"],
        "deidentify": True,
        "manifest": "csv",
    }
    # Not in the linear order of roles: an uploader (which may more than a viewer) may not.
    assert call(server, "POST", "/api/exports", "ugo", json=body).status_code == 403
    assert call(server, "GET", "/api/exports", "ugo").status_code == 403
    asked = call(server, "POST", "/api/exports", json=body)
    assert asked.status_code == 202, asked.text
    job = asked.json()["id"]
    assert asked.headers["Location"] == f"/api/exports/{job}"
    state = finished(server, job)
    assert (state["state"], state["done"], state["total"]) == ("done", 9, 9), state
    assert state["summary"]["exported"] == 9
    listing = call(server, "GET", f"/api/exports/{job}/files").json()
    assert len([f for f in listing if f["path"].endswith(".dcm")]) == 9
    got = call(server, "GET", f"/api/exports/{job}/files/manifest.csv")
    rows = list(csv.DictReader(got.text.splitlines()))
    assert len(rows) == 9 and PATIENT not in got.text
    dicom = call(server, "GET", f"/api/exports/{job}/files/{rows[0]['dicom']}")
    assert hashlib.sha256(dicom.content).hexdigest() == rows[0]["sha256"]
    assert call(server, "GET", f"/api/exports/{job}/files/.export.json").status_code == 404
    assert audited(server, (f"rhea (export job {job})", PATIENT))
    # Cancelled: the second job waits behind the first (one at a time) or is stopped.
    first = call(server, "POST", "/api/exports", json={**body, "formats": ["dicom", "png"]})
    second = call(server, "POST", "/api/exports", json={**body, "deidentify": False})
    assert call(server, "DELETE", f"/api/exports/{second.json()['id']}").status_code == 202
    assert finished(server, second.json()["id"])["state"] == "cancelled"
    assert finished(server, first.json()["id"])["state"] == "done"
    # A finished job's files are removed on request.
    assert call(server, "DELETE", f"/api/exports/{job}").status_code == 204
    assert call(server, "GET", f"/api/exports/{job}").status_code == 404
    bad = call(server, "POST", "/api/exports", json={"query": {"Modality": "MR"}})
    assert (bad.status_code, bad.json()["error"]) == (400, "no stored instance matches the query")


# -- A bounded disk: an export stops before it eats the room ingest needs -----------------


def test_an_export_stops_before_the_disk_holds_less_than_the_reserve(archive):
    """Into the archive's disk an export leaves `disk_reserve_mb` and a margin free: with
    a reserve larger than the disk it stops before its first file (exit 1, the reason, no
    file, no manifest); with room the same folder goes on."""
    if archive["engine"]:
        pytest.skip("nothing here depends on the index engine: SQLite only")
    out = archive["root"] / "no-room"
    reserve = 1 << 30  # MiB: a pebibyte
    stopped = archive["cli"](
        "export", "--to", str(out), f"PatientID={PATIENT}",
        env={"MINIPACS_DISK_RESERVE_MB": str(reserve)}, check=False,
    )  # fmt: skip
    assert stopped.returncode == 1, stopped.stderr
    assert f"export: stopped: under {reserve + 256} MiB free on {out}" in stopped.stdout
    assert "exported: 0" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    assert not list(out.rglob("*.dcm")) and not (out / "manifest.csv").exists()
    resumed = archive["cli"]("export", "--to", str(out), "--resume")
    assert "instances: 9  exported: 9  already done: 0  volumes: 0  problems: 0" in resumed.stdout
    assert len(manifest(out)) == 9


def test_a_full_disk_stops_an_export_job_and_ingest_goes_on(archive, request, tmp_path):
    """A write that finds no room (EFBIG under RLIMIT_FSIZE, the "no room" errno a test
    can cause without root, as in test_faults) stops the job: failed, with the reason; the
    files before it kept, the manifest naming only those; audited as a failure; and the
    server goes on storing."""
    if archive["engine"]:
        pytest.skip("the jobs use the index as the command does (tested on both): SQLite only")
    server = request.getfixturevalue("server")
    small, other, big = make_study(tmp_path / "full", 3, size=64, patient_id="EXPORT-FULL")
    ds = pydicom.dcmread(big)  # instance 3, exported last: 18 MiB of pixels
    ds.Rows = ds.Columns = 3072
    ds.PixelData = np.zeros((3072, 3072), np.int16).tobytes()
    ds.save_as(big, enforce_file_format=True)
    minipacs("send", "--port", str(server.port), str(tmp_path / "full"))
    # Every file the server writes meanwhile must stay under it: the index and its WAL
    # (checkpointed at ~4 MiB) well under, the big instance over.
    limit = 16 << 20
    pids = {server.proc.pid, *children(server.proc.pid)}
    for pid in pids:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    try:
        body = {"query": {"PatientID": "EXPORT-FULL"}, "formats": ["dicom"]}
        job = call(server, "POST", "/api/exports", json=body).json()["id"]
        state = finished(server, job)
        assert state["state"] == "failed", state
        assert state["error"].startswith("stopped: no space left on "), state
        assert state["summary"]["exported"] == 2
        listing = call(server, "GET", f"/api/exports/{job}/files").json()
        written = sorted(f["path"] for f in listing if f["path"].endswith(".dcm"))
        got = call(server, "GET", f"/api/exports/{job}/files/manifest.csv")
        rows = list(csv.DictReader(got.text.splitlines()))
        assert sorted(r["dicom"] for r in rows) == written and len(written) == 2
        for row in rows:
            dicom = call(server, "GET", f"/api/exports/{job}/files/{row['dicom']}")
            assert hashlib.sha256(dicom.content).hexdigest() == row["sha256"]
        assert {r["SOPInstanceUID"] for r in rows} == {
            pydicom.dcmread(p).SOPInstanceUID for p in (small, other)
        }
        sql = "SELECT outcome FROM auditevent WHERE event = 'export' AND who LIKE ?"
        outcomes = wait_until(lambda: server.rows(sql, f"% (export job {job})"))
        assert outcomes[0][0].startswith("failure: stopped: no space left"), outcomes
        later = make_study(tmp_path / "later", 1, size=64, patient_id="EXPORT-FULL")
        minipacs("send", "--port", str(server.port), *map(str, later))
    finally:
        for pid in pids:
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
    found = minipacs(
        "find", "--port", str(server.port), "-L", "IMAGE", "PatientID=EXPORT-FULL", "SOPInstanceUID"
    )
    assert pydicom.dcmread(later[0]).SOPInstanceUID in found.stdout
