"""The worklist over HTTP, for a RIS or a script: GET lists the items, POST adds one (a JSON
object of DICOM keywords, as `minipacs worklist add`) or several (a list), DELETE
removes one. Roles as everywhere: viewer reads, uploader adds, admin deletes."""

from flask import Blueprint
from flask import Response
from flask import current_app
from flask import g
from flask import jsonify
from flask import request

from storage.worklist import WorklistError
from viewer.errors import WebError

bp = Blueprint("worklist", __name__, url_prefix="/api/worklist")


@bp.get("")
def items() -> Response:
    found = _archive().worklist.items()
    g.audit = {"patients": sorted({item["patient_id"] for item in found})}  # names, birth dates
    return jsonify(found)


@bp.post("")
def add() -> Response:
    body = request.get_json(silent=True)
    entries = body if isinstance(body, list) else [body]
    if not entries or not all(isinstance(e, dict) for e in entries):
        raise WebError(400, "the body is a JSON object of DICOM keywords, or a list of them")
    added: list[int] = []
    g.audit = {"ids": added, "patients": [str(e.get("PatientID", "")) for e in entries]}
    for entry in entries:
        try:
            added.append(_archive().worklist.add({k: str(v) for k, v in entry.items()}))
        except WorklistError as exc:
            raise WebError(400, f"item {len(added) + 1}: {exc}", added=added) from exc
    return jsonify(ids=added), 201


@bp.delete("/<int:item_id>")
def remove(item_id: int) -> Response:
    if not _archive().worklist.remove(item_id):
        raise WebError(404, f"no worklist item {item_id}")
    return Response(status=204)


def _archive():
    return current_app.extensions["minipacs"]["archive"]
