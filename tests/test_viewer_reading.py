"""The viewer's reading tools (issue 19) in a real headless Chromium against the real
server: orientation letters and the scale, layouts with the patient's prior study,
viewports scrolling together by slice position, the keys, and measurements.

One patient, READ1, made by scripts/make_study.py from pydicom's CT_small.dcm (axial,
PixelSpacing 0.661468 mm, slice thickness 5 mm, one Frame of Reference):
  current study (2024-01-02): series 1, 20 axial slices at z = 1..20 mm;
                              series 2, 10 axial slices at z = 2, 4, ..., 20 mm;
                              series 3, 6 coronal slices at y = 5..30 mm;
  prior study (2023-01-01):   one series of 5 axial slices;
and a study with the same Patient ID under another issuer, which is another patient.
"""

import re

import numpy as np
import pydicom
import pytest
from conftest import Server
from conftest import storescu
from playwright.sync_api import Page
from playwright.sync_api import expect

SPACING = 0.661468  # CT_small.dcm's PixelSpacing (make_study keeps it)


def _rewrite(paths, **changes) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            setattr(ds, keyword, value(ds) if callable(value) else value)
        ds.save_as(path)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The files of the patient, and the UIDs the tests open."""
    from make_study import make_study

    root = tmp_path_factory.mktemp("reading")
    axial = make_study(root / "axial", 20, size=64, patient_id="READ1")
    uid = pydicom.dcmread(axial[0]).StudyInstanceUID
    _rewrite(axial, StudyDate="20240102", SeriesNumber=1, SeriesDescription="Axial")
    thick = make_study(root / "thick", 10, size=64, patient_id="READ1")
    _rewrite(
        thick,
        StudyInstanceUID=uid,
        StudyDate="20240102",
        SeriesNumber=2,
        SeriesDescription="Axial 2 mm",
        ImagePositionPatient=lambda ds: [0, 0, 2 * ds.InstanceNumber],
        SliceLocation=lambda ds: 2 * ds.InstanceNumber,
    )
    coronal = make_study(root / "coronal", 6, size=64, patient_id="READ1")
    _rewrite(
        coronal,
        StudyInstanceUID=uid,
        StudyDate="20240102",
        SeriesNumber=3,
        SeriesDescription="Coronal",
        ImageOrientationPatient=[1, 0, 0, 0, 0, -1],
        ImagePositionPatient=lambda ds: [0, 5 * ds.InstanceNumber, 30],
        SliceLocation=lambda ds: 5 * ds.InstanceNumber,
    )
    prior = make_study(root / "prior", 5, size=64, patient_id="READ1")
    _rewrite(prior, StudyDate="20230101", StudyDescription="prior study", SeriesDescription="Axial")
    other = make_study(root / "other", 1, size=64, patient_id="READ1")
    _rewrite(other, StudyDate="20240301", IssuerOfPatientID="ELSEWHERE")
    files = axial + thick + coronal + prior + other
    return {"files": files, "current": uid, "prior": pydicom.dcmread(prior[0]).StudyInstanceUID}


@pytest.fixture(scope="module")
def server(tmp_path_factory, study):
    running = Server(tmp_path_factory.mktemp("reading-data") / "data").start()
    try:
        storescu(running.port, *study["files"])
        yield running
    finally:
        running.kill()


def open_current(page: Page, server: Server, study: dict) -> None:
    page.goto(f"{server.url}/study/{study['current']}")
    page.wait_for_function("globalThis.minipacsView && globalThis.minipacsView.drawn >= 1")
    expect(page.locator(".counter")).to_have_text("1 / 20")


def saved_report(response) -> bool:
    """The viewer's GET of a study's saved measurements (Save shows once it answered)."""
    return response.url.endswith("/measurements") and response.request.method == "GET"


def pane(page: Page, number: int):
    return page.locator(f".pane[data-pane='{number}']")


def letters(page: Page, number: int = 1) -> dict[str, str]:
    edges = ("top", "right", "bottom", "left")
    return {edge: pane(page, number).locator(f".orient.{edge}").inner_text() for edge in edges}


def test_orientation_letters_turn_with_the_view(page, server, study):
    """An axial image seen from the feet: the patient's right on the screen's left, anterior
    up (PS3.3 C.7.6.1.1.1); the letters follow a quarter turn and a flip."""
    open_current(page, server, study)
    expect(pane(page, 1).locator(".orient.left")).to_have_text("R")
    assert letters(page) == {"top": "A", "right": "L", "bottom": "P", "left": "R"}
    page.keyboard.press("r")  # a quarter turn clockwise: anterior goes right
    expect(pane(page, 1).locator(".orient.right")).to_have_text("A")
    assert letters(page) == {"top": "R", "right": "A", "bottom": "L", "left": "P"}
    page.keyboard.press("h")  # then a left-right flip
    expect(pane(page, 1).locator(".orient.right")).to_have_text("P")
    page.get_by_role("button", name="Reset").click()
    expect(pane(page, 1).locator(".orient.left")).to_have_text("R")
    corner = pane(page, 1).locator(".corner.bl")
    expect(corner).to_contain_text("Loc 1 mm  Th 5 mm")
    expect(pane(page, 1).locator(".scalebar-label")).to_have_text(
        re.compile(r"^(1|2|5)0* mm$")  # a round length
    )


def test_keys_help_a_preset_key_and_the_window_by_keys(page, server, study):
    """'?' lists the keys, and the toolbar's titles name them from the same table; 2 is
    the lung preset; Shift+arrows move the window as a drag would, rendered as a drag's
    (a JPEG, then the exact PNG in the window reached); 0 is the file's window again."""
    open_current(page, server, study)
    page.keyboard.press("?")
    help = page.get_by_role("dialog", name="Keyboard shortcuts")
    expect(help).to_be_visible()
    expect(help).to_contain_text("Next series")
    expect(help).to_contain_text("Window narrower, wider")
    expect(help).to_contain_text("Shift+R")
    page.keyboard.press("Escape")
    rotate = page.get_by_role("button", name="Rotate left")
    expect(rotate).to_have_attribute("title", "Rotate 90° anticlockwise (Shift+R)")
    expect(help).to_be_hidden()
    corner = pane(page, 1).locator(".corner.br")
    page.keyboard.press("2")  # CT's second preset: lung
    expect(corner).to_contain_text("WC -600 WW 1500")
    expect(page.get_by_label("Window preset")).to_have_value("-600,1500")

    def exact(url: str) -> bool:
        return "window=-525%2C1650" in url and "accept=image%2Fpng" in url

    with page.expect_request(lambda request: exact(request.url)):
        page.keyboard.press("Shift+ArrowDown")  # centre up a twentieth of the width: darker
        page.keyboard.press("Shift+ArrowRight")  # a tenth wider
    expect(corner).to_contain_text("WC -525 WW 1650")
    expect(page.get_by_label("Window preset")).to_have_value("custom")
    first = "window=-525%2C1500"
    assert any(first in url and "accept=image%2Fjpeg" in url for url in page.requests)
    expect(pane(page, 1).locator(".counter")).to_have_text("1 / 20")  # the image stayed
    page.keyboard.press("0")
    expect(page.get_by_label("Window preset")).to_have_value("file")


