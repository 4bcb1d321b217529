"""DICOMweb (PS3.18 chapter 10) under /dicom-web: QIDO-RS, WADO-RS and STOW-RS.

Searches go through `storage.query` (the C-FIND engine), metadata is the DICOM JSON the
index keeps (no file is opened), instances and frames stream from the stored files, and
rendered images go through `viewer.render`. Errors are `viewer.errors.WebError`, answered
as JSON {"error": reason} with 400 (bad parameter or UID), 404 (unknown), 406 (nothing
acceptable), 409, 413, 415 or 422.
"""

import gzip
import itertools
import json
import re
import zlib
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from pathlib import Path

from flask import Blueprint
from flask import Response
from flask import current_app
from flask import g
from flask import request
from flask import stream_with_context
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from storage import Archive
from storage import deidentify
from storage import query
from storage.dataset import check_pixel_budget
from storage.dataset import dataset_pixel_bytes
from storage.dataset import is_uid
from storage.dataset import read_dataset
from storage.errors import OverPixelBudget
from storage.query import Key
from storage.rows import InstanceLocation
from viewer import qido
from viewer import render
from viewer import stow
from viewer import transcode
from viewer.errors import WebError
from viewer.errors import whole_number
from viewer.media import MediaError
from viewer.media import MediaRange
from viewer.media import MultipartReader
from viewer.media import TooLarge
from viewer.media import file_chunks
from viewer.media import multipart
from viewer.media import multipart_length
from viewer.media import new_boundary
from viewer.media import parse_accept
from viewer.media import parse_media_type

bp = Blueprint("dicomweb", __name__, url_prefix="/dicom-web")

STUDY, SERIES, SOP = 0x0020000D, 0x0020000E, 0x00080018
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTETS = "application/octet-stream"
RENDERED_TYPES = {"image/jpeg": "jpeg", "image/png": "png", "image/gif": "gif"}
CACHE_CONTROL = "private, max-age=86400"  # patient data: browsers only, never shared caches
THUMBNAIL = 128
BURNED_IN = re.compile(r'"00280301":\{"vr":"CS","Value":\["YES"\]')
EAGER_FRAMES = 32  # frames cut before answering; longer lists stream
GZIP_MIN = 1024
STREAM_CHUNK = 64 << 10  # bytes of a streamed JSON array sent at once
TRUNCATED = (
    '299 {host} "The number of results exceeded the maximum supported by the server. '
    'Additional results can be requested."'
)


@bp.before_request
def _anonymize_only_where_offered() -> None:
    """`anonymize=yes` (our extension) de-identifies WADO-RS instances; anywhere else it
    would be silently ignored and identified data sent, so it is refused."""
    value = request.args.get("anonymize")
    if value is None:
        return
    if value != "yes":
        raise WebError(400, "anonymize must be yes")
    if request.endpoint != "dicomweb.retrieve":
        raise WebError(400, "anonymize=yes applies to instance retrieval (WADO-RS) only")


def _archive() -> Archive:
    return current_app.extensions["minipacs"]["archive"]


def _local(path: Path) -> Path:
    """The instance's file, fetched first when only the object store has it (the
    archive's one reader; a store that does not answer is a 503)."""
    return _archive().files.local(path)


def _config():
    return current_app.extensions["minipacs"]["config"]


def _pixel_budget() -> int:
    return _config().pixel_budget_mb << 20


def _uid(value: str, name: str) -> str:
    if not is_uid(value):
        raise WebError(400, f"{name} {value[:80]!r} is not a valid UID")
    return value


def _scope(study: str | None, series: str | None = None, sop: str | None = None):
    scope = {}
    for tag, value, name in ((STUDY, study, "study"), (SERIES, series, "series")):
        if value is not None:
            scope[tag] = _uid(value, f"{name} UID")
    if sop is not None:
        scope[SOP] = _uid(sop, "instance UID")
    return scope


def base_url() -> str:
    """Where clients reach /dicom-web: configured, else this request's own (through
    X-Forwarded-* when `trust_proxy` is set)."""
    config = _config()
    if config.public_url:
        return f"{config.public_url}/dicom-web"
    host = request.host
    port = request.environ.get("SERVER_PORT", "")
    if not config.trust_proxy and not re.search(r":\d+$", host) and port not in ("80", "443"):
        host = f"{host}:{port}"  # a client that left the port out of Host (dicomweb-client)
    return f"{request.scheme}://{host}{request.script_root}/dicom-web"


