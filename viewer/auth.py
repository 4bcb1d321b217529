"""Who may do what over HTTP: the one `before_request` check (DESIGN.md "Security").

With no user in the index, every request is allowed (a loopback-only server, as before;
`minipacs serve` refuses to listen beyond loopback without users). Once there is one,
each request needs a bearer token (`Authorization: Bearer …`, for scripts) or the session
cookie of the login page (browsers), and a role: `viewer` reads, `uploader` also stores
(STOW-RS), `admin` also deletes and reads the audit trail. The session cookie is
HttpOnly, SameSite=Strict and Secure over HTTPS; a state-changing request carried by the
cookie must also come from our own origin (Origin/Referer), so no other site can make a
logged-in browser store or delete.
"""

from html import escape
from pathlib import Path
from urllib.parse import quote
from urllib.parse import urlsplit

from flask import Blueprint
from flask import Response
from flask import current_app
from flask import g
from flask import jsonify
from flask import redirect
from flask import request
from flask import session

from storage import Archive
from storage import audit
from storage import files
from storage import users

bp = Blueprint("auth", __name__)
PUBLIC = {"auth.login", "auth.login_form", "healthz", "ui.static"}
NEEDS = {"GET": "viewer", "HEAD": "viewer", "OPTIONS": "viewer", "POST": "uploader",
         "DELETE": "admin"}  # fmt: skip
ADMIN_ENDPOINTS = {"auth.audit_trail", "prometheus"}
AUDIT_FILTERS = ("event", "who", "patient_id", "study_uid", "since", "until")


def session_key(data: Path) -> bytes:
    """The key that signs session cookies: kept in the data folder, so sessions survive
    restarts and every server sharing the folder accepts them."""
    return files.secret(data / ".session-key")


def check() -> Response | None:
    """before_request: authenticate, then authorise by role; None lets the request on."""
    archive = _archive()
    g.user = ""
    if request.endpoint in PUBLIC or not archive.accounts(users.count):
        return None
    header = request.headers.get("Authorization", "")
    found = None
    if header.startswith("Bearer "):
        found = archive.accounts(users.by_token, header[7:].strip())
        if found is None:
            return _denied(401, "the bearer token is unknown, removed or expired")
    elif "user" in session:
        found = (session["user"], session["role"])
        if request.method not in ("GET", "HEAD", "OPTIONS") and not _same_origin():
            return _denied(403, "cross-site request refused (Origin is not this server)")
    if found is None:
        if _wants_html():
            return redirect(f"/login?next={quote(request.full_path.rstrip('?'), safe='/')}")
        return _denied(401, "log in or send Authorization: Bearer <token>")
    g.user, role = found
    needed = "admin" if request.endpoint in ADMIN_ENDPOINTS else NEEDS.get(request.method, "admin")
    if users.ROLES.index(role) < users.ROLES.index(needed):
        return _denied(403, f"{g.user} ({role}) may not do this; it needs {needed}")
    return None


@bp.get("/login")
def login_form(error: str = "") -> Response:
    target = request.values.get("next", "/")
    body = LOGIN_PAGE.format(next=escape(target), error=escape(error))
    response = Response(body, status=401 if error else 200, mimetype="text/html")
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/login")
def login() -> Response:
    name = request.form.get("user", "")
    found = _archive().accounts(users.by_password, name, request.form.get("password", ""))
    _archive().audit(
        audit.Event(
            "login",
            "success" if found else "failure: wrong user or password",
            who=name[:64],
            address=request.remote_addr or "",
        )  # fmt: skip
    )
    if found is None or not _same_origin():
        return login_form("Wrong user name or password.")
    session.clear()
    session["user"], session["role"] = found
    target = request.form.get("next", "/")
    if not target.startswith("/") or target.startswith("//"):  # never off-site
        target = "/"
    return redirect(target, code=303)


@bp.post("/logout")
def logout() -> Response:
    session.clear()
    return redirect("/login", code=303)


@bp.get("/audit")
def audit_trail() -> Response:
    """The audit trail as JSON (admins): the filters of `minipacs audit` as parameters,
    at most `limit` (default 1000) events from `offset`."""
    filters = {name: request.args.get(name, "") for name in AUDIT_FILTERS}
    try:
        limit = min(int(request.args.get("limit", 1000)), 10000)
        offset = int(request.args.get("offset", 0))
    except ValueError:
        return _denied(400, "limit and offset are whole numbers")
    events = []
    for number, row in enumerate(_archive().audit_events(**filters)):
        if number >= offset + limit:
            break
        if number >= offset:
            events.append({k: v for k, v in row.items() if k != "prev_hash"})
    return jsonify(events)


def _same_origin() -> bool:
    origin = request.headers.get("Origin") or request.headers.get("Referer", "")
    if not origin:
        return False
    return urlsplit(origin).netloc == request.host


def _wants_html() -> bool:
    """A browser navigating (it names text/html); a script's */* gets a 401 instead."""
    named = [kind for kind, quality in request.accept_mimetypes if quality > 0]
    return request.method == "GET" and "text/html" in named


def _denied(status: int, message: str) -> Response:
    _archive().audit(
        audit.Event(
            "rejected",
            f"failure: HTTP {status}: {message}",
            who=g.get("user", ""),
            address=request.remote_addr or "",
            detail={"method": request.method, "path": request.path},
        )  # fmt: skip
    )
    response = jsonify(error=message)
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="minipacs"'
    return response


def _archive() -> Archive:
    return current_app.extensions["minipacs"]["archive"]


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>minipacs: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/ui/static/style.css"></head>
<body><main class="login"><h1>minipacs</h1><p class="error">{error}</p>
<form method="post" action="/login"><input type="hidden" name="next" value="{next}">
<label>User <input name="user" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password"
required></label><button type="submit">Log in</button></form></main></body></html>
"""
