"""The change feed over HTTP (storage.changefeed), in the shape of the Azure DICOM
service's v2 change feed, so clients written for it work here.

GET /changefeed answers a JSON array of entries in sequence order: `startTime`
(inclusive) and `endTime` (exclusive) select by Timestamp (ISO 8601; without a zone,
UTC), `offset` skips that many of the selected, `limit` (1-200, default 100) caps them,
`includemetadata` (default true) adds each current instance's DICOM JSON. `after=N`
(ours, not Azure's) keeps only entries numbered above N: the exact way to follow the feed,
as `pacs.changes` and `minipacs changes` do. GET /changefeed/latest answers the newest
entry, or 204 with no body while the feed is empty (Azure's null). Parameter names are
matched without regard to case, as Azure does.

Each entry has Azure's fields (Sequence, StudyInstanceUid, SeriesInstanceUid,
SopInstanceUid, Action, Timestamp, State, Metadata) and ours under `Minipacs`: `Who`, the
calling AE title or user of a create or update, whoever deleted for a delete. Both answers
carry `Minipacs-Feed-Start`, the lowest number still kept: a reader whose last number is
below it lost entries to pruning (`changefeed_days`).
"""

import json
from datetime import UTC
from datetime import datetime

from flask import Blueprint
from flask import Response
from flask import current_app
from flask import g
from flask import request

from storage import Archive
from storage.changefeed import MAX_LIMIT
from storage.changefeed import stamp
from storage.rows import ChangeEntry
from viewer.dicomweb import base_url
from viewer.dicomweb import with_bulk_urls
from viewer.errors import WebError
from viewer.errors import int_param

bp = Blueprint("changefeed", __name__)
START_HEADER = "Minipacs-Feed-Start"


@bp.get("/changefeed")
def read() -> Response:
    """Entries in sequence order, selected and paged by the query's parameters."""
    args = {name.lower(): value for name, value in reversed(list(request.args.items(multi=True)))}
    metadata = _flag(args, "includemetadata")
    entries = _archive().changes.read(
        after=int_param(args, "after", 0, minimum=0) or 0,
        start=_time(args, "starttime"),
        end=_time(args, "endtime"),
        offset=int_param(args, "offset", 0, minimum=0) or 0,
        limit=int_param(args, "limit", 100, minimum=1, maximum=MAX_LIMIT) or 100,
        metadata=metadata,
    )
    g.audit = {"entries": len(entries)}
    base = base_url()
    return _answer("[" + ",".join(_json(entry, metadata, base) for entry in entries) + "]")


@bp.get("/changefeed/latest")
def latest() -> Response:
    """The newest entry; 204 while nothing has changed."""
    args = {name.lower(): value for name, value in request.args.items()}
    metadata = _flag(args, "includemetadata")
    entry = _archive().changes.latest(metadata)
    if entry is None:
        response = Response(status=204)
        response.headers[START_HEADER] = str(_archive().changes.first())
        return response
    return _answer(_json(entry, metadata, base_url()))


def _json(entry: ChangeEntry, metadata: bool, base: str) -> str:
    """One entry as JSON text, its fields in Azure's order; the stored DICOM JSON is put in
    as it is (parsing and re-encoding ~12 KB an instance halved the read rate), its
    BulkDataURIs made absolute as WADO-RS metadata has them."""
    fields = {
        "Sequence": entry.sequence,
        "StudyInstanceUid": entry.study_uid,
        "SeriesInstanceUid": entry.series_uid,
        "SopInstanceUid": entry.sop_uid,
        "Action": entry.action,
        "Timestamp": entry.at,
        "State": entry.state,
    }
    text = json.dumps(fields, separators=(",", ":"))[:-1]
    if metadata:
        url = (
            f"{base}/studies/{entry.study_uid}/series/{entry.series_uid}/instances/{entry.sop_uid}"
        )
        stored = with_bulk_urls(entry.metadata, url) if entry.metadata else "null"
        text += f',"Metadata":{stored}'
    return text + f',"Minipacs":{json.dumps({"Who": entry.who})}}}'


def _answer(body: str) -> Response:
    response = Response(body, mimetype="application/json")
    response.headers[START_HEADER] = str(_archive().changes.first())
    return response


def _time(args: dict[str, str], name: str) -> str:
    """An ISO 8601 time parameter in the feed's stored form ('' when absent). A '+' of a
    zone offset sent unencoded arrives as a space; it is taken back."""
    value = args.get(name, "").strip()
    if not value:
        return ""
    for text in (value, value.replace(" ", "+")):
        try:
            when = datetime.fromisoformat(text)
            return stamp(when if when.tzinfo else when.replace(tzinfo=UTC))
        except (ValueError, OverflowError):  # not a time; beyond year 9999 in UTC
            continue
    raise WebError(400, f"{name} must be an ISO 8601 time, not {value[:40]!r}")


def _flag(args: dict[str, str], name: str) -> bool:
    value = args.get(name, "true").strip().lower()
    if value not in ("true", "false"):
        raise WebError(400, f"{name} must be true or false")
    return value == "true"


def _archive() -> Archive:
    return current_app.extensions["minipacs"]["archive"]
