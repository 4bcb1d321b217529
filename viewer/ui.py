"""The browser viewer: one HTML page and its ES modules, a DICOMweb client of this server.

Every path the page can show (`/`, `/study/...`) answers the same page, so deep links and
reloads work; the modules route on the URL. Nothing is loaded from another host.
"""

import json
from functools import cache

from flask import Blueprint
from flask import Response
from flask import g
from pydicom.datadict import DicomDictionary

from storage.dataset import is_uid

bp = Blueprint("ui", __name__, static_folder="static", static_url_path="/ui/static")


@bp.get("/")
@bp.get("/study/<path:rest>")
def page(rest: str = "") -> Response:
    g.audit = {"study_uid": _shown_study(rest)}  # its audit event looks up the patient
    response = bp.send_static_file("index.html")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'"
    )
    return response


def _shown_study(rest: str) -> str:
    """The study a /study/<uid>/... page shows ('' for none, or for a path that is no UID)."""
    study = rest.partition("/")[0]
    return study if is_uid(study) else ""


@bp.get("/ui/keywords.json")
def keywords() -> Response:
    """Tag → keyword for the tag panel, from pydicom's dictionary."""
    response = Response(_keywords(), mimetype="application/json")
    response.headers["Cache-Control"] = "public, max-age=86400"
    return response


@cache
def _keywords() -> str:
    return json.dumps({f"{tag:08X}": entry[4] for tag, entry in DicomDictionary.items()})
