"""The viewer's MPR, key images and keyboard-only measurement (issue 19) in a real
headless Chromium against the real server.

One study made by scripts/make_study.py from pydicom's CT_small.dcm (axial, PixelSpacing
0.661468 mm, 64×64):
  series 1, "Volume": 24 slices 1 mm apart, each slice's pixels shifted and raised by its
            number (so a plane cut along the wrong axis or at the wrong index shows);
  series 2, "Gaps": 5 slices at z = 1, 2, 4, 5, 6 mm, which is not a volume.
"""

import io
import json
import re
import urllib.request

import numpy as np
import pydicom
import pytest
from conftest import Server
from conftest import storescu
from PIL import Image
from playwright.sync_api import Page
from playwright.sync_api import expect
from pydicom.uid import generate_uid

SPACING = 0.661468  # CT_small.dcm's PixelSpacing (make_study keeps it)
SLICES = 24
KOS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from make_study import make_study

    files = make_study(tmp_path_factory.mktemp("mpr"), SLICES + 5, size=64, patient_id="MPR1")
    gaps_uid = generate_uid()
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        if k < SLICES:
            pixels = np.roll(ds.pixel_array, 2 * k, axis=1) + 5 * k
            ds.PixelData = pixels.astype(ds.pixel_array.dtype).tobytes()
            ds.SeriesDescription = "Volume"
        else:
            z = [1, 2, 4, 5, 6][k - SLICES]
            ds.SeriesInstanceUID = gaps_uid
            ds.SeriesNumber = 2
            ds.SeriesDescription = "Gaps"
            ds.InstanceNumber = k - SLICES + 1
            ds.ImagePositionPatient = [0, 0, z]
            ds.SliceLocation = z
        ds.save_as(path)
    first = pydicom.dcmread(files[0])
    return {
        "files": files,
        "study": first.StudyInstanceUID,
        "volume": first.SeriesInstanceUID,
        "sops": [pydicom.dcmread(f).SOPInstanceUID for f in files[:SLICES]],
        "gaps": gaps_uid,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory, study):
    running = Server(tmp_path_factory.mktemp("mpr-data") / "data").start()
    try:
        storescu(running.port, *study["files"])
        yield running
    finally:
        running.kill()


def get(server: Server, path: str) -> bytes:
    with urllib.request.urlopen(f"{server.url}{path}", timeout=60) as response:
        assert response.status == 200
        return response.read()


def open_series(page: Page, server: Server, study: dict, series: str, count: int) -> None:
    page.goto(f"{server.url}/study/{study['study']}/series/{study[series]}")
    page.wait_for_function("globalThis.minipacsView && globalThis.minipacsView.drawn >= 1")
    expect(page.locator(".pane[data-pane='1'] .counter")).to_have_text(f"1 / {count}")


def saved_report(response) -> bool:
    """The viewer's GET of a study's saved measurements (Save shows once it answered)."""
    return response.url.endswith("/measurements") and response.request.method == "GET"


def plane_pane(page: Page, plane: str):
    return page.locator(f".pane[data-plane='{plane}']")


def letters(page: Page, plane: str) -> dict[str, str]:
    edges = ("top", "right", "bottom", "left")
    return {e: plane_pane(page, plane).locator(f".orient.{e}").inner_text() for e in edges}


PANE = "globalThis.minipacsView.panes.find((p) => p.plane === name)"


def shown_plane(page: Page, plane: str) -> dict:
    """The index of the plane the pane shows and the pixels of its exact image (red
    channel: the PNG is grey), once it is drawn."""
    page.wait_for_function(f"(name) => {PANE}.exactShown()", arg=plane)
    return page.evaluate(
        f"""(name) => {{
            const pane = {PANE};
            const bitmap = pane.viewport.shown.bitmap;
            const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
            const context = canvas.getContext("2d");
            context.drawImage(bitmap, 0, 0);
            const rgba = context.getImageData(0, 0, bitmap.width, bitmap.height).data;
            return {{index: pane.index, width: bitmap.width, height: bitmap.height,
                     red: Array.from(rgba.filter((_, i) => i % 4 === 0))}};
        }}""",
        plane,
    )


