"""The viewer's reading tools over HTTP, under /api: a series' geometry, ROI statistics,
MPR planes, and measurements saved as DICOM SR/KOS. Viewer-private: PS3.18 has no
resource for these. Contract: docs/viewer-api.md.

Geometry is answered from the index's DICOM JSON; ROI statistics and MPR read pixels
through the render pipeline (viewer.render), MPR from a volume cache (viewer.mpr).
Access is the one before_request check's (viewer/auth.py): GETs need the viewer role,
storing measurements the uploader role; the app's audit hook records each request.
"""

import hashlib
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from flask import Blueprint
from flask import Response
from flask import current_app
from flask import g
from flask import jsonify
from flask import request
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import ImplicitVRLittleEndian

from storage import Archive
from storage.dataset import is_uid
from storage.dataset import read_dataset
from storage.query import Key
from storage.rows import InstanceLocation
from viewer import geometry
from viewer import mpr
from viewer import render
from viewer import roi
from viewer import stow
from viewer.dicomweb import render_request
from viewer.errors import WebError
from viewer.errors import int_param

bp = Blueprint("reading", __name__, url_prefix="/api")

STUDY, SERIES, SOP, SOP_CLASS = 0x0020000D, 0x0020000E, 0x00080018, 0x00080016
MEASUREMENTS_BODY = 4 << 20  # bytes of a measurements POST
IMAGE_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
SERIES_PATH = "/studies/<study>/series/<series>"
# Uncompressed transfer syntaxes (not deflate, which pydicom cannot read a frame of).
NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian}


def _archive() -> Archive:
    return current_app.extensions["minipacs"]["archive"]


def _config():
    return current_app.extensions["minipacs"]["config"]


def _keys(study: str, series: str, sop: str = "") -> list[Key]:
    keys = []
    named = ((STUDY, study, "study"), (SERIES, series, "series"), (SOP, sop, "instance"))
    for tag, value, name in named:
        if tag != STUDY and not value:
            continue
        if not is_uid(value):
            raise WebError(400, f"{name} UID {value[:80]!r} is not a valid UID")
        keys.append(Key(tag, "UI", value))
    return keys


def _images(study: str, series: str) -> tuple[list[geometry.Image], str]:
    """The series' instances' geometry in stack order, and its modality; 404 if none."""
    found = list(_archive().catalog.instance_json("SERIES", _keys(study, series)))
    if not found:
        raise WebError(404, f"no series {series} of study {study} in the archive")
    return [geometry.image(sop, text) for sop, text in found], geometry.modality(found[0][1])


# -- geometry ---------------------------------------------------------------------------


@bp.get(f"{SERIES_PATH}/geometry")
def series_geometry(study: str, series: str) -> Response:
    images, modality = _images(study, series)
    try:
        volume = geometry.describe(geometry.volume(images))
    except geometry.NotAVolume as exc:
        volume = geometry.describe(str(exc))
    return jsonify(
        studyInstanceUID=study,
        seriesInstanceUID=series,
        modality=modality,
        instances=[found.as_json() for found in images],
        volume=volume,
    )


# -- ROI statistics ---------------------------------------------------------------------


@bp.get(f"{SERIES_PATH}/instances/<sop>/roi")
def roi_statistics(study: str, series: str, sop: str) -> Response:
    keys = _keys(study, series, sop)
    args = request.args
    shape = roi.Shape.of(
        args.get("shape", ""), *(_number(args, name) for name in ("x0", "y0", "x1", "y1"))
    )
    frame = int_param(args, "frame", 1, minimum=1) or 1
    return jsonify(instance_statistics(keys, shape, frame))


def instance_statistics(keys: list[Key], shape: roi.Shape, frame: int) -> dict:
    """ROI figures on one frame of the instance the keys name (404 when not stored)."""
    image = _image(keys)
    rows = list(_archive().catalog.locate("IMAGE", keys))
    if not rows:
        raise WebError(404, f"no instance {keys[-1].value} in the archive")
    cache = current_app.extensions["minipacs"]["frames"]
    path = _archive().files.local(rows[0].path)  # fetched when only the object store has it
    ds, values = render.frame_values(path, frame, cache, _config().pixel_budget_mb << 20)
    return {**roi.statistics(values, ds, shape, image.spacing, image.spacing_kind), "frame": frame}


