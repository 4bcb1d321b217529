"""The viewer's reading tools, server side (issue 19, docs/viewer-api.md): series geometry
and its spacing labels, ROI statistics in HU, MPR planes against numpy's slices of the
same volume, and the refusals. One server for the module; data from scripts/make_study.py
(CT_small.dcm's geometry), each slice's pixels made different so a wrong axis shows."""

import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import Server
from conftest import add_user
from conftest import import_files
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from test_audit import trail
from test_auth import PASSWORD

from storage import Archive
from storage import users
from viewer import mpr

SLICES, SIZE = 12, 32
# The server's volume cache is 1 MiB: 5 slices of 256² fit it in int16 (640 KiB), not in
# float32 (1.25 MiB).
WIDE_SLICES, WIDE_SIZE = 5, 256
SR_CLASS = "1.2.840.10008.5.1.4.1.1."  # + 88.34 (Comprehensive 3D SR), 88.59 (KOS)
WINDOW = (40.0, 400.0)


def _save_series(paths: list[Path], z: list[float], spacing=None, imager=None) -> list[Path]:
    """The files as one new series: slice k moved to z[k], its pixels shifted by k (so every
    slice differs), spacing attributes as given ("drop" removes PixelSpacing)."""
    series = generate_uid()
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        pixels = np.roll(ds.pixel_array, 3 * k, axis=1) + 7 * k
        ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
        ds.SeriesInstanceUID = series
        ds.IssuerOfPatientID = "READING-TEST"  # a KOS must copy it (and the whole module)
        ds.ImagePositionPatient = [0, 0, z[k]]
        ds.SliceLocation = z[k]
        if spacing == "drop":
            del ds.PixelSpacing
        elif spacing:
            ds.PixelSpacing = spacing
        if imager:
            ds.ImagerPixelSpacing = imager
        ds.save_as(path)
    return paths


def _wide_series(paths: list[Path], slope: float, lowest: int) -> list[Path]:
    """The files as one new volume of WIDE_SIZE² slices 1 mm apart, Rescale Slope `slope`,
    and `lowest` the stored value of slice 1's first pixel."""
    _save_series(paths, [float(k) for k in range(len(paths))])
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        pixels = np.full((WIDE_SIZE, WIDE_SIZE), 100 + k, dtype=np.int16)
        if k == 1:
            pixels[0, 0] = lowest
        ds.Rows = ds.Columns = WIDE_SIZE
        ds.PixelData = pixels.tobytes()
        ds.RescaleSlope = slope
        ds.save_as(path)
    return paths


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from make_study import make_study

    root = tmp_path_factory.mktemp("reading")
    made = make_study(root / "in", 2 * SLICES + 5 + 3 + 2 * WIDE_SLICES, size=SIZE)
    wide = made[2 * SLICES + 8 :]
    study = pydicom.dcmread(made[0]).StudyInstanceUID
    series = {
        # Slices 1 mm apart, 0.5 mm pixels: coronal and sagittal planes get a row between
        # each two slices, so their pixels are square.
        "volume": _save_series(made[:SLICES], [float(k) for k in range(SLICES)], [0.5, 0.5]),
        # Irregular gaps, stored out of order.
        "gaps": _save_series(made[SLICES : SLICES + 5], [5.0, 1.0, 2.0, 4.0, 3.5]),
        "single": _save_series(made[SLICES + 5 : SLICES + 6], [0.0]),
        "detector": _save_series(made[SLICES + 6 : SLICES + 7], [0.0], "drop", [0.2, 0.25]),
        "px": _save_series(made[SLICES + 7 : SLICES + 8], [0.0], "drop"),
        # 0.7 mm pixels, slices 1 mm apart: 11 mm from end to end is 15.7 output rows.
        "stretched": _save_series(
            made[SLICES + 8 : 2 * SLICES + 8], [float(k) for k in range(SLICES)], [0.7] * 2
        ),
        # Float32 by its headers (slope 0.5), and by slice 1's values only (-32768 - 1024).
        "float": _wide_series(wide[:WIDE_SLICES], 0.5, 0),
        "beyond": _wide_series(wide[WIDE_SLICES:], 1.0, -32768),
    }
    import_files(root / "data", root / "in")
    running = Server(root / "data", env={"MINIPACS_VOLUME_CACHE_MB": "1"}).start()
    running.study = study
    running.files = series
    running.series = {k: pydicom.dcmread(v[0]).SeriesInstanceUID for k, v in series.items()}
    yield running
    running.kill()


