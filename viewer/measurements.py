"""A study's measurements and key images as DICOM: a TID 1500 Measurement Report
(Comprehensive 3D SR) and a Key Object Selection document, built with highdicom, and the
measurements read back from such a report so the viewer can reopen them.

highdicom builds and checks the content trees (templates, codes, references): a
well-kept builder rather than SR trees made by hand. It is imported only here, and this
module only when a report is saved or read (server processes import what they use).
The request and answer shapes are docs/viewer-api.md, section 4. No Flask here.

Each measurement is one planar ROI measurement group (TID 1410) on its image, its
coordinates SCOORD in image pixel coordinates (PS3.3 C.18.6.1.1: (0, 0) the top-left
corner of the top-left pixel, as the viewer's): a length is a 2-point POLYLINE with a
Length, an angle a 3-point POLYLINE (vertex in the middle) with an Angle, an ellipse an
ELLIPSE (major axis end points, then minor), a rectangle a closed 5-point POLYGON, each
ROI with its Area, Mean, Standard Deviation, Minimum and Maximum.
"""

import io
import logging
import math
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime

import numpy as np
from pydicom.dataset import Dataset

from viewer.errors import WebError

log = logging.getLogger(__name__)

TYPES = {"length": 2, "angle": 3, "ellipse": 2, "rectangle": 2}  # type → points given
ROI_TYPES = ("ellipse", "rectangle")
MAX_ITEMS = 1000  # measurements or key images in one report
SERIES_DESCRIPTION = "minipacs measurements"
KOS_DESCRIPTION = "minipacs key images"
SR_SERIES_NUMBER, KOS_SERIES_NUMBER = 990, 991
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
KEY_OBJECT_SELECTION = "1.2.840.10008.5.1.4.1.1.88.59"
SR_DOCUMENTS = "1.2.840.10008.5.1.4.1.1.88."  # the SR SOP classes' prefix (KOS included)
IMAGING_MEASUREMENTS = "126010"  # (126010, DCM): TID 1500 row 6, the groups' container
# Document titles (Concept Name of the root, PS3.16): TID 1500's Imaging Measurement
# Report and TID 2010's "Of Interest" (CID 7010: a rejection note or "For Teaching" is
# not the reader's key images).
TITLES = {COMPREHENSIVE_3D_SR: ("126000", "DCM"), KEY_OBJECT_SELECTION: ("113000", "DCM")}
EARLIEST = datetime.min.replace(tzinfo=UTC)
# What `titled` and `moment` read, as DICOM JSON tags: SOP Class UID, Content Date and
# Time, Timezone Offset From UTC, Concept Name Code Sequence (the title).
HEADER_TAGS = ["00080016", "00080023", "00080033", "00080201", "0040A043"]


@dataclass
class Item:
    """One measurement of the request; `value`/`unit` and `stats` are the server's."""

    kind: str
    sop_uid: str
    frame: int
    points: list[tuple[float, float]]
    value: float | None = None
    unit: str = ""
    stats: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        found: dict = {
            "type": self.kind,
            "sopInstanceUID": self.sop_uid,
            "frame": self.frame,
            "points": [list(p) for p in self.points],
        }
        if self.kind in ROI_TYPES:
            found["stats"] = self.stats
        else:
            found |= {"value": self.value, "unit": self.unit}
        return found


def parse(body: object) -> tuple[list[Item], list[tuple[str, int]], str]:
    """(measurements, key images as (SOP UID, frame), description) of a POST body; 400
    saying what is wrong. Both lists may be empty: such a save clears what was saved."""
    if not isinstance(body, dict):
        raise WebError(400, "the body must be a JSON object")
    measurements = body.get("measurements", [])
    keys = body.get("keyImages", [])
    if not isinstance(measurements, list) or not isinstance(keys, list):
        raise WebError(400, "measurements and keyImages must be lists")
    if len(measurements) > MAX_ITEMS or len(keys) > MAX_ITEMS:
        raise WebError(400, f"at most {MAX_ITEMS} measurements and key images")
    items = [_item(found, n) for n, found in enumerate(measurements)]
    key_images = [_reference(found, f"keyImages[{n}]") for n, found in enumerate(keys)]
    description = body.get("description", "")
    if not isinstance(description, str) or len(description) > 1024:
        raise WebError(400, "description must be text of at most 1024 characters")
    return items, key_images, description


