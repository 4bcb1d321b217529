"""The browser viewer in a real headless Chromium (Debian's, driven by Playwright) against
the real server, with studies pushed by storescu. Screenshots of each screen are saved
under test-artifacts/viewer/."""

import re
import shutil
from pathlib import Path

import pydicom
import pytest
from conftest import CHROMIUM
from conftest import ROOT
from conftest import STORESCU_PROPOSE
from conftest import VIEWER_ARTIFACTS
from conftest import Server
from conftest import minipacs
from conftest import storescu
from dicom_files import TEST_FILES
from playwright.sync_api import Page
from playwright.sync_api import expect

SLICES = 30
OTHERS = ("CT_small.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG-lossy.dcm")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from make_study import make_study

    root = tmp_path_factory.mktemp("viewer")
    stack = make_study(root / "stack", SLICES, size=96)
    for path in stack:  # a patient of its own, so a search can single it out
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID = "Stack^Synthetic", "STACK1"
        ds.save_as(path)
    broken = make_study(root / "broken", 3, size=16, patient_id="BROKEN1")
    ds = pydicom.dcmread(broken[0])  # its first slice's pixels cut short: it cannot render
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(broken[0])
    running = Server(root / "data").start()
    try:  # the server stops even when pushing the studies fails
        storescu(running.port, *stack, *broken)
        for name in OTHERS:
            syntax = pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True).file_meta
            propose = STORESCU_PROPOSE.get(syntax.TransferSyntaxUID)
            storescu(running.port, TEST_FILES / name, extra=(propose,) if propose else ())
        yield running
    finally:
        running.kill()


def uid_of(name: str, keyword: str) -> str:
    return str(pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True).get(keyword))


def open_stack(page: Page, server: Server) -> None:
    page.goto(f"{server.url}/?id=STACK1")
    page.locator("tr.study").first.click()
    wait_drawn(page, 1)
    expect(page.locator(".counter")).to_have_text(f"1 / {SLICES}")


def wait_drawn(page: Page, count: int) -> None:
    page.wait_for_function(f"globalThis.minipacsView && globalThis.minipacsView.drawn >= {count}")


def drawn(page: Page) -> int:
    return page.evaluate("globalThis.minipacsView.drawn")


def canvas(page: Page) -> bytes:
    return page.locator(".stage canvas").screenshot()


def test_search_narrows_the_list(page, server):
    page.goto(server.url)
    expect(page.locator("tr.study")).to_have_count(5)
    VIEWER_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=VIEWER_ARTIFACTS / "list.png")
    page.get_by_label("Patient ID").fill("STACK1")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("tr.study")).to_have_count(1)
    assert "id=STACK1" in page.url
    expect(page.locator("tr.study td").nth(8)).to_have_text(str(SLICES))
    page.get_by_label("Patient ID").fill("")
    page.get_by_label("Patient name").fill("stack")  # any name part, any case
    page.get_by_role("button", name="Search").click()
    expect(page.locator("tr.study")).to_have_count(1)
    page.get_by_label("Patient name").fill("nobody")
    page.get_by_role("button", name="Search").click()
    expect(page.locator(".state")).to_have_text("No studies match this search.")


def test_keyboard_opens_a_study_from_the_list(page, server):
    page.goto(f"{server.url}/?id=STACK1")
    page.locator("tr.study").first.focus()
    page.keyboard.press("Enter")
    wait_drawn(page, 1)
    assert "/study/" in page.url


def test_slice_counter_follows_wheel_keys_and_slider(page, server):
    open_stack(page, server)
    page.locator(".stage").hover()
    for _ in range(3):
        page.mouse.wheel(0, 100)
    expect(page.locator(".counter")).to_have_text(f"4 / {SLICES}")
    page.keyboard.press("ArrowDown")
    expect(page.locator(".counter")).to_have_text(f"5 / {SLICES}")
    page.keyboard.press("End")
    expect(page.locator(".counter")).to_have_text(f"{SLICES} / {SLICES}")
    page.keyboard.press("Home")
    expect(page.locator(".counter")).to_have_text(f"1 / {SLICES}")
    page.locator(".scroll input[type=range]").fill("12")
    expect(page.locator(".counter")).to_have_text(f"12 / {SLICES}")
    expect(page.locator(".corner.bl")).to_contain_text("Im 12")


