"""The one render pipeline: stored frame → 8-bit PNG/JPEG, as PS3.3 C.11 says to display it.

decode frame (pydicom + pylibjpeg/pyjpegls; LRU cache bounded in bytes) → Modality LUT
(PS3.3 C.11.1) → VOI LUT: requested window, else the file's first window, else its VOI
LUT Sequence, else min/max (C.11.2) → MONOCHROME1 / Presentation LUT INVERSE (C.11.6) →
colour (RGB, YBR as decoded, PALETTE COLOR C.7.6.3.1.5) → region, flips, size → encoding.
No Flask here: WADO-URI, WADO-RS and the viewer all call `render`.
"""

import hashlib
import io
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from PIL import ImageDraw
from pydicom.datadict import dictionary_has_tag
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array

from storage.dataset import check_pixel_budget
from storage.dataset import dataset_pixel_bytes
from storage.dataset import pixel_data_bytes
from storage.dataset import read_dataset
from storage.errors import OverPixelBudget
from storage.recode import check_stored_frame
from viewer.errors import WebError

RENDER_BYTES = 16  # bytes a sample takes at most while a frame is rendered (check_cost)
ENCODING = 2  # changes when the same rendering is encoded into other bytes (2: PNG's Z_RLE)


class RenderError(WebError):
    """The instance cannot be rendered (no pixels, no decoder, bad frame): 400 or 422."""


@dataclass(frozen=True)
class Request:
    """What to render. `frame` counts from 1 (PS3.18 frameNumber); `region` is
    (left, top, right, bottom), normalised 0-1 when every value ≤ 1, else in pixels."""

    frame: int = 1
    window: tuple[float, float] | None = None  # (center, width); None: the file's VOI
    function: str = ""  # LINEAR, LINEAR_EXACT or SIGMOID; "": the file's (else LINEAR)
    minmax: bool = False  # ignore the file's VOI: window the frame's min to max
    rows: int | None = None
    columns: int | None = None
    exact_size: bool = False  # fill rows×columns instead of fitting inside
    region: tuple[float, float, float, float] | None = None
    flip_horizontal: bool = False
    flip_vertical: bool = False
    format: str = "png"  # png, jpeg or gif
    quality: int = 90
    annotation: tuple[str, ...] = ()  # "patient", "technique"
    # Limits from the configuration: the largest output side (a missing rows or columns is
    # bounded by it too), and the pixel budget (bytes; None: none), checked before decoding.
    max_size: int = 4096
    pixel_budget: int | None = None