def _item(found: object, n: int) -> Item:
    where = f"measurements[{n}]"
    if not isinstance(found, dict):
        raise WebError(400, f"{where} must be an object")
    kind = found.get("type")
    if kind not in TYPES:
        raise WebError(400, f"{where}.type must be one of {', '.join(TYPES)}")
    sop, frame = _reference(found, where)
    points = found.get("points")
    if not isinstance(points, list) or len(points) != TYPES[kind]:
        raise WebError(400, f"{where}.points must be {TYPES[kind]} [x, y] pairs for a {kind}")
    pairs = []
    for point in points:
        if not isinstance(point, list) or len(point) != 2 or not all(_finite(v) for v in point):
            raise WebError(400, f"{where}.points must be [x, y] pairs of finite numbers")
        pairs.append((float(point[0]), float(point[1])))
    return Item(kind, sop, frame, pairs)


def _reference(found: object, where: str) -> tuple[str, int]:
    from storage.dataset import is_uid

    if not isinstance(found, dict):
        raise WebError(400, f"{where} must be an object")
    sop = found.get("sopInstanceUID")
    if not isinstance(sop, str) or not is_uid(sop):
        raise WebError(400, f"{where}.sopInstanceUID must be a UID")
    frame = found.get("frame", 1)
    if not isinstance(frame, int) or isinstance(frame, bool) or frame < 1:
        raise WebError(400, f"{where}.frame must be a whole number from 1")
    return sop, frame


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# -- values the server works out --------------------------------------------------------


def measure(item: Item, spacing: tuple[float, float] | None, spacing_kind: str) -> None:
    """A length in mm (px with no spacing; mm at the detector with only Imager Pixel
    Spacing) or an angle in degrees, from the points and the pixel spacing: the server's
    figure, not the client's."""
    row, column = spacing or (1.0, 1.0)
    scaled = [np.array([x * column, y * row]) for x, y in item.points]
    if item.kind == "length":
        item.value = float(np.linalg.norm(scaled[1] - scaled[0]))
        item.unit = "px" if spacing is None else "mm"
        if spacing_kind == "detector":
            item.unit = "mm (detector)"
    elif item.kind == "angle":
        a, b = scaled[0] - scaled[1], scaled[2] - scaled[1]
        norms = float(np.linalg.norm(a) * np.linalg.norm(b))
        if norms == 0:
            raise WebError(400, "an angle's arms must not be of zero length")
        cosine = float(np.clip(np.dot(a, b) / norms, -1.0, 1.0))
        item.value, item.unit = math.degrees(math.acos(cosine)), "deg"


# -- writing ------------------------------------------------------------------------------