def get(server: Server, path: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(f"{server.url}{path}", timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def series_path(server: Server, name: str) -> str:
    return f"/api/studies/{server.study}/series/{server.series[name]}"


def hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def windowed(values: np.ndarray) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR windowing to 0-255, written out here."""
    center, width = WINDOW
    grey = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.clip(np.rint(np.clip(grey, 0, 255)), 0, 255).astype(np.uint8)


def plane(server: Server, name: str, index: int, series="volume") -> tuple[np.ndarray, dict]:
    status, headers, body = get(
        server, f"{series_path(server, series)}/mpr/{name}/{index}?window=40,400"
    )
    assert status == 200, body
    assert headers["Content-Type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(body))), headers


def test_geometry_lists_each_instance_and_checks_the_volume(server):
    status, _, body = get(server, f"{series_path(server, 'volume')}/geometry")
    assert status == 200
    answer = json.loads(body)
    assert answer["modality"] == "CT"
    first = answer["instances"][0]
    assert first["rows"] == first["columns"] == SIZE
    assert first["imageOrientationPatient"] == [1, 0, 0, 0, 1, 0]
    assert first["imagePositionPatient"] == [0, 0, 0]
    assert (first["pixelSpacing"], first["spacingKind"]) == ([0.5, 0.5], "patient")
    assert first["sliceThickness"] == 5
    assert first["frameOfReferenceUID"]
    assert [i["instanceNumber"] for i in answer["instances"]] == list(range(1, SLICES + 1))
    volume = answer["volume"]
    assert volume["ok"] and volume["slices"] == SLICES and volume["spacing"] == [0.5, 0.5, 1]
    assert volume["order"] == [i["sopInstanceUID"] for i in answer["instances"]]


@pytest.mark.parametrize(
    "name, spacing, kind",
    [
        ("detector", [0.2, 0.25], "detector"),
        ("px", None, "px"),
        ("gaps", [0.661468] * 2, "patient"),
    ],
)
def test_spacing_is_labelled_by_where_it_was_measured(server, name, spacing, kind):
    answer = json.loads(get(server, f"{series_path(server, name)}/geometry")[2])
    assert (answer["instances"][0]["pixelSpacing"], answer["instances"][0]["spacingKind"]) == (
        spacing,
        kind,
    )


@pytest.mark.parametrize(
    "name, reason",
    [("gaps", "slice gaps differ: 0.50 to 1.50 mm"), ("single", "at least 3 slices")],
)
def test_a_series_that_is_not_a_volume_is_refused_with_the_reason(server, name, reason):
    geometry = json.loads(get(server, f"{series_path(server, name)}/geometry")[2])
    assert geometry["volume"]["ok"] is False and reason in geometry["volume"]["reason"]
    for path in ("/mpr", "/mpr/coronal/0"):
        status, headers, body = get(server, series_path(server, name) + path)
        assert status == 409 and headers["Content-Type"] == "application/json"
        assert reason in json.loads(body)["error"]


def test_coronal_and_sagittal_rows_are_the_volumes_rows(server):
    volume = np.stack([hu(path) for path in server.files["volume"]])  # [z, row, column]
    # Head up: the top row is the highest slice; 0.5 mm rows, so every other row is a
    # slice and the rows between are halfway (linear interpolation of HU).
    top_down = volume[::-1]
    halfway = (top_down[:-1] + top_down[1:]) / 2
    row, column = 9, 20
    coronal, headers = plane(server, "coronal", row)
    assert coronal.shape == (2 * SLICES - 1, SIZE)
    assert np.array_equal(coronal[::2], windowed(top_down[:, row, :]))
    assert np.array_equal(coronal[1::2], windowed(halfway[:, row, :]))
    assert headers["Minipacs-Plane-Origin"] == f"0.0,{row * 0.5},{SLICES - 1}.0"
    assert headers["Minipacs-Plane-Row"] == "0.0,0.0,-0.5"
    sagittal, _ = plane(server, "sagittal", column)
    assert sagittal.shape == (2 * SLICES - 1, SIZE)
    assert np.array_equal(sagittal[::2], windowed(top_down[:, :, column]))
    assert np.array_equal(sagittal[1::2], windowed(halfway[:, :, column]))
    axial, headers = plane(server, "axial", 4)
    assert np.array_equal(axial, windowed(volume[4]))
    assert headers["Minipacs-Plane-Origin"] == "0.0,0.0,4.0"
    # Rows of 0.7 mm over 11 mm: 17 rows, the top one the highest slice and the last one
    # (0.2 mm below the lowest slice, the nearest row to it) the lowest slice.
    top_down = np.stack([hu(path) for path in server.files["stretched"]])[::-1]
    for name, cut in (("coronal", top_down[:, row, :]), ("sagittal", top_down[:, :, column])):
        image, headers = plane(server, name, row if name == "coronal" else column, "stretched")
        assert image.shape == (17, SIZE) and headers["Minipacs-Plane-Row"] == "0.0,0.0,-0.7"
        assert np.array_equal(image[0], windowed(cut[0]))
        assert np.array_equal(image[-1], windowed(cut[-1]))


def test_planes_have_square_pixels_and_a_patient_mapping(server):
    status, _, body = get(server, f"{series_path(server, 'volume')}/mpr")
    planes = json.loads(body)["planes"]
    assert planes["coronal"] == {
        "count": SIZE,
        "width": SIZE,
        "height": 2 * SLICES - 1,
        "pixel": 0.5,
        "origin": [0.0, 0.0, SLICES - 1.0],
        "column": [0.5, 0.0, 0.0],
        "row": [0.0, 0.0, -0.5],
        "step": [0.0, 0.5, 0.0],
    }
    assert planes["axial"]["count"] == SLICES and planes["sagittal"]["column"] == [0, 0.5, 0]
    metrics = get(server, "/metrics")[2].decode()
    assert "minipacs_volume_cache_bytes " in metrics


def test_roi_mean_is_numpys_over_the_same_mask_in_hu(server):
    path = server.files["volume"][3]
    sop = pydicom.dcmread(path).SOPInstanceUID
    x0, y0, x1, y1 = 4.2, 6.0, 21.7, 17.5
    status, _, body = get(
        server,
        f"{series_path(server, 'volume')}/instances/{sop}/roi"
        f"?shape=ellipse&x0={x1}&y0={y0}&x1={x0}&y1={y1}",
    )
    assert status == 200, body
    answer = json.loads(body)
    rows, columns = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    a, b, cx, cy = (x1 - x0) / 2, (y1 - y0) / 2, (x0 + x1) / 2, (y0 + y1) / 2
    inside = ((columns - cx) / a) ** 2 + ((rows - cy) / b) ** 2 <= 1
    values = hu(path)[inside]
    assert answer["pixels"] == inside.sum()
    assert answer["mean"] == pytest.approx(values.mean())
    assert answer["sd"] == pytest.approx(values.std())
    assert (answer["min"], answer["max"]) == (values.min(), values.max())
    assert (answer["area"], answer["areaUnit"], answer["unit"]) == (inside.sum() / 4, "mm2", "HU")


@pytest.mark.parametrize("name, unit", [("detector", "mm2"), ("px", "px2")])
def test_roi_area_follows_the_spacing(server, name, unit):
    sop = pydicom.dcmread(server.files[name][0]).SOPInstanceUID
    query = "shape=rectangle&x0=0&y0=0&x1=10&y1=4"
    body = get(server, f"{series_path(server, name)}/instances/{sop}/roi?{query}")[2]
    answer = json.loads(body)
    assert answer["pixels"] == 40 and answer["areaUnit"] == unit
    assert answer["area"] == pytest.approx(40 * 0.2 * 0.25 if unit == "mm2" else 40)


@pytest.mark.parametrize(
    "path, status",
    [
        ("/roi?shape=circle&x0=0&y0=0&x1=4&y1=4", 400),
        ("/roi?shape=ellipse&x0=0&y0=0&x1=4", 400),
        ("/roi?shape=ellipse&x0=0&y0=0&x1=x&y1=4", 400),
        ("/roi?shape=rectangle&x0=40&y0=40&x1=50&y1=50", 400),
        ("/roi?shape=rectangle&x0=0&y0=0&x1=4&y1=4&frame=2", 400),
        ("/../../mpr/oblique/0", 400),
        ("/../../mpr/axial/99", 400),
        ("/../../mpr/axial/0?window=40,0", 400),
    ],
)
def test_bad_input_is_a_400_with_a_json_error(server, path, status):
    sop = pydicom.dcmread(server.files["volume"][0]).SOPInstanceUID
    base = f"{series_path(server, 'volume')}/instances/{sop}"
    if path.startswith("/../.."):
        base, path = series_path(server, "volume"), path[6:]
    code, headers, body = get(server, base + path)
    assert code == status and headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"]


def test_unknown_series_and_bad_uids(server):
    assert get(server, f"/api/studies/{server.study}/series/1.2.3/geometry")[0] == 404
    assert get(server, f"/api/studies/{server.study}/series/x/geometry")[0] == 400


def post(server: Server, path: str, body: object, token: str = "") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"{server.url}{path}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_measurements_saved_as_sr_and_kos_read_back(server):
    import highdicom as hd

    image = pydicom.dcmread(server.files["volume"][2], stop_before_pixels=True)
    sop = image.SOPInstanceUID
    # Only Imager Pixel Spacing (0.2, 0.25): mm at the detector, which the SR cannot say.
    detector = pydicom.dcmread(server.files["detector"][0], stop_before_pixels=True)
    body = {
        "measurements": [
            {"type": "length", "sopInstanceUID": sop, "points": [[2, 3], [2, 23]]},
            {"type": "angle", "sopInstanceUID": sop, "points": [[9, 4], [4, 4], [4, 9]]},
            {"type": "ellipse", "sopInstanceUID": sop, "points": [[4.2, 6], [21.7, 17.5]]},
            {
                "type": "length",
                "sopInstanceUID": detector.SOPInstanceUID,
                "points": [[0, 0], [8, 0]],
            },
            {
                "type": "ellipse",
                "sopInstanceUID": detector.SOPInstanceUID,
                "points": [[2, 2], [9, 9]],
            },
        ],
        "keyImages": [{"sopInstanceUID": sop}, {"sopInstanceUID": detector.SOPInstanceUID}],
    }
    # Saved by a user (the index has one only meanwhile: the module's other requests have
    # none), who is named in the store events of both documents.
    token = add_user(server.data, "reader", "uploader", PASSWORD, server.index)
    try:
        status, saved = post(server, f"/api/studies/{server.study}/measurements", body, token)
    finally:
        with Archive(server.data, fsync=False, index_url=server.index) as archive:
            archive.accounts(users.remove, "reader", write=True)
    assert status == 201, saved
    documents = {saved[name]["sopInstanceUID"] for name in ("sr", "kos")}
    stored = trail(server, 2, event="store", who="reader")
    assert {json.loads(e["detail"])["sop"] for e in stored} == documents
    assert {(e["outcome"], e["study_uid"]) for e in stored} == {("success", server.study)}
    query = f"/dicom-web/studies/{server.study}/instances?SOPClassUID=1.2.840.10008.5.1.4.1.1.88.34"
    found = json.loads(get(server, query)[2])
    assert [f["00080018"]["Value"][0] for f in found] == [saved["sr"]["sopInstanceUID"]]
    roi = json.loads(
        get(
            server,
            f"{series_path(server, 'volume')}/instances/{sop}/roi"
            "?shape=ellipse&x0=4.2&y0=6&x1=21.7&y1=17.5",
        )[2]
    )

    # pydicom and highdicom read the stored report: a 10 mm length (20 px of 0.5 mm), a
    # right angle, the ROI's statistics as the ROI endpoint computes them.
    path = next(server.data.glob(f"*/*/{saved['sr']['sopInstanceUID']}.dcm"))
    assert pydicom.dcmread(path).SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    report = hd.sr.srread(path)
    groups = report.content.get_planar_roi_measurement_groups()
    values = [
        {m.name.meaning: (pytest.approx(m.value), m.unit.value) for m in g.get_measurements()}
        for g in groups
    ]
    assert values[0] == {"Length": (10.0, "mm")}
    assert values[1] == {"Angle": (90.0, "deg")}
    assert values[2]["Mean"] == (pytest.approx(roi["mean"]), "[hnsf'U]")
    assert values[2]["Area"] == (pytest.approx(roi["area"]), "mm2")
    assert groups[2].roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sop
    kos = pydicom.dcmread(next(server.data.glob(f"*/*/{saved['kos']['sopInstanceUID']}.dcm")))
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    # The selection references exactly the key images, in its content and its evidence.
    marked = {
        (image.SOPClassUID, sop, server.series["volume"]),
        (detector.SOPClassUID, detector.SOPInstanceUID, server.series["detector"]),
    }
    selection = hd.ko.KeyObjectSelectionDocument.from_dataset(kos)
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    assert {
        (item.referenced_sop_class_uid, item.referenced_sop_instance_uid, series)
        for item in selection.content.get_references()
        for series in [selection.resolve_reference(item.referenced_sop_instance_uid)[1]]
    } == marked
    [evidence] = kos.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == server.study
    assert {
        (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID, series.SeriesInstanceUID)
        for series in evidence.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    } == marked
    # Both documents carry the image's patient and study (ID and issuer: the same patient).
    for document in (pydicom.dcmread(path), kos):
        for keyword in ("PatientID", "IssuerOfPatientID", "PatientName", "StudyDescription"):
            assert document.get(keyword) == image.get(keyword), keyword

    # The viewer reopens them.
    back = json.loads(get(server, f"/api/studies/{server.study}/measurements")[2])
    assert back["sopInstanceUID"] == saved["sr"]["sopInstanceUID"]
    types = [m["type"] for m in back["measurements"]]
    assert types == ["length", "angle", "ellipse", "length", "ellipse"]
    assert back["measurements"][0]["points"] == [[2, 3], [2, 23]]
    assert back["measurements"][0]["value"] == pytest.approx(10.0)
    assert back["measurements"][2]["points"] == [[4.2, 6], [21.7, 17.5]]
    stats = back["measurements"][2]["stats"]
    assert (stats["mean"], stats["unit"]) == (pytest.approx(roi["mean"]), "HU")
    assert (stats["min"], stats["max"]) == (roi["min"], roi["max"])
    assert stats["spacingKind"] == "patient"
    # At the detector, as when measured: 8 columns of 0.25 mm, an area in mm² there.
    assert (back["measurements"][3]["value"], back["measurements"][3]["unit"]) == (
        pytest.approx(2.0),
        "mm (detector)",
    )
    assert back["measurements"][4]["stats"]["spacingKind"] == "detector"
    # Each names its image's series, which the viewer shows and measures it under.
    named = [m["seriesInstanceUID"] for m in back["measurements"]]
    assert named == [server.series["volume"]] * 3 + [server.series["detector"]] * 2
    assert back["keyImages"] == [
        {"sopInstanceUID": sop, "frame": 1, "seriesInstanceUID": server.series["volume"]},
        {
            "sopInstanceUID": detector.SOPInstanceUID,
            "frame": 1,
            "seriesInstanceUID": server.series["detector"],
        },
    ]


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"{not json", "JSON object"),
        ({"measurements": [{"type": "arrow", "sopInstanceUID": "1.2"}]}, "type"),
        (
            {"measurements": [{"type": "length", "sopInstanceUID": "1.2", "points": [[0, 0]]}]},
            "2 [x, y]",
        ),
        ({"keyImages": [{"sopInstanceUID": "1.2.3.4"}]}, "not in study"),
    ],
)
def test_bad_measurements_are_a_400(server, body, reason):
    status, answer = post(server, f"/api/studies/{server.study}/measurements", body)
    assert status == 400 and reason in answer["error"]


def test_a_measurement_on_a_frame_of_a_legacy_multi_frame_image_keeps_its_frame(server, tmp_path):
    """pydicom's SC_rgb_rle_2frame.dcm is a Secondary Capture (a single-frame SOP class, to
    which highdicom gives no frame number) with Number of Frames 2. A length on its frame
    2 is saved with Referenced Frame Number 2 and reopens on frame 2 (it was a 422); a
    frame it does not have is a 400."""
    from conftest import storescu
    from pydicom.data import get_testdata_file

    image = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    image.decompress()  # storescu offers uncompressed syntaxes
    image.StudyInstanceUID, image.SeriesInstanceUID = server.study, generate_uid()
    image.SOPInstanceUID = image.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    like = pydicom.dcmread(server.files["single"][0], stop_before_pixels=True)
    for keyword in ("PatientID", "IssuerOfPatientID", "PatientName"):
        setattr(image, keyword, like.get(keyword))
    image.save_as(tmp_path / "sc.dcm")
    storescu(server.port, tmp_path / "sc.dcm")
    path = f"/api/studies/{server.study}/measurements"
    length = {
        "type": "length",
        "sopInstanceUID": image.SOPInstanceUID,
        "points": [[0, 0], [30, 40]],
    }

    status, saved = post(server, path, {"measurements": [{**length, "frame": 2}]})
    assert status == 201, saved
    status, answer = post(server, path, {"measurements": [{**length, "frame": 3}]})
    assert status == 400 and "frame 3" in answer["error"]
    report = pydicom.dcmread(next(server.data.glob(f"*/*/{saved['sr']['sopInstanceUID']}.dcm")))
    region = report.ContentSequence[-1].ContentSequence[0].ContentSequence[-1]
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 2
    [back] = json.loads(get(server, path)[2])["measurements"]
    assert (back["frame"], back["value"], back["unit"]) == (2, pytest.approx(50.0), "mm")


def test_a_save_supersedes_the_saved_report_and_can_clear_it(server):
    """Each save states the study's measurements and key images as they are now: a new
    report names the one it replaces (Predecessor Documents Sequence) and may hold no
    measurement; a key-image selection counts only when made with the newest report or
    after it. Earlier documents stay in the archive. Lengths only: no ROI to compute."""
    import highdicom as hd

    path = f"/api/studies/{server.study}/measurements"
    sop = pydicom.dcmread(server.files["volume"][5], stop_before_pixels=True).SOPInstanceUID
    lengths = [
        {"type": "length", "sopInstanceUID": sop, "points": [[2, 3], [2, 23]]},
        {"type": "length", "sopInstanceUID": sop, "points": [[4, 4], [14, 4]]},
    ]
    key = [{"sopInstanceUID": sop, "frame": 1}]

    def save(measurements: list, keys: list) -> dict:
        status, saved = post(server, path, {"measurements": measurements, "keyImages": keys})
        assert status == 201, saved
        return saved

    def current() -> tuple[list, list]:
        answer = json.loads(get(server, path)[2])
        keys = [
            {k: v for k, v in found.items() if k != "seriesInstanceUID"}
            for found in answer["keyImages"]
        ]
        return [m["points"] for m in answer["measurements"]], keys

    def predecessor(sr: dict) -> str:
        document = pydicom.dcmread(next(server.data.glob(f"*/*/{sr['sopInstanceUID']}.dcm")))
        [series] = document.PredecessorDocumentsSequence[0].ReferencedSeriesSequence
        return series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID

    first = save(lengths, key)
    assert current() == ([m["points"] for m in lengths], key)

    # Everything removed: a report with no measurement, and no selection.
    cleared = save([], [])
    assert cleared["kos"] is None and current() == ([], [])
    assert predecessor(cleared["sr"]) == first["sr"]["sopInstanceUID"]
    found = hd.sr.srread(next(server.data.glob(f"*/*/{cleared['sr']['sopInstanceUID']}.dcm")))
    assert found.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert found.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert found.content.get_observer_contexts()  # a whole TID 1500 report, …
    container = found.ContentSequence[-1]  # … its Imaging Measurements empty
    assert container.ConceptNameCodeSequence[0].CodeValue == "126010"
    assert "ContentSequence" not in container
    evidence = {
        sop.ReferencedSOPInstanceUID
        for series in found.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert sop in evidence and first["sr"]["sopInstanceUID"] not in evidence
    for name, sop_class in (("sr", "88.34"), ("kos", "88.59")):  # still queryable
        query = f"/dicom-web/studies/{server.study}/instances?SOPClassUID={SR_CLASS}{sop_class}"
        uids = {f["00080018"]["Value"][0] for f in json.loads(get(server, query)[2])}
        assert first[name]["sopInstanceUID"] in uids

    # A key image alone: a selection after the (empty) report, no new report.
    marked = save([], key)
    assert marked["sr"] is None and current() == ([], key)
    # Measurements, the key image unmarked: the selection is older than the report.
    measured = save(lengths[:1], [])
    assert measured["kos"] is None and current() == ([lengths[0]["points"]], [])
    assert predecessor(measured["sr"]) == cleared["sr"]["sopInstanceUID"]
    # The measurement deleted, the key image kept: an empty report and a selection.
    kept = save([], key)
    assert kept["sr"] and kept["kos"] and current() == ([], key)
    # Both gone, then nothing left to clear.
    assert save([], [])["kos"] is None and current() == ([], [])
    status, answer = post(server, path, {"measurements": [], "keyImages": []})
    assert status == 400 and "nothing to save" in answer["error"]


def test_an_idle_volume_leaves_the_cache():
    """The server's memory returns to idle once nobody looks at an MPR: a volume not asked
    for in `idle` seconds is dropped by the cache's own timer."""
    cache = mpr.VolumeCache(1 << 20, idle=0.2)
    cache._put(("series",), mpr.Loaded(np.zeros((4, 8, 8), np.int16), Dataset()))
    assert cache.bytes == 4 * 8 * 8 * 2
    deadline = time.monotonic() + 10
    while cache.bytes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cache.bytes == 0
    assert cache._cached(("series",)) is None


def _changed_volume(server, tmp_path, change) -> tuple[mpr.Plan, list[Path]]:
    """The first 4 slices of "volume", each changed by `change(k, ds)`, as files outside
    the server, and their plan as reading._plan makes it from the headers' JSON."""
    from viewer import geometry

    paths, images, headers = [], [], []
    for k, source in enumerate(server.files["volume"][:4]):
        ds = pydicom.dcmread(source)
        change(k, ds)
        paths.append(tmp_path / f"{k}.dcm")
        ds.save_as(paths[-1])
        headers.append(ds.to_json_dict())
        images.append(geometry.image(ds.SOPInstanceUID, headers[-1]))
    volume = geometry.volume(images)
    by_sop = {image.sop_uid: path for image, path in zip(images, paths, strict=True)}
    return mpr.Plan(volume, mpr.voxel_bytes(headers)), [by_sop[sop] for sop in volume.order]


def test_a_volume_in_float_counts_its_own_size_against_the_bound(server, tmp_path):
    """A Rescale Slope of 0.5 makes the volume float32, twice what int16 needs: one that
    fits the bound as int16 but not as float32 is refused (422), not kept over it. Told
    nothing of it beforehand, the cache finds it in the values and remembers it."""
    from viewer.render import RenderError

    plan, ordered = _changed_volume(
        server, tmp_path, lambda k, ds: setattr(ds, "RescaleSlope", 0.5)
    )
    assert plan.voxel == mpr.FLOAT32
    plan = mpr.Plan(plan.volume)  # int16 at least, as the headers of integer values say
    int16 = 4 * SIZE * SIZE * 2
    roomy = mpr.VolumeCache(2 * int16)
    assert roomy.get(("float",), plan, lambda: ordered, True, None).values.dtype == np.float32
    tight = mpr.VolumeCache(int16 + int16 // 2)
    with pytest.raises(RenderError) as refused:
        tight.get(("float",), plan, lambda: ordered, True, None)
    assert refused.value.code == 422
    assert tight.bytes == 0
    assert roomy.plan(("float",)).voxel == tight.plan(("float",)).voxel == mpr.FLOAT32


def test_a_modality_lut_makes_a_fractional_rescale_no_float(server, tmp_path):
    """With a Modality LUT Sequence the pipeline applies the LUT (integers) and ignores
    Rescale Slope 0.5: the volume is int16 and fits a cache too small for float32."""
    pixels = np.arange(SIZE * SIZE, dtype=np.int16).reshape(SIZE, SIZE) % 200

    def lut(k: int, ds: Dataset) -> None:
        ds.PixelData = (pixels + k).astype(ds.pixel_array.dtype).tobytes()
        ds.RescaleSlope = 0.5
        item = Dataset()
        item.LUTDescriptor = [256, 0, 16]
        item.ModalityLUTType = "HU"
        item.add_new("LUTData", "US", [4 * i for i in range(256)])
        ds.ModalityLUTSequence = [item]

    plan, ordered = _changed_volume(server, tmp_path, lut)
    assert plan.voxel == mpr.INT16
    cache = mpr.VolumeCache(4 * SIZE * SIZE * 2 + SIZE * SIZE)  # under float32's 4 × 4 KiB
    loaded = cache.get(("lut",), plan, lambda: ordered, True, None)
    assert loaded.values.dtype == np.int16
    assert sorted(np.unique(loaded.values[:, 0, 0])) == [0, 4, 8, 12]


def _cut_pixels(server: Server, name: str, slices: range) -> None:
    """Those slices' stored files cut short inside their pixel data: decoding them fails."""
    for path in server.files[name][slices.start : slices.stop]:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        stored = next(server.data.glob(f"*/*/{sop}.dcm"))
        stored.write_bytes(stored.read_bytes()[: -WIDE_SIZE * WIDE_SIZE])


def test_a_volume_over_the_bound_by_its_headers_is_refused_before_decoding(server):
    """Rescale Slope 0.5: float32, 1.25 MiB over the 1 MiB cache, refused from the index's
    JSON before any pixel is read: every file's pixel data cut short changes nothing (a
    decode would answer "cannot decode")."""
    _cut_pixels(server, "float", range(WIDE_SLICES))
    for _ in range(2):
        status, _, body = get(server, f"{series_path(server, 'float')}/mpr/axial/0")
        assert status == 422, body
        error = json.loads(body)["error"]
        assert "(values beyond int16), over volume_cache_mb (1 MiB)" in error


def test_a_volume_found_over_the_bound_while_decoding_is_refused_at_once_after(server):
    """Integer values, so int16 by the headers; slice 1's -33792 needs float32, over the
    bound: the decode stops there (slices 2-4, cut short, are not read) and the refusal
    is remembered (with every slice cut short, the next request answers it again)."""
    path = f"{series_path(server, 'beyond')}/mpr/coronal/0"
    _cut_pixels(server, "beyond", range(2, WIDE_SLICES))
    for cut in (range(0), range(2)):
        _cut_pixels(server, "beyond", cut)
        status, _, body = get(server, path)
        assert status == 422, body
        assert "(values beyond int16), over volume_cache_mb" in json.loads(body)["error"]


def test_other_documents_are_not_the_viewers_report(server, tmp_path):
    """Only a Measurement Report (126000) is the saved report and only an "Of Interest"
    selection (113000) the key images: a later rejection note (IHE IOCM) or another
    system's report of the same SOP classes leaves what the viewer reopens unchanged."""
    from conftest import storescu

    path = f"/api/studies/{server.study}/measurements"
    sop = pydicom.dcmread(server.files["volume"][4], stop_before_pixels=True).SOPInstanceUID
    length = {"type": "length", "sopInstanceUID": sop, "points": [[2, 3], [2, 23]]}
    status, saved = post(
        server, path, {"measurements": [length], "keyImages": [{"sopInstanceUID": sop}]}
    )
    assert status == 201, saved

    others = []
    for name, title in (("sr", ("18748-4", "LN")), ("kos", ("113001", "DCM")), ("sr", None)):
        document = pydicom.dcmread(
            next(server.data.glob(f"*/*/{saved[name]['sopInstanceUID']}.dcm"))
        )
        document.SOPInstanceUID = document.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        document.ContentDate, document.ContentTime = "29991231", "235959"  # newer than any save
        if title is None:  # no title at all (a Type 1 attribute, but STOW-RS clients vary)
            del document.ConceptNameCodeSequence
        else:
            document.ConceptNameCodeSequence[0].CodeValue = title[0]
            document.ConceptNameCodeSequence[0].CodingSchemeDesignator = title[1]
        others.append(tmp_path / f"{len(others)}.dcm")
        document.save_as(others[-1], enforce_file_format=True)
    storescu(server.port, *others, extra=("--required",))  # SR classes are not among its defaults

    answer = json.loads(get(server, path)[2])
    assert answer["sopInstanceUID"] == saved["sr"]["sopInstanceUID"]
    assert [m["points"] for m in answer["measurements"]] == [length["points"]]
    assert [k["sopInstanceUID"] for k in answer["keyImages"]] == [sop]


def test_the_current_documents_are_found_without_opening_older_ones(server):
    """Which report and selection are current is decided from the index (one query), and
    only their files are read: an older saved report and selection whose files are
    unreadable do not change a GET or a save. Each save adds two documents to the study,
    and opening every one of them made each GET slower than the last."""
    path = f"/api/studies/{server.study}/measurements"
    sop = pydicom.dcmread(server.files["volume"][6], stop_before_pixels=True).SOPInstanceUID
    key = [{"sopInstanceUID": sop, "frame": 1}]

    def save(points: list) -> dict:
        length = {"type": "length", "sopInstanceUID": sop, "points": points}
        status, saved = post(server, path, {"measurements": [length], "keyImages": key})
        assert status == 201, saved
        return saved

    older = save([[1, 1], [1, 11]])
    newer = save([[3, 3], [13, 3]])
    files = [next(server.data.glob(f"*/*/{older[n]['sopInstanceUID']}.dcm")) for n in older]
    kept = [file.read_bytes() for file in files]
    try:
        for file in files:
            file.write_bytes(b"not a DICOM file " * 64)
        status, _, body = get(server, path)
        assert status == 200, body
        answer = json.loads(body)
        assert answer["sopInstanceUID"] == newer["sr"]["sopInstanceUID"]
        assert [m["points"] for m in answer["measurements"]] == [[[3, 3], [13, 3]]]
        assert [k["sopInstanceUID"] for k in answer["keyImages"]] == [sop]
        latest = save([[5, 5], [5, 25]])  # names the newer report as its predecessor
        answer = json.loads(get(server, path)[2])
        assert answer["sopInstanceUID"] == latest["sr"]["sopInstanceUID"]
    finally:
        for file, data in zip(files, kept, strict=True):
            file.write_bytes(data)


def test_an_image_that_left_the_study_is_named_without_a_series(server, tmp_path):
    """A saved measurement or key image whose instance was deleted since still comes back
    (the SR is the record) but names no series: nothing of the study shows it now."""
    from conftest import storescu

    path = f"/api/studies/{server.study}/measurements"
    kept = pydicom.dcmread(server.files["single"][0], stop_before_pixels=True).SOPInstanceUID
    extra = pydicom.dcmread(server.files["px"][0])  # a copy in a series of its own
    extra.SeriesInstanceUID, extra.SOPInstanceUID = generate_uid(), generate_uid()
    extra.file_meta.MediaStorageSOPInstanceUID = extra.SOPInstanceUID
    extra.save_as(tmp_path / "extra.dcm")
    storescu(server.port, tmp_path / "extra.dcm")
    lengths = [
        {"type": "length", "sopInstanceUID": sop, "points": [[1, 1], [1, 9]]}
        for sop in (kept, extra.SOPInstanceUID)
    ]
    keys = [{"sopInstanceUID": kept}, {"sopInstanceUID": extra.SOPInstanceUID}]
    status, saved = post(server, path, {"measurements": lengths, "keyImages": keys})
    assert status == 201, saved
    gone = f"/dicom-web/studies/{server.study}/series/{extra.SeriesInstanceUID}"
    request = urllib.request.Request(
        f"{server.url}{gone}/instances/{extra.SOPInstanceUID}", method="DELETE"
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 204

    answer = json.loads(get(server, path)[2])
    for found in (answer["measurements"], answer["keyImages"]):
        assert [item["sopInstanceUID"] for item in found] == [kept, extra.SOPInstanceUID]
        assert [item.get("seriesInstanceUID") for item in found] == [server.series["single"], None]