def expected_index(info: dict, plane: str, point: np.ndarray) -> int:
    """docs/viewer-api.md, 3: the index of `plane` through patient point `point`."""
    described = info["planes"][plane]
    step = np.array(described["step"])
    along = (point - np.array(described["origin"])) @ step / (step @ step)
    return int(np.floor(along + 0.5))


def test_mpr_shows_the_servers_planes_linked_by_a_crosshair(page, server, study):
    """M turns the volume into axial, coronal and sagittal viewports; the coronal one
    shows the server's coronal plane, pixel for pixel; the letters are the plane's; a
    click in the axial plane moves the other two to the point under it; the arrows
    scroll a plane and a preset windows all three; M goes back to the series."""
    open_series(page, server, study, "volume", SLICES)
    page.keyboard.press("PageDown")  # z = 11 mm: inside the coronal and sagittal images
    expect(page.locator(".pane[data-pane='1'] .counter")).to_have_text(f"11 / {SLICES}")
    page.keyboard.press("m")
    expect(page.locator(".pane[data-plane]")).to_have_count(3)
    info = json.loads(get(server, f"/api/studies/{study['study']}/series/{study['volume']}/mpr"))
    coronal = info["planes"]["coronal"]
    shown = shown_plane(page, "coronal")
    png = get(
        server,
        f"/api/studies/{study['study']}/series/{study['volume']}/mpr/coronal/{shown['index']}",
    )
    direct = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    assert (shown["width"], shown["height"]) == (coronal["width"], coronal["height"])
    assert direct.shape == (coronal["height"], coronal["width"])
    assert np.array_equal(np.array(shown["red"]).reshape(direct.shape), direct)
    assert len(np.unique(direct)) > 10  # a real picture, not a blank one
    assert letters(page, "axial") == {"top": "A", "right": "L", "bottom": "P", "left": "R"}
    assert letters(page, "coronal") == {"top": "H", "right": "L", "bottom": "F", "left": "R"}
    assert letters(page, "sagittal") == {"top": "H", "right": "P", "bottom": "F", "left": "A"}

    # A click at the centre of axial pixel (10, 50).
    x, y = 10.5, 50.5
    axial_index = page.evaluate(f"(name) => {PANE}.index", "axial")
    assert axial_index == 10  # the planes start through the image the series showed
    screen = page.evaluate(
        f"""([name, x, y]) => {{
            const pane = {PANE};
            const [sx, sy] = pane.viewport.toScreen([x, y]);
            const box = pane.viewport.stage.getBoundingClientRect();
            return [box.left + sx, box.top + sy];
        }}""",
        ["axial", x, y],
    )
    axial = info["planes"]["axial"]
    point = (
        np.array(axial["origin"])
        + axial_index * np.array(axial["step"])
        + (x - 0.5) * np.array(axial["column"])
        + (y - 0.5) * np.array(axial["row"])
    )
    to_coronal, to_sagittal = (expected_index(info, p, point) for p in ("coronal", "sagittal"))
    assert (to_coronal, to_sagittal) == (50, 10)  # rows along y, columns along x
    page.mouse.click(*screen)
    expect(plane_pane(page, "coronal").locator(".counter")).to_have_text(
        f"{to_coronal + 1} / {coronal['count']}"
    )
    expect(plane_pane(page, "sagittal").locator(".counter")).to_have_text(
        f"{to_sagittal + 1} / {info['planes']['sagittal']['count']}"
    )
    expect(plane_pane(page, "axial").locator(".counter")).to_have_text(
        f"{axial_index + 1} / {axial['count']}"
    )
    expect(plane_pane(page, "axial").locator(".reference-lines line")).to_have_count(2)

    plane_pane(page, "coronal").locator(".stage").focus()
    page.keyboard.press("ArrowDown")
    expect(plane_pane(page, "coronal").locator(".counter")).to_have_text(
        f"{to_coronal + 2} / {coronal['count']}"
    )
    page.keyboard.press("2")  # CT's second preset, lung, on the three planes
    for plane in ("axial", "coronal", "sagittal"):
        expect(plane_pane(page, plane).locator(".corner.br")).to_contain_text("WC -600 WW 1500")
    assert shown_plane(page, "coronal")["index"] == to_coronal + 1

    page.keyboard.press("m")
    expect(page.locator(".pane[data-plane]")).to_have_count(0)
    expect(page.locator(".pane[data-pane='1'] .counter")).to_have_text(f"11 / {SLICES}")