def _number(args, name: str) -> float:
    value = args.get(name)
    if value is None or value == "":
        raise WebError(400, f"{name} is required")
    try:
        return float(value)
    except ValueError:
        raise WebError(400, f"{name} must be a number, not {value[:40]!r}") from None


# -- MPR --------------------------------------------------------------------------------


@bp.get(f"{SERIES_PATH}/mpr")
def mpr_planes(study: str, series: str) -> Response:
    volume = _volume(study, series)[0].volume
    return jsonify(
        slices=len(volume.order),
        spacing=list(volume.spacing),
        frameOfReferenceUID=volume.frame_of_reference,
        planes={name: plane.describe() for name, plane in mpr.planes(volume).items()},
    )


@bp.get(f"{SERIES_PATH}/mpr/<plane>/<int:index>")
def mpr_image(study: str, series: str, plane: str, index: int) -> Response:
    if plane not in mpr.PLANES:
        raise WebError(400, f"plane is axial, coronal or sagittal, not {plane[:20]!r}")
    plan, key, paths, native = _volume(study, series)
    volume = plan.volume
    cut = mpr.planes(volume)[plane]
    if not 0 <= index < cut.count:
        raise WebError(400, f"{plane} index {index} is outside 0-{cut.count - 1}")
    fmt = _image_format()
    wanted = render_request(fmt, 1)
    cache: mpr.VolumeCache = current_app.extensions["minipacs"]["volumes"]
    loaded = cache.get(key, plan, paths, native, _config().pixel_budget_mb << 20)
    values = mpr.cut(loaded.values, volume, cut, index)
    response = Response(
        render.render_values(loaded.header, values, wanted), mimetype=IMAGE_TYPES[fmt]
    )
    response.headers.update(cut.headers(index))
    response.headers["Cache-Control"] = "private, no-store"
    return response


def _volume(study: str, series: str) -> tuple[mpr.Plan, tuple, Callable[[], list[Path]], bool]:
    """The series' plan, its volume a Volume (409 with the reason when it is not one), the
    cache key of its instances as stored now, their files in slice order (a function: a
    volume refused before decoding fetches none from an object store), and whether all are
    stored uncompressed. The plan is worked out from the index's JSON once per set of
    instances (the volume cache remembers it, and so the refusal)."""
    keys = _keys(study, series)
    rows = list(_archive().catalog.locate("SERIES", keys))
    if not rows:
        raise WebError(404, f"no series {series} of study {study} in the archive")
    stored = sorted((row.pk, row.sop_uid, str(row.path)) for row in rows)
    key = (series, hashlib.sha256(repr(stored).encode()).hexdigest())
    cache: mpr.VolumeCache = current_app.extensions["minipacs"]["volumes"]
    plan = cache.plan(key)
    if plan is None:
        plan = _plan(keys)
        cache.remember(key, plan)
    volume = plan.volume
    if isinstance(volume, str):
        raise WebError(409, f"the series is not a volume: {volume}")
    by_sop = {row.sop_uid: row.path for row in rows}
    if set(by_sop) != set(volume.order):  # changed between the two reads: ask again
        raise WebError(409, "the series changed while it was read; try again")
    native = all(row.transfer_syntax in NATIVE for row in rows)
    local = _archive().files.local  # each fetched when only the object store has it
    return plan, key, lambda: [local(by_sop[sop]) for sop in volume.order], native


def _plan(keys: list[Key]) -> mpr.Plan:
    """The series' volume, or why it is not one, and what a voxel of it takes, from its
    instances' JSON in the index (each parsed once)."""
    found = [
        (sop, json.loads(text)) for sop, text in _archive().catalog.instance_json("SERIES", keys)
    ]
    try:
        volume = geometry.volume([geometry.image(sop, data) for sop, data in found])
    except geometry.NotAVolume as exc:
        return mpr.Plan(str(exc))
    return mpr.Plan(volume, mpr.voxel_bytes(data for _, data in found))


def _image_format() -> str:
    """png or jpeg: `format`, else the better of the two in Accept (PNG on a tie: exact)."""
    asked = request.args.get("format", "")
    if asked:
        if asked not in IMAGE_TYPES:
            raise WebError(400, "format is png or jpeg")
        return asked
    accept = request.accept_mimetypes
    if not accept:  # no Accept header: anything will do
        return "png"
    png, jpeg = accept.quality("image/png"), accept.quality("image/jpeg")
    if not png and not jpeg:
        raise WebError(406, "MPR images are image/png or image/jpeg")
    return "jpeg" if jpeg > png else "png"


