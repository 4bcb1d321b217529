"""Hostile paths and parameters: every UID-carrying URL part and WADO-URI parameter, with
traversal and injection attempts, answers 400 or 404 (never a file, never a 500)."""

import http.client
from urllib.parse import quote

import pytest
from conftest import TEST_FILES
from conftest import storescu
from test_dicomweb_http import stow_body

HOSTILE = [
    "../../../../etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2findex.sqlite",
    "1.2.3/../../index.sqlite",
    "1.2.3%00.dcm",
    "1.2.3'; DROP TABLE study; --",
    "*",
    "1" * 200,
]
ROUTES = [
    "/dicom-web/studies/{x}",
    "/dicom-web/studies/{x}/metadata",
    "/dicom-web/studies/{x}/series",
    "/dicom-web/studies/{x}/rendered",
    "/dicom-web/studies/1.2/series/{x}/metadata",
    "/dicom-web/studies/1.2/series/1.3/instances/{x}",
    "/dicom-web/studies/1.2/series/1.3/instances/{x}/frames/1",
    "/dicom-web/studies/1.2/series/1.3/instances/1.4/frames/{x}",
    "/dicom-web/studies/1.2/series/1.3/instances/1.4/bulkdata/{x}",
    "/wado?requestType=WADO&studyUID={x}&seriesUID=1.2&objectUID=1.3",
    "/wado?requestType=WADO&studyUID=1.2&seriesUID={x}&objectUID=1.3",
    "/wado?requestType=WADO&studyUID=1.2&seriesUID=1.3&objectUID={x}",
    "/ui/static/{x}",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from conftest import Server

    server = Server(tmp_path_factory.mktemp("hostile") / "data").start()
    storescu(server.port, TEST_FILES / "CT_small.dcm")
    yield server
    server.kill()


def raw_get(server, path: str) -> tuple[int, bytes]:
    """The path exactly as written: no client-side normalisation of `..`."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    connection.request("GET", path)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response.status, body


@pytest.mark.parametrize("route", ROUTES)
def test_hostile_values_are_refused(served, route):
    for value in HOSTILE:
        for form in (value.replace(" ", "%20"), quote(value, safe="")):
            status, body = raw_get(served, route.format(x=form))
            assert status in (400, 404), f"{route} {form!r}: {status}"
            assert b"root:" not in body and b"SQLite format" not in body
    assert "Traceback" not in served.log()


# A UID pattern ending in `$` also matches before a trailing newline (issue 17).
UID_ROUTES = [r for r in ROUTES if "frames/{x}" not in r and "bulkdata" not in r and "ui/" not in r]


@pytest.mark.parametrize("route", UID_ROUTES)
def test_a_trailing_newline_is_not_a_uid(served, route):
    status, body = raw_get(served, route.format(x="1.2.3%0A"))
    assert status == 400, f"{route}: {status} {body[:200]!r}"


def test_stow_to_a_study_uid_with_a_trailing_newline_is_refused(served):
    connection = http.client.HTTPConnection("127.0.0.1", served.http_port, timeout=30)
    body = stow_body([(TEST_FILES / "CT_small.dcm").read_bytes()])
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b0undary'}
    connection.request("POST", "/dicom-web/studies/1.2.3%0A", body, headers)
    response = connection.getresponse()
    answer = response.read()
    connection.close()
    assert response.status == 400, answer[:300]
    assert b"RetrieveURL" not in answer and b"1.2.3\n" not in answer