def test_layout_1x2_and_the_prior_study(page, server, study):
    """The patient's studies are listed newest first (not the other issuer's); 1×2 shows
    the study's next series beside the first, and the prior chosen in the list takes its
    place; without a mouse, ] from a series in the strip makes the other viewport active
    and Enter opens the series there."""
    open_current(page, server, study)
    items = page.locator(".study-item")
    expect(items).to_have_count(2)
    expect(items.nth(0)).to_contain_text("2024-01-02")
    expect(items.nth(1)).to_contain_text("2023-01-01")
    page.get_by_label("Layout").select_option("1x2")
    expect(pane(page, 2).locator(".counter")).to_have_text("1 / 10")  # Axial 2 mm
    items.nth(1).click()
    expect(pane(page, 2).locator(".counter")).to_have_text("1 / 5")
    expect(pane(page, 2).locator(".corner.tr")).to_contain_text("prior study")
    expect(pane(page, 1).locator(".corner.tr")).to_contain_text("2024-01-02")
    coronal = page.locator(".series-item", has_text="Coronal")
    coronal.focus()
    page.keyboard.press("]")  # from the prior's viewport (the active one) to the first
    expect(coronal).to_be_focused()
    page.keyboard.press("Enter")
    expect(pane(page, 1).locator(".counter")).to_have_text("1 / 6")
    expect(pane(page, 2).locator(".counter")).to_have_text("1 / 5")


