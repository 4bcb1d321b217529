"""Where each image of a series lies in the patient, from the index's DICOM JSON (no file
is read), and whether the series forms a volume an MPR can be cut from.

The viewer needs this for orientation letters, the scale bar and measurements in mm;
`viewer.mpr` needs the volume check, so that a series that is not one (a localizer, a
stack with gaps, a tilted gantry) is refused rather than shown as a wrong picture.
No Flask here. The contract is docs/viewer-api.md, section 1.
"""

import json
from dataclasses import dataclass

import numpy as np

ROWS, COLUMNS, FRAMES = "00280010", "00280011", "00280008"
ORIENTATION, POSITION = "00200037", "00200032"
PIXEL_SPACING, IMAGER_PIXEL_SPACING = "00280030", "00181164"
THICKNESS, LOCATION, FRAME_OF_REFERENCE = "00180050", "00201041", "00200052"
INSTANCE_NUMBER, MODALITY = "00200013", "00080060"
SHARED_GROUPS, PIXEL_MEASURES, PLANE_ORIENTATION = "52009229", "00289110", "00209116"

MIN_SLICES = 3
COSINE_TOLERANCE = 1e-3  # orientations and spacings that differ less are the same
GAP_TOLERANCE = 0.01  # of the median gap (and at least GAP_FLOOR mm): regular spacing
GAP_FLOOR = 0.01  # mm


@dataclass(frozen=True)
class Image:
    """The geometry of one instance (its first frame for a multi-frame one)."""

    sop_uid: str
    instance_number: int | None
    frames: int
    rows: int | None
    columns: int | None
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row then column cosines
    position: tuple[float, ...] | None  # ImagePositionPatient of the top-left pixel's centre
    spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    spacing_kind: str  # "patient", "detector" (PS3.3 10.7.1.3) or "px"
    thickness: float | None
    location: float | None
    frame_of_reference: str | None

    def as_json(self) -> dict:
        return {
            "sopInstanceUID": self.sop_uid,
            "instanceNumber": self.instance_number,
            "frames": self.frames,
            "rows": self.rows,
            "columns": self.columns,
            "imageOrientationPatient": _list(self.orientation),
            "imagePositionPatient": _list(self.position),
            "pixelSpacing": _list(self.spacing),
            "spacingKind": self.spacing_kind,
            "sliceThickness": self.thickness,
            "sliceLocation": self.location,
            "frameOfReferenceUID": self.frame_of_reference,
        }


@dataclass(frozen=True)
class Volume:
    """Slices that form a regular volume: array index k (along the normal, ascending),
    row r, column c lie at `origin + c·Δc·row_cosines + r·Δr·column_cosines + k·gap·normal`."""

    order: tuple[str, ...]  # SOP Instance UIDs by ascending position along the normal
    rows: int
    columns: int
    spacing: tuple[float, float, float]  # (between rows, between columns, between slices)
    origin: np.ndarray
    row_cosines: np.ndarray  # X: the direction of increasing column
    column_cosines: np.ndarray  # Y: the direction of increasing row
    normal: np.ndarray  # X × Y
    frame_of_reference: str | None

    def describe(self) -> dict:
        return {
            "ok": True,
            "reason": "",
            "slices": len(self.order),
            "spacing": list(self.spacing),
            "order": list(self.order),
        }


class NotAVolume(ValueError):
    """The series does not form a volume; the message says which check failed."""


def image(sop_uid: str, stored: str | dict) -> Image:
    """One instance's geometry from its stored DICOM JSON (or that JSON parsed, when the
    caller reads more of it: viewer.reading's MPR)."""
    data = json.loads(stored) if isinstance(stored, str) else stored
    shared = _item(data, SHARED_GROUPS)
    orientation = _numbers(data, ORIENTATION) or _numbers(
        _item(shared, PLANE_ORIENTATION), ORIENTATION
    )
    spacing = _pair(_numbers(data, PIXEL_SPACING)) or _pair(
        _numbers(_item(shared, PIXEL_MEASURES), PIXEL_SPACING)
    )
    kind = "patient"
    if spacing is None:  # PS3.3 10.7.1.3: Imager Pixel Spacing is measured at the detector
        spacing = _pair(_numbers(data, IMAGER_PIXEL_SPACING))
        kind = "detector" if spacing else "px"
    return Image(
        sop_uid=sop_uid,
        instance_number=_int(data, INSTANCE_NUMBER),
        frames=_int(data, FRAMES) or 1,
        rows=_int(data, ROWS),
        columns=_int(data, COLUMNS),
        orientation=orientation if orientation and len(orientation) == 6 else None,
        position=_sized(_numbers(data, POSITION), 3),
        spacing=spacing,
        spacing_kind=kind,
        thickness=_number(data, THICKNESS),
        location=_number(data, LOCATION),
        frame_of_reference=_text(data, FRAME_OF_REFERENCE),
    )