def build_report(
    items: list[Item],
    images: dict[str, Dataset],
    observer: str,
    description: str,
    made: datetime,
    replaces: Dataset | None = None,
    study: list[Dataset] | None = None,
) -> bytes:
    """The Measurement Report (Comprehensive 3D SR) as Part 10 bytes, its content made at
    `made`. `images`: the referenced instances' headers by SOP Instance UID. `replaces`:
    the report this one supersedes, named in its Predecessor Documents Sequence (PS3.3
    C.17.2: the earlier version stays in the archive). With no item the report says the
    study has no measurements: its Imaging Measurements container is empty, and `study`
    (the study's instances, the first a whole header) is its evidence."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    groups = []
    for number, item in enumerate(items, start=1):
        image = images[item.sop_uid]
        region = hd.sr.ImageRegion(
            graphic_type=_graphic_type(item.kind),
            graphic_data=_graphic_data(item),
            source_image=_source_image(image, item.frame),
        )
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=hd.UID(), identifier=f"{item.kind} {number}"
                ),
                referenced_region=region,
                measurements=_measurements(item),
            )
        )
    observer_context = hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name=_person_name(observer)
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=observer_context),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups or [_placeholder_group()],
    )
    evidence = list({item.sop_uid: images[item.sop_uid] for item in items}.values())
    if not groups:
        _empty_measurements(report[0])
        evidence = study or []
    document = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="minipacs",
        series_description=description or SERIES_DESCRIPTION,
        previous_versions=[replaces] if replaces is not None else None,
        content_date=made.date(),
        content_time=made.time(),
    )
    document.TimezoneOffsetFromUTC = made.strftime("%z")
    return _bytes(document)


def _placeholder_group():
    """A TID 1501 group that `_empty_measurements` removes again: highdicom (0.28) builds
    no TID 1500 report without a group, though the template allows one (the groups under
    Imaging Measurements are optional; docs/decisions.md, 2026-12-05)."""
    import highdicom as hd

    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="none")
    )


def _empty_measurements(root: Dataset) -> None:
    """The report's Imaging Measurements container without children: no Content Sequence
    (PS3.3 C.17.3: present only when the item has children, then with one or more)."""
    container = _imaging_measurements(root)
    if container is not None and "ContentSequence" in container:
        del container.ContentSequence


def _imaging_measurements(root: Dataset) -> Dataset | None:
    """The (126010, DCM, "Imaging Measurements") container under a TID 1500 root."""
    for item in root.get("ContentSequence", []):
        names = item.get("ConceptNameCodeSequence") or [Dataset()]
        if (
            names[0].get("CodeValue") == IMAGING_MEASUREMENTS
            and item.get("ValueType") == "CONTAINER"
        ):
            return item
    return None


def is_empty(report: Dataset) -> bool:
    """Whether a Measurement Report holds no measurement group (or is no TID 1500 one)."""
    container = _imaging_measurements(report)
    return container is None or not container.get("ContentSequence")


def reference(study: str, series: str, sop: str, sop_class: str) -> Dataset:
    """The identifiers highdicom lists an instance by (evidence, predecessors)."""
    found = Dataset()
    found.StudyInstanceUID, found.SeriesInstanceUID = study, series
    found.SOPInstanceUID, found.SOPClassUID = sop, sop_class
    return found


def header(elements: dict) -> Dataset:
    """A document's HEADER_TAGS from the index's DICOM JSON, for `titled` and `moment`:
    which documents are current is decided without opening their files."""
    return Dataset.from_json({tag: elements[tag] for tag in HEADER_TAGS if tag in elements})


def titled(header: Dataset) -> bool:
    """Whether a document is what the viewer saves (TITLES): a Measurement Report, or key
    images "Of Interest". Another system's CAD report or rejection note is left alone."""
    names = header.get("ConceptNameCodeSequence") or []
    if not names:
        return False
    code = (str(names[0].get("CodeValue", "")), str(names[0].get("CodingSchemeDesignator", "")))
    return code == TITLES.get(str(header.get("SOPClassUID", "")))


def moment(header: Dataset) -> datetime:
    """When a document's content was made: Content Date and Time (PS3.3 C.17.2), in its
    Timezone Offset From UTC when it has one, else this server's zone; the earliest time
    there is when they are absent or unreadable (such a document is the oldest)."""
    try:
        date = str(header.ContentDate)
        clock, _, fraction = str(header.get("ContentTime") or "").partition(".")
        text = date + clock.ljust(6, "0") + fraction.ljust(6, "0")[:6]
        found = datetime.strptime(text, "%Y%m%d%H%M%S%f")
        offset = str(header.get("TimezoneOffsetFromUTC") or "")
        if offset:
            return found.replace(tzinfo=datetime.strptime(offset, "%z").tzinfo)
        return found.astimezone()
    except (AttributeError, ValueError, OverflowError):
        return EARLIEST


def _person_name(user: str) -> str:
    """The observer's name as a PN: a user name is one component (a trailing ^ says so)."""
    name = (user or "minipacs").replace("\\", " ")[:60]
    return name if "^" in name else f"{name}^"