def _accept_text() -> str:
    return request.args.get("accept") or request.headers.get("Accept", "")


def _accept() -> list[MediaRange]:
    return parse_accept(_accept_text())


# -- QIDO-RS -------------------------------------------------------------------------


@bp.get("/studies")
def search_studies() -> Response:
    return _search("STUDY", {})


@bp.get("/series")
@bp.get("/studies/<study>/series")
def search_series(study: str | None = None) -> Response:
    return _search("SERIES", _scope(study))


@bp.get("/instances")
@bp.get("/studies/<study>/instances")
@bp.get("/studies/<study>/series/<series>/instances")
def search_instances(study: str | None = None, series: str | None = None) -> Response:
    return _search("IMAGE", _scope(study, series))


def _search(level: str, scope: dict[int, str]) -> Response:
    _json_type()
    search = qido.parse(request.args, level, scope, _archive().query_tags.private)
    config = _config()
    options = query.Options(
        pn_case_insensitive=config.pn_case_insensitive,
        retrieve_aet=config.aet,
        fuzzy_names=search.fuzzy,
        all_attributes=search.all_attributes,
    )
    cap = config.max_results
    limit = min(search.limit or cap, cap)
    try:
        answers = list(
            _archive().catalog.find(
                level, search.keys, "STUDY", options, limit=limit + 1, offset=search.offset
            )
        )
    except query.QueryError as exc:
        raise WebError(400, str(exc)) from exc
    truncated = len(answers) > limit
    base = base_url()
    for answer in answers[:limit]:
        answer.pop("00080052", None)  # QueryRetrieveLevel is C-FIND's
        answer["00081190"] = {"vr": "UR", "Value": [_retrieve_url(base, level, answer)]}
    g.audit = shown_patients(answers[:limit])
    response = _json_response(answers[:limit])
    if truncated and (search.limit is None or search.limit > cap):
        response.headers["Warning"] = TRUNCATED.format(host=request.host)
        current_app.logger.warning("QIDO-RS %s stopped at max_results=%d", request.path, cap)
    return response


def shown_patients(answers: list[dict]) -> dict:
    """For the audit event of a query: how many answers, and whose (their Patient IDs; the
    one patient also as the event's). A search scoped to a study has its patient looked up."""
    patients = sorted(
        {
            str(value)
            for answer in answers
            for value in (answer.get("00100020") or {}).get("Value", [])
        }
    )
    found: dict = {"answers": len(answers), "patients": patients}
    if len(patients) == 1:
        found["patient_id"] = patients[0]
    return found


def _retrieve_url(base: str, level: str, answer: dict) -> str:
    def uid(tag: str) -> str:
        return ((answer.get(tag) or {}).get("Value") or [""])[0]

    url = f"{base}/studies/{uid('0020000D')}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{uid('0020000E')}"
    if level == "IMAGE":
        url += f"/instances/{uid('00080018')}"
    return url


def _json_type() -> str:
    for choice in _accept():
        for media in (DICOM_JSON, "application/json"):
            if choice.matches(media):
                return media
    raise WebError(406, "this resource is application/dicom+json (or application/json)")


def _json_response(value: object, text: str | None = None) -> Response:
    body = (text if text is not None else json.dumps(value, ensure_ascii=False)).encode()
    response = Response(mimetype=_json_type())
    if len(body) >= GZIP_MIN and "gzip" in request.accept_encodings:
        body = gzip.compress(body, compresslevel=1)
        response.headers["Content-Encoding"] = "gzip"
    response.headers["Vary"] = "Accept, Accept-Encoding"
    response.set_data(body)
    return response


# -- WADO-RS: metadata ---------------------------------------------------------------


@bp.get("/studies/<study>/metadata")
@bp.get("/studies/<study>/series/<series>/metadata")
@bp.get("/studies/<study>/series/<series>/instances/<sop>/metadata")
def metadata(study: str, series: str | None = None, sop: str | None = None) -> Response:
    scope = _scope(study, series, sop)
    level = "IMAGE" if sop else "SERIES" if series else "STUDY"
    keys = [Key(tag, "UI", uid) for tag, uid in scope.items()]
    base = base_url()
    rows = _archive().catalog.instance_json(level, keys)
    first = next(rows, None)
    if first is None:
        raise WebError(404, f"no {level.lower()} {list(scope.values())[-1]} in the archive")
    texts = (
        with_bulk_urls(text, _instance_url(base, scope, sop_uid, text))
        for sop_uid, text in itertools.chain([first], rows)
    )
    return _json_array_stream(texts)


