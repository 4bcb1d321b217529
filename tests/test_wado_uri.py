"""WADO-URI (PS3.18 chapter 9) over real HTTP to the real server (waitress)."""

import io
import json
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pydicom
import pytest
from conftest import Server
from conftest import minipacs
from dicom_files import TEST_FILES
from dicom_files import dataset_bytes
from PIL import Image

from viewer.render import FrameCache
from viewer.render import Request
from viewer.render import render

FILES = ("CT_small.dcm", "SC_rgb_jpeg_dcmtk.dcm", "examples_ybr_color.dcm", "rtdose.dcm")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("wado")
    minipacs("import", "--data", str(root / "data"), *(str(TEST_FILES / f) for f in FILES))
    running = Server(root / "data").start()
    yield running
    running.kill()


def uids(name: str) -> dict[str, str]:
    ds = pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True)
    return {
        "studyUID": ds.StudyInstanceUID,
        "seriesUID": ds.SeriesInstanceUID,
        "objectUID": ds.SOPInstanceUID,
    }


def get(server, name: str | None = None, method: str = "GET", headers=None, **params):
    query = {"requestType": "WADO", **(uids(name) if name else {}), **params}
    data = None
    url = f"{server.url}/wado"
    if method == "POST":
        data = urllib.parse.urlencode(query).encode()
    else:
        url += "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def picture(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(body)))


def test_default_is_jpeg(server):
    status, headers, body = get(server, "CT_small.dcm")
    assert status == 200
    assert headers["Content-Type"] == "image/jpeg"
    assert body[:3] == b"\xff\xd8\xff"
    assert picture(body).shape == (128, 128)


def test_png_with_every_rendering_parameter_matches_the_pipeline(server):
    params = {
        "contentType": "image/png",
        "windowCenter": "40",
        "windowWidth": "400",
        "rows": "64",
        "columns": "64",
        "region": "0.25,0.25,0.75,0.75",
    }
    status, headers, body = get(server, "CT_small.dcm", **params)
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    expected = render(
        TEST_FILES / "CT_small.dcm",
        Request(window=(40, 400), rows=64, columns=64, region=(0.25, 0.25, 0.75, 0.75)),
        FrameCache(1 << 24),
    )
    assert np.array_equal(picture(body), picture(expected))


def test_frame_number_and_gif(server):
    status, headers, body = get(
        server, "examples_ybr_color.dcm", contentType="image/gif", frameNumber="3"
    )
    assert status == 200 and headers["Content-Type"] == "image/gif" and body[:3] == b"GIF"
    _, _, first = get(server, "examples_ybr_color.dcm", contentType="image/png", frameNumber="1")
    _, _, third = get(server, "examples_ybr_color.dcm", contentType="image/png", frameNumber="3")
    assert not np.array_equal(picture(first), picture(third))


def test_image_quality_and_annotation(server):
    _, _, best = get(server, "CT_small.dcm", imageQuality="100")
    _, _, worst = get(server, "CT_small.dcm", imageQuality="5")
    assert len(worst) < len(best)
    _, _, plain = get(server, "CT_small.dcm", contentType="image/png")
    _, _, annotated = get(
        server, "CT_small.dcm", contentType="image/png", annotation="patient,technique"
    )
    assert not np.array_equal(picture(plain), picture(annotated))


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("image/webp,image/png", "image/png"),
        ("*/*", "image/jpeg"),
        ("image/*", "image/jpeg"),
        ("application/dicom", "application/dicom"),
        ("image/png;q=0.9", "image/png"),
        ("image/jpeg;q=0.5,image/png", "image/png"),  # q-values honoured (viewer.media)
        ("image/gif;q=0,application/dicom", "application/dicom"),
    ],
)
def test_content_type_lists(server, accept, expected):
    status, headers, _ = get(server, "CT_small.dcm", contentType=accept)
    assert status == 200
    assert headers["Content-Type"] == expected


