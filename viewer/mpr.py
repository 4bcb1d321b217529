"""Multiplanar reformatting: axial, coronal and sagittal planes cut with numpy from a
volume decoded once and cached, each returned with square pixels and the mapping from
its pixels to patient coordinates (so a crosshair can link the three).

A volume is the series' slices (viewer.geometry.volume: checked to be one) decoded by the
render pipeline's decode and Modality LUT stages, stacked in slice order as int16 (float32
when the values do not fit), and kept in a VolumeCache bounded by `volume_cache_mb`. A
volume over the bound is refused before any pixel is read, from the index's JSON (its
size, and float32 when a header says so), or at the first slice whose values need float32
when only they say so; either way the refusal is remembered. A plane's modality values
then go through the rest of the one pipeline
(`render.render_values`: VOI, presentation, encoding). No Flask here; the contract is
docs/viewer-api.md, section 3.
"""

import logging
import threading
import time
from collections import OrderedDict
from collections import deque
from collections.abc import Callable
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from viewer import render
from viewer.geometry import Volume
from viewer.render import RenderError

log = logging.getLogger(__name__)

PLANES = ("axial", "coronal", "sagittal")
# Each plane: the patient axis (x 0, y 1, z 2) its normal is closest to, then the patient
# direction of its image's columns and of its rows, the radiological way: axial with the
# patient's right on the image's left and anterior up; coronal and sagittal head up,
# sagittal with anterior on the left (PS3.3 C.7.6.2.1.1: +x left, +y posterior, +z head).
LAYOUT = {
    "axial": (2, (0, +1), (1, +1)),
    "coronal": (1, (0, +1), (2, -1)),
    "sagittal": (0, (1, +1), (2, -1)),
}
DECODE_THREADS = 4
DECODE_AHEAD = 8  # slices decoded ahead of the one copied into the volume
PLANS_KEPT = 256  # series geometries remembered (a few KiB each)
INT16, FLOAT32 = 2, 4  # bytes a voxel takes
RESCALE = ("00281053", "00281052")  # Rescale Slope, Rescale Intercept (DICOM JSON keys)
MODALITY_LUT = "00283000"  # Modality LUT Sequence
VOLUME_IDLE = 300.0  # s a volume stays cached unasked (a reader scrolling MPR asks often)
EXACT = 1e-6  # relative: a spacing this close to the output pixel needs no resampling


@dataclass(frozen=True)
class Plane:
    """How plane `name` is cut from the volume array (axes k, r, c = 0, 1, 2): the array
    axis along its normal, the array axes shown as its image's columns and rows (each
    maybe reversed), and where its pixels lie in the patient."""

    name: str
    normal_axis: int
    column_axis: int
    column_reversed: bool
    row_axis: int
    row_reversed: bool
    count: int  # indices along the normal
    width: int  # output pixels
    height: int
    pixel: float  # mm, both directions
    origin: np.ndarray  # patient position of the top-left pixel's centre at index 0
    column: np.ndarray  # patient mm vector of one output column to the right
    row: np.ndarray  # … of one output row down
    step: np.ndarray  # … of one index along the normal

    def describe(self) -> dict:
        return {
            "count": self.count,
            "width": self.width,
            "height": self.height,
            "pixel": self.pixel,
            "origin": _rounded(self.origin),
            "column": _rounded(self.column),
            "row": _rounded(self.row),
            "step": _rounded(self.step),
        }

    def headers(self, index: int) -> dict[str, str]:
        """Where this image's pixels lie: Minipacs-Plane-* (docs/viewer-api.md)."""
        origin = self.origin + index * self.step
        return {
            "Minipacs-Plane-Origin": ",".join(map(str, _rounded(origin))),
            "Minipacs-Plane-Column": ",".join(map(str, _rounded(self.column))),
            "Minipacs-Plane-Row": ",".join(map(str, _rounded(self.row))),
            "Minipacs-Plane-Index": str(index),
            "Minipacs-Plane-Count": str(self.count),
        }