def modality(text: str) -> str:
    return _text(json.loads(text), MODALITY) or ""


def volume(images: list[Image]) -> Volume:
    """The volume the images form, or NotAVolume saying why not (parallel slices of one
    size and spacing on one Frame of Reference, offset along their normal, regular gaps)."""
    if len(images) < MIN_SLICES:
        raise NotAVolume(
            f"a volume needs at least {MIN_SLICES} slices; the series has {len(images)}"
        )
    first = images[0]
    for found in images:
        if found.frames != 1:
            raise NotAVolume("multi-frame instances are not assembled into volumes")
        if found.orientation is None or found.position is None:
            raise NotAVolume("an image has no ImageOrientationPatient or ImagePositionPatient")
        if found.spacing_kind != "patient" or found.spacing is None:
            raise NotAVolume("an image has no PixelSpacing (mm in the patient)")
        if (found.rows, found.columns) != (first.rows, first.columns):
            raise NotAVolume("the images differ in Rows or Columns")
        if found.frame_of_reference != first.frame_of_reference:
            raise NotAVolume("the images are on different Frames of Reference")
        if not np.allclose(found.orientation, first.orientation, atol=COSINE_TOLERANCE):
            raise NotAVolume("the images are not parallel (ImageOrientationPatient differs)")
        if not np.allclose(found.spacing, first.spacing, rtol=COSINE_TOLERANCE):
            raise NotAVolume("the images differ in PixelSpacing")
    assert first.orientation is not None and first.spacing is not None
    cosines = np.asarray(first.orientation, dtype=np.float64)
    x, y = cosines[:3], cosines[3:]
    normal = np.cross(x, y)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2):
        raise NotAVolume("ImageOrientationPatient is not two orthogonal unit vectors")
    normal = normal / np.linalg.norm(normal)
    positions = np.asarray([found.position for found in images], dtype=np.float64)
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    distance, positions = distance[order], positions[order]
    gaps = np.diff(distance)
    if gaps.min() < GAP_FLOOR:
        raise NotAVolume("two images lie at the same position")
    gap = float(np.median(gaps))
    if np.abs(gaps - gap).max() > max(GAP_TOLERANCE * gap, GAP_FLOOR):
        raise NotAVolume(f"slice gaps differ: {gaps.min():.2f} to {gaps.max():.2f} mm")
    steps = np.diff(positions, axis=0)
    sideways = np.linalg.norm(steps - np.outer(gaps, normal), axis=1)
    if sideways.max() > max(GAP_TOLERANCE * gap, GAP_FLOOR):
        raise NotAVolume("slices are offset sideways (gantry tilt or sheared positions)")
    return Volume(
        order=tuple(images[i].sop_uid for i in order),
        rows=int(first.rows or 0),
        columns=int(first.columns or 0),
        spacing=(float(first.spacing[0]), float(first.spacing[1]), gap),
        origin=positions[0],
        row_cosines=x,
        column_cosines=y,
        normal=normal,
        frame_of_reference=first.frame_of_reference,
    )


def describe(volume_or_reason: Volume | str) -> dict:
    if isinstance(volume_or_reason, Volume):
        return volume_or_reason.describe()
    return {"ok": False, "reason": volume_or_reason}


# -- DICOM JSON values ----------------------------------------------------------------


def _values(data: dict | None, tag: str) -> list:
    if not data:
        return []
    return (data.get(tag) or {}).get("Value") or []


def _item(data: dict | None, tag: str) -> dict | None:
    values = _values(data, tag)
    return values[0] if values and isinstance(values[0], dict) else None


def _numbers(data: dict | None, tag: str) -> tuple[float, ...] | None:
    try:
        found = tuple(float(v) for v in _values(data, tag))
    except (TypeError, ValueError):
        return None
    return found or None


def _number(data: dict, tag: str) -> float | None:
    found = _numbers(data, tag)
    return found[0] if found else None


def _int(data: dict, tag: str) -> int | None:
    found = _number(data, tag)
    return int(found) if found is not None else None


def _text(data: dict, tag: str) -> str | None:
    values = _values(data, tag)
    return str(values[0]) if values and values[0] is not None else None


def _sized(values: tuple[float, ...] | None, size: int) -> tuple[float, ...] | None:
    return values if values and len(values) == size else None


def _pair(values: tuple[float, ...] | None) -> tuple[float, float] | None:
    if not values or len(values) != 2 or min(values) <= 0:
        return None
    return (values[0], values[1])


def _list(values) -> list[float] | None:
    return list(values) if values is not None else None