def _json_array_stream(texts: Iterator[str]) -> Response:
    """A JSON array of already-encoded items, sent as the index yields them (gzipped on
    the fly when accepted): a study's metadata is ~11 KB an instance, tens of MB for a
    large study, four copies of it when built whole; this holds ~64 KiB."""
    gzipped = "gzip" in request.accept_encodings
    packer = zlib.compressobj(1, zlib.DEFLATED, 31) if gzipped else None  # 31: gzip

    def chunks() -> Iterator[bytes]:
        pending, size = ["["], 1
        for n, text in enumerate(texts):
            pending.append("," + text if n else text)
            size += len(text)
            if size >= STREAM_CHUNK:
                yield _packed("".join(pending).encode(), packer)
                pending, size = [], 0
        pending.append("]")
        yield _packed("".join(pending).encode(), packer) + (packer.flush() if packer else b"")

    response = Response(stream_with_context(chunks()), mimetype=_json_type())
    if gzipped:
        response.headers["Content-Encoding"] = "gzip"
    response.headers["Vary"] = "Accept, Accept-Encoding"
    return response


def _packed(data: bytes, packer) -> bytes:
    return packer.compress(data) if packer else data


def _instance_url(base: str, scope: dict[int, str], sop_uid: str, text: str) -> str:
    series = scope.get(SERIES) or _series_of(text)
    return f"{base}/studies/{scope[STUDY]}/series/{series}/instances/{sop_uid}"


def _series_of(text: str) -> str:
    at = text.find('"0020000E":')
    match = re.search(r'"Value":\["([0-9.]+)"\]', text[at : at + 120]) if at >= 0 else None
    return match.group(1) if match else ""


def with_bulk_urls(text: str, instance_url: str) -> str:
    """Stored BulkDataURIs hold the element's path (TAG[/ITEM/TAG...]); clients get
    absolute URLs. A text replacement: no parse of the stored JSON."""
    return text.replace('"BulkDataURI":"', f'"BulkDataURI":"{instance_url}/bulkdata/')


# -- WADO-RS: instances --------------------------------------------------------------


@bp.get("/studies/<study>")
@bp.get("/studies/<study>/series/<series>")
@bp.get("/studies/<study>/series/<series>/instances/<sop>")
def retrieve(study: str, series: str | None = None, sop: str | None = None) -> Response:
    """Instances as stored or transcoded; with `anonymize=yes`, de-identified
    (storage.deidentify, the server's project key and `deid_options`)."""
    scope = _scope(study, series, sop)
    rows = _instances(scope)
    wanted, single = _dicom_syntaxes(_accept(), single_allowed=sop is not None)
    change = _deidentifier(scope) if request.args.get("anonymize") == "yes" else None
    plan = []
    for row in rows:
        stored = row.transfer_syntax
        syntax = next((w for w in wanted if transcode.can_send(stored, w)), None)
        if syntax is None:
            raise WebError(406, f"{row.sop_uid} cannot be sent in {wanted}")
        plan.append((row, stored if syntax == "*" else syntax))
    if single:
        row, syntax = plan[0]
        body = _instance_bytes(row, syntax, change)
        response = Response(body, mimetype=DICOM)
        response.headers["Content-Type"] = f"{DICOM}; transfer-syntax={syntax}"
        return _private(response)
    boundary = new_boundary()
    heads = []
    for row, syntax in plan:
        headers = {"Content-Type": f"{DICOM}; transfer-syntax={syntax}"}
        if change is None:  # a de-identified part has no original to point to
            headers["Content-Location"] = _row_url(row)
        if syntax == row.transfer_syntax and change is None and row.path.exists():
            headers["Content-Length"] = str(row.path.stat().st_size)  # (not: in a bucket)
        heads.append(headers)
    _local(plan[0][0].path)  # a store that does not answer: a 503, not a broken body

    def parts() -> Iterator[tuple[dict[str, str], Iterable[bytes]]]:
        for (row, syntax), headers in zip(plan, heads, strict=True):
            if syntax == row.transfer_syntax and change is None:
                yield headers, file_chunks(_local(row.path))
            else:
                yield headers, [_instance_bytes(row, syntax, change)]

    response = _multipart(parts(), boundary, DICOM)
    if all("Content-Length" in h for h in heads):  # all as stored: the length is known
        sizes = [int(h["Content-Length"]) for h in heads]
        response.headers["Content-Length"] = str(multipart_length(heads, sizes, boundary))
    return response


