"""viewer.render against dcmtk's dcmj2pnm (and pydicom's own pipeline where dcmj2pnm cannot
decode), pixel by pixel, within ±1 grey level unless an exception below says why."""

import io
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_files import TEST_FILES
from PIL import Image
from pydicom.pixels import apply_modality_lut

from viewer.render import FrameCache
from viewer.render import RenderError
from viewer.render import Request
from viewer.render import frame_values
from viewer.render import render

# Where dcmj2pnm and we legitimately differ by more than ±1:
LOSSY_JPEG = {  # IDCT / chroma upsampling differ between IJG (dcmtk) and libjpeg (pylibjpeg)
    "JPGExtended.dcm": 3,
    "SC_rgb_dcmtk_+eb+cy+n1.dcm": 3,
    "SC_rgb_dcmtk_+eb+cy+np.dcm": 3,
    "SC_rgb_jpeg_lossy_gdcm.dcm": 3,
    "examples_ybr_color.dcm": 4,
}
DCMTK_WRONG = {  # dcmj2pnm is the one that is wrong
    # min/max of the big-endian 32-bit copies differs from the little-endian ones that hold
    # the same pixels (pydicom decodes both to identical arrays; dcmj2pnm matches on LE)
    ("rtdose_expb.dcm", "minmax"),
    ("rtdose_expb_1frame.dcm", "minmax"),
}
UNDECODABLE = {  # neither we nor pydicom's default plugins decode these: 422 with a reason
    "JPEG-lossy.dcm",  # 12-bit JPEG extended that libjpeg refuses (gdcm would decode it)
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "MR_truncated.dcm",  # pixel data shorter than declared
    "SC_rgb_jpeg.dcm",  # implicit VR under an explicit syntax
    "badVR.dcm",  # NumberOfFrames "1A"
}


def images() -> list[tuple[Path, str]]:
    cases = []
    for path in sorted(TEST_FILES.iterdir()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if "Rows" not in ds:
            continue
        if str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME"):
            modes = ["minmax", "window"] + (["file"] if "WindowCenter" in ds else [])
        else:
            modes = ["colour"]
        cases += [(path, mode) for mode in modes]
    return cases


OPTIONS = {"minmax": ["+Wm"], "window": ["+Ww", "100", "500"], "file": ["+Wi", "1"], "colour": []}
REQUESTS = {
    "minmax": Request(minmax=True),
    "window": Request(window=(100, 500)),
    "file": Request(),
    "colour": Request(),
}


def ours(path: Path, request: Request) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(render(path, request, FrameCache(1 << 28)))))


def dcmj2pnm(path: Path, tmp_path: Path, *options: str) -> np.ndarray | None:
    out = tmp_path / "reference.png"
    result = subprocess.run(
        ["dcmj2pnm", "+on", "-O", *options, str(path), str(out)], capture_output=True, text=True
    )
    return None if result.returncode else np.asarray(Image.open(out))