def test_viewports_on_one_frame_of_reference_scroll_together(page, server, study):
    """The 1 mm series follows the 2 mm one dropped beside it, and the other way round, by
    position (z = 8 is the 2 mm series' 4th slice, not its 8th); with sync off it stays; a
    coronal beside it shows the axial slice as a reference line."""
    open_current(page, server, study)
    page.keyboard.press("l")  # 1×2
    expect(pane(page, 2).locator(".counter")).not_to_have_text("")
    page.locator(".series-item", has_text="Axial 2 mm").drag_to(pane(page, 2).locator(".stage"))
    expect(pane(page, 2).locator(".counter")).to_have_text("1 / 10")
    expect(pane(page, 1).locator(".counter")).to_have_text("2 / 20")  # followed it to z = 2
    pane(page, 1).locator(".stage").focus()
    for _ in range(6):
        page.keyboard.press("ArrowDown")
    expect(pane(page, 1).locator(".counter")).to_have_text("8 / 20")
    expect(pane(page, 2).locator(".counter")).to_have_text("4 / 10")
    expect(pane(page, 2).locator(".corner.bl")).to_contain_text("Loc 8 mm")
    page.keyboard.press("s")  # sync off
    page.keyboard.press("End")
    expect(pane(page, 1).locator(".counter")).to_have_text("20 / 20")
    expect(pane(page, 2).locator(".counter")).to_have_text("4 / 10")
    page.locator(".series-item", has_text="Coronal").drag_to(pane(page, 2).locator(".stage"))
    expect(pane(page, 2).locator(".counter")).to_have_text("1 / 6")
    expect(pane(page, 2).locator(".reference-lines line")).to_have_count(1)
    expect(pane(page, 1).locator(".reference-lines line")).to_have_count(1)


def test_a_length_is_spacing_times_pixels(page, server, study):
    """At 1:1 a CSS pixel is an image pixel: a line drawn over 30 of them reads 30 ×
    PixelSpacing; its end dragged 10 further reads 40 ×; it stays with its image when
    scrolling away and back; a rectangle gets the server's statistics in HU, and again
    when a corner is moved with the keyboard (G grabs the image's last point, the
    cursor moves it, Enter leaves it); Delete removes the selected measurement."""
    open_current(page, server, study)
    stage = pane(page, 1).locator(".stage")
    page.keyboard.press("z")
    expect(pane(page, 1).locator(".corner.br")).to_contain_text("Zoom 100%")
    page.keyboard.press("d")
    expect(page.get_by_role("button", name="Length")).to_have_attribute("aria-pressed", "true")
    box = stage.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2

    def drag(start, end):
        page.mouse.move(*start)
        page.mouse.down()
        page.mouse.move(*end, steps=4)
        page.mouse.up()

    drag((x - 15, y), (x + 15, y))
    label = stage.locator(".measurement.length .label")
    expect(label).to_have_text(f"{30 * SPACING:.2f} mm")
    drag((x + 15, y), (x + 25, y))  # the end's handle
    expect(label).to_have_text(f"{40 * SPACING:.2f} mm")
    page.keyboard.press("ArrowDown")
    expect(pane(page, 1).locator(".counter")).to_have_text("2 / 20")
    expect(stage.locator(".measurement")).to_have_count(0)
    page.keyboard.press("ArrowUp")
    expect(label).to_have_text(f"{40 * SPACING:.2f} mm")
    page.keyboard.press("b")
    drag((x - 20, y - 20), (x - 5, y - 5))
    stats = stage.locator(".measurement.rectangle .label")
    expect(stats).to_contain_text(" HU")
    before = stats.text_content()
    page.keyboard.press("G")  # the rectangle's second corner, 15 image pixels right of its first
    expect(stage.locator(".handle.grabbed")).to_have_count(1)
    page.keyboard.press("Shift+ArrowRight")  # ten image pixels: 15 → 25 wide
    page.keyboard.press("Enter")
    expect(stage.locator(".handle.grabbed")).to_have_count(0)
    expect(stats).to_contain_text(" HU")
    after = stats.text_content()

    def area(text: str) -> float:
        return float(re.search(r"Area ([\d.]+) mm²", text).group(1))

    assert 1.4 < area(after) / area(before) < 1.9  # 25/15 wide, give or take the edge pixels
    page.keyboard.press("Delete")
    expect(stage.locator(".measurement.rectangle")).to_have_count(0)
    expect(stage.locator(".measurement.length")).to_have_count(1)


