"""Who may do what over HTTP: the one `before_request` check (docs/architecture.md).

With no user in the index, a loopback-only server lets every request through (as before
users existed); beyond loopback, no user means no access, on every request. Otherwise each
request needs a bearer token (`Authorization: Bearer …`, for scripts) or the session
cookie of the login page (browsers), and a role: `viewer` reads, `uploader` also stores
(STOW-RS), `admin` also deletes and reads the audit trail; cohort exports (/api/exports)
are for `researcher` (who otherwise reads, as `viewer`) and `admin` only. A session is
checked against the index on every request (a removed user, or a new password, ends it;
the role is the index's) and ends after `session_idle_minutes` without a request or
`session_hours` after login. The session cookie is HttpOnly, SameSite=Strict and Secure
over HTTPS; a state-changing request carried by the cookie must also come from our own
origin (Origin/Referer), so no other site can make a logged-in browser store or delete.
Failed logins are throttled per user name and per address; a body over HEAD_BODY needs
credentials before waitress reads it (`check_head`, called by pacs.server).
"""

import dataclasses
import io
import threading
import time
from collections import deque
from html import escape
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote
from urllib.parse import urlsplit

from flask import Blueprint
from flask import Flask
from flask import Response
from flask import current_app
from flask import g
from flask import jsonify
from flask import redirect
from flask import request
from flask import session
from flask.sessions import SecureCookieSessionInterface
from itsdangerous import URLSafeTimedSerializer

from storage import Archive
from storage import audit
from storage import files
from storage import users
from viewer.errors import WebError
from viewer.errors import int_param

bp = Blueprint("auth", __name__)
PUBLIC = {"auth.login", "auth.login_form", "auth.logout", "healthz", "ui.static"}
NEEDS = {"GET": "viewer", "HEAD": "viewer", "OPTIONS": "viewer", "POST": "uploader",
         "DELETE": "admin"}  # fmt: skip
ADMIN_ENDPOINTS = {"auth.audit_trail", "prometheus"}
# Cohort export takes patient data out in bulk: its own roles, outside the linear order
# (an uploader, a modality's account, may store but not export).
EXPORT_ROLES = ("researcher", "admin")
AUDIT_FILTERS = ("event", "who", "patient_id", "study_uid", "since", "until")
HEAD_BODY = 16 << 10  # larger bodies need credentials before waitress reads them
SEEN_EVERY = 60  # seconds between rewrites of a session's last-seen time (its cookie)
MAX_THROTTLED = 10000  # user names and addresses whose failed logins are remembered


class Caller(NamedTuple):
    name: str
    role: str
    cookie: bool = False  # by the session cookie: state changes must come from our origin


# No user in the index, loopback only: open, as minipacs was before it had users.
ANYONE = Caller("", "admin")


class Sessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions with their serializer made once per key: Flask made
    one (itsdangerous) on every request, with a cookie or not."""

    def __init__(self) -> None:
        self._made: dict[tuple, URLSafeTimedSerializer | None] = {}

    def get_signing_serializer(self, app: Flask) -> URLSafeTimedSerializer | None:
        key = (
            app.secret_key,
            tuple(app.config.get("SECRET_KEY_FALLBACKS") or ()),
        )  # the key: Flask 3.1+
        if key not in self._made:
            self._made[key] = super().get_signing_serializer(app)
        return self._made[key]


def session_key(data: Path) -> bytes:
    """The key that signs session cookies: kept in the data folder, so sessions survive
    restarts and every server sharing the folder accepts them."""
    return files.secret(data / ".session-key")


def check() -> Response | None:
    """before_request: authenticate, then authorise by role; None lets the request on."""
    g.user = ""
    if request.endpoint in PUBLIC:
        return None
    caller = _caller()
    if caller is None:
        if _wants_html():
            return redirect(f"/login?next={quote(request.full_path.rstrip('?'), safe='/')}")
        raise _denied(401, "log in or send Authorization: Bearer <token>")
    g.user = caller.name
    if caller.cookie and request.method not in ("GET", "HEAD", "OPTIONS") and not _same_origin():
        raise _denied(403, "cross-site request refused (Origin is not this server)")
    _check_role(caller)
    return None


def check_head(
    app: Flask, method: str, path: str, headers: dict[str, str], address: str
) -> Response | None:
    """The credentials and role of a request whose body has not been read (pacs.server
    asks before waitress reads a body over HEAD_BODY bytes, which it would otherwise take
    whole, from anyone, before the app runs): the refusal, or None. `headers` as waitress
    parses them (CONTENT_TYPE, AUTHORIZATION, COOKIE…)."""
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "minipacs",
        "SERVER_PORT": "0",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": address,
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        **{f"HTTP_{name}": value for name, value in headers.items()},
    }
    with app.request_context(environ):
        g.user = ""
        try:
            caller = _caller()
            if caller is None:
                limit = HEAD_BODY >> 10
                raise _denied(401, f"a body over {limit} KiB needs a login or a bearer token")
            g.user = caller.name
            _check_role(caller)
        except WebError as refusal:
            return refusal.get_response()
        return None


class Throttle:
    """Failed logins per user name and per client address over a sliding window, in this
    process (several servers on one index count apart): enough failures refuse every
    login of that name or from that address, right password or not, until they age out."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def wait(self, *keys: str) -> float:
        """Seconds until a login for these keys may be tried again (0: now)."""
        now = time.monotonic()
        with self._lock:
            waits = [self._prune(key, now) for key in keys]
        return max(waits, default=0.0)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in keys:
                self._failures.setdefault(key, deque(maxlen=self.limit)).append(now)
                self._failures[key] = self._failures.pop(key)  # newest last
            while len(self._failures) > MAX_THROTTLED:
                del self._failures[next(iter(self._failures))]

    def forget(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)

    def _prune(self, key: str, now: float) -> float:
        times = self._failures.get(key)
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times or len(times) < self.limit:
            return 0.0
        return times[0] + self.window - now


@bp.get("/login")
def login_form(error: str = "", status: int = 200) -> Response:
    target = request.values.get("next", "/")
    body = LOGIN_PAGE.format(next=escape(target), error=escape(error))
    response = Response(body, status=status, mimetype="text/html")
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.post("/login")
def login() -> Response:
    name = request.form.get("user", "")
    address = request.remote_addr or ""
    keys = (f"user {name}", f"address {address}")
    throttle: Throttle = current_app.extensions["minipacs"]["logins"]
    wait = throttle.wait(*keys)
    if wait:
        _login_event(name, "failure: too many failed logins")
        minutes = int(wait // 60) + 1
        response = login_form(f"Too many failed logins: try again in {minutes} minute(s).", 429)
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    found = _archive().accounts(users.by_password, name, request.form.get("password", ""))
    if found is None:
        _login_event(name, "failure: wrong user or password")
        throttle.failed(*keys)
        return login_form("Wrong user name or password.", 401)
    if not _same_origin():  # a right password from another site, or with no Origin: refused
        _login_event(name, "failure: Origin is not this server")
        return login_form("Wrong user name or password.", 401)
    _login_event(name, "success")
    throttle.forget(keys[0])
    session.clear()
    now = int(time.time())
    session.update(user=found[0], stamp=found[2], since=now, seen=now)
    return redirect(local_target(request.form.get("next", "/")), code=303)


def local_target(target: str) -> str:
    """`target` if it is a path on this server, else "/": never a redirect off-site.
    Normalised first as browsers read a Location (tabs and newlines dropped, "\\" taken
    as "/"), so "/\\t/evil.com" cannot become "//evil.com" after the check."""
    cleaned = target.translate(URL_IGNORED).replace("\\", "/")
    if not cleaned.startswith("/") or cleaned.startswith("//"):
        return "/"
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in cleaned):  # Location would mangle them
        return "/"
    return cleaned


@bp.post("/logout")
def logout() -> Response:
    """End the session (any role, or none: the page is public)."""
    session.clear()
    return redirect("/login", code=303)