def _deidentifier(scope: dict[int, str]) -> Callable[[Dataset], object]:
    """The de-identifying change, once no instance in scope needs its pixels cleaned
    (refused before the first part is sent, not halfway through a multipart body)."""
    burned = [
        uid
        for uid, text in _archive().catalog.instance_json(*_selection(scope))
        if BURNED_IN.search(text)
    ]
    if burned:
        raise WebError(409, f"cannot anonymize: burned-in annotation in {', '.join(burned[:5])}")
    profile = current_app.extensions["minipacs"]["deid"]()
    return lambda ds: deidentify.deidentify(ds, profile)


def _instance_bytes(row: InstanceLocation, syntax: str, change) -> bytes:
    try:
        return transcode.instance_bytes(
            _local(row.path), row.transfer_syntax, syntax, change, _pixel_budget()
        )
    except deidentify.NotDeidentifiable as exc:
        raise WebError(409, f"cannot anonymize {row.sop_uid}: {exc}") from exc


def _selection(scope: dict[int, str]) -> tuple[str, list[Key]]:
    level = "IMAGE" if SOP in scope else "SERIES" if SERIES in scope else "STUDY"
    return level, [Key(tag, "UI", uid) for tag, uid in scope.items()]


def _instances(scope: dict[int, str]) -> list[InstanceLocation]:
    level, keys = _selection(scope)
    rows = list(_archive().catalog.locate(level, keys))
    if not rows:
        raise WebError(404, f"no {level.lower()} {list(scope.values())[-1]} in the archive")
    return rows


def _row_url(row: InstanceLocation) -> str:
    return f"{base_url()}/studies/{row.study_uid}/series/{row.series_uid}/instances/{row.sop_uid}"


def _dicom_syntaxes(accept: list[MediaRange], single_allowed: bool) -> tuple[list[str], bool]:
    """Transfer syntaxes acceptable for application/dicom, best first ("*" = as stored),
    and whether the client wants one single-part object rather than multipart."""
    wanted: list[str] = []
    single = False
    for choice in accept:
        if choice.media_type == DICOM and single_allowed:
            single = single or not wanted
        elif choice.media_type == "multipart/related":
            if choice.params.get("type", DICOM).lower() not in (DICOM, "*/*", "application/*"):
                continue
        elif not (choice.matches("multipart/related") or choice.matches(DICOM)):
            continue
        wanted.append(choice.params.get("transfer-syntax", ExplicitVRLittleEndian))
    if not wanted:
        raise WebError(406, 'this resource is multipart/related; type="application/dicom"')
    return wanted, single


def _multipart(parts, boundary: str, part_type: str) -> Response:
    body = stream_with_context(multipart(parts, boundary))
    response = Response(body)
    response.headers["Content-Type"] = f'multipart/related; type="{part_type}"; boundary={boundary}'
    return _private(response)


def _private(response: Response) -> Response:
    response.headers["Cache-Control"] = CACHE_CONTROL
    return response


# -- WADO-RS: frames and bulk data ---------------------------------------------------


@bp.get("/studies/<study>/series/<series>/instances/<sop>/frames/<frames>")
def frames(study: str, series: str, sop: str, frames: str) -> Response:
    numbers = _frame_numbers(frames)
    row = _instances(_scope(study, series, sop))[0]
    return _frames_response(row, numbers)


@bp.get("/studies/<study>/series/<series>/instances/<sop>/bulkdata/<path:tags>")
def bulkdata(study: str, series: str, sop: str, tags: str) -> Response:
    row = _instances(_scope(study, series, sop))[0]
    path = tags.strip("/").split("/")
    tags_ok = all(re.fullmatch(r"[0-9A-Fa-f]{8}", p) for p in path[::2])
    if len(path) % 2 != 1 or not tags_ok or not all(p.isdigit() for p in path[1::2]):
        raise WebError(400, "bulk data is addressed as TAG[/ITEM/TAG...]")
    if path == ["7FE00010"]:  # every frame: the whole file
        ds = read_dataset(_local(row.path))
        return _frames_response(row, list(range(1, render.number_of_frames(ds) + 1)), ds)
    head = _archive().files.frames(row.path, []) if int(path[0], 16) < 0x7FE00010 else None
    ds = head.dataset if head is not None else read_dataset(_local(row.path))  # ranges, or all
    value = transcode.bulk_bytes(ds, path)
    _octets_accepted()
    headers = {"Content-Type": OCTETS, "Content-Length": str(len(value))}
    return _multipart([(headers, [value])], new_boundary(), OCTETS)


