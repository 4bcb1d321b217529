"""HTTP access control with `requests`: roles, bearer tokens, the login page and its
cookie, cross-site requests, security headers, and no open server beyond loopback."""

import http.client
import json
import socket
import subprocess
import sys
from urllib.parse import urlencode

import conftest
import pydicom
import pytest
import requests
from conftest import ROOT
from conftest import TEST_FILES
from conftest import Server
from conftest import free_port
from conftest import minipacs
from test_dicomweb_http import stow_body

PASSWORD = "correct horse battery"
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'
CT = TEST_FILES / "CT_small.dcm"


def add_user(server, name: str, role: str) -> str:
    """Add a user and return a fresh bearer token of theirs, in this process (what the
    commands call; test_roles_and_tokens runs them: `user_commands`)."""
    return conftest.add_user(server.data, name, role, PASSWORD, server.index)


def user_commands(server, name: str, role: str) -> str:
    """`minipacs user add` and `minipacs user token`: the new user's token."""
    data = ["--data", str(server.data)]
    minipacs("user", "add", name, "--role", role, "--password-stdin", *data, input=PASSWORD)
    return minipacs("user", "token", name, *data).stdout.strip()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def stow(server, headers: dict, session=requests) -> requests.Response:
    headers = {"Content-Type": STOW_TYPE, "Accept": "application/dicom+json", **headers}
    return session.post(
        f"{server.url}/dicom-web/studies", data=stow_body([CT.read_bytes()]), headers=headers
    )


def test_roles_and_tokens(server):
    viewer, uploader, admin = (
        user_commands(server, n, r)
        for n, r in (("alice", "viewer"), ("bob", "uploader"), ("root", "admin"))
    )
    studies = f"{server.url}/dicom-web/studies"
    anonymous = requests.get(studies)
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == 'Bearer realm="minipacs"'
    assert requests.get(studies, headers=bearer("not-a-token")).status_code == 401
    assert requests.get(studies, headers=bearer(viewer)).status_code in (200, 204)

    assert stow(server, bearer(viewer)).status_code == 403
    assert stow(server, bearer(uploader)).status_code == 200
    study = pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID
    assert requests.delete(f"{studies}/{study}", headers=bearer(uploader)).status_code == 403
    assert requests.delete(f"{studies}/{study}", headers=bearer(admin)).status_code == 204
    assert requests.delete(f"{studies}/{study}", headers=bearer(admin)).status_code == 404
    assert requests.get(f"{studies}/{study}/metadata", headers=bearer(admin)).status_code == 404

    assert requests.get(f"{server.url}/audit", headers=bearer(viewer)).status_code == 403
    trail = requests.get(f"{server.url}/audit?event=delete", headers=bearer(admin)).json()
    assert [(e["who"], e["study_uid"]) for e in trail] == [("root", study)]

    server.rows("UPDATE apitoken SET expires_at = '2000-01-01T00:00:00Z'")  # all expired
    assert requests.get(studies, headers=bearer(admin)).status_code == 401
    fresh = minipacs("user", "token", "alice", "--data", str(server.data)).stdout.strip()
    assert requests.get(studies, headers=bearer(fresh)).status_code in (200, 204)
    minipacs("user", "remove", "alice", "--data", str(server.data))
    assert requests.get(studies, headers=bearer(fresh)).status_code == 401


def test_login_cookie_and_cross_site_requests(server):
    add_user(server, "bob", "uploader")
    browser = requests.Session()
    page = browser.get(
        f"{server.url}/study/1.2.3", headers={"Accept": "text/html"}, allow_redirects=False
    )
    assert page.status_code == 302
    assert page.headers["Location"].endswith("/login?next=/study/1.2.3")
    origin = {"Origin": server.url}
    wrong = browser.post(
        f"{server.url}/login", data={"user": "bob", "password": "guess"}, headers=origin
    )
    assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    done = browser.post(
        f"{server.url}/login",
        headers=origin,
        allow_redirects=False,
        data={"user": "bob", "password": PASSWORD, "next": "/study/1.2.3"},
    )
    assert done.status_code == 303 and done.headers["Location"] == "/study/1.2.3"
    cookie = done.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert browser.get(f"{server.url}/dicom-web/studies").status_code in (200, 204)

    assert stow(server, {"Origin": "https://evil.example"}, browser).status_code == 403
    assert stow(server, {}, browser).status_code == 403  # no Origin, no Referer
    assert stow(server, origin, browser).status_code == 200

    logins = minipacs("audit", "--data", str(server.data), "--event", "login", "--json").stdout
    assert [json.loads(line)["outcome"] for line in logins.splitlines()] == [
        "failure: wrong user or password",
        "success",
    ]


