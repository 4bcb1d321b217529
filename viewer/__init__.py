"""The web side: a Flask app factory with the WADO-URI, DICOMweb and viewer (UI)
blueprints."""

import functools
import logging
import shutil
import time
from typing import Any

from flask import Flask
from flask import Response
from flask import current_app
from flask import g
from flask import jsonify
from flask import request
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from storage import Archive
from storage import audit
from storage import deidentify
from storage import files
from storage import metrics
from storage.errors import ObjectStoreError
from viewer.errors import WebError

CORS_HEADERS = "Authorization, Accept, Content-Type, If-None-Match, Cache-Control"
EXPOSED_HEADERS = "Content-Type, Content-Length, Content-Location, Content-Encoding, ETag, Warning"


def create_app(config: Any, archive: Archive) -> Flask:
    """Build the app around one long-lived archive (kept in `app.extensions`)."""
    from viewer import auth
    from viewer import changefeed
    from viewer import dicomweb
    from viewer import download
    from viewer import export_jobs
    from viewer import mpr
    from viewer import reading
    from viewer import render
    from viewer import ui
    from viewer import wado_uri
    from viewer import worklist

    app = Flask(__name__)
    app.extensions["minipacs"] = {
        "config": config,
        "archive": archive,
        "frames": render.FrameCache(config.render_cache_mb << 20),
        "volumes": mpr.VolumeCache(config.volume_cache_mb << 20),
        "stats": {},  # the archive's counts for /metrics, refreshed once a minute
        "logins": auth.Throttle(config.login_failures, config.login_lockout_minutes * 60),
        # The key file is made on first use, not by every start.
        "deid": functools.cache(
            lambda: deidentify.Profile(
                files.secret(archive.root / ".deid-key"),
                deidentify.parse_options(config.deid_options),
            )
        ),
    }
    app.secret_key = auth.session_key(archive.root)
    app.session_interface = auth.Sessions()
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=bool(config.https_cert) or config.public_url.startswith("https:"),
        SESSION_COOKIE_NAME="minipacs_session",
        # The cookie's signature ages out with the session (auth also checks idle time).
        PERMANENT_SESSION_LIFETIME=config.session_hours * 3600,
    )
    app.register_error_handler(HTTPException, _error)
    app.register_error_handler(ObjectStoreError, _store_error)
    app.before_request(_start_clock)
    app.before_request(auth.check)
    app.register_blueprint(auth.bp)
    app.register_blueprint(wado_uri.bp)
    app.register_blueprint(dicomweb.bp)
    app.register_blueprint(ui.bp)
    app.register_blueprint(worklist.bp)
    app.register_blueprint(export_jobs.bp)
    app.register_blueprint(changefeed.bp)
    app.register_blueprint(download.bp)
    app.register_blueprint(reading.bp)
    if config.trust_proxy:  # scheme, host and prefix as the client sees them
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1, x_prefix=1)
    if config.cors_origins:
        app.after_request(lambda response: _cors(response, config.cors_origins))
    app.after_request(lambda response: _audit(response, archive))
    app.after_request(_security_headers)
    app.after_request(_count)

    @app.get("/healthz")
    def healthz():
        """200 when the index answers and the data folder takes a file; else 503 and why
        (for a load balancer or a probe: no patient data, no login)."""
        problems = archive.health()
        if problems:
            return jsonify(status="unhealthy", problems=problems), 503
        return jsonify(status="ok", aet=config.aet, dicom_port=config.port)

    @app.get("/metrics")
    def prometheus():
        """This server's counters, its DICOM workers', archive gauges: Prometheus text, or
        OpenMetrics when the scraper's Accept asks for it (prometheus_client decides)."""
        state = app.extensions["minipacs"]
        gauges = _archive_gauges(archive, state["stats"])
        gauges["minipacs_frame_cache_bytes"] = state["frames"].bytes
        gauges["minipacs_volume_cache_bytes"] = state["volumes"].bytes
        accept = request.headers.get("Accept", "")
        body, content_type = metrics.exposition(archive.root / ".metrics", gauges, accept)
        return Response(body, content_type=content_type)

    return app