def pydicom_pipeline(path: Path, mode: str) -> np.ndarray:
    """The reference where dcmj2pnm cannot decode: pydicom decodes and applies the Modality
    LUT; the window is PS3.3 C.11.2.1.2's formula, written out here."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array[0] if int(ds.get("NumberOfFrames", 1) or 1) > 1 else ds.pixel_array
    if mode == "colour":
        return arr.astype(np.uint8)
    x = apply_modality_lut(arr, ds).astype(np.float64)
    if mode == "minmax":  # LINEAR_EXACT over min…max
        low, high = x.min(), x.max()
        return np.rint(np.clip((x - low) / max(high - low, 1) * 255, 0, 255))
    if mode == "window":
        c, w = 100.0, 500.0
    else:
        center, width = ds.WindowCenter, ds.WindowWidth
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    return np.rint(np.clip(((x - (c - 0.5)) / (w - 1) + 0.5) * 255, 0, 255))


@pytest.mark.parametrize(("path", "mode"), images(), ids=lambda v: getattr(v, "name", v))
def test_matches_dcmj2pnm(path, mode, tmp_path):
    if path.name in UNDECODABLE:
        with pytest.raises(RenderError) as error:
            ours(path, REQUESTS[mode])
        assert error.value.code == 422
        return
    mine = ours(path, REQUESTS[mode])
    reference = dcmj2pnm(path, tmp_path, *OPTIONS[mode])
    if reference is None or (path.name, mode) in DCMTK_WRONG:
        reference = pydicom_pipeline(path, mode)
    assert mine.shape == reference.shape
    tolerance = LOSSY_JPEG.get(path.name, 1)
    difference = np.abs(mine.astype(int) - reference.astype(int))
    assert difference.max() <= tolerance, f"{difference.max()} at {np.argmax(difference)}"


# -- the VOI functions, LUTs and photometric cases, on synthetic variants of real files ----


def variant(tmp_path: Path, source: str, **changes) -> Path:
    ds = pydicom.dcmread(TEST_FILES / source)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    path = tmp_path / f"variant-{source}"
    ds.save_as(path)
    return path


def test_monochrome1_is_inverted(tmp_path):
    path = variant(tmp_path, "MR_small.dcm", PhotometricInterpretation="MONOCHROME1")
    mine = ours(path, Request())
    reference = dcmj2pnm(path, tmp_path, "+Wi", "1")
    assert np.abs(mine.astype(int) - reference.astype(int)).max() <= 1
    plain = ours(TEST_FILES / "MR_small.dcm", Request())
    assert np.abs((255 - plain.astype(int)) - mine.astype(int)).max() <= 1


def test_presentation_lut_inverse(tmp_path):
    path = variant(tmp_path, "MR_small.dcm", PresentationLUTShape="INVERSE")
    plain = ours(TEST_FILES / "MR_small.dcm", Request())
    assert np.array_equal(ours(path, Request()), 255 - plain)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_functions_follow_ps3_3(tmp_path, function):
    path = variant(
        tmp_path, "CT_small.dcm", WindowCenter=60, WindowWidth=350, VOILUTFunction=function
    )
    ds = pydicom.dcmread(path)
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if function == "SIGMOID":  # PS3.3 C.11.2.1.3.1
        expected = 255 / (1 + np.exp(-4 * (values - 60) / 350))
    else:  # PS3.3 C.11.2.1.3.2
        expected = np.clip(((values - 60) / 350 + 0.5) * 255, 0, 255)
    mine = ours(path, Request())
    assert np.abs(mine.astype(float) - expected).max() <= 0.5 + 1e-9
    # A requested window keeps the file's function.
    shifted = ours(path, Request(window=(200, 350)))
    assert not np.array_equal(shifted, mine)


def test_voi_lut_sequence(tmp_path):
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    item = pydicom.Dataset()
    item.LUTDescriptor = [256, 0, 8]  # 256 entries from input 0, 8-bit output
    item.add_new(0x00283006, "US", [min(255, v * 2) for v in range(256)])  # LUTData
    ds.VOILUTSequence = [item]
    path = tmp_path / "voilut.dcm"
    ds.save_as(path)
    mine = ours(path, Request())
    reference = dcmj2pnm(path, tmp_path, "+Wl", "1")
    assert np.abs(mine.astype(int) - reference.astype(int)).max() <= 1


def test_modality_lut_sequence(tmp_path):
    ds = pydicom.dcmread(TEST_FILES / "MR_small.dcm")
    ds.pop("RescaleSlope", None)
    ds.pop("RescaleIntercept", None)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new(0x00283006, "US", [4095 - v for v in range(4096)])  # an inverting LUT
    ds.ModalityLUTSequence = [item]
    path = tmp_path / "mlut.dcm"
    ds.save_as(path)
    mine = ours(path, Request(minmax=True))
    reference = dcmj2pnm(path, tmp_path, "+Wm")
    assert np.abs(mine.astype(int) - reference.astype(int)).max() <= 1


def test_palette_colour_and_ybr_full_422(tmp_path):
    for name in ("examples_palette.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        mine = ours(TEST_FILES / name, Request())
        assert mine.ndim == 3 and mine.shape[2] == 3
        reference = dcmj2pnm(TEST_FILES / name, tmp_path)
        assert np.abs(mine.astype(int) - reference.astype(int)).max() <= 1


def test_frame_number_selects_the_frame(tmp_path):
    path = TEST_FILES / "examples_ybr_color.dcm"
    fifth = ours(path, Request(frame=5))
    reference = dcmj2pnm(path, tmp_path, "+F", "5")
    assert np.abs(fifth.astype(int) - reference.astype(int)).max() <= LOSSY_JPEG[path.name]
    assert not np.array_equal(fifth, ours(path, Request(frame=1)))
    with pytest.raises(RenderError) as error:
        ours(path, Request(frame=31))
    assert error.value.code == 400


def test_rows_columns_region_and_flips():
    path = TEST_FILES / "CT_small.dcm"  # 128 × 128
    full = ours(path, Request(window=(40, 400)))
    assert ours(path, Request(window=(40, 400), rows=64)).shape == (64, 64)
    assert ours(path, Request(window=(40, 400), rows=64, columns=32)).shape == (32, 32)
    assert ours(path, Request(window=(40, 400), rows=50, columns=80, exact_size=True)).shape == (
        50,
        80,
    )
    half = ours(path, Request(window=(40, 400), region=(0.5, 0.0, 1.0, 0.5)))
    assert np.array_equal(half, full[:64, 64:])
    pixels = ours(path, Request(window=(40, 400), region=(10, 20, 30, 60)))
    assert np.array_equal(pixels, full[20:60, 10:30])
    assert np.array_equal(
        ours(path, Request(window=(40, 400), flip_horizontal=True)), full[:, ::-1]
    )
    assert np.array_equal(ours(path, Request(window=(40, 400), flip_vertical=True)), full[::-1])


def test_cache_is_bounded_and_reused(tmp_path):
    cache = FrameCache(max_bytes=300_000)
    path = TEST_FILES / "CT_small.dcm"
    render(path, Request(), cache)
    first = cache.bytes
    ds, values = frame_values(path, 1, cache, None)  # what the cache holds
    assert values.dtype == np.int16
    # Its header without the private elements (179 of this GE slice's 256): ~30 KB, not ~100.
    assert not [tag for tag in ds.keys() if tag.group % 2]  # noqa: SIM118
    assert 128 * 128 * 2 < first < 128 * 128 * 2 + 40_000
    render(path, Request(window=(0, 100)), cache)  # a new window: the cached frame
    assert cache.bytes == first
    render(TEST_FILES / "rtdose_1frame.dcm", Request(), cache)  # float64: evicts CT
    assert cache.bytes <= 300_000


def test_a_frame_over_the_bound_is_kept_alone():
    """A radiograph larger than render_cache_mb is still re-windowed without a decode:
    the newest frame stays even alone over the bound, until another makes it go."""
    cache = FrameCache(max_bytes=40_000)
    ct, mr = TEST_FILES / "CT_small.dcm", TEST_FILES / "MR_small.dcm"
    first = frame_values(ct, 1, cache, None)  # ~64 KB with its header
    assert frame_values(ct, 1, cache, None) is first
    assert cache.bytes > 40_000
    frame_values(mr, 1, cache, None)  # 64² int16: within the bound, the CT goes
    assert cache.bytes <= 40_000
    assert frame_values(ct, 1, cache, None) is not first
    nothing = FrameCache(0)
    assert frame_values(ct, 1, nothing, None) is not frame_values(ct, 1, nothing, None)
    assert nothing.bytes == 0
