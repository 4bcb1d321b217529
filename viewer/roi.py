"""ROI statistics in modality units: mean, SD, min, max, pixel count and area of an
ellipse or rectangle on one frame, computed from the stored pixel data after the Modality
LUT (the render pipeline's decode stage), never from a windowed image.

A pixel belongs to the ROI when its centre lies inside the shape; image pixel coordinates
have (0, 0) at the top-left corner of the top-left pixel (docs/viewer-api.md). No Flask.
"""

import math
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from viewer.errors import WebError

SHAPES = ("ellipse", "rectangle")


@dataclass(frozen=True)
class Shape:
    kind: str  # ellipse (inscribed in the box) or rectangle
    x0: float
    y0: float
    x1: float
    y1: float

    @classmethod
    def of(cls, kind: str, x0: float, y0: float, x1: float, y1: float) -> "Shape":
        """The shape with its box's corners put in order; 400 for an unknown kind or a
        box that is not finite."""
        if kind not in SHAPES:
            raise WebError(400, f"shape must be ellipse or rectangle, not {kind[:20]!r}")
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
            raise WebError(400, "ROI corners must be finite numbers")
        return cls(kind, min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def mask(shape: Shape, rows: int, columns: int) -> tuple[int, int, np.ndarray]:
    """(top row, left column, boolean mask) of the pixels of `shape` inside a rows ×
    columns image: only the box clipped to the image is evaluated. 400 when no pixel
    centre is inside."""
    left = max(0, math.ceil(shape.x0 - 0.5))
    right = min(columns - 1, math.floor(shape.x1 - 0.5))
    top = max(0, math.ceil(shape.y0 - 0.5))
    bottom = min(rows - 1, math.floor(shape.y1 - 0.5))
    if right < left or bottom < top:
        raise WebError(400, "the ROI holds no pixel centre of the image")
    y = np.arange(top, bottom + 1, dtype=np.float64)[:, None] + 0.5
    x = np.arange(left, right + 1, dtype=np.float64)[None, :] + 0.5
    if shape.kind == "rectangle":
        inside = np.ones((len(y), x.shape[1]), dtype=bool)
    else:
        a, b = (shape.x1 - shape.x0) / 2, (shape.y1 - shape.y0) / 2
        if a <= 0 or b <= 0:
            raise WebError(400, "the ROI holds no pixel centre of the image")
        cx, cy = (shape.x0 + shape.x1) / 2, (shape.y0 + shape.y1) / 2
        inside = ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0
    if not inside.any():
        raise WebError(400, "the ROI holds no pixel centre of the image")
    return top, left, inside


def statistics(
    values: np.ndarray,
    ds: Dataset,
    shape: Shape,
    spacing: tuple[float, float] | None,
    spacing_kind: str,
) -> dict:
    """The ROI's figures (docs/viewer-api.md section 2) over modality `values` of a frame."""
    if values.ndim != 2:
        raise WebError(422, "ROI statistics are for greyscale images")
    top, left, inside = mask(shape, *values.shape)
    window = values[top : top + inside.shape[0], left : left + inside.shape[1]]
    chosen = window[inside].astype(np.float64)
    count = int(chosen.size)
    area, area_unit = float(count), "px2"
    if spacing is not None:
        area, area_unit = count * spacing[0] * spacing[1], "mm2"
    return {
        "mean": float(chosen.mean()),
        "sd": float(chosen.std()),
        "min": _number(chosen.min()),
        "max": _number(chosen.max()),
        "pixels": count,
        "area": area,
        "areaUnit": area_unit,
        "unit": unit(ds),
        "spacingKind": spacing_kind,
    }


def unit(ds: Dataset) -> str:
    """What the modality values measure: the Rescale Type (0028,1054), else HU for CT,
    else "US" (unspecified, PS3.3 C.11.1.1.2)."""
    kind = str(ds.get("RescaleType", "") or "").strip()
    if kind:
        return kind
    return "HU" if str(ds.get("Modality", "")).upper() == "CT" else "US"


def _number(value) -> float | int:
    number = float(value)
    return int(number) if number.is_integer() else number