AUDITED = {  # endpoint → audit event; STOW-RS instances are audited as they are stored
    "dicomweb.search_studies": "query",
    "dicomweb.search_series": "query",
    "dicomweb.search_instances": "query",
    "dicomweb.metadata": "retrieve",
    "dicomweb.retrieve": "retrieve",
    "dicomweb.frames": "retrieve",
    "dicomweb.bulkdata": "retrieve",
    "dicomweb.rendered": "retrieve",
    "dicomweb.thumbnail": "retrieve",
    "wado_uri.wado": "retrieve",
    "download.archive": "retrieve",
    "ui.page": "view",
    "worklist.items": "query",
    "worklist.add": "worklist",
    "worklist.remove": "worklist",
    "auth.audit_trail": "audit",
    "exports.file": "retrieve",  # the export itself is audited as it runs (viewer.export)
    "changefeed.read": "query",
    "changefeed.latest": "query",
    "reading.series_geometry": "retrieve",
    "reading.roi_statistics": "retrieve",
    "reading.mpr_planes": "retrieve",
    "reading.mpr_image": "retrieve",
    "reading.read_measurements": "retrieve",  # a save is audited as the stores it makes
}


def _error(error: HTTPException):
    """Every error response, of any blueprint or of werkzeug's routing: one JSON shape."""
    answer = WebError.of(error)
    level = logging.WARNING if answer.code >= 422 else logging.INFO
    current_app.logger.log(level, "%s %s: %s %s", request.method, request.path, answer.code, answer)
    return answer.get_response()


def _store_error(error: ObjectStoreError):
    """The object store could not give an instance's bytes: 503, the store's message, and
    a hint to try again (the instance is not lost; its bytes are not at hand now)."""
    return _error(WebError(503, str(error), [("Retry-After", "10")]))


def _start_clock() -> None:
    g.started = time.monotonic()


def _count(response: Response) -> Response:
    seconds = time.monotonic() - g.get("started", time.monotonic())
    metrics.http(request.method, response.status_code, request.endpoint or "none", seconds)
    return response


def _archive_gauges(archive: Archive, cache: dict) -> dict[str, float]:
    """Counts from the index (at most once a minute: a count over 1M rows is not free)
    and the free space of the data folder."""
    minute = int(time.time() // 60)
    if cache.get("minute") != minute:
        cache.update(minute=minute, figures=archive.catalog.stats())
    figures = cache["figures"]
    queue = archive.route_queue.depth()
    return {
        "minipacs_route_pending": queue["pending"] + queue["sending"],
        "minipacs_route_failed": queue["failed"],
        "minipacs_archive_instances": figures["instances"],
        "minipacs_archive_bytes": figures.get("bytes", 0),
        "minipacs_disk_free_bytes": shutil.disk_usage(archive.root).free,
    }


def _audit(response: Response, archive: Archive) -> Response:
    """One audit event per request for patient data: what was asked (path, query), by whom
    (the user and the client's address), and the HTTP status; a view adds what only it
    knows in `g.audit` (the patients its answer showed, the study a page shows)."""
    kind = AUDITED.get(request.endpoint or "")
    if kind is None or request.method == "OPTIONS":
        return response
    if kind == "retrieve" and request.values.get("anonymize") == "yes":
        kind = "deidentify"
    uids = request.view_args or {}
    status = response.status_code
    found = dict(g.get("audit", {}))
    archive.audit(
        audit.Event(
            kind,
            "success" if status < 400 else f"failure: HTTP {status}",
            who=g.get("user", ""),
            address=request.remote_addr or "",
            patient_id=found.pop("patient_id", ""),
            study_uid=found.pop("study_uid", "")
            or uids.get("study")
            or request.values.get("studyUID", ""),
            detail={
                "method": request.method,
                "path": request.path,
                "query": request.query_string.decode("latin-1"),
                **found,
            },
        )
    )
    return response


def _security_headers(response: Response) -> Response:
    """On every response: no MIME sniffing, no framing by other sites, no URL (which holds
    UIDs) in Referer headers to other origins; over HTTPS, HSTS."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; style-src 'self'; frame-ancestors 'none'; form-action 'self'",
    )
    if request.scheme == "https":  # browsers keep to HTTPS for this host name from now on
        response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
    return response


def _cors(response: Response, origins: tuple[str, ...]) -> Response:
    """Cross-origin access for the configured origins (preflight included); CORP lets pages
    with cross-origin isolation (OHIF's COEP) load images and bulk data."""
    response.headers["Cross-Origin-Resource-Policy"] = "cross-origin"
    origin = request.headers.get("Origin", "").rstrip("/")
    if not origin or ("*" not in origins and origin not in origins):
        return response
    response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
    response.headers.add("Vary", "Origin")
    response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    if request.method == "OPTIONS":
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
        response.headers["Access-Control-Max-Age"] = "600"
    return response