def test_dicom_default_is_explicit_little_endian(server):
    name = "SC_rgb_jpeg_dcmtk.dcm"  # stored JPEG baseline
    status, headers, body = get(server, name, contentType="application/dicom")
    assert status == 200 and headers["Content-Type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(body))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    original = pydicom.dcmread(TEST_FILES / name)
    assert np.array_equal(ds.pixel_array, original.pixel_array)


def test_dicom_as_stored(server):
    name = "SC_rgb_jpeg_dcmtk.dcm"
    for syntax in ("*", "1.2.840.10008.1.2.4.50"):
        status, headers, body = get(
            server, name, contentType="application/dicom", transferSyntax=syntax
        )
        assert status == 200
        stored = next(server.data.glob(f"*/*/{uids(name)['objectUID']}.dcm"))
        assert body == stored.read_bytes()
        assert dataset_bytes(stored) == dataset_bytes(TEST_FILES / name)


@pytest.mark.parametrize(
    ("name", "params", "status", "reason"),
    [
        (None, {}, 400, "studyUID is required"),
        ("CT_small.dcm", {"requestType": "WADO-RS"}, 400, "requestType must be WADO"),
        ("CT_small.dcm", {"objectUID": "1.2.3.4"}, 404, "no object 1.2.3.4"),
        ("CT_small.dcm", {"seriesUID": "1.2.3"}, 404, "no object"),
        ("CT_small.dcm", {"studyUID": "../../etc/passwd"}, 400, "studyUID is not a valid UID"),
        ("CT_small.dcm", {"objectUID": "1." + "2" * 70}, 400, "objectUID is not a valid UID"),
        ("CT_small.dcm", {"contentType": "text/html"}, 406, "cannot produce"),
        ("CT_small.dcm", {"rows": "0"}, 400, "rows must be"),
        ("CT_small.dcm", {"columns": "wide"}, 400, "columns must be a whole number"),
        ("CT_small.dcm", {"windowCenter": "40"}, 400, "go together"),
        ("CT_small.dcm", {"windowCenter": "a", "windowWidth": "b"}, 400, "must be numbers"),
        ("CT_small.dcm", {"frameNumber": "2"}, 400, "outside 1-1"),
        ("CT_small.dcm", {"imageQuality": "101"}, 400, "imageQuality must be"),
        ("CT_small.dcm", {"region": "0.5,0.5,0.2,0.9"}, 400, "region must be"),
        ("CT_small.dcm", {"annotation": "secrets"}, 400, "annotation must be"),
        ("CT_small.dcm", {"anonymize": "yes"}, 400, "applies only to application/dicom"),
        ("CT_small.dcm", {"presentationUID": "1.2.3"}, 400, "presentation states"),
        (
            "CT_small.dcm",
            {"contentType": "application/dicom", "transferSyntax": "1.2.840.10008.1.2.4.90"},
            406,
            "cannot transcode",
        ),
        (
            "CT_small.dcm",
            {"contentType": "application/dicom", "transferSyntax": "x.y"},
            400,
            "not a valid UID",
        ),
        ("CT_small.dcm", {"transferSyntax": "1.2.840.10008.1.2"}, 400, "only to application/dicom"),
    ],
)
def test_errors_are_exact(server, name, params, status, reason):
    query = dict(params)
    got_status, headers, body = get(server, name, **query)
    assert got_status == status
    assert headers["Content-Type"] == "application/json"  # the one error shape (viewer.errors)
    assert reason in json.loads(body)["error"]


def test_etag_and_304(server):
    status, headers, body = get(server, "CT_small.dcm", contentType="image/png")
    assert status == 200
    tag = headers["ETag"]
    assert tag and "private" in headers["Cache-Control"]
    status, headers, body = get(
        server, "CT_small.dcm", contentType="image/png", headers={"If-None-Match": tag}
    )
    assert status == 304 and body == b""
    status, _, _ = get(
        server,
        "CT_small.dcm",
        contentType="image/png",
        windowCenter="0",
        windowWidth="10",
        headers={"If-None-Match": tag},
    )
    assert status == 200  # another rendering, another tag


def test_post_form_and_percent_encoding(server):
    status, headers, _ = get(server, "CT_small.dcm", method="POST", contentType="image/png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    query = "&".join(f"{k}={v}" for k, v in uids("CT_small.dcm").items())
    url = f"{server.url}/wado?requestType=WADO&{query}&contentType=image%2Fpng"
    with urllib.request.urlopen(url) as response:
        assert response.headers["Content-Type"] == "image/png"


def test_concurrent_renders_are_correct(server):
    from concurrent.futures import ThreadPoolExecutor

    windows = [(str(c), "300") for c in range(-200, 400, 50)]

    def fetch(window):
        _, _, body = get(
            server,
            "CT_small.dcm",
            contentType="image/png",
            windowCenter=window[0],
            windowWidth=window[1],
        )
        return window, picture(body)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(fetch, windows * 2))
    cache = FrameCache(1 << 24)
    for (center, width), image in results:
        expected = render(
            TEST_FILES / "CT_small.dcm", Request(window=(float(center), float(width))), cache
        )
        assert np.array_equal(image, picture(expected))


def test_image_size_is_bounded_before_any_work(server):
    """rows=200000 asked for 4×10¹⁰ pixels, enough for the kernel to kill the whole server
    (issue 17): above render_max_size (4096) rows and columns answer 400."""
    for params in ({"rows": "200000"}, {"columns": "4097"}, {"rows": "12000", "columns": "64"}):
        status, _, body = get(server, "CT_small.dcm", **params)
        assert status == 400, params
        assert b"must be between 1 and 4096" in body
    status, _, body = get(server, "CT_small.dcm", rows="4096", contentType="image/png")
    assert status == 200
    assert picture(body).shape == (4096, 4096)  # one side given: the other follows, bounded