def test_security_headers_on_every_response(server):
    for path in ("/", "/dicom-web/studies", "/login", "/healthz"):
        headers = requests.get(f"{server.url}{path}").headers
        assert headers["X-Content-Type-Options"] == "nosniff", path
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"], path
        assert headers["Referrer-Policy"] == "same-origin", path


def test_no_open_server_beyond_loopback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pacs",
            "serve",
            "--data",
            str(tmp_path / "data"),
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
            "--http-port",
            str(free_port()),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "refusing to listen on 0.0.0.0 with no user" in result.stderr


@pytest.mark.parametrize("password", ["short", ""])
def test_weak_passwords_are_refused(tmp_path, password):
    result = minipacs(
        "user",
        "add",
        "eve",
        "--password-stdin",
        "--data",
        str(tmp_path / "d"),
        input=password,
        check=False,
    )
    assert result.returncode == 2
    assert "at least 10 characters" in result.stderr
    assert "index write failed" not in result.stderr  # a refusal, not a failure


# -- Beyond loopback (issue 17): a server on 127.0.0.2, with its users made before start ---

BEYOND = "127.0.0.2"


@pytest.fixture(scope="module")
def beyond(tmp_path_factory):
    """A server other hosts could reach (127.0.0.2 is not loopback to minipacs) with an
    admin, an uploader and a viewer; `tokens` holds one token of each."""
    data = tmp_path_factory.mktemp("beyond") / "data"
    server = Server(data, host=BEYOND)
    server.tokens = {n: add_user(server, n, r) for n, r in USERS.items()}
    server.start()
    yield server
    server.kill()


USERS = {"root": "admin", "bob": "uploader", "alice": "viewer"}


def log_in(server, name: str, **extra) -> requests.Session:
    browser = requests.Session()
    done = browser.post(
        f"{server.url}/login",
        data={"user": name, "password": PASSWORD, **extra},
        headers={"Origin": server.url},
        allow_redirects=False,
    )
    assert done.status_code == 303, done.text
    browser.location = done.headers["Location"]
    return browser


def test_beyond_loopback_no_user_means_no_access(start_server, tmp_path):
    data = tmp_path / "data"
    add_user(Server(data), "root", "admin")
    server = start_server(data=data, host=BEYOND)
    browser = log_in(server, "root")
    minipacs("user", "remove", "root", "--data", str(data))
    for path in ("/audit", "/metrics", "/dicom-web/studies", "/wado?requestType=WADO"):
        assert requests.get(f"{server.url}{path}").status_code == 401, path
        assert browser.get(f"{server.url}{path}").status_code == 401, path
    study = pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID
    assert requests.delete(f"{server.url}/dicom-web/studies/{study}").status_code == 401
    assert stow(server, {}).status_code == 401
    assert requests.get(f"{server.url}/healthz").status_code == 200


def test_sessions_end_with_their_user_password_and_role(beyond):
    data = ["--data", str(beyond.data)]
    add_user(beyond, "carol", "admin")
    admin = log_in(beyond, "carol")
    assert admin.get(f"{beyond.url}/audit").status_code == 200
    minipacs("user", "remove", "carol", *data)
    refused = admin.get(f"{beyond.url}/audit")
    assert refused.status_code == 401
    assert "minipacs_session=;" in refused.headers["Set-Cookie"]  # the cookie is deleted
    add_user(beyond, "carol", "viewer")  # back, same name and password, lower role
    assert admin.get(f"{beyond.url}/audit").status_code == 401  # still the old session
    viewer = log_in(beyond, "carol")
    assert viewer.get(f"{beyond.url}/audit").status_code == 403
    assert viewer.get(f"{beyond.url}/dicom-web/studies").status_code in (200, 204)
    minipacs("user", "passwd", "carol", "--password-stdin", *data, input=PASSWORD + "!")
    assert viewer.get(f"{beyond.url}/dicom-web/studies").status_code == 401


def test_sessions_have_an_idle_and_an_absolute_lifetime(beyond):
    from flask import Flask
    from flask.sessions import SecureCookieSessionInterface

    forger = Flask("forger")
    forger.secret_key = (beyond.data / ".session-key").read_bytes()
    signer = SecureCookieSessionInterface().get_signing_serializer(forger)
    cookie = log_in(beyond, "alice").cookies["minipacs_session"]
    studies = f"{beyond.url}/dicom-web/studies"
    assert requests.get(studies, cookies={"minipacs_session": cookie}).status_code in (200, 204)
    session = signer.loads(cookie)
    for field, age in (("seen", 31 * 60), ("since", 12 * 3600 + 1)):
        aged = {**session, field: session[field] - age}
        answer = requests.get(studies, cookies={"minipacs_session": signer.dumps(aged)})
        assert answer.status_code == 401, field