def test_a_series_that_is_not_a_volume_says_why(page, server, study):
    open_series(page, server, study, "gaps", 5)
    page.get_by_role("button", name="MPR").click()
    expect(page.locator(".status")).to_contain_text(re.compile(r"not a volume: slice gaps differ"))
    expect(page.locator(".pane[data-plane]")).to_have_count(0)
    expect(page.locator(".pane[data-pane='1'] .counter")).to_have_text("1 / 5")


def test_keyboard_length_and_key_images_saved_and_reopened(page, server, study):
    """Without the mouse: a length placed with the keyboard cursor reads 30 × the
    spacing; its start grabbed (g) and moved, then Esc, puts it back; its end grabbed
    and moved 5 pixels back, then Enter, reads 25 ×; two images marked as key images;
    Save (Tab to it, Enter) stores the SR and a Key Object Selection that QIDO-RS finds;
    the study opened again shows both."""
    with page.expect_response(saved_report) as answer:  # Save shows once it is in
        open_series(page, server, study, "volume", SLICES)
    assert answer.value.ok
    view = page.locator(".pane[data-pane='1']")
    page.keyboard.press("d")  # length tool
    page.keyboard.press("x")  # the cursor, at the image's centre
    expect(view.locator(".keyboard-cursor line")).to_have_count(2)
    page.keyboard.press("Enter")
    for _ in range(3):
        page.keyboard.press("Shift+ArrowRight")  # 10 image pixels each
    page.keyboard.press("Enter")
    label = view.locator(".measurement.length .label")
    expect(label).to_have_text(f"{30 * SPACING:.2f} mm")
    expect(view.locator(".counter")).to_have_text(f"1 / {SLICES}")  # the arrows moved the cursor
    page.keyboard.press("g")  # the length's start
    page.keyboard.press("Shift+ArrowLeft")
    expect(label).to_have_text(f"{40 * SPACING:.2f} mm")
    page.keyboard.press("Escape")
    expect(label).to_have_text(f"{30 * SPACING:.2f} mm")
    page.keyboard.press("g")
    page.keyboard.press("g")  # its end
    for _ in range(5):
        page.keyboard.press("ArrowLeft")  # (the end is 2 pixels from the image's edge)
    page.keyboard.press("Enter")
    expected = f"{25 * SPACING:.2f} mm"
    expect(label).to_have_text(expected)
    page.keyboard.press("x")
    expect(view.locator(".keyboard-cursor line")).to_have_count(0)

    mark = view.locator(".key-mark")
    page.keyboard.press("k")
    expect(mark).to_be_visible()
    page.keyboard.press("End")
    expect(mark).to_be_hidden()
    page.keyboard.press("k")
    expect(mark).to_be_visible()
    expect(page.get_by_role("button", name="Key image")).to_have_attribute("aria-pressed", "true")
    save = page.get_by_role("button", name="Save")
    expect(save).to_be_visible()
    save.focus()
    page.keyboard.press("Enter")
    expect(page.locator(".status")).to_have_text("Saved 1 measurement and 2 key images.")

    path = f"/dicom-web/studies/{study['study']}/instances?SOPClassUID={KOS}"
    assert len(json.loads(get(server, path))) == 1
    saved = json.loads(get(server, f"/api/studies/{study['study']}/measurements"))
    marked = {study["sops"][0], study["sops"][-1]}
    assert {item["sopInstanceUID"] for item in saved["keyImages"]} == marked

    with page.expect_response(saved_report):
        page.reload()  # on the last image, where the URL was
    page.wait_for_function("globalThis.minipacsView && globalThis.minipacsView.drawn >= 1")
    expect(view.locator(".counter")).to_have_text(f"{SLICES} / {SLICES}")
    expect(mark).to_be_visible()
    strip_item = page.locator(f".series-item[data-series='{study['volume']}'] .key-count")
    expect(strip_item).to_have_text("★ 2 key images")
    page.keyboard.press("Home")
    expect(mark).to_be_visible()
    expect(view.locator(".measurement.length .label")).to_have_text(expected)
    page.keyboard.press("ArrowDown")
    expect(mark).to_be_hidden()