def _frame_numbers(text: str) -> list[int]:
    try:
        numbers = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise WebError(400, f"frame list {text[:80]!r} is not comma-separated numbers") from None
    if not numbers or min(numbers) < 1:
        raise WebError(400, "frame numbers start at 1")
    if len(set(numbers)) != len(numbers):  # each would be sent again: a response multiplier
        raise WebError(400, "a frame list names each frame once")
    return numbers


def _octets_accepted() -> None:
    for choice in _accept():
        kind = choice.params.get("type", OCTETS).lower()
        if choice.matches("multipart/related") and kind in (OCTETS, "*/*", "application/*"):
            return
    raise WebError(406, 'bulk data is multipart/related; type="application/octet-stream"')


def _frames_response(row: InstanceLocation, numbers: list[int], ds=None) -> Response:
    stored = row.transfer_syntax
    as_stored, part_type = _frame_choice(_accept(), stored)
    at = {number: number for number in numbers}  # frame of `ds` for each number asked
    subset = _archive().files.frames(row.path, numbers) if ds is None else None
    if subset is not None:  # a large object in a bucket: only these frames were read
        ds, frame_count = subset.dataset, subset.count
        at = {number: place for place, number in enumerate(numbers, 1)}
    else:
        ds = ds or read_dataset(_local(row.path))
        frame_count = render.number_of_frames(ds)
    bad = [n for n in numbers if n > frame_count]
    if bad:
        raise WebError(404, f"frame {bad[0]} is outside 1-{frame_count}")
    if not as_stored:  # decoded: within the budget, like any decode
        try:
            check_pixel_budget(dataset_pixel_bytes(ds), _pixel_budget())
        except OverPixelBudget as exc:
            raise WebError(422, f"{exc} (pixel_budget_mb)") from exc
    native = not transcode.UID(stored).is_encapsulated  # native frames go out little endian
    syntax = stored if as_stored and not native else str(ExplicitVRLittleEndian)
    media = part_type if as_stored else OCTETS

    def parts():
        for number in numbers:
            data = transcode.frame_bytes(ds, at[number], as_stored)
            headers = {
                "Content-Type": f"{media}; transfer-syntax={syntax}",
                "Content-Length": str(len(data)),
                "Content-Location": f"{_row_url(row)}/frames/{number}",
            }
            yield headers, [data]

    if len(numbers) <= EAGER_FRAMES:  # cut now: a decoder failure is a 422, and a
        boundary = new_boundary()  # Content-Length keeps the connection open
        body = b"".join(multipart(list(parts()), boundary))
        response = Response(body)
        response.headers["Content-Type"] = f'multipart/related; type="{media}"; boundary={boundary}'
        return _private(response)
    return _multipart(parts(), new_boundary(), media)


def _frame_choice(accept: list[MediaRange], stored: str) -> tuple[bool, str]:
    """(send as stored?, part media type) for the first acceptable entry of Accept."""
    native = not transcode.UID(stored).is_encapsulated
    stored_type = OCTETS if native else transcode.frame_media_type(stored)
    for choice in accept:
        if choice.media_type in ("*/*", "multipart/*"):
            return native, OCTETS
        if not choice.matches("multipart/related") and choice.media_type != stored_type:
            continue
        kind = choice.params.get("type", OCTETS).lower()
        if kind in ("*/*", "application/*"):
            kind = OCTETS
        if choice.media_type == stored_type:
            kind = stored_type
        syntax = choice.params.get("transfer-syntax")
        if kind == OCTETS:
            if syntax in (None, str(ExplicitVRLittleEndian)):
                return False, OCTETS
            if syntax in ("*", stored):
                return True, stored_type if not native else OCTETS
        elif kind in (stored_type, "image/*") and syntax in (None, "*", stored):
            return True, stored_type
    raise WebError(406, f"frames are stored as {stored}; no fit in Accept: {_accept_text()}")