def test_every_role_can_log_out(beyond):
    for name in USERS:
        browser = log_in(beyond, name)
        assert browser.get(f"{beyond.url}/dicom-web/studies").status_code in (200, 204)
        out = browser.post(
            f"{beyond.url}/logout", headers={"Origin": beyond.url}, allow_redirects=False
        )
        assert out.status_code == 303 and out.headers["Location"] == "/login", name
        assert browser.get(f"{beyond.url}/dicom-web/studies").status_code == 401, name


@pytest.mark.parametrize(
    "target",
    ["/\t/evil.com", "/\\evil.com", "\\/evil.com", "//evil.com", "/\n/evil.com",
     "https://evil.com/", "\t//evil.com", " /x", "evil.com"],
)  # fmt: skip
def test_login_never_redirects_off_site(beyond, target):
    assert log_in(beyond, "alice", next=target).location == "/"


def test_login_redirects_to_a_local_path(beyond):
    assert log_in(beyond, "alice", next="/study/1.2.3?x=1").location == "/study/1.2.3?x=1"


def login_from(server, address: str, name: str, password: str) -> http.client.HTTPResponse:
    """A login POST from another loopback address (the throttle counts per address)."""
    host = server.url.split("//")[1].split(":")[0]
    connection = http.client.HTTPConnection(
        host, server.http_port, timeout=30, source_address=(address, 0)
    )
    body = urlencode({"user": name, "password": password})
    headers = {"Content-Type": "application/x-www-form-urlencoded", "Origin": server.url}
    connection.request("POST", "/login", body, headers)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def test_failed_logins_are_throttled(beyond):
    add_user(beyond, "dave", "viewer")
    add_user(beyond, "erin", "viewer")
    for _ in range(10):  # login_failures
        assert login_from(beyond, "127.0.0.3", "dave", "wrong guess").status == 401
    locked = login_from(beyond, "127.0.0.3", "dave", PASSWORD)  # right, but too late
    assert locked.status == 429 and int(locked.headers["Retry-After"]) > 0
    assert login_from(beyond, "127.0.0.4", "dave", PASSWORD).status == 429  # per user name
    assert login_from(beyond, "127.0.0.3", "erin", PASSWORD).status == 429  # per address
    assert login_from(beyond, "127.0.0.4", "erin", PASSWORD).status == 303
    outcomes = minipacs("audit", "--data", str(beyond.data), "--who", "dave", "--json").stdout
    assert "failure: too many failed logins" in outcomes


def test_tokens_expire_by_default_and_one_can_be_revoked(beyond):
    data = ["--data", str(beyond.data)]
    issued = minipacs("user", "token", "bob", *data)
    assert "expires never" not in issued.stderr and "expires 20" in issued.stderr
    second, first = issued.stdout.strip(), beyond.tokens["bob"]
    listed = minipacs("user", "token", "bob", "--list", *data).stdout.splitlines()
    assert len(listed) == 2 and "never" not in listed[0]
    studies = f"{beyond.url}/dicom-web/studies"
    minipacs("user", "token", "bob", "--revoke", second, *data)
    assert requests.get(studies, headers=bearer(second)).status_code == 401
    assert requests.get(studies, headers=bearer(first)).status_code in (200, 204)
    third = minipacs("user", "token", "bob", "--days", "0", *data)
    assert "expires never" in third.stderr
    number = minipacs("user", "token", "bob", "--list", *data).stdout.splitlines()[-1].split()[0]
    minipacs("user", "token", "bob", "--revoke", number, *data)
    assert requests.get(studies, headers=bearer(third.stdout.strip())).status_code == 401
    assert requests.get(studies, headers=bearer(first)).status_code in (200, 204)
    wrong = minipacs("user", "token", "alice", "--revoke", first, *data, check=False)
    assert wrong.returncode == 2 and "no such token" in wrong.stderr