def build_key_images(
    references: list[tuple[str, int]], images: dict[str, Dataset], description: str, made: datetime
) -> bytes:
    """The Key Object Selection document ("Of Interest") as Part 10 bytes, its content made
    at `made` (the report saved with it has the same). highdicom's KOS references whole
    instances: a frame number is not kept."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    chosen = list({sop: images[sop] for sop, _ in references}.values())
    document = hd.ko.KeyObjectSelectionDocument(
        evidence=chosen,
        content=hd.ko.KeyObjectSelection(
            document_title=codes.DCM.OfInterest,
            referenced_objects=chosen,
            description=description or None,
        ),
        series_instance_uid=hd.UID(),
        series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="minipacs",
        series_description=KOS_DESCRIPTION,
        content_date=made.date(),
        content_time=made.time(),
    )
    _copy_patient_and_study(document, chosen[0])
    document.TimezoneOffsetFromUTC = made.strftime("%z")
    return _bytes(document)


def _copy_patient_and_study(document, image: Dataset) -> None:
    """The image's whole Patient and Study modules in the document. highdicom's KOS (0.28)
    copies only the Type 1/2 few (name, ID, birth date, sex, accession...): without
    Issuer of Patient ID a PACS that keys patients by ID and issuer files the selection
    under another patient, and without Study Description it disagrees with its study.
    An image of a SOP class highdicom has no IOD for keeps those few."""
    try:
        document.copy_patient_and_study_information(image)
    except KeyError:
        log.debug(
            "no IOD known for SOP class %s: patient and study copied in part",
            image.get("SOPClassUID"),
        )


def _graphic_type(kind: str):
    import highdicom as hd

    return {
        "length": hd.sr.GraphicTypeValues.POLYLINE,
        "angle": hd.sr.GraphicTypeValues.POLYLINE,
        "ellipse": hd.sr.GraphicTypeValues.ELLIPSE,
        "rectangle": hd.sr.GraphicTypeValues.POLYLINE,
    }[kind]


def _graphic_data(item: Item) -> np.ndarray:
    if item.kind in ("length", "angle"):
        return np.array(item.points, dtype=np.float64)
    (x0, y0), (x1, y1) = item.points
    left, right, top, bottom = min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)
    if right == left or bottom == top:
        raise WebError(400, f"a {item.kind} needs a box of non-zero width and height")
    if item.kind == "rectangle":
        corners = [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]
        return np.array(corners, dtype=np.float64)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    horizontal = [(left, cy), (right, cy)]
    vertical = [(cx, top), (cx, bottom)]
    major, minor = (
        (horizontal, vertical) if right - left >= bottom - top else (vertical, horizontal)
    )
    return np.array(major + minor, dtype=np.float64)


def _source_image(image: Dataset, frame: int):
    """The image a region is drawn on (TID 1410 SELECTED FROM), with the frame whenever the
    instance has more than one: Referenced Frame Number is required for a multi-frame
    image (PS3.3 Table 10-3), and the region is on that frame's pixels. highdicom's
    from_source_image allows a frame number only in a multi-frame SOP class (the IOD has
    Number of Frames); a single-frame class with Number of Frames > 1 (a legacy Secondary
    Capture) is referenced through the constructor, after from_source_image has checked
    that the instance is an image. 400 for a frame the instance does not have."""
    import highdicom as hd

    frames = int(image.get("NumberOfFrames") or 1)
    if frame > frames:
        raise WebError(400, f"frame {frame} of {image.SOPInstanceUID}: it has {frames}")
    source = hd.sr.SourceImageForRegion.from_source_image(image)
    if frames == 1:
        return source
    return hd.sr.SourceImageForRegion(
        image.SOPClassUID, image.SOPInstanceUID, referenced_frame_numbers=[frame]
    )


def _measurements(item: Item) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if item.kind == "length":
        return [hd.sr.Measurement(codes.SCT.Length, item.value or 0.0, _unit(item.unit))]
    if item.kind == "angle":
        return [hd.sr.Measurement(codes.SCT.Angle, item.value or 0.0, codes.UCUM.Degree)]
    stats = item.stats
    values = _unit(stats["unit"])
    return [
        hd.sr.Measurement(codes.SCT.Area, stats["area"], _unit(stats["areaUnit"])),
        hd.sr.Measurement(codes.SCT.Mean, stats["mean"], values),
        hd.sr.Measurement(codes.SCT.StandardDeviation, stats["sd"], values),
        hd.sr.Measurement(codes.SCT.Minimum, stats["min"], values),
        hd.sr.Measurement(codes.SCT.Maximum, stats["max"], values),
    ]


def _unit(text: str):
    """The UCUM code of a unit of ours (annotations in braces for what UCUM has no unit
    of: pixels, modality units of no known kind)."""
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    known = {
        "mm": codes.UCUM.Millimeter,
        "mm (detector)": codes.UCUM.Millimeter,
        "mm2": codes.UCUM.SquareMillimeter,
        "deg": codes.UCUM.Degree,
        "HU": codes.UCUM.HounsfieldUnit,
        "px": Code("{pixels}", "UCUM", "pixels"),
        "px2": Code("{pixels}", "UCUM", "pixels"),
    }
    return known.get(text) or Code(f"{{{text}}}", "UCUM", text)


def _bytes(document: Dataset) -> bytes:
    buffer = io.BytesIO()
    document.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# -- reading back -------------------------------------------------------------------------


UNITS_BACK = {"mm": "mm", "mm2": "mm2", "deg": "deg", "[hnsf'U]": "HU", "{pixels}": "px"}


def read_report(data: Dataset) -> list[dict]:
    """The measurements of a Measurement Report (as `Item.as_json`), from any TID 1500
    report whose groups are planar ROIs of the shapes we write."""
    import highdicom as hd

    if is_empty(data):  # highdicom's getters expect children there
        return []
    report = hd.sr.Comprehensive3DSR.from_dataset(data, copy=False)
    found = []
    for group in report.content.get_planar_roi_measurement_groups():
        region = group.roi
        if region is None:
            continue
        # GraphicData is FL (float32): rounded to 1/1000 pixel, what was sent comes back.
        points = [tuple(round(float(v), 3) for v in p) for p in region.value]
        graphic = region.graphic_type.value
        kind = _kind_back(graphic, len(points))
        if kind is None:
            continue
        reference = region.ContentSequence[0].ReferencedSOPSequence[0]  # SELECTED FROM
        sop = str(reference.ReferencedSOPInstanceUID)
        item = Item(kind, sop, _frame_back(reference), _points_back(kind, points))
        measured = {
            m.name.meaning: (float(m.value), m.unit.value) for m in group.get_measurements()
        }
        if kind in ROI_TYPES:
            unit = measured.get("Mean", (0.0, ""))[1]
            item.stats = {
                "area": measured.get("Area", (None,))[0],
                "areaUnit": "px2" if measured.get("Area", (0, ""))[1] == "{pixels}" else "mm2",
                "mean": measured.get("Mean", (None,))[0],
                "sd": measured.get("Standard Deviation", (None,))[0],
                "min": measured.get("Minimum", (None,))[0],
                "max": measured.get("Maximum", (None,))[0],
                "unit": UNITS_BACK.get(unit, unit.strip("{}")),
            }
        else:
            name = "Length" if kind == "length" else "Angle"
            value, unit = measured.get(name, (None, ""))
            item.value, item.unit = value, UNITS_BACK.get(unit, unit.strip("{}"))
        found.append(item.as_json())
    return found


def _frame_back(reference: Dataset) -> int:
    frames = reference.get("ReferencedFrameNumber")
    if frames is None or frames == "":
        return 1
    if not isinstance(frames, int | str):
        frames = frames[0]
    return int(frames)


def _kind_back(graphic: str, count: int) -> str | None:
    if graphic == "POLYLINE" and count in (2, 3):
        return "length" if count == 2 else "angle"
    if graphic == "ELLIPSE" and count == 4:
        return "ellipse"
    if graphic == "POLYLINE" and count == 5:
        return "rectangle"
    return None


def _points_back(kind: str, points: list[tuple[float, ...]]) -> list[tuple[float, float]]:
    """The two box corners of an ROI (top-left, bottom-right), else the points."""
    if kind not in ROI_TYPES:
        return [(p[0], p[1]) for p in points]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [(min(xs), min(ys)), (max(xs), max(ys))]


def read_key_images(data: Dataset) -> list[dict]:
    """The instances a Key Object Selection document references (frame 1: whole instances)."""
    found = []
    for item in data.get("ContentSequence", []):
        if item.get("ValueType") != "IMAGE":
            continue
        for reference in item.get("ReferencedSOPSequence", []):
            found.append({"sopInstanceUID": str(reference.ReferencedSOPInstanceUID), "frame": 1})
    return found