def hu(path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_an_angle_an_ellipse_and_a_length_through_zoom_and_pan(page, server, study):
    """Drawn with the mouse at 1:1: an angle of 45° reads 45.0°; an ellipse gets the
    statistics numpy finds over the same mask (pixel centres inside it) in HU. Zoomed to
    244% (no smoothing: an image pixel is a block of canvas pixels), a length is drawn
    from pixel centre to pixel centre; panned, its drawn ends move as far as the pointer;
    zoomed again, they spread 1.25 times further; and through both the canvas under each
    end keeps its colour (the same image pixel) and every value stays."""
    open_current(page, server, study)
    stage = pane(page, 1).locator(".stage")
    page.keyboard.press("z")
    expect(pane(page, 1).locator(".corner.br")).to_contain_text("Zoom 100%")
    box = stage.bounding_box()
    x, y = round(box["x"] + box["width"] / 2), round(box["y"] + box["height"] / 2)

    page.keyboard.press("a")
    page.mouse.move(x + 20, y)
    page.mouse.down()
    page.mouse.move(x, y, steps=4)  # the vertex
    page.mouse.up()
    page.mouse.move(x + 20, y - 20, steps=4)  # the third point follows, a click places it
    page.mouse.down()
    page.mouse.up()
    angle = stage.locator(".measurement.angle .label")
    expect(angle).to_have_text("45.0°")

    page.keyboard.press("e")
    page.mouse.move(x - 20, y - 20)
    page.mouse.down()
    page.mouse.move(x - 5, y - 8, steps=4)
    page.mouse.up()
    ellipse = stage.locator(".measurement.ellipse .label")
    expect(ellipse).to_contain_text(" HU")
    drawn = page.evaluate(
        "globalThis.minipacsView.measurements.all().find((m) => m.type === 'ellipse')"
    )
    path = next(p for p in study["files"] if pydicom.dcmread(p).SOPInstanceUID == drawn["sop"])
    (x0, y0), (x1, y1) = drawn["points"]
    rows, columns = np.mgrid[0:64, 0:64] + 0.5
    inside = ((columns - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + (
        (rows - (y0 + y1) / 2) / ((y1 - y0) / 2)
    ) ** 2 <= 1
    values = hu(path)[inside]
    stats = drawn["stats"]
    assert stats["pixels"] == inside.sum() > 100  # of a 15 × 12 box
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["sd"] == pytest.approx(values.std())
    assert (stats["min"], stats["max"]) == (values.min(), values.max())
    assert stats["area"] == pytest.approx(inside.sum() * SPACING**2)
    expect(ellipse).to_contain_text(f"Mean {values.mean():.1f} HU")
    labels = angle.text_content(), ellipse.text_content()

    for _ in range(4):
        page.keyboard.press("+")
    expect(pane(page, 1).locator(".corner.br")).to_contain_text("Zoom 244%")
    page.keyboard.press("d")

    def on_screen(point) -> list[float]:
        """Where the viewer draws image point `point`, in page coordinates."""
        at = page.evaluate("(p) => globalThis.minipacsView.panes[0].viewport.toScreen(p)", point)
        return [box["x"] + at[0], box["y"] + at[1]]

    start, end = on_screen([10.5, 50.5]), on_screen([40.5, 50.5])  # pixel centres
    page.mouse.move(round(start[0]), round(start[1]))
    page.mouse.down()
    page.mouse.move(round(end[0]), round(end[1]), steps=4)
    page.mouse.up()
    length = stage.locator(".measurement.length")
    expect(length.locator(".label")).to_have_text(re.compile(r" mm$"))
    drawn = page.evaluate(
        "globalThis.minipacsView.measurements.all().find((m) => m.type === 'length')"
    )
    (a, b), (c, d) = drawn["points"]
    value = f"{np.hypot(c - a, d - b) * SPACING:.2f} mm"
    assert length.locator(".label").text_content() == value
    assert abs(np.hypot(c - a, d - b) - 30) < 1  # a pixel at most

    def ends() -> np.ndarray:
        """The drawn line's two ends, in the stage's CSS pixels."""
        points = length.locator("polyline").get_attribute("points").split()
        return np.array([[float(v) for v in p.split(",")] for p in points])

    def colours(points: np.ndarray) -> list[list[int]]:
        """The canvas's colour under each point."""
        return page.evaluate(
            """(points) => {
                const canvas = document.querySelector(".pane[data-pane='1'] canvas.image");
                const ratio = window.devicePixelRatio || 1;
                const context = canvas.getContext("2d");
                const at = (v) => Math.floor(v * ratio);
                return points.map(([x, y]) => [...context.getImageData(at(x), at(y), 1, 1).data]);
            }""",
            points.tolist(),
        )

    before = ends()
    under = colours(before)
    page.keyboard.down("Shift")  # Shift+drag pans, whatever the tool
    page.mouse.move(x + 100, y + 100)
    page.mouse.down()
    page.mouse.move(x + 130, y + 80, steps=4)
    page.mouse.up()
    page.keyboard.up("Shift")
    panned = ends()
    assert panned - before == pytest.approx(np.array([[30, -20], [30, -20]]))
    assert colours(panned) == under
    page.keyboard.press("+")
    expect(pane(page, 1).locator(".corner.br")).to_contain_text("Zoom 305%")
    zoomed = ends()
    assert np.linalg.norm(zoomed[1] - zoomed[0]) == pytest.approx(
        1.25 * np.linalg.norm(before[1] - before[0])
    )
    assert colours(zoomed) == under
    assert length.locator(".label").text_content() == value
    assert (angle.text_content(), ellipse.text_content()) == labels


def test_saved_measurements_come_back(page, server, study):
    """Save stores the prior study's length as an SR through the server; the study opened
    again shows it where it was. Deleted and saved again, it is cleared: the study opened
    again has none. (On the prior: the other tests' study stays as made.)"""
    with page.expect_response(saved_report) as answer:  # Save shows once it is in
        page.goto(f"{server.url}/study/{study['prior']}")
    assert answer.value.ok
    page.wait_for_function("globalThis.minipacsView && globalThis.minipacsView.drawn >= 1")
    save = page.get_by_role("button", name="Save")
    expect(save).to_be_visible()  # the server has the endpoint
    stage = pane(page, 1).locator(".stage")
    page.keyboard.press("z")
    page.keyboard.press("d")
    box = stage.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 10, y - 10)
    page.mouse.down()
    page.mouse.move(x + 20, y - 10, steps=4)
    page.mouse.up()
    expected = f"{30 * SPACING:.2f} mm"
    expect(stage.locator(".measurement.length .label")).to_have_text(expected)
    documents = page.locator(f'.series-item.no-images[data-study="{study["prior"]}"]')
    before = documents.count()
    save.click()
    expect(page.locator(".status")).to_have_text("Saved 1 measurement.")
    expect(documents).to_have_count(before + 1)  # its SR series, listed without a reload
    page.reload()
    expect(stage.locator(".measurement.length .label")).to_have_text(expected)
    page.keyboard.press("Delete")
    expect(stage.locator(".measurement")).to_have_count(0)
    save.click()
    expect(page.locator(".status")).to_have_text("Cleared the saved measurements.")
    with page.expect_response(saved_report):
        page.reload()
    expect(save).to_be_visible()  # the saved report was read
    expect(stage.locator(".measurement")).to_have_count(0)
    saved = page.request.get(f"{server.url}/api/studies/{study['prior']}/measurements").json()
    assert saved["measurements"] == [] and saved["sopInstanceUID"]


def test_a_saved_report_opens_cleanly_and_2x2_shows_four_series(page, server, study):
    """A study with a saved SR and Key Object Selection (series 990 and 991; saved here
    through the API, on the last axial slice, which the tests above do not look at) opens
    with no failed request and no console error: the strip lists both as text, and nothing
    of them is asked for. The layout key pressed three times (1×2, 2×1, 2×2) fills the
    panes with four different image series: this study's next ones, then the prior's;
    at 2×1 two panes of one size are stacked, each showing its series. The SR's own URL
    opens nothing and says why."""
    failed, console = [], []
    page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
    page.on("console", lambda m: m.type == "error" and console.append(m.text))
    last = next(p for p in study["files"][:20] if pydicom.dcmread(p).InstanceNumber == 20)
    sop = pydicom.dcmread(last).SOPInstanceUID
    body = {
        "measurements": [{"type": "length", "sopInstanceUID": sop, "points": [[10, 10], [40, 10]]}],
        "keyImages": [{"sopInstanceUID": sop}],
    }
    saved = page.request.post(
        f"{server.url}/api/studies/{study['current']}/measurements", data=body
    )
    assert saved.ok, saved.text()
    with page.expect_response(saved_report):
        open_current(page, server, study)
    documents = page.locator(".series-item.no-images")
    expect(documents).to_have_count(2)
    expect(documents.nth(0)).to_contain_text("SR")
    expect(documents.nth(1)).to_contain_text("KO")
    expect(documents.locator("img")).to_have_count(0)
    page.keyboard.press("l")
    page.keyboard.press("l")
    expect(page.get_by_label("Layout")).to_have_value("2x1")
    for number, count in enumerate(["1 / 20", "1 / 10"], start=1):
        expect(pane(page, number).locator(".counter")).to_have_text(count)
    expect(pane(page, 3)).to_be_hidden()
    top, bottom = pane(page, 1).bounding_box(), pane(page, 2).bounding_box()
    assert (top["x"], top["width"]) == (bottom["x"], bottom["width"])  # one column
    assert bottom["y"] >= top["y"] + top["height"] and top["height"] == bottom["height"] > 100
    page.keyboard.press("l")
    expect(page.get_by_label("Layout")).to_have_value("2x2")
    for number, count in enumerate(["1 / 20", "1 / 10", "1 / 6", "1 / 5"], start=1):
        expect(pane(page, number).locator(".counter")).to_have_text(count)
    expect(pane(page, 4).locator(".corner.tr")).to_contain_text("prior study")
    shown = page.evaluate("globalThis.minipacsView.panes.map((p) => p.series)")
    assert len(set(shown)) == 4
    expect(page.locator(".study-series")).to_have_count(2)  # the prior's series listed too
    page.wait_for_function(
        "[...document.querySelectorAll('.series-item img')].every((i) => i.src && i.complete)"
    )

    uids = [documents.nth(n).get_attribute("data-series") for n in (0, 1)]
    page.goto(f"{server.url}/study/{study['current']}/series/{uids[0]}")
    message = pane(page, 1).locator(".message")
    expect(message).to_have_text("minipacs measurements (SR) has no images to show.")
    expect(page.locator(".status")).to_have_text(message.text_content())
    assert not [url for url in page.requests if any(f"/series/{uid}/" in url for uid in uids)]
    assert failed == [] and console == []


def test_saved_items_on_a_deleted_image_are_left_out(page, server, study, tmp_path):
    """The other patient's study, with a length and a key image saved on its image and on
    one deleted since: the study opens with the kept length drawn, and the status line
    says two saved items are not shown (their image is gone; the GET names no series for
    them). Two panes' asks for the same instance's metadata at once make one request."""
    kept = pydicom.dcmread(study["files"][-1])
    extra = pydicom.dcmread(study["files"][-1])  # a copy in a series of its own
    extra.SeriesInstanceUID, extra.SOPInstanceUID = (
        pydicom.uid.generate_uid(),
        pydicom.uid.generate_uid(),
    )
    extra.file_meta.MediaStorageSOPInstanceUID = extra.SOPInstanceUID
    extra.save_as(tmp_path / "extra.dcm")
    storescu(server.port, tmp_path / "extra.dcm")
    sops = [kept.SOPInstanceUID, extra.SOPInstanceUID]
    body = {
        "measurements": [
            {"type": "length", "sopInstanceUID": sop, "points": [[10, 10], [40, 10]]}
            for sop in sops
        ],
        "keyImages": [{"sopInstanceUID": extra.SOPInstanceUID}],
    }
    base = f"{server.url}/api/studies/{kept.StudyInstanceUID}"
    assert page.request.post(f"{base}/measurements", data=body).ok
    gone = f"/dicom-web/studies/{kept.StudyInstanceUID}/series/{extra.SeriesInstanceUID}"
    assert page.request.delete(f"{server.url}{gone}/instances/{extra.SOPInstanceUID}").ok

    with page.expect_response(saved_report):
        page.goto(f"{server.url}/study/{kept.StudyInstanceUID}")
    expect(page.locator(".status")).to_have_text(
        "2 of the saved measurements and key images are on images no longer in this study:"
        " not shown."
    )
    stage = pane(page, 1).locator(".stage")
    expect(stage.locator(".measurement.length .label")).to_have_text(f"{30 * SPACING:.2f} mm")
    expect(pane(page, 1).locator(".key-mark")).to_be_hidden()

    asked = []
    page.on(
        "request", lambda r: r.url.endswith(f"/{kept.SOPInstanceUID}/metadata") and asked.append(r)
    )
    same = page.evaluate(
        """async (sop) => {
            const view = globalThis.minipacsView;
            view.metadata.delete(sop);
            const pane = view.panes[0];
            const [a, b] = await Promise.all([pane.metadataOf(sop), pane.metadataOf(sop)]);
            return a === b && view.metadata.get(sop) === a && !view.metadataAsked.size;
        }""",
        kept.SOPInstanceUID,
    )
    assert same and len(asked) == 1
