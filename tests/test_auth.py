"""HTTP access control with `requests`: roles, bearer tokens, the login page and its
cookie, cross-site requests, security headers, and no open server beyond loopback."""

import json
import subprocess
import sys

import pydicom
import pytest
import requests
from conftest import ROOT
from conftest import TEST_FILES
from conftest import free_port
from conftest import minipacs
from test_dicomweb_http import stow_body

PASSWORD = "correct horse battery"
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b0undary'
CT = TEST_FILES / "CT_small.dcm"


def add_user(server, name: str, role: str) -> str:
    """Add a user and return a fresh bearer token of theirs."""
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
        add_user(server, n, r)
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