class FrameCache:
    """Decoded frames (after the Modality LUT), least recently used out first, bounded in
    bytes; shared by every request thread. A frame larger than the bound is kept alone
    (max_bytes 0: none), so a radiograph (3,072² is 18 MiB) is re-windowed without a
    decode however small the bound that keeps a reading load's memory down."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, tuple[Dataset, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[Dataset, np.ndarray] | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple, item: tuple[Dataset, np.ndarray]) -> None:
        if not self.max_bytes:
            return
        size = _cost(item)
        with self._lock:
            if key in self._items:
                return
            self._items[key] = item
            self.bytes += size
            while self.bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self.bytes -= _cost(old)


def _cost(item: tuple[Dataset, np.ndarray]) -> int:
    """Bytes an entry holds: the frame, plus its parsed header (~400 B an element as pydicom
    objects; a CT header with private tags is ~90 KiB)."""
    ds, arr = item
    elements = getattr(ds, "_minipacs_elements", None)
    if elements is None:
        elements = _elements(ds)
        ds._minipacs_elements = elements
    return arr.nbytes + 400 * elements


def _elements(ds: Dataset) -> int:
    """The elements of `ds` and of its sequences' items, as Dataset.iterall counts them,
    without converting each raw element on the way (which took 2.7 ms, more than the
    decoding, of a CT slice's first rendering)."""
    count = 0
    for tag in ds.keys():  # noqa: SIM118 (iterating a Dataset converts every element)
        count += 1
        if _is_sequence(ds.get_item(tag)):
            count += sum(_elements(item) for item in ds[tag].value)
    return count


def _is_sequence(element) -> bool:
    """Whether pydicom reads this element as a sequence: by its VR; with none (implicit VR)
    or UN, by the dictionary's, else by an undefined length."""
    if element.VR not in (None, "UN"):
        return element.VR == "SQ"
    if dictionary_has_tag(element.tag):
        return dictionary_VR(element.tag) == "SQ"
    return getattr(element, "length", 0) == 0xFFFFFFFF


def render(path: Path, request: Request, cache: FrameCache) -> bytes:
    """The encoded image of one frame of the stored instance at `path`."""
    ds, values = frame_values(path, request.frame, cache, request.pixel_budget)
    return render_values(ds, values, request)


def render_values(ds: Dataset, values: np.ndarray, request: Request) -> bytes:
    """The stages after the Modality LUT (VOI, presentation, region, size, encoding) on
    modality values: one stored frame's, or a plane cut from a volume (viewer.mpr), whose
    VOI comes from `ds` (one of its slices) unless the request gives a window."""
    window = request.window
    if window is None and request.minmax:
        low, high = float(values.min()), float(values.max())
        window = ((low + high) / 2, max(high - low, 1.0))
    function = "LINEAR_EXACT" if request.minmax else request.function.upper()
    image = _to_8bit(ds, values, window, request.frame, function)
    image = _region(image, request.region)
    if request.flip_horizontal:
        image = image[:, ::-1]
    if request.flip_vertical:
        image = image[::-1]
    picture = _resize(Image.fromarray(np.ascontiguousarray(image)), request)
    if request.annotation:
        _annotate(picture, ds, request.annotation)
    return _encode(picture, request.format, request.quality)


def etag(path: Path, request: Request) -> str:
    """Identifies a rendering: the file (path, mtime, size), every parameter and the
    encoder's version (ENCODING: a strong ETag promises the same bytes)."""
    stat = path.stat()
    key = f"{path}|{stat.st_mtime_ns}|{stat.st_size}|{request}|{ENCODING}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


# -- decode + Modality LUT ----------------------------------------------------------


def frame_values(
    path: Path, frame: int, cache: FrameCache | None, pixel_budget: int | None
) -> tuple[Dataset, np.ndarray]:
    """The header and the modality values (after the Modality LUT) of one frame, through
    the cache when one is given (a volume's slices are decoded once and kept as the
    volume instead: viewer.mpr)."""
    key = (str(path), path.stat().st_mtime_ns, frame)
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        return cached
    ds = read_dataset(path, stop_before_pixels=True)
    if not any(t in ds for t in (0x7FE00010,)) and "Rows" not in ds:
        raise RenderError(400, "the instance has no pixel data")
    frames = number_of_frames(ds)
    if not 1 <= frame <= frames:
        raise RenderError(400, f"frameNumber {frame} is outside 1-{frames}")
    check_cost(ds, pixel_budget)
    try:
        check_stored_frame(path, ds, frame)  # its codestream's own size, before a decoder
        arr = decode_frame(path, frame)
    except Exception as exc:  # no decoder, corrupt stream: say so
        raise RenderError(422, f"cannot decode the pixel data: {exc}") from exc
    if arr.ndim == 2 or ds.get("PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2"):
        arr = _modality(arr, ds, frame)
    if cache is None:
        return ds, arr
    item = (_without_private(ds), arr)  # the kept header: its private part is most of it
    cache.put(key, item)
    return item


def _without_private(ds: Dataset) -> Dataset:
    """`ds` less its private elements, which nothing after decoding reads (the render
    stages, viewer.reading, viewer.mpr) and which are most of a kept header: 179 of a GE
    CT slice's 256 elements, ~70 of its ~100 KiB; Siemens' CSA headers are tens of KB.
    By key, not Dataset.remove_private_tags, which converts every element on its walk."""
    for tag in [tag for tag in ds.keys() if tag.group % 2]:  # noqa: SIM118 (no conversion)
        del ds[tag]
    return ds


def native_frame_values(path: Path) -> np.ndarray:
    """Modality values of the single frame of an uncompressed instance whose header was
    checked already (a volume's slice after the first: viewer.mpr): pydicom reads only the
    pixel module beside the pixels, one parse of the file instead of two."""
    header = Dataset()
    arr = pixel_array(path, index=0, raw=False, ds_out=header)
    if arr.ndim == 2:
        arr = _modality(arr, header, 1)
    return arr


def check_cost(ds: Dataset, pixel_budget: int | None) -> None:
    """Refuse (422), before anything is decoded, an instance over the pixel budget (one
    stored before the budget was lowered), or a frame whose rendering would take more:
    decoding, the Modality LUT and windowing take up to RENDER_BYTES a sample."""
    try:
        check_pixel_budget(dataset_pixel_bytes(ds), pixel_budget)
        samples = pixel_data_bytes(
            ds.get("Rows"), ds.get("Columns"), 1, ds.get("SamplesPerPixel"), 8
        )
        check_pixel_budget(samples * RENDER_BYTES, pixel_budget, "rendering a frame")
    except OverPixelBudget as exc:
        raise RenderError(422, f"{exc} (pixel_budget_mb)") from exc


def decode_frame(source: Path | Dataset, frame: int) -> np.ndarray:
    """One frame, read from the file without loading the others (or from a dataset already
    read); a deflated dataset has to be inflated whole first (bounded: read_dataset)."""
    try:
        return pixel_array(source, index=frame - 1, raw=False)
    except AttributeError:  # pydicom cannot seek in a deflated stream
        return pixel_array(read_dataset(source), index=frame - 1, raw=False)


def _modality(arr: np.ndarray, ds: Dataset, frame: int) -> np.ndarray:
    """Rescale slope/intercept or Modality LUT Sequence (PS3.3 C.11.1), per frame for
    enhanced multi-frame (Pixel Value Transformation in the functional groups)."""
    group = _functional_group(ds, frame, "PixelValueTransformationSequence")
    source = group if group is not None and "RescaleSlope" in group else ds
    if "ModalityLUTSequence" in ds and source is ds:
        return _narrow(apply_modality_lut(arr, ds))
    slope = float(source.get("RescaleSlope", 1) or 1)
    intercept = float(source.get("RescaleIntercept", 0) or 0)
    # In place: a new array per operation cost ~8× the arithmetic (a 512² CT slice:
    # 1.1 → 0.1 ms), which a volume of 500 slices pays 500 times (viewer.mpr).
    if arr.dtype.kind in "iu" and slope.is_integer() and intercept.is_integer():
        # Exact integers stay integers, and are windowed by look-up.
        values = arr.astype(np.int64 if arr.dtype.itemsize >= 4 else np.int32)
        if slope != 1:
            values *= int(slope)
        if intercept:
            values += int(intercept)
        return _narrow(values)
    values = arr.astype(np.float64)
    values *= slope
    values += intercept
    return _narrow(values)


def _narrow(values: np.ndarray) -> np.ndarray:
    """The smallest type that holds the modality values exactly (a CT frame in int16, not
    int32) or closely enough for an 8-bit display (float32): cached frames are the
    reading load's largest memory, and this halves them."""
    if values.dtype.kind == "f":
        return values.astype(np.float32)
    if values.dtype.kind not in "iu" or not values.size:
        return values
    low, high = int(values.min()), int(values.max())
    for kind in (np.uint8, np.int16, np.uint16, np.int32):
        if np.iinfo(kind).min <= low and high <= np.iinfo(kind).max:
            return values.astype(kind, copy=False)
    return values.astype(np.int64, copy=False)


def _functional_group(ds: Dataset, frame: int, name: str) -> Dataset | None:
    """The item of macro `name` that applies to `frame` (per-frame, else shared)."""
    for sequence, index in (
        ("PerFrameFunctionalGroupsSequence", frame - 1),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(sequence)
        if groups and len(groups) > index and name in groups[index]:
            items = groups[index][name]
            if items:
                return items[0]
    return None


# -- VOI LUT, presentation, colour --------------------------------------------------


def _to_8bit(ds: Dataset, values: np.ndarray, window, frame: int, function: str) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        return _scale_to_8bit(apply_color_lut(values.astype(np.uint16), ds), ds, lut=True)
    if values.ndim == 3:  # RGB (YBR_* are decoded to RGB by pydicom)
        return _scale_to_8bit(values, ds)
    if values.dtype.kind in "iu":
        low, high = int(values.min()), int(values.max())
        if high - low < 1 << 20:  # window every possible value once, then look up
            domain = np.arange(low, high + 1, dtype=np.int64)
            lut = _grey(ds, domain, window, frame, function, photometric)
            return lut.take(_offsets(values, low))
    return _grey(ds, values, window, frame, function, photometric)


def _offsets(values: np.ndarray, low: int) -> np.ndarray:
    """`values - low`, each value's place in a look-up table from `low`: subtracted in the
    values' own type, whose wrap-around is exact modulo 2**bits, and read unsigned (every
    difference is below 2**bits). A 512² int16 frame: 0.05 ms, and `take` with it 0.19 ms
    where indexing with an int32 copy took 0.35 ms."""
    unsigned = np.dtype(f"u{values.dtype.itemsize}")
    return np.subtract(values, values.dtype.type(low)).view(unsigned)


def _grey(ds: Dataset, values: np.ndarray, window, frame: int, function: str, photometric: str):
    grey = _voi(ds, values, window, frame, function)
    inverse = photometric == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE":
        inverse = not inverse
    if inverse:
        grey = 255.0 - grey
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def _voi(ds: Dataset, values: np.ndarray, window, frame: int, asked: str) -> np.ndarray:
    """Grey levels 0-255 (float) from modality values; `asked` overrides the file's
    VOI LUT Function."""
    function = asked or str(ds.get("VOILUTFunction") or "LINEAR").upper()
    if window is None:
        group = _functional_group(ds, frame, "FrameVOILUTSequence")
        source = group if group is not None and "WindowCenter" in group else ds
        window = _first_window(source)
        if group is not None and not asked:
            function = str(group.get("VOILUTFunction", function) or function).upper()
    if window is not None:
        return window_to_grey(values, window[0], window[1], function)
    if ds.get("VOILUTSequence"):
        return _voi_lut(values, ds.VOILUTSequence[0])
    low, high = float(values.min()), float(values.max())
    return window_to_grey(values, (low + high) / 2, max(high - low, 1.0), "LINEAR_EXACT")


def _voi_lut(values: np.ndarray, item: Dataset) -> np.ndarray:
    """PS3.3 C.11.2.1.1: input below the first mapped value takes the first entry, above
    the last takes the last; entries scale from their bit depth to 0-255."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    data = item.LUTData
    if isinstance(data, bytes):
        data = np.frombuffer(data, dtype="<u2" if bits > 8 else "u1")
    lut = np.asarray(data, dtype=np.float64)[:entries]
    index = np.clip(np.rint(values).astype(np.int64) - first, 0, len(lut) - 1)
    return lut[index] * 255.0 / (2 ** (bits or 16) - 1)


def _first_window(ds: Dataset) -> tuple[float, float] | None:
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    try:
        return (float(center), float(width)) if center is not None and width is not None else None
    except (TypeError, ValueError):
        return None


def _first(value):
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return value[0] if len(value) else None
    return value


def window_to_grey(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID), output 0-255."""
    x = values.astype(np.float64)
    if function == "SIGMOID":
        if width <= 0:
            raise RenderError(400, "Window Width must be greater than 0 for SIGMOID")
        return 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise RenderError(400, "Window Width must be greater than 0 for LINEAR_EXACT")
        return np.clip(((x - center) / width + 0.5) * 255.0, 0.0, 255.0)
    if width < 1:
        raise RenderError(400, "Window Width must be at least 1 for LINEAR")
    if width == 1:
        return np.where(x <= center - 0.5, 0.0, 255.0)
    return np.clip(((x - (center - 0.5)) / (width - 1) + 0.5) * 255.0, 0.0, 255.0)


def _scale_to_8bit(arr: np.ndarray, ds: Dataset, lut: bool = False) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if lut:
        top = float(arr.max()) if arr.size else 255.0
        bits = 16 if top > 255 else 8
    else:
        bits = int(ds.get("BitsStored", 8) or 8)
    if bits <= 8:
        return arr.astype(np.uint8)
    return np.clip(np.rint(arr.astype(np.float64) * 255.0 / (2**bits - 1)), 0, 255).astype(np.uint8)


# -- geometry and encoding ----------------------------------------------------------


def _region(image: np.ndarray, region) -> np.ndarray:
    if region is None:
        return image
    height, width = image.shape[:2]
    left, top, right, bottom = region
    if max(region) <= 1.0:
        left, right = left * width, right * width
        top, bottom = top * height, bottom * height
    box = [int(round(v)) for v in (left, top, right, bottom)]
    box = [
        min(max(v, 0), limit) for v, limit in zip(box, (width, height, width, height), strict=True)
    ]
    if box[2] <= box[0] or box[3] <= box[1]:
        raise RenderError(400, "region is empty")
    return image[box[1] : box[3], box[0] : box[2]]


def _resize(picture: Image.Image, request: Request) -> Image.Image:
    rows, columns = request.rows, request.columns
    if rows is None and columns is None:
        return picture
    width, height = picture.size
    if request.exact_size and rows and columns:
        size = (columns, rows)
    else:
        scale = min((columns or request.max_size) / width, (rows or request.max_size) / height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
    if size == picture.size:
        return picture
    return picture.resize(
        size, Image.Resampling.BILINEAR if size[0] < width else Image.Resampling.BICUBIC
    )


def _annotate(picture: Image.Image, ds: Dataset, kinds: tuple[str, ...]) -> None:
    lines = []
    if "patient" in kinds:
        lines.append(f"{ds.get('PatientName', '')}  {ds.get('PatientID', '')}")
    if "technique" in kinds:
        lines.append(
            " ".join(str(ds.get(k, "")) for k in ("Modality", "SeriesDescription")).strip()
        )
    draw = ImageDraw.Draw(picture)
    fill = 255 if picture.mode == "L" else (255, 255, 255)
    draw.multiline_text((4, 4), "\n".join(lines), fill=fill)


def _encode(picture: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        picture.save(buffer, "JPEG", quality=quality)
    elif fmt == "gif":
        picture.save(buffer, "GIF")
    else:
        # zlib's run-length strategy after PNG's row filters: faster, and ~20 % smaller
        # on CT and MR, than the default.
        picture.save(buffer, "PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buffer.getvalue()