def head_only(server, head: str) -> bytes:
    """Send a request head and no body; what the server answers before any body byte."""
    with socket.create_connection((BEYOND, server.http_port), timeout=20) as sock:
        sock.sendall(head.encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


@pytest.mark.parametrize("length", ["Content-Length: 1073741824", "Transfer-Encoding: chunked"])
def test_large_bodies_need_credentials_before_they_are_read(beyond, length):
    head = f"POST /dicom-web/studies HTTP/1.1\r\nHost: {BEYOND}\r\nContent-Type: {STOW_TYPE}\r\n"
    assert head_only(beyond, f"{head}{length}\r\n\r\n").startswith(b"HTTP/1.1 401 ")
    viewer = f"Authorization: Bearer {beyond.tokens['alice']}\r\n"
    assert head_only(beyond, f"{head}{viewer}{length}\r\n\r\n").startswith(b"HTTP/1.1 403 ")
    login = f"POST /login HTTP/1.1\r\nHost: {BEYOND}\r\n{length}\r\n\r\n"
    assert head_only(beyond, login).startswith(b"HTTP/1.1 401 ")
    # Allowed ones are read and stored: a token, or a login session from our origin.
    bigger = stow_body([CT.read_bytes(), (TEST_FILES / "liver_1frame.dcm").read_bytes()])
    assert len(bigger) > 64 << 10
    headers = {"Content-Type": STOW_TYPE, "Accept": "application/dicom+json"}
    stored = requests.post(
        f"{beyond.url}/dicom-web/studies",
        data=bigger,
        headers={**headers, **bearer(beyond.tokens["bob"])},
    )
    assert stored.status_code == 200, stored.text
    browser = log_in(beyond, "bob")
    stored = browser.post(
        f"{beyond.url}/dicom-web/studies", data=bigger, headers={**headers, "Origin": beyond.url}
    )
    assert stored.status_code == 200, stored.text


# -- One error shape (issue 18): every blueprint's refusals, and werkzeug's own ------------

CT_UIDS = pydicom.dcmread(CT, stop_before_pixels=True)
CT_WADO = (
    f"/wado?requestType=WADO&studyUID={CT_UIDS.StudyInstanceUID}"
    f"&seriesUID={CT_UIDS.SeriesInstanceUID}&objectUID={CT_UIDS.SOPInstanceUID}"
)
TS_JPEG2000 = "1.2.840.10008.1.2.4.90"


@pytest.mark.parametrize(
    ("who", "method", "path", "status", "reason"),
    [
        ("", "GET", "/dicom-web/studies", 401, "log in"),  # auth
        ("alice", "POST", "/api/worklist", 403, "it needs uploader"),  # auth, role
        ("root", "GET", "/audit?limit=many", 400, "whole number"),  # auth blueprint
        ("root", "GET", "/wado?requestType=WADO", 400, "studyUID is required"),  # wado_uri
        ("root", "GET", f"{CT_WADO}&windowCenter=1&windowWidth=0", 400, "at least 1"),  # render
        ("root", "GET", f"{CT_WADO}&contentType=application/dicom&transferSyntax={TS_JPEG2000}",
         406, "cannot transcode"),  # transcode
        ("root", "GET", "/dicom-web/studies?NoSuchKeyword=1", 400, "neither a DICOM keyword"),
        ("root", "GET", "/dicom-web/studies/1.2.3/metadata", 404, "no study 1.2.3"),  # dicomweb
        ("root", "GET", "/dicom-web/studies/1.2.3", 404, "no study 1.2.3"),
        ("root", "POST", "/dicom-web/studies", 415, "STOW-RS takes multipart/related"),  # stow
        ("root", "DELETE", "/api/worklist/999999", 404, "no worklist item"),  # worklist
        ("root", "GET", "/ui/static/nothing.js", 404, "not found"),  # ui (werkzeug's 404)
        ("root", "GET", "/nowhere", 404, "not found"),  # no route at all
        ("root", "PUT", "/dicom-web/studies", 405, "not allowed"),
    ],
)  # fmt: skip
def test_every_error_has_one_json_shape(beyond, who, method, path, status, reason):
    """Each blueprint's errors, werkzeug's 404/405 and the render, transcode and media
    errors answer {"error": reason} as application/json with the status (WADO-URI answered
    text/plain, unknown paths werkzeug's HTML)."""
    if not hasattr(beyond, "stored_ct"):  # the instance the render/transcode cases ask for
        assert stow(beyond, bearer(beyond.tokens["bob"])).status_code == 200
        beyond.stored_ct = True
    headers = bearer(beyond.tokens[who]) if who else {}
    answer = requests.request(method, f"{beyond.url}{path}", headers=headers)
    assert answer.status_code == status
    assert answer.headers["Content-Type"] == "application/json"
    body = answer.json()
    assert list(body) == ["error"] and reason.lower() in body["error"].lower()
    if status == 405:
        assert "GET" in answer.headers["Allow"]  # werkzeug's headers kept
