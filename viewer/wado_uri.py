"""WADO-URI (PS3.18 chapter 9): one object by its UIDs, as DICOM or as a rendered image.

Every answer is exact: 400 for a missing or invalid parameter, 404 for an unknown object,
406 when no acceptable content type or transfer syntax can be produced, each with its
reason as JSON {"error": reason} (viewer.errors). Rendered images go through
`viewer.render`; they carry an ETag and Cache-Control and answer 304 to a matching
If-None-Match.
"""

from flask import Blueprint
from flask import Response
from flask import current_app
from flask import request
from pydicom.uid import UID
from pydicom.uid import ExplicitVRLittleEndian

from storage import deidentify
from storage.dataset import is_uid
from storage.dataset import read_dataset
from viewer import render
from viewer import transcode
from viewer.errors import WebError
from viewer.errors import int_param
from viewer.media import parse_accept

bp = Blueprint("wado_uri", __name__)

IMAGE_TYPES = {"image/jpeg": "jpeg", "image/png": "png", "image/gif": "gif"}
DICOM = "application/dicom"
KNOWN = {
    "requestType",
    "studyUID",
    "seriesUID",
    "objectUID",
    "contentType",
    "charset",
    "anonymize",
    "annotation",
    "rows",
    "columns",
    "region",
    "windowCenter",
    "windowWidth",
    "frameNumber",
    "imageQuality",
    "presentationUID",
    "presentationSeriesUID",
    "transferSyntax",
}
CACHE_CONTROL = "private, max-age=86400"  # patient data: browsers only, never shared caches


@bp.route("/wado", methods=["GET", "POST"])
def wado() -> Response:
    """GET with a query string or POST with a form: the same parameters."""
    params = request.values
    if params.get("requestType") != "WADO":
        raise WebError(400, "requestType must be WADO")
    uids = [_uid(params, name) for name in ("studyUID", "seriesUID", "objectUID")]
    anonymize = params.get("anonymize")
    if anonymize not in (None, "yes"):
        raise WebError(400, "anonymize must be yes")
    if params.get("presentationUID") or params.get("presentationSeriesUID"):
        raise WebError(400, "presentation states are not supported")
    archive = current_app.extensions["minipacs"]["archive"]
    path = archive.catalog.instance_file(uids[2], uids[0], uids[1])
    if path is None:
        raise WebError(404, f"no object {uids[2]} in series {uids[1]} of study {uids[0]}")
    path = archive.files.local(path)  # fetched when only the object store has it
    header = read_dataset(path, stop_before_pixels=True)
    has_pixels = "Rows" in header and "Columns" in header
    content_type = _content_type(params.get("contentType", ""), has_pixels)
    if content_type == DICOM:
        return _dicom(path, header, params.get("transferSyntax", ""), anonymize == "yes")
    for name in ("transferSyntax", "anonymize"):
        if params.get(name):
            raise WebError(400, f"{name} applies only to application/dicom")
    return _image(path, header, content_type, params)


def _uid(params, name: str) -> str:
    value = params.get(name, "")
    if not value:
        raise WebError(400, f"{name} is required")
    if not is_uid(value):
        raise WebError(400, f"{name} is not a valid UID")
    return value


def _content_type(accepted: str, has_pixels: bool) -> str:
    """The best type of the list (q-values honoured) we can produce (PS3.18 9.1.2.1.5);
    images default to image/jpeg, other objects to application/dicom."""
    default = "image/jpeg" if has_pixels else DICOM
    for choice in parse_accept("*/*" if accepted.strip() == "*" else accepted):
        if choice.media_type == "*/*":
            return default
        if choice.media_type == DICOM:
            return DICOM
        if has_pixels and choice.media_type == "image/*":
            return "image/jpeg"
        if has_pixels and choice.media_type in IMAGE_TYPES:
            return choice.media_type
    raise WebError(406, f"cannot produce any of: {accepted}")


def _dicom(path, header, syntax: str, anonymize: bool) -> Response:
    """The object; de-identified (PS3.15 Basic Profile, storage.deidentify) on request."""
    stored = UID(header.file_meta.TransferSyntaxUID)
    wanted = syntax.strip() or ExplicitVRLittleEndian
    if wanted != "*" and not is_uid(wanted):
        raise WebError(400, "transferSyntax is not a valid UID")
    profile = current_app.extensions["minipacs"]["deid"]()
    change = (lambda ds: deidentify.deidentify(ds, profile)) if anonymize else None
    budget = current_app.extensions["minipacs"]["config"].pixel_budget_mb << 20
    try:
        body = transcode.instance_bytes(path, stored, wanted, change, budget)
    except deidentify.NotDeidentifiable as exc:  # PS3.18 lets the server refuse
        raise WebError(409, f"cannot anonymize {header.SOPInstanceUID}: {exc}") from exc
    return _dicom_response(body, stored if wanted == "*" else UID(wanted))


def _dicom_response(body: bytes, syntax: UID) -> Response:
    response = Response(body, mimetype=DICOM)
    response.headers["Cache-Control"] = CACHE_CONTROL
    response.headers["Content-Disposition"] = "attachment; filename=object.dcm"
    response.headers["X-Transfer-Syntax"] = str(syntax)
    return response


def _image(path, header, content_type: str, params) -> Response:
    config = current_app.extensions["minipacs"]["config"]
    size = config.render_max_size  # bounds the output before any work (PS3.18 leaves it open)
    wanted = render.Request(
        frame=int_param(params, "frameNumber", 1, minimum=1),
        window=_window(params),
        rows=int_param(params, "rows", None, minimum=1, maximum=size),
        columns=int_param(params, "columns", None, minimum=1, maximum=size),
        region=_region(params.get("region")),
        format=IMAGE_TYPES[content_type],
        quality=int_param(params, "imageQuality", 90, minimum=1, maximum=100),
        annotation=_annotation(params.get("annotation", "")),
        max_size=size,
        pixel_budget=config.pixel_budget_mb << 20,
    )
    tag = render.etag(path, wanted)
    if request.if_none_match.contains(tag):
        response = Response(status=304)
    else:
        cache = current_app.extensions["minipacs"]["frames"]
        response = Response(render.render(path, wanted, cache), mimetype=content_type)
    response.set_etag(tag)
    response.headers["Cache-Control"] = CACHE_CONTROL
    return response


def _window(params) -> tuple[float, float] | None:
    center, width = params.get("windowCenter"), params.get("windowWidth")
    if center is None and width is None:
        return None
    if center is None or width is None:
        raise WebError(400, "windowCenter and windowWidth go together")
    try:
        return float(center), float(width)
    except ValueError:
        raise WebError(400, "windowCenter and windowWidth must be numbers") from None


def _region(value: str | None):
    if not value:
        return None
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise WebError(400, "region must be four numbers: left,top,right,bottom") from None
    if len(parts) != 4 or min(parts) < 0 or parts[2] <= parts[0] or parts[3] <= parts[1]:
        raise WebError(400, "region must be left,top,right,bottom with left<right, top<bottom")
    return parts


def _annotation(value: str) -> tuple[str, ...]:
    kinds = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = set(kinds) - {"patient", "technique"}
    if unknown:
        raise WebError(400, f"annotation must be patient and/or technique, not {sorted(unknown)}")
    return kinds