def planes(volume: Volume) -> dict[str, Plane]:
    """The three planes of a volume, each perpendicular to the array axis closest to its
    patient axis (one array axis per plane)."""
    rows, columns, gap = volume.spacing
    # Array axes k, r, c: their patient vectors (mm per index) and their lengths.
    vectors = [gap * volume.normal, rows * volume.column_cosines, columns * volume.row_cosines]
    sizes = [len(volume.order), volume.rows, volume.columns]
    spacings = [gap, rows, columns]
    units = [v / np.linalg.norm(v) for v in vectors]
    # The array axis of each patient axis x, y, z: the assignment most aligned overall.
    best = max(permutations(range(3)), key=lambda p: sum(abs(units[p[i]][i]) for i in range(3)))
    axis_of = dict(enumerate(best))  # patient axis → array axis
    found = {}
    for name, (patient, (col_patient, col_sign), (row_patient, row_sign)) in LAYOUT.items():
        normal = axis_of[patient]
        col_axis, row_axis = axis_of[col_patient], axis_of[row_patient]
        col_reversed = units[col_axis][col_patient] * col_sign < 0
        row_reversed = units[row_axis][row_patient] * row_sign < 0
        pixel = min(spacings[col_axis], spacings[row_axis])
        origin = volume.origin.copy()
        if col_reversed:
            origin = origin + (sizes[col_axis] - 1) * vectors[col_axis]
        if row_reversed:
            origin = origin + (sizes[row_axis] - 1) * vectors[row_axis]
        found[name] = Plane(
            name=name,
            normal_axis=normal,
            column_axis=col_axis,
            column_reversed=col_reversed,
            row_axis=row_axis,
            row_reversed=row_reversed,
            count=sizes[normal],
            width=_resampled_size(sizes[col_axis], spacings[col_axis], pixel),
            height=_resampled_size(sizes[row_axis], spacings[row_axis], pixel),
            pixel=pixel,
            origin=origin,
            column=units[col_axis] * pixel * (-1 if col_reversed else 1),
            row=units[row_axis] * pixel * (-1 if row_reversed else 1),
            step=vectors[normal],
        )
    return found


def cut(values: np.ndarray, volume: Volume, plane: Plane, index: int) -> np.ndarray:
    """Modality values of the plane at `index`, rows × columns, square pixels."""
    if not 0 <= index < plane.count:
        raise RenderError(400, f"{plane.name} index {index} is outside 0-{plane.count - 1}")
    taken = np.take(values, index, axis=plane.normal_axis)
    # The two axes left keep their order (k, r, c without the normal): rows first?
    remaining = [axis for axis in range(3) if axis != plane.normal_axis]
    if remaining.index(plane.row_axis) != 0:
        taken = taken.T
    if plane.row_reversed:
        taken = taken[::-1]
    if plane.column_reversed:
        taken = taken[:, ::-1]
    spacing = (_spacing(volume, plane.row_axis), _spacing(volume, plane.column_axis))
    taken = _resample(taken, 0, spacing[0], plane.pixel)
    return _resample(taken, 1, spacing[1], plane.pixel)


def _spacing(volume: Volume, axis: int) -> float:
    rows, columns, gap = volume.spacing
    return (gap, rows, columns)[axis]


def _resampled_size(size: int, spacing: float, pixel: float) -> int:
    """Output pixels along an axis of `size` samples `spacing` mm apart: from the first
    sample to the pixel nearest the last (within half a pixel beyond it, where the last
    sample's value is shown), so both end slices of a volume are in the plane."""
    return int(np.floor((size - 1) * spacing / pixel + 0.5)) + 1


def _resample(values: np.ndarray, axis: int, spacing: float, pixel: float) -> np.ndarray:
    """`values` sampled every `pixel` mm along `axis` (samples `spacing` mm apart), from
    the first sample, by linear interpolation (the last output pixel, up to half a pixel
    past the last sample, takes its value); unchanged when the spacing is the pixel."""
    if abs(spacing - pixel) <= EXACT * pixel:
        return values
    size = values.shape[axis]
    where = np.arange(_resampled_size(size, spacing, pixel)) * (pixel / spacing)
    below = np.minimum(where.astype(np.int64), size - 1)
    above = np.minimum(below + 1, size - 1)
    weight = (where - below).astype(np.float32)
    shape = [1, 1]
    shape[axis] = -1
    weight = weight.reshape(shape)
    low = np.take(values, below, axis=axis).astype(np.float32)
    high = np.take(values, above, axis=axis).astype(np.float32)
    return low + (high - low) * weight