# -- measurements saved as DICOM SR / KOS -----------------------------------------------


@bp.post("/studies/<study>/measurements")
def save_measurements(study: str) -> Response:
    """Store the study's measurements and key images as they are now: a Measurement
    Report that supersedes the current one (possibly with no measurement: a clear), and a
    Key Object Selection when there are key images, through the archive's ingest, as
    STOW-RS does (each instance audited as a store). Nothing is deleted: earlier reports
    stay in the archive, and GET answers the newest."""
    from viewer import measurements

    keys = _keys(study, "")
    if request.content_length is not None and request.content_length > MEASUREMENTS_BODY:
        raise WebError(413, f"a measurements body is at most {MEASUREMENTS_BODY >> 20} MiB")
    items, key_images, description = measurements.parse(request.get_json(silent=True))
    stored = {row.sop_uid: row for row in _archive().catalog.locate("STUDY", keys)}
    if not stored:
        raise WebError(404, f"no study {study} in the archive")
    wanted = {item.sop_uid for item in items} | {sop for sop, _ in key_images}
    missing = sorted(wanted - set(stored))
    if missing:
        raise WebError(400, f"instance {missing[0]} is not in study {study}")
    report, selection = _saved(study, list(stored.values()))
    saved_measurements = report is not None and not measurements.is_empty(_read(report))
    # A new report when there are measurements, or to clear the saved ones, or to clear
    # the saved key images when no new selection replaces them.
    write_report = bool(items) or saved_measurements or (not key_images and selection is not None)
    if not write_report and not key_images:
        raise WebError(400, "nothing to save: no measurements, no key images, none saved")
    for item in items:
        row = stored[item.sop_uid]
        image_keys = _keys(study, row.series_uid, item.sop_uid)
        if item.kind in measurements.ROI_TYPES:
            (x0, y0), (x1, y1) = item.points
            shape = roi.Shape.of(item.kind, x0, y0, x1, y1)
            item.stats = instance_statistics(image_keys, shape, item.frame)
        else:
            image = _image(image_keys)
            measurements.measure(item, image.spacing, image.spacing_kind)
    headers = {sop: _read(stored[sop], stop_before_pixels=True) for sop in wanted}
    made = datetime.now().astimezone()  # one time for both: they are one save
    documents = {}
    try:
        if write_report:
            replaces = _reference(report) if report is not None else None
            evidence = None if items else _evidence(list(stored.values()))
            who = g.get("user", "")
            documents["sr"] = measurements.build_report(
                items, headers, who, description, made, replaces, evidence
            )
        if key_images:
            documents["kos"] = measurements.build_key_images(key_images, headers, description, made)
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom refused the content
        raise WebError(422, f"cannot build the report: {exc}") from exc
    outcomes: list[stow.Outcome] = []
    parts = (({"content-type": stow.DICOM}, iter([data])) for data in documents.values())
    caller = request.remote_addr or "?"
    stow.store_parts(_archive(), parts, stow.DICOM, study, caller, outcomes, g.get("user", ""))
    failed = [o for o in outcomes if o.failure is not None]
    if failed:
        raise WebError(500, f"the report was not stored: {failed[0].reason}")
    answer: dict = {"sr": None, "kos": None}
    for name, outcome in zip(documents, outcomes, strict=True):
        answer[name] = {
            "seriesInstanceUID": outcome.series_uid,
            "sopInstanceUID": outcome.sop_uid,
        }
    return jsonify(answer), 201


@bp.get("/studies/<study>/measurements")
def read_measurements(study: str) -> Response:
    """The study's current measurements and key images (`_saved`); empty lists when it
    has none, or when the newest save cleared them. Each item names its instance's series
    as the index has it now (the viewer asks for the image and its statistics under it);
    one whose instance left the study has no seriesInstanceUID."""
    from viewer import measurements

    rows = list(_archive().catalog.locate("STUDY", _keys(study, "")))
    if not rows:
        raise WebError(404, f"no study {study} in the archive")
    answer: dict = {"sopInstanceUID": None, "measurements": [], "keyImages": []}
    report, selection = _saved(study, rows)
    if report is not None:
        answer["sopInstanceUID"] = report.sop_uid
        try:
            answer["measurements"] = measurements.read_report(_read(report))
        except (ValueError, AttributeError, KeyError, IndexError) as exc:
            raise WebError(422, f"cannot read the report {report.sop_uid}: {exc}") from exc
        _label_spacing(study, answer["measurements"])
    if selection is not None:
        answer["keyImages"] = measurements.read_key_images(_read(selection))
    series = {row.sop_uid: row.series_uid for row in rows}
    for item in answer["measurements"] + answer["keyImages"]:
        if item["sopInstanceUID"] in series:
            item["seriesInstanceUID"] = series[item["sopInstanceUID"]]
    return jsonify(answer)