@bp.get("/audit")
def audit_trail() -> Response:
    """The audit trail as JSON (admins): the filters of `minipacs audit` as parameters,
    at most `limit` (default 1000) events from `offset`."""
    filters = {name: request.args.get(name, "") for name in AUDIT_FILTERS}
    limit = min(int_param(request.args, "limit", 1000, minimum=1) or 1000, 10000)
    offset = int_param(request.args, "offset", 0, minimum=0)
    events = []
    for number, row in enumerate(_archive().audit_events(**filters)):
        if number >= offset + limit:
            break
        if number >= offset:
            events.append({k: v for k, v in dataclasses.asdict(row).items() if k != "prev_hash"})
    return jsonify(events)


def _caller() -> Caller | None:
    """Who sends this request: a bearer token's user, or the session cookie's while it is
    fresh and its user unchanged; ANYONE when no user exists on a loopback-only server
    (beyond loopback, no user means no access); None: nobody. A bad token raises 401."""
    archive = _archive()
    if not _config().beyond_loopback and not archive.accounts(users.count):
        return ANYONE
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        found = archive.accounts(users.by_token, header[7:].strip())
        if found is None:
            raise _denied(401, "the bearer token is unknown, removed or expired")
        return Caller(*found)
    if "user" in session:
        found = _session_user(archive)
        if found is not None:
            return Caller(*found, cookie=True)
    return None


def _session_user(archive: Archive) -> tuple[str, str] | None:
    """(name, role now) of the session, checked against the index on every request; an
    idle, too old or orphaned session is cleared (its cookie deleted)."""
    config, now = _config(), int(time.time())
    fresh = (
        now - session.get("since", 0) < config.session_hours * 3600
        and now - session.get("seen", 0) < config.session_idle_minutes * 60
    )
    found = None
    if fresh:
        found = archive.accounts(users.by_session, session["user"], session.get("stamp", ""))
    if found is None:
        session.clear()
        return None
    if now - session["seen"] >= SEEN_EVERY:
        session["seen"] = now
    return found


def _check_role(caller: Caller) -> None:
    if request.blueprint == "exports":
        if caller.role not in EXPORT_ROLES:
            raise _denied(403, f"{caller.name} ({caller.role}) may not export; it needs "
                          f"{' or '.join(EXPORT_ROLES)}")  # fmt: skip
        return
    needed = "admin" if request.endpoint in ADMIN_ENDPOINTS else NEEDS.get(request.method, "admin")
    if users.ROLES.index(caller.role) < users.ROLES.index(needed):
        raise _denied(403, f"{caller.name} ({caller.role}) may not do this; it needs {needed}")


def _login_event(name: str, outcome: str) -> None:
    _archive().audit(
        audit.Event("login", outcome, who=name[:64], address=request.remote_addr or "")
    )


def _same_origin() -> bool:
    origin = request.headers.get("Origin") or request.headers.get("Referer", "")
    if not origin:
        return False
    return urlsplit(origin).netloc == request.host


def _wants_html() -> bool:
    """A browser navigating (it names text/html); a script's */* gets a 401 instead."""
    named = [kind for kind, quality in request.accept_mimetypes if quality > 0]
    return request.method == "GET" and "text/html" in named


def _denied(status: int, message: str) -> WebError:
    """The refusal to raise, audited as a `rejected` event."""
    _archive().audit(
        audit.Event(
            "rejected",
            f"failure: HTTP {status}: {message}",
            who=g.get("user", ""),
            address=request.remote_addr or "",
            detail={"method": request.method, "path": request.path},
        )  # fmt: skip
    )
    challenge = [("WWW-Authenticate", 'Bearer realm="minipacs"')] if status == 401 else []
    return WebError(status, message, challenge)


def _archive() -> Archive:
    return current_app.extensions["minipacs"]["archive"]


def _config():
    return current_app.extensions["minipacs"]["config"]


# What a browser drops from a URL before reading it (WHATWG URL: tab, LF, CR).
URL_IGNORED = str.maketrans("", "", "\t\n\r")
LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>minipacs: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><link rel="stylesheet" href="/ui/static/style.css"></head>
<body><main class="login"><h1>minipacs</h1><p class="error">{error}</p>
<form method="post" action="/login"><input type="hidden" name="next" value="{next}">
<label>User <input name="user" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password"
required></label><button type="submit">Log in</button></form></main></body></html>
"""