# -- WADO-RS: rendered and thumbnails ------------------------------------------------


@bp.get("/studies/<study>/rendered")
@bp.get("/studies/<study>/series/<series>/rendered")
@bp.get("/studies/<study>/series/<series>/instances/<sop>/rendered")
@bp.get("/studies/<study>/series/<series>/instances/<sop>/frames/<frames>/rendered")
def rendered(study: str, series=None, sop=None, frames=None) -> Response:
    rows = _instances(_scope(study, series, sop))
    fmt, media, wrap = _image_type()
    frame = _single_frame(frames)
    if sop is None and wrap:  # a study or series: every instance's first frame, one part each
        wanted = render_request(fmt, 1)
        cache = current_app.extensions["minipacs"]["frames"]

        def parts():
            for row in rows:
                yield {"Content-Type": media}, [render.render(_local(row.path), wanted, cache)]

        return _multipart(parts(), new_boundary(), media)
    # One image asked for: the instance's, or the study's or series' middle instance.
    path = _representative(rows).path
    return _render_one(path, render_request(fmt, frame), media, wrap)


@bp.get("/studies/<study>/thumbnail")
@bp.get("/studies/<study>/series/<series>/thumbnail")
@bp.get("/studies/<study>/series/<series>/instances/<sop>/thumbnail")
@bp.get("/studies/<study>/series/<series>/instances/<sop>/frames/<frames>/thumbnail")
def thumbnail(study: str, series=None, sop=None, frames=None) -> Response:
    rows = _instances(_scope(study, series, sop))
    fmt, media, wrap = _image_type()
    wanted = render_request(fmt, _single_frame(frames), thumbnail=True)
    return _render_one(_representative(rows).path, wanted, media, wrap)