def test_window_drag_changes_the_image(page, server):
    open_stack(page, server)
    before = canvas(page)
    count = drawn(page)
    box = page.locator(".stage").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x - 150, y + 60, steps=8)
    page.mouse.up()
    wait_drawn(page, count + 1)  # the exact PNG after the drag
    page.wait_for_function("globalThis.minipacsView.loading.size === 0")
    assert canvas(page) != before
    expect(page.locator(".preset")).to_have_value("custom")
    expect(page.locator(".corner.br")).to_contain_text("WC ")


def test_preset_applies_its_window(page, server):
    open_stack(page, server)
    page.get_by_label("Window preset").select_option(label="Brain (40/80)")
    expect(page.locator(".corner.br")).to_contain_text("WC 40 WW 80")
    page.wait_for_function("globalThis.minipacsView.loading.size === 0")
    assert any("window=40%2C80" in url or "window=40,80" in url for url in page.requests)
    page.screenshot(path=VIEWER_ARTIFACTS / "brain-preset.png")


def test_invert_zoom_and_overlays(page, server):
    open_stack(page, server)
    before = canvas(page)
    page.get_by_role("button", name="Invert").click()
    assert canvas(page) != before
    page.get_by_role("button", name="1:1").click()
    expect(page.locator(".corner.br")).to_contain_text("Zoom 100%")
    page.get_by_role("button", name="Overlays").click()
    expect(page.locator(".corner.tl")).to_be_hidden()


def test_cine_advances_frames(page, server):
    open_stack(page, server)
    page.get_by_label("Frames per second").fill("20")
    page.get_by_label("Frames per second").dispatch_event("change")
    page.get_by_role("button", name="▶ Cine").click()
    page.wait_for_function("globalThis.minipacsView.index >= 5")
    page.get_by_role("button", name="❚❚ Stop").click()
    index = page.evaluate("globalThis.minipacsView.index")
    page.wait_for_timeout(300)
    assert page.evaluate("globalThis.minipacsView.index") == index  # stopped


def test_multiframe_instance_scrolls_its_frames(page, server):
    study = uid_of("SC_rgb_rle_2frame.dcm", "StudyInstanceUID")
    page.goto(f"{server.url}/study/{study}")
    wait_drawn(page, 1)
    expect(page.locator(".counter")).to_have_text("1 / 3")  # 2 frames + the JPEG instance
    page.keyboard.press("ArrowDown")
    expect(page.locator(".corner.bl")).to_contain_text("Fr ")
    assert "frame=" in page.url


def test_tag_panel_shows_the_instance(page, server):
    study = uid_of("CT_small.dcm", "StudyInstanceUID")
    page.goto(f"{server.url}/study/{study}")
    wait_drawn(page, 1)
    page.get_by_role("button", name="Tags").click()
    row = page.locator("tr[data-tag='00080018']")
    expect(row).to_contain_text(uid_of("CT_small.dcm", "SOPInstanceUID"))
    expect(row).to_contain_text("SOPInstanceUID")
    expect(page.locator("tr[data-tag='7FE00010']")).to_contain_text("(bulk data)")


def first_png(urls: list[str]) -> tuple[str, int]:
    """The instance of the first rendered image asked for, and how often its PNG was."""
    rendered = [url for url in urls if "/rendered" in url]
    sop = re.search(r"/instances/([0-9.]+)/", rendered[0]).group(1)
    return sop, sum(f"/instances/{sop}/frames/1/rendered?accept=image%2Fpng" in u for u in rendered)


def test_deep_link_reopens_the_same_instance(page, server, browser):
    """The slice shown first, the series' first or the one a link names, is the first
    image asked for (beside the instance list: pane.warmFirst), and only once."""
    open_stack(page, server)
    assert first_png(page.requests) == (page.evaluate("globalThis.minipacsView.stack[0].sop"), 1)
    page.locator(".scroll input[type=range]").fill("7")
    expect(page.locator(".counter")).to_have_text(f"7 / {SLICES}")
    link = page.url
    assert re.search(r"/study/[0-9.]+/series/[0-9.]+/instance/[0-9.]+$", link)
    other = browser.new_context(bypass_csp=True).new_page()
    asked = []
    other.on("request", lambda request: asked.append(request.url))
    other.goto(link)
    expect(other.locator(".counter")).to_have_text(f"7 / {SLICES}")
    assert other.url == link
    wait_drawn(other, 1)
    other.wait_for_function("globalThis.minipacsView.loading.size === 0")
    assert first_png(asked) == (link.rsplit("/", 1)[1], 1)
    other.context.close()