# -- the volume cache -----------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the index's JSON says of one set of a series' instances, remembered so that a
    plane's request parses none of it again: the volume, or why the series is not one, and
    the bytes a voxel of its decoded volume takes at least (FLOAT32 when a header says the
    values are not integers, or once decoding found a slice beyond int16; else INT16)."""

    volume: Volume | str
    voxel: int = INT16


def voxel_bytes(headers: Iterable[dict]) -> int:
    """FLOAT32 when a slice's Rescale Slope or Intercept (stored DICOM JSON) is not an
    integer, so its modality values are float32 (render._modality), else INT16: integer
    values may still go beyond int16, which only the pixels tell. A slice with a Modality
    LUT Sequence is skipped: render._modality applies the LUT (integers) and ignores the
    rescale then."""
    for header in headers:
        if MODALITY_LUT in header:
            continue
        for tag in RESCALE:
            values = (header.get(tag) or {}).get("Value") or [0]
            try:
                number = float(values[0] or 0)
            except (TypeError, ValueError):
                continue  # render._modality would fail on it too: decoding says so
            if not number.is_integer():
                return FLOAT32
    return INT16


class OverBound(RenderError):
    """A volume that cannot fit in the cache (422)."""

    def __init__(self, need: int, bound: int, voxel: int) -> None:
        beyond = " (values beyond int16)" if voxel == FLOAT32 else ""
        super().__init__(
            422,
            f"the volume needs {need >> 20} MiB{beyond}, over volume_cache_mb ({bound >> 20} MiB)",
        )


@dataclass
class Loaded:
    """A decoded volume: its modality values [k, r, c] and the header of its first slice
    (for the file's window and photometric interpretation)."""

    values: np.ndarray
    header: Dataset


class VolumeCache:
    """Decoded volumes, least recently used out first, bounded in bytes. One volume is
    decoded at a time (a lock): concurrent asks for one series decode it once, and the
    memory held while decoding stays one volume's. A volume nobody asked for in `idle`
    seconds is dropped, so a server that showed one MPR returns to its idle memory. The
    plans of the last PLANS_KEPT sets of instances are remembered beside them: a series
    refused (not a volume, over the bound) is refused again without reading anything."""

    def __init__(self, max_bytes: int, idle: float = VOLUME_IDLE) -> None:
        self.max_bytes = max_bytes
        self.idle = idle
        self.bytes = 0
        self._items: OrderedDict[tuple, Loaded] = OrderedDict()
        self._used: dict[tuple, float] = {}
        self._timer: threading.Timer | None = None
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._lock = threading.Lock()
        self._building = threading.Lock()

    def plan(self, key: tuple) -> Plan | None:
        """The plan remembered for `key`, or None (not worked out yet); each plane's
        request then skips parsing every slice's JSON."""
        with self._lock:
            found = self._plans.get(key)
            if found is not None:
                self._plans.move_to_end(key)
            return found

    def remember(self, key: tuple, plan: Plan) -> None:
        with self._lock:
            self._plans[key] = plan
            self._plans.move_to_end(key)
            while len(self._plans) > PLANS_KEPT:
                self._plans.popitem(last=False)

    def get(
        self,
        key: tuple,
        plan: Plan,
        paths: Callable[[], list[Path]],
        native: bool,
        pixel_budget: int | None,
    ) -> Loaded:
        """The volume under `key` (the series and its instances), of `plan`, decoded when
        not cached from the files `paths()` gives (in slice order; `native`: all
        uncompressed); 422 when it cannot fit in the cache: from its plan before any file
        is asked for, else at the first slice whose values need float32 (remembered)."""
        found = self._cached(key)
        if found is not None:
            return found
        volume = plan.volume
        assert isinstance(volume, Volume)
        voxels = volume.rows * volume.columns * len(volume.order)
        self._check(voxels * plan.voxel, plan.voxel)  # at once, not after another's decode
        with self._building:
            found = self._cached(key)
            if found is not None:
                return found
            # Another request may have learned float32 (and been refused) meanwhile.
            plan = self.plan(key) or plan
            self._make_room(voxels * plan.voxel, plan.voxel)
            started = time.monotonic()
            try:
                loaded = decode_volume(
                    paths(),
                    native,
                    volume,
                    plan.voxel == FLOAT32,
                    pixel_budget,
                    lambda nbytes: self._make_room(nbytes, FLOAT32),
                )
            except OverBound:  # int16 fitted, float32 does not: next time, refused at once
                self.remember(key, Plan(volume, FLOAT32))
                raise
            if loaded.values.dtype == np.float32 and plan.voxel != FLOAT32:
                self.remember(key, Plan(volume, FLOAT32))  # room made for it next time
            log.info(
                "volume of %d slices decoded in %.2f s (%d MiB)",
                len(volume.order),
                time.monotonic() - started,
                loaded.values.nbytes >> 20,
            )
            self._put(key, loaded)
            return loaded

    def _cached(self, key: tuple) -> Loaded | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self._used[key] = time.monotonic()
            return found

    def _check(self, need: int, voxel: int) -> None:
        if need > self.max_bytes:
            raise OverBound(need, self.max_bytes, voxel)

    def _make_room(self, need: int, voxel: int) -> None:
        """Cached volumes dropped, oldest first, until `need` more bytes fit the bound;
        OverBound when they never can (`voxel`: the bytes a voxel takes, for its message)."""
        self._check(need, voxel)
        with self._lock:
            while self._items and self.bytes + need > self.max_bytes:
                self._drop(next(iter(self._items)))

    def _put(self, key: tuple, loaded: Loaded) -> None:
        with self._lock:
            self._items[key] = loaded
            self._used[key] = time.monotonic()
            self.bytes += loaded.values.nbytes
            while self.bytes > self.max_bytes and len(self._items) > 1:
                self._drop(next(iter(self._items)))
            self._schedule()

    def expire(self) -> None:
        """Drop the volumes idle for `idle` seconds (run by a timer while any is held)."""
        with self._lock:
            self._timer = None
            now = time.monotonic()
            for key in [k for k, used in self._used.items() if now - used >= self.idle]:
                self._drop(key)
            self._schedule()

    def _schedule(self) -> None:
        """With the lock held: a timer for the next expiry, if any volume is held."""
        if self._items and self._timer is None:
            due = min(self._used.values()) + self.idle - time.monotonic()
            self._timer = threading.Timer(max(due, 0.0) + 0.01, self.expire)
            self._timer.daemon = True
            self._timer.start()

    def _drop(self, key: tuple) -> None:
        old = self._items.pop(key)
        del self._used[key]
        self.bytes -= old.values.nbytes


def decode_volume(
    paths: list[Path],
    native: bool,
    volume: Volume,
    float32: bool,
    pixel_budget: int | None,
    room: Callable[[int], None],
) -> Loaded:
    """Each slice through the render pipeline's decode and Modality LUT, into one array:
    int16 while the values fit, float32 from the first slice that does not (from the
    start when `float32`). Before that conversion, `room(nbytes)` makes room for the
    float32 volume in the cache, or raises OverBound (then the slices after are not read).
    The first slice is read whole (its header is the planes' VOI and its checks the
    pipeline's); the rest, when uncompressed (`native`), through
    render.native_frame_values. A few threads decode at once (file reads and numpy leave
    the GIL), at most DECODE_AHEAD slices ahead of the copy into the volume, so memory
    stays the volume's."""
    header, first = render.frame_values(paths[0], 1, None, pixel_budget)
    dtype = np.float32 if float32 else np.int16
    values = np.empty((len(paths), volume.rows, volume.columns), dtype=dtype)

    def decode(path: Path) -> np.ndarray:
        if not native:
            return render.frame_values(path, 1, None, pixel_budget)[1]
        try:
            return render.native_frame_values(path)
        except Exception as exc:  # a slice cut short, unreadable: say so
            raise RenderError(422, f"cannot decode a slice's pixel data: {exc}") from exc

    pending: deque[Future] = deque()
    with ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="mpr") as pool:
        try:
            ahead = 1  # the next slice to hand to the pool
            for k in range(len(paths)):
                while ahead < len(paths) and ahead - k <= DECODE_AHEAD:
                    pending.append(pool.submit(decode, paths[ahead]))
                    ahead += 1
                slice_values = first if k == 0 else pending.popleft().result()
                if slice_values.shape != values.shape[1:]:
                    raise RenderError(
                        422, f"slice {k} decodes to {slice_values.shape}, not a slice"
                    )
                if values.dtype == np.int16 and not _fits_int16(slice_values):
                    room(values.size * FLOAT32)
                    values = values.astype(np.float32)
                values[k] = slice_values
        except BaseException:
            for future in pending:  # no more work for a volume that will not be
                future.cancel()
            raise
    return Loaded(values, header)


def _fits_int16(values: np.ndarray) -> bool:
    if values.dtype.kind not in "iu":
        return False
    if values.dtype.itemsize == 1 or values.dtype == np.int16:
        return True
    info = np.iinfo(np.int16)
    return values.size == 0 or (info.min <= values.min() and values.max() <= info.max)


def _rounded(vector: np.ndarray) -> list[float]:
    return [round(float(v), 6) + 0.0 for v in vector]  # + 0.0: no "-0.0"