def _representative(rows: list[InstanceLocation]) -> InstanceLocation:
    """The middle instance by Instance Number: what a study or series looks like."""
    rows = sorted(rows, key=lambda r: (r.instance_number or 0, r.pk))
    return rows[len(rows) // 2]


def _single_frame(frames: str | None) -> int:
    if frames is None:
        return 1
    numbers = _frame_numbers(frames)
    if len(numbers) != 1:
        raise WebError(400, "a rendered frame is one frame number")
    return numbers[0]


def _render_one(path: Path, wanted: render.Request, media: str, wrap: bool) -> Response:
    path = _local(path)
    tag = render.etag(path, wanted)
    cache = current_app.extensions["minipacs"]["frames"]
    if request.if_none_match.contains(tag):
        response = Response(status=304)
    elif wrap:
        image = render.render(path, wanted, cache)
        response = _multipart([({"Content-Type": media}, [image])], new_boundary(), media)
    else:
        response = Response(render.render(path, wanted, cache), mimetype=media)
    response.set_etag(tag)
    return _private(response)


def _image_type() -> tuple[str, str, bool]:
    """(format, media type, wrap in multipart?): OHIF asks for thumbnails as
    multipart/related; a single image is then sent as a one-part multipart body."""
    for choice in _accept():
        if choice.media_type in ("*/*", "image/*"):
            return "jpeg", "image/jpeg", False
        if choice.media_type in RENDERED_TYPES:
            return RENDERED_TYPES[choice.media_type], choice.media_type, False
        if choice.media_type == "multipart/related":
            kind = choice.params.get("type", "image/jpeg").lower()
            if kind in RENDERED_TYPES:
                return RENDERED_TYPES[kind], kind, True
            if kind in ("*/*", "image/*", OCTETS):
                return "jpeg", "image/jpeg", True
    raise WebError(406, "rendered images are image/jpeg, image/png or image/gif")


def render_request(fmt: str, frame: int, thumbnail: bool = False) -> render.Request:
    """PS3.18 8.3.5.1: quality, window=center,width[,function], viewport=vw,vh[,sx,sy,sw,sh]
    (sw/sh negative: flipped), annotation=patient,technique."""
    args = request.args
    fields: dict = {"frame": frame, "format": fmt, "pixel_budget": _pixel_budget()}
    fields["max_size"] = _config().render_max_size
    if thumbnail:
        fields |= {"rows": THUMBNAIL, "columns": THUMBNAIL}
    if "quality" in args:
        fields["quality"] = whole_number("quality", args["quality"], 1, 100)
    if args.get("window") == "auto":  # extension: this frame's min to max (viewer preset)
        fields["minmax"] = True
    elif "window" in args:
        parts = args["window"].split(",")
        if len(parts) not in (2, 3):
            raise WebError(400, "window is center,width[,function]")
        center, width = (_float_param("window", p) for p in parts[:2])
        if width <= 0:
            raise WebError(400, "window width must be positive")
        fields["window"] = (center, width)
        if len(parts) == 3:
            function = parts[2].strip().upper()
            if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
                raise WebError(400, "window function is linear, linear-exact or sigmoid")
            fields["function"] = function
    if "viewport" in args:
        fields |= _viewport(args["viewport"])
    if "annotation" in args:
        kinds = tuple(k.strip() for k in args["annotation"].split(",") if k.strip())
        if set(kinds) - {"patient", "technique"}:
            raise WebError(400, "annotation is patient and/or technique")
        fields["annotation"] = kinds
    return render.Request(**fields)


def _viewport(text: str) -> dict:
    parts = text.split(",")
    if len(parts) not in (2, 6):
        raise WebError(400, "viewport is vw,vh or vw,vh,sx,sy,sw,sh")
    vw, vh = (whole_number("viewport", p, 1, _config().render_max_size) for p in parts[:2])
    fields: dict = {"columns": vw, "rows": vh}
    if len(parts) == 6:
        sx, sy, sw, sh = (_float_param("viewport", p or "0") for p in parts[2:])
        if sw == 0 or sh == 0:
            raise WebError(400, "viewport source width and height must not be 0")
        left, right = sorted((sx, sx + sw))
        top, bottom = sorted((sy, sy + sh))
        fields |= {
            "region": (left, top, right, bottom),
            "flip_horizontal": sw < 0,
            "flip_vertical": sh < 0,
        }
    return fields


def _float_param(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise WebError(400, f"{name} must be numbers") from None


# -- STOW-RS -------------------------------------------------------------------------


@bp.post("/studies")
@bp.post("/studies/<study>")
def store(study: str | None = None) -> Response:
    if study is not None:
        _uid(study, "study UID")
    content_type = request.headers.get("Content-Type", "")
    if not content_type:
        raise WebError(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    kind = parse_media_type(content_type)
    part_type = kind.params.get("type", DICOM).lower()
    if kind.media_type != "multipart/related" or part_type != DICOM:
        raise WebError(415, f'STOW-RS takes multipart/related; type="{DICOM}", not {content_type}')
    if "boundary" not in kind.params:
        raise WebError(400, "the multipart/related Content-Type has no boundary")
    _json_type()
    limit = _config().max_upload_mb << 20
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(limit)
    reader = MultipartReader(request.stream, kind.params["boundary"], limit)
    outcomes: list[stow.Outcome] = []
    caller = request.remote_addr or "?"
    try:
        stow.store_parts(
            _archive(), reader.parts(), part_type, study, caller, outcomes, g.get("user", "")
        )
    except MediaError as exc:
        stored = sum(1 for o in outcomes if o.failure is None)
        current_app.logger.warning(
            "STOW-RS from %s broke off after %d part(s), %d stored: %s",
            caller,
            len(outcomes),
            stored,
            exc,
        )
        raise WebError(exc.code, f"{exc}; {stored} instance(s) before it were stored") from exc
    if not outcomes:
        raise WebError(400, "the body has no parts")
    status, body = stow.response(outcomes, base_url(), study)
    response = _json_response(body)
    response.status_code = status
    return response


# -- DELETE (admins: viewer.auth) --------------------------------------------------------


@bp.delete("/studies/<study>")
@bp.delete("/studies/<study>/series/<series>")
@bp.delete("/studies/<study>/series/<series>/instances/<sop>")
def remove(study: str, series: str | None = None, sop: str | None = None) -> Response:
    """Delete a study, series or instance: files and rows, audited; 204, or 404."""
    for value, name in ((study, "study UID"), (series, "series UID"), (sop, "instance UID")):
        if value is not None:
            _uid(value, name)
    archive = _archive()
    if not archive.catalog.contains(study, series or "", sop or ""):
        raise WebError(404, "no such study, series or instance")
    level, uid = ("IMAGE", sop) if sop else ("SERIES", series) if series else ("STUDY", study)
    archive.retention.delete(level, uid, who=g.get("user", "") or request.remote_addr or "")
    return Response(status=204)
