"""Cohort exports over HTTP, as jobs (researcher or admin: viewer.auth.EXPORT_ROLES).

    POST   /api/exports                  queue one: 202, its id and Location
    GET    /api/exports                  every job
    GET    /api/exports/<id>             state (queued, running, done, failed, cancelled),
                                         progress (done of total), summary and problems
    DELETE /api/exports/<id>             cancel a queued or running job (202); a finished
                                         one's files are removed (204)
    GET    /api/exports/<id>/files       what it wrote: path and size of each file
    GET    /api/exports/<id>/files/PATH  one file, streamed from disk

A job is a record, `<data>/.exports/<id>.json`, beside its folder `<data>/.exports/<id>/`
(a dot-folder: reindex never looks in it). One thread of the server process (`run`,
started by pacs.server) takes queued jobs one at a time, oldest first, through
viewer.export; a job left running by a stop or a crash continues after the restart, and
viewer.export skips what it had done. The record is written by the request that makes it,
then only by that thread; a cancel is a marker file (`<id>.cancel`) the thread looks for
between instances. The folder is on the archive's disk: a job stops (failed, its `error`
says why) rather than leave less free than C-STORE's `disk_reserve_mb` and a margin
(viewer.export), and one job runs at a time per server, so exports never race ingest
for the last of the disk together.
"""

import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

from flask import Blueprint
from flask import Response
from flask import current_app
from flask import g
from flask import jsonify
from flask import request
from flask import send_from_directory

from storage import Archive
from storage import deidentify
from storage import files
from viewer import export as engine
from viewer.errors import WebError

log = logging.getLogger(__name__)
bp = Blueprint("exports", __name__, url_prefix="/api/exports")
FOLDER = ".exports"
POLL = 2.0  # seconds between looks for work when nothing woke the thread
ID = re.compile(r"[0-9]{8}T[0-9]{6}-[0-9a-f]{6}")
MEMBERS = {"query", "level", "formats", "deidentify", "options", "manifest", "tags"}
ACTIVE = ("queued", "running")
_wake = threading.Event()  # a job was queued or cancelled: look now


@bp.post("")
def create() -> tuple[Response, int, dict[str, str]]:
    """Queue an export; refused with 400 when it could not run (bad key, format, option,
    or nothing selected)."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise WebError(400, "send a JSON object: query, formats, deidentify, options, …")
    unknown = set(body) - MEMBERS
    if unknown:
        raise WebError(400, f"unknown member(s) {sorted(unknown)}; known: {sorted(MEMBERS)}")
    query = body.get("query")
    if not isinstance(query, dict) or not all(isinstance(v, str) for v in query.values()):
        raise WebError(400, 'query: an object of Keyword: "value" strings')
    asked = {
        "query": query,
        "level": str(body.get("level", "IMAGE")).upper(),
        "formats": body.get("formats", ["dicom"]),
        "deidentify": body.get("deidentify", False) is True,
        "options": body.get("options", ""),
        "manifest": body.get("manifest", "csv"),
        "tags": body.get("tags", ""),
    }
    try:
        chosen = _options(asked)
        engine.select(_archive(), asked["level"], query)
    except (engine.ExportError, TypeError) as exc:
        raise WebError(400, str(exc)) from None
    asked.update(formats=list(chosen.formats), options=",".join(chosen.deid_options))
    asked["tags"] = list(chosen.tags)
    stamp = datetime.now(UTC)
    job = {
        "id": f"{stamp:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}",
        "who": g.get("user", ""),
        "created": stamp.isoformat(timespec="seconds"),
        "request": asked,
        "state": "queued",
        "done": 0,
        "total": 0,
    }
    _save(_folder(), job)
    _wake.set()
    location = f"/api/exports/{job['id']}"
    return jsonify(_public(job)), 202, {"Location": location}


@bp.get("")
def listing() -> Response:
    folder = _folder()
    found = sorted(folder.glob("*.json")) if folder.is_dir() else []
    return jsonify([_public(_read(path)) for path in found])


@bp.get("/<job_id>")
def status(job_id: str) -> Response:
    return jsonify(_public(_job(job_id)))


@bp.delete("/<job_id>")
def cancel(job_id: str) -> tuple[Response | str, int]:
    """Cancel a queued or running job (it ends `cancelled`); remove a finished one."""
    job = _job(job_id)
    folder = _folder()
    if job["state"] in ACTIVE:
        (folder / f"{job_id}.cancel").touch()
        _wake.set()
        return jsonify({"id": job_id, "state": "cancelling"}), 202
    shutil.rmtree(folder / job_id, ignore_errors=True)
    for name in (f"{job_id}.cancel", f".{job_id}.lock", f"{job_id}.json"):
        (folder / name).unlink(missing_ok=True)
    return "", 204


@bp.get("/<job_id>/files")
def contents(job_id: str) -> Response:
    """The job's files (not its state files), path and size, in path order."""
    _job(job_id)
    top = _folder() / job_id
    found = []
    for where, folders, names in os.walk(top):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        for name in sorted(n for n in names if not n.startswith(".")):
            path = Path(where, name)
            found.append({"path": path.relative_to(top).as_posix(), "size": path.stat().st_size})
    return jsonify(found)


