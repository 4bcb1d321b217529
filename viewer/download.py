"""A study or series as a ZIP to save, burn on a CD or mail: its files as stored and a
DICOMDIR (PS3.10 media, storage.fileset), streamed as it is written.

`/studies/<study>/archive` and `/studies/<study>/series/<series>/archive`, at the root of
the site: the viewer's own pages are `/study/...` and DICOMweb is under `/dicom-web`.
Access is the read role's (the one `before_request` check); the app's audit hook records
each download as a retrieval.
"""

import logging
from collections.abc import Iterator

from flask import Blueprint
from flask import Response
from flask import current_app
from flask import g

from storage import Archive
from storage import fileset
from storage.dataset import is_uid
from storage.errors import StorageError
from viewer.errors import WebError

bp = Blueprint("download", __name__)
log = logging.getLogger(__name__)


@bp.get("/studies/<study>/archive")
@bp.get("/studies/<study>/series/<series>/archive")
def archive(study: str, series: str = "") -> Response:
    """The ZIP, named by UIDs only (the name travels with the file: no patient data)."""
    for name, uid in (("study", study), ("series", series)):
        if uid and not is_uid(uid):
            raise WebError(400, f"{name} UID {uid[:80]!r} is not a valid UID")
    archive: Archive = current_app.extensions["minipacs"]["archive"]
    plan = archive.catalog.file_set(study, series)
    if plan is None:
        what = f"series {series} of study {study}" if series else f"study {study}"
        raise WebError(404, f"no {what} in the archive")
    g.audit = {"instances": len(plan.members)}  # the audit event's detail
    name = f"series-{series}.zip" if series else f"study-{study}.zip"
    archive.files.local(plan.members[0].path)  # a store that does not answer: 503, not a cut ZIP
    chunks = fileset.zip_chunks(plan, archive.files.local)
    response = Response(_logged(chunks, name), mimetype="application/zip")
    response.headers["Content-Disposition"] = f'attachment; filename="{name}"'
    response.headers["Cache-Control"] = "private, no-store"
    return response


def _logged(chunks: Iterator[bytes], name: str) -> Iterator[bytes]:
    """The chunks; a file that cannot be read halfway (deleted meanwhile) ends the
    response early, so the client sees a broken ZIP and the log says why."""
    try:
        yield from chunks
    except (OSError, StorageError) as exc:  # StorageError: the object store stopped answering
        log.warning("%s: stopped: %s", name, exc)
        raise