def test_back_and_forward(page, server):
    page.goto(f"{server.url}/?id=STACK1")
    page.locator("tr.study").first.click()
    wait_drawn(page, 1)
    page.go_back()
    expect(page.locator("tr.study")).to_have_count(1)
    assert page.url.endswith("/?id=STACK1")
    page.go_forward()
    expect(page.locator(".counter")).to_have_text(f"1 / {SLICES}")


def test_unrenderable_image_is_a_message_in_the_viewport(page, server):
    """The message, and the series thumbnails asked for as soon as the first image has
    failed (they wait for it, not for a fixed delay: this failed with the old 1.5 s timer)."""
    study = uid_of("JPEG-lossy.dcm", "StudyInstanceUID")
    page.goto(f"{server.url}/study/{study}")
    expect(page.locator(".message")).to_contain_text("Cannot display this image")
    thumbnail = page.locator(".series-item img").first.get_attribute("src")  # no waiting
    assert thumbnail and "/thumbnail" in thumbnail


def test_neighbours_are_fetched_when_the_first_image_fails(page, server):
    """A series' first image is asked for alone, its neighbours once it is drawn; when it
    fails they are asked for all the same, not only after a scroll."""
    page.goto(f"{server.url}/?id=BROKEN1")
    page.locator("tr.study").first.click()
    expect(page.locator(".message")).to_contain_text("Cannot display this image")
    second = page.evaluate("globalThis.minipacsView.stack[1].sop")
    page.wait_for_function(
        """(sop) => performance.getEntriesByType("resource")
            .some((entry) => entry.name.includes(`/instances/${sop}/frames/1/rendered`))""",
        arg=second,
    )
    expect(page.locator(".counter")).to_have_text("1 / 3")


def test_viewer_modules_keep_to_their_jobs():
    """The study view takes DOM helpers from dom.js (not the study list), and requests in
    flight are records holding their AbortController, not controllers with fields added."""
    static = ROOT / "viewer" / "static"
    assert 'from "./studylist.js"' not in (static / "studyview.js").read_text()
    for script in static.glob("*.js"):
        source = script.read_text()
        assert not re.search(r"\bcontroller\.\w+\s*(\|\|)?=[^=]", source), script.name
        assert not re.search(r"setTimeout\([^;]*,\s*1500\)", source), script.name


def test_download_is_the_stored_file(page, server):
    study = uid_of("CT_small.dcm", "StudyInstanceUID")
    page.goto(f"{server.url}/study/{study}")
    wait_drawn(page, 1)
    with page.expect_download() as download:
        page.get_by_role("link", name="Download").click()
    saved = Path(download.value.path())
    sop = uid_of("CT_small.dcm", "SOPInstanceUID")
    assert saved.read_bytes() == next(server.data.rglob(f"{sop}.dcm")).read_bytes()


def test_the_page_talks_only_to_its_own_server(page, server):
    open_stack(page, server)
    for _ in range(5):
        page.keyboard.press("ArrowDown")
    page.get_by_role("button", name="Tags").click()
    page.wait_for_function("globalThis.minipacsView.loading.size === 0")
    hosts = {re.match(r"^[a-z]+://[^/]+", url).group(0) for url in page.requests if "://" in url}
    assert hosts == {server.url}, hosts


def test_chromium_is_debians():
    assert shutil.which("chromium") == CHROMIUM


def test_login_page_then_the_study_list(browser, start_server):
    """With a user configured, the viewer sends the browser to the login page (under the
    page's real CSP) and, once logged in, lists the studies with the session cookie."""
    fresh = start_server()
    storescu(fresh.port, TEST_FILES / "CT_small.dcm")
    data = ["--data", str(fresh.data)]
    minipacs(
        "user",
        "add",
        "rad",
        "--role",
        "viewer",
        "--password-stdin",
        *data,
        input="a long enough password",
    )
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.goto(fresh.url)
    expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    # Its own icon: no /favicon.ico for a browser to ask for (a 401 in the console).
    expect(page.locator('link[rel="icon"]')).to_have_count(1)
    page.get_by_label("User").fill("rad")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator(".error")).to_have_text("Wrong user name or password.")
    page.get_by_label("User").fill("rad")
    page.get_by_label("Password").fill("a long enough password")
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("tr.study")).to_have_count(1)
    VIEWER_ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=VIEWER_ARTIFACTS / "after-login.png")
    cookie = next(c for c in context.cookies() if c["name"] == "minipacs_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    page.get_by_role("button", name="Log out").click()  # a viewer may log out (issue 17)
    expect(page).to_have_url(re.compile(r"/login$"))
    page.goto(fresh.url)
    expect(page).to_have_url(re.compile(r"/login\?next=/$"))
    context.close()