@bp.get("/<job_id>/files/<path:name>")
def file(job_id: str, name: str) -> Response:
    """One file of the job, streamed from disk (audited as a retrieve)."""
    _job(job_id)
    if any(part.startswith(".") for part in name.split("/")):
        raise WebError(404, "no such file")
    return send_from_directory(_folder() / job_id, name, max_age=0)


def run(archive: Archive, config: Any, stop: threading.Event) -> None:
    """The server's export thread: queued jobs one at a time, oldest first."""
    folder = archive.root / FOLDER
    while not stop.is_set():
        claimed = _claim(folder)
        if claimed is None:
            _wake.wait(POLL)
            _wake.clear()
            continue
        job, lock = claimed
        try:
            _run_job(archive, config, folder, job, stop)
        except Exception:  # never let one job end exports for good
            log.exception("export job %s failed", job["id"])
            _save(folder, {**job, "state": "failed", "error": "internal error (server log)"})
        finally:
            lock.close()


def _run_job(archive: Archive, config: Any, folder: Path, job: dict, stop) -> None:
    marker = folder / f"{job['id']}.cancel"
    if marker.exists():
        _save(folder, {**job, "state": "cancelled"})
        return
    asked = job["request"]
    job = {**job, "state": "running"}
    _save(folder, job)
    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        job.update(done=done, total=total)
        if time.monotonic() - last[0] >= 0.5:
            last[0] = time.monotonic()
            _save(folder, job)

    try:
        chosen = _options(asked)
        profile = None
        if chosen.deidentify:
            key = files.secret(archive.root / ".deid-key")
            profile = deidentify.Profile(key, frozenset(chosen.deid_options))
        out = folder / job["id"]
        plan = engine.prepare(archive, out, asked["level"], asked["query"], chosen, profile)
        who = f"{job['who'] or 'anyone on loopback'} (export job {job['id']})"
        work = engine.Export(
            archive,
            out,
            plan,
            profile,
            who,
            config.pixel_budget_mb << 20,
            config.disk_reserve_mb << 20,
        )
        outcome = work.run(progress, lambda: stop.is_set() or marker.exists())
    except engine.ExportError as exc:
        _save(folder, {**job, "state": "failed", "error": str(exc)})
        return
    if outcome.cancelled:
        state = "cancelled" if marker.exists() else "running"  # a stop: resumed at start-up
    else:
        state = "failed" if outcome.problems else "done"
    job.update(
        state=state,
        summary=outcome.summary(),
        problems=[{"what": what, "why": why} for what, why in outcome.problems[:100]],
        notes=[{"what": what, "why": why} for what, why in outcome.notes[:100]],
    )
    if outcome.stopped:
        job["error"] = outcome.stopped
    _save(folder, job)
    log.info("export job %s: %s %s", job["id"], state, outcome.summary())


def _options(asked: dict) -> engine.Options:
    return engine.options(
        asked["formats"], asked["deidentify"], asked["options"], asked["manifest"], asked["tags"]
    )


def _claim(folder: Path):
    """The oldest job that is queued, or was running when a server stopped, and no other
    server sharing the data folder runs: (job, its lock, held until closed), or None."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*.json")):
        if _read(path).get("state") not in ACTIVE:
            continue
        lock = open(folder / f".{path.stem}.lock", "a")  # noqa: SIM115 (held while it runs)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        job = _read(path)  # again, under the lock: another server may have finished it
        if job.get("state") in ACTIVE:
            return job, lock
        lock.close()
    return None


def _job(job_id: str) -> dict:
    path = _folder() / f"{job_id}.json"
    if not ID.fullmatch(job_id) or not path.is_file():
        raise WebError(404, f"no export job {job_id}")
    return _read(path)


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _save(folder: Path, job: dict) -> None:
    folder.mkdir(exist_ok=True)
    aside = folder / f".{job['id']}.json.tmp"
    aside.write_text(json.dumps(job))
    os.replace(aside, folder / f"{job['id']}.json")


def _public(job: dict) -> dict:
    return {**job, "location": f"/api/exports/{job['id']}"}


def _folder() -> Path:
    return _archive().root / FOLDER


def _archive() -> Archive:
    return current_app.extensions["minipacs"]["archive"]