def _label_spacing(study: str, found: list[dict]) -> None:
    """What each measurement's millimetres are, from its image as stored now: an SR unit
    is UCUM mm either way, so a length on an image with only Imager Pixel Spacing reads
    "mm (detector)" again, and an ROI's stats say their `spacingKind`, as when measured.
    The images' JSON comes in one query, of the study's instances (one that left it is
    not found, and keeps what the SR says)."""
    sops = sorted({item["sopInstanceUID"] for item in found})
    if not sops:
        return
    keys = [*_keys(study, ""), Key(SOP, "UI", sops)]
    catalog = _archive().catalog
    kinds = {
        sop: geometry.image(sop, text).spacing_kind
        for sop, text in catalog.instance_json("IMAGE", keys)
    }
    for item in found:
        kind = kinds.get(item["sopInstanceUID"])
        if kind is None:
            continue
        if "stats" in item:
            item["stats"]["spacingKind"] = kind
        elif item["unit"] == "mm" and kind == "detector":
            item["unit"] = "mm (detector)"


def _saved(
    study: str, rows: list[InstanceLocation]
) -> tuple[InstanceLocation | None, InstanceLocation | None]:
    """The study's current Measurement Report (its newest Comprehensive 3D SR) and Key
    Object Selection (its newest, when made with that report or after it: a save with
    no key images writes a report and no selection, and so clears them). Newest by the
    documents' own Content Date and Time (a reindex renumbers the index), then index id.
    Decided from the index's JSON of the study's documents in one query: every save adds
    two, and no file of theirs is opened here."""
    from viewer import measurements

    by_sop = {row.sop_uid: row for row in rows}
    classes = [measurements.COMPREHENSIVE_3D_SR, measurements.KEY_OBJECT_SELECTION]
    keys = [*_keys(study, ""), Key(SOP_CLASS, "UI", classes)]
    found: dict[str, list[tuple[datetime, int, InstanceLocation]]] = {c: [] for c in classes}
    for sop, elements in _archive().catalog.instance_elements(
        "IMAGE", keys, measurements.HEADER_TAGS
    ):
        row = by_sop.get(sop)  # None: stored after `rows` were read
        header = measurements.header(elements)
        if row is not None and measurements.titled(header):
            found[row.sop_class_uid].append((measurements.moment(header), row.pk, row))

    def newest(sop_class: str) -> tuple[InstanceLocation | None, datetime]:
        if not found[sop_class]:
            return None, measurements.EARLIEST
        made, _, row = max(found[sop_class], key=lambda entry: entry[:2])
        return row, made

    report, reported = newest(measurements.COMPREHENSIVE_3D_SR)
    selection, selected = newest(measurements.KEY_OBJECT_SELECTION)
    if selection is not None and report is not None and selected < reported:
        selection = None
    return report, selection


def _evidence(rows: list[InstanceLocation]) -> list[Dataset]:
    """What a report with no measurement lists as its evidence: the study's instances
    other than SR documents (PS3.3 C.17.2, Current Requested Procedure Evidence Sequence:
    those the creator knows were made for the procedure), the first as a whole header
    (highdicom copies the patient and study from it)."""
    from viewer import measurements

    found = [row for row in rows if not row.sop_class_uid.startswith(measurements.SR_DOCUMENTS)]
    found = sorted(found or rows, key=lambda row: row.pk)
    return [_read(found[0], stop_before_pixels=True)] + [_reference(row) for row in found[1:]]


def _reference(row: InstanceLocation) -> Dataset:
    from viewer import measurements

    return measurements.reference(row.study_uid, row.series_uid, row.sop_uid, row.sop_class_uid)


def _read(row: InstanceLocation, stop_before_pixels: bool = False) -> Dataset:
    return read_dataset(_archive().files.local(row.path), stop_before_pixels=stop_before_pixels)


def _image(keys: list[Key]) -> geometry.Image:
    found = list(_archive().catalog.instance_json("IMAGE", keys))
    if not found:
        raise WebError(404, f"no instance {keys[-1].value} in the archive")
    return geometry.image(*found[0])
