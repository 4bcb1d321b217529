"""What an outside validator reads in the objects minipacs writes: David Clunie's
dicom3tools (Debian package dicom3tools, which scripts/test installs). `dciodvfy` checks one
object against its IOD in PS3.3 (Type 1/2 attributes, enumerated values, codes, units);
`dcentvfy` checks that the files of a study say the same of the patient and the study.
Checked: the viewer's Measurement Report with a length, an angle and an ROI, its Key Object
Selection, the report that clears every measurement, and the DICOMDIR of the study's ZIP
(docs/decisions.md, 2026-12-05: what dciodvfy found and what was fixed). Warnings are
allowed (make_study's Patient's Weight 0 is copied into the documents); an error is not."""

import json
import shutil
import subprocess
import urllib.request
import zipfile
from pathlib import Path

import pydicom
import pytest
from conftest import Server
from conftest import import_files

SIZE = 32
PROBLEMS = ("Error", "Abort")  # dciodvfy's and dcentvfy's lines that are not warnings


def validate(tool: str, *paths: Path) -> tuple[int, list[str]]:
    """A dicom3tools validator's exit status and output lines. Both print to stderr: the
    IOD's name, then "Error - ..." and "Warning - ..." lines; the status is 1 when there is
    an error (a file it cannot read too) and 134 when an assertion of its own failed, so
    the status and the lines are both checked. Missing, it fails, not skips: scripts/test
    installs it."""
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: apt-get install dicom3tools (scripts/test does)")
    done = subprocess.run([tool, *map(str, paths)], capture_output=True, text=True, timeout=60)
    return done.returncode, (done.stdout + done.stderr).splitlines()


def post(server: Server, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"{server.url}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 201
        return json.loads(response.read())


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """The objects, made once from one server: a report with a length, an angle and an
    ellipse (its ROI statistics in HU) and its key images, then a save that clears both,
    then the study's ZIP unpacked."""
    from make_study import make_study

    root = tmp_path_factory.mktemp("conformance")
    made = make_study(root / "in", 3, size=SIZE, patient_id="CONFORM")
    for path in made:  # what a KOS must copy from the images (the whole Patient module)
        ds = pydicom.dcmread(path)
        ds.IssuerOfPatientID, ds.StudyDescription = "CONFORMANCE", "dciodvfy"
        ds.save_as(path)
    sops = [pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in made]
    study = pydicom.dcmread(made[0], stop_before_pixels=True).StudyInstanceUID
    import_files(root / "data", root / "in")
    server = Server(root / "data").start()
    try:
        path = f"/api/studies/{study}/measurements"
        first = post(
            server,
            path,
            {
                "measurements": [
                    {"type": "length", "sopInstanceUID": sops[0], "points": [[2, 3], [2, 23]]},
                    {
                        "type": "angle",
                        "sopInstanceUID": sops[0],
                        "points": [[9, 4], [4, 4], [4, 9]],
                    },
                    {"type": "ellipse", "sopInstanceUID": sops[1], "points": [[4, 6], [21, 17]]},
                ],
                "keyImages": [{"sopInstanceUID": sops[0]}, {"sopInstanceUID": sops[2]}],
                "description": "conformance",
            },
        )
        cleared = post(server, path, {"measurements": [], "keyImages": []})
        found = {
            name: next(server.data.glob(f"*/*/{saved['sopInstanceUID']}.dcm"))
            for name, saved in (
                ("report", first["sr"]),
                ("key images", first["kos"]),
                ("cleared report", cleared["sr"]),
            )
        }
        media = root / "media"
        with urllib.request.urlopen(f"{server.url}/studies/{study}/archive", timeout=60) as got:
            (root / "study.zip").write_bytes(got.read())
        with zipfile.ZipFile(root / "study.zip") as archive:
            archive.extractall(media)
    finally:
        server.kill()
    found["DICOMDIR"] = media / "DICOMDIR"
    found["media"] = media
    return found


@pytest.mark.parametrize(
    "name, iod",
    [
        ("report", "Comprehensive3DSR"),
        ("key images", "KeyObjectSelectionDocument"),
        ("cleared report", "Comprehensive3DSR"),
        ("DICOMDIR", "BasicDirectory"),
    ],
)
def test_dciodvfy_finds_no_error(written, name, iod):
    status, lines = validate("dciodvfy", written[name])
    assert lines and lines[0] == iod, lines  # read as the IOD it is, not as another
    errors = [line for line in lines if line.startswith(PROBLEMS)]
    assert status == 0 and not errors, "\n".join(lines)


def test_dcentvfy_finds_the_study_consistent(written):
    """Every file of the ZIP (the images, both reports, the key images) names the same
    patient and study with the same attributes: a document that copied them differently
    from the images (a date, a birth date, a name) is an error here."""
    files = sorted(p for p in (written["media"] / "DICOM").rglob("*") if p.is_file())
    assert len(files) == 3 + 3  # the images, two reports and a KOS
    status, lines = validate("dcentvfy", *files)
    errors = [line for line in lines if line.startswith(PROBLEMS)]
    assert status == 0 and not errors, "\n".join(lines)
