"""DICOMweb over raw HTTP: status codes, headers, Accept negotiation, CORS, gzip, proxy
headers, STOW-RS edge cases and the exact requests OHIF v3 sends. Multipart answers are
read with the standard library's MIME parser."""

import email
import email.policy
import gzip
import http.client
import io
import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pydicom
import pytest
from conftest import Server
from conftest import minipacs
from conftest import storescu
from dicom_files import TEST_FILES
from PIL import Image
from pydicom.encaps import get_frame
from pydicom.uid import generate_uid

FILES = {
    "ct": TEST_FILES / "CT_small.dcm",
    "mr": TEST_FILES / "MR_small.dcm",
    "jpeg": TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm",
    "j2k": TEST_FILES / "JPEG2000.dcm",
}
OHIF_FRAME_ACCEPTS = (
    "multipart/related; type=application/octet-stream; transfer-syntax=*",
    'multipart/related; type="application/octet-stream"; transfer-syntax="*"',
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicomweb-http")
    minipacs("import", "--data", str(root / "data"), *(str(p) for p in FILES.values()))
    running = Server(root / "data").start()
    yield running
    running.kill()


def uids(name: str) -> tuple[str, str, str]:
    ds = pydicom.dcmread(FILES[name], stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def instance_url(server: Server, name: str) -> str:
    study, series, sop = uids(name)
    return f"{server.url}/dicom-web/studies/{study}/series/{series}/instances/{sop}"


def get(url: str, method: str = "GET", **headers: str):
    """(status, headers, body) of a request; HTTP errors are answers too."""
    request = urllib.request.Request(url, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def parts(headers, body: bytes) -> list[email.message.Message]:
    head = f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + body, policy=email.policy.HTTP)
    assert message.is_multipart(), headers["Content-Type"]
    return list(message.iter_parts())


def media(part: email.message.Message) -> tuple[str, str | None]:
    return part.get_content_type(), part.get_param("transfer-syntax")


def studies(server: Server, query: str, **headers: str) -> list[dict]:
    status, _, body = get(f"{server.url}/dicom-web/studies?{query}", **headers)
    assert status == 200, body
    return json.loads(body)


def study_uids(answers: list[dict]) -> set[str]:
    return {a["0020000D"]["Value"][0] for a in answers}


# -- errors and negotiation ----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/studies/1.2.x", 400),
        ("/studies/1.2.3", 404),
        ("/studies/1.2.3/metadata", 404),
        ("/studies?NoSuchKeyword=1", 400),
        ("/studies?limit=ten", 400),
        ("/studies?offset=-1", 400),
        ("/studies?fuzzymatching=maybe", 400),
        ("/studies/1." + "1" * 70 + "/series", 400),
    ],
)
def test_bad_and_unknown_requests_get_a_json_reason(server, path, status):
    code, headers, body = get(f"{server.url}/dicom-web{path}")
    assert code == status
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"]


def test_accept_lists_q_values_and_406(server):
    _, headers, _ = get(
        f"{server.url}/dicom-web/studies", Accept="application/json;q=0.5, application/dicom+json"
    )
    assert headers["Content-Type"] == "application/dicom+json"
    _, headers, _ = get(f"{server.url}/dicom-web/studies", Accept="application/json")
    assert headers["Content-Type"] == "application/json"
    code, _, _ = get(f"{server.url}/dicom-web/studies", Accept="application/dicom+xml")
    assert code == 406
    code, _, _ = get(instance_url(server, "ct"), Accept="image/jpeg")
    assert code == 406
    code, _, _ = get(
        f"{instance_url(server, 'ct')}/frames/1", Accept='multipart/related; type="image/jls"'
    )
    assert code == 406
    code, _, _ = get(f"{server.url}/dicom-web/studies", Accept="text/html;;")
    assert code == 406  # empty parameters are allowed (RFC 9110 5.6.6): text/html, not JSON
    for malformed in ("html", "application/json;q=high", "application/json;q=2"):
        code, _, body = get(f"{server.url}/dicom-web/studies", Accept=malformed)
        assert code == 400 and json.loads(body)["error"], malformed
    _, headers, _ = get(
        f"{server.url}/dicom-web/studies",
        Accept='multipart/related; type="a,b"; q=0.9, application/json; q="0.5"',
    )
    assert headers["Content-Type"] == "application/json"  # a comma inside quotes, quoted q


def test_percent_encoded_wildcards_lists_and_repeated_keys(server):
    ct, mr = uids("ct")[0], uids("mr")[0]
    assert ct in study_uids(studies(server, "PatientName=Compressed%2A"))
    assert ct in study_uids(studies(server, "PatientName=*%5ECT1"))
    both = {ct, mr}
    assert study_uids(studies(server, f"StudyInstanceUID={ct}%5C{mr}")) == both
    assert study_uids(studies(server, f"StudyInstanceUID={ct}&StudyInstanceUID={mr}")) == both
    assert study_uids(studies(server, "ModalitiesInStudy=CT%2CMR")) == both


def test_gzip_when_accepted(server):
    _, plain_headers, plain = get(f"{server.url}/dicom-web/studies")
    assert "Content-Encoding" not in plain_headers
    _, headers, body = get(f"{server.url}/dicom-web/studies", **{"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(body)) == json.loads(plain)


def test_metadata_is_streamed_plain_and_gzipped(stow_server, tmp_path):
    """A series' metadata is sent as the index yields it (chunked, never whole in
    memory: tens of MB for a large study), the same JSON with or without gzip."""
    from make_study import make_study

    files = make_study(tmp_path / "many", 30, size=16)
    storescu(stow_server.port, *files)
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    url = f"{stow_server.url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
    status, headers, plain = get(f"{url}/metadata")
    assert status == 200 and len(plain) > 64 << 10  # more than one chunk
    assert headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in headers
    answer = json.loads(plain)
    assert sorted(item["00080018"]["Value"][0] for item in answer) == sorted(
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files
    )
    _, headers, body = get(f"{url}/metadata", **{"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(body)) == answer


def test_retrieve_default_syntax_and_as_stored(server):
    url = instance_url(server, "j2k")
    _, headers, body = get(url, Accept="*/*")
    (part,) = parts(headers, body)
    assert media(part) == ("application/dicom", "1.2.840.10008.1.2.1")
    _, headers, body = get(
        url, Accept='multipart/related; type="application/dicom"; q=1; transfer-syntax=*'
    )
    (part,) = parts(headers, body)
    assert part.get_payload(decode=True) == FILES["j2k"].read_bytes()
    assert int(headers["Content-Length"]) == len(body)  # keeps the connection open
    assert part["Content-Location"] == url
    _, headers, body = get(url, Accept="application/dicom")  # single part, for an instance
    assert headers["Content-Type"].startswith("application/dicom")
    assert pydicom.dcmread(io.BytesIO(body)).SOPInstanceUID == uids("j2k")[2]


def test_frames_carry_their_transfer_syntax(server):
    stored = pydicom.dcmread(FILES["jpeg"])
    url = f"{instance_url(server, 'jpeg')}/frames/1"
    _, headers, body = get(url, Accept='multipart/related; type="image/jpeg"')
    (part,) = parts(headers, body)
    assert int(headers["Content-Length"]) == len(body)
    assert media(part) == ("image/jpeg", "1.2.840.10008.1.2.4.50")
    assert part.get_payload(decode=True) == get_frame(stored.PixelData, 0, number_of_frames=1)
    _, headers, body = get(url, Accept='multipart/related; type="application/octet-stream"')
    (part,) = parts(headers, body)
    assert media(part) == ("application/octet-stream", "1.2.840.10008.1.2.1")
    assert len(part.get_payload(decode=True)) == stored.Rows * stored.Columns * 3
    assert get(f"{instance_url(server, 'jpeg')}/frames/2")[0] == 404
    assert get(f"{instance_url(server, 'jpeg')}/frames/0")[0] == 400
    assert get(f"{instance_url(server, 'jpeg')}/frames/a,b")[0] == 400


def test_thumbnail_and_rendered_parameters(server):
    url = instance_url(server, "ct")
    status, headers, body = get(f"{url}/thumbnail")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    status, headers, _ = get(f"{url}/rendered?window=40,400,sigmoid&quality=50&accept=image/png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    etag = headers["ETag"]
    status, _, _ = get(
        f"{url}/rendered?window=40,400,sigmoid&quality=50&accept=image/png",
        **{"If-None-Match": etag},
    )
    assert status == 304
    for bad in ("window=40", "window=40,0", "window=1,2,cubic", "viewport=0,10", "quality=101"):
        assert get(f"{url}/rendered?{bad}")[0] == 400, bad


# -- headers: Warning, CORS, proxies ---------------------------------------------------


def test_warning_when_the_maximum_truncates(start_server, tmp_path):
    minipacs("import", "--data", str(tmp_path / "data"), *(str(p) for p in FILES.values()))
    capped = start_server(env={"MINIPACS_MAX_RESULTS": "2"})
    status, headers, body = get(f"{capped.url}/dicom-web/studies")
    assert status == 200 and len(json.loads(body)) == 2
    assert headers["Warning"].startswith("299 ")
    _, headers, body = get(f"{capped.url}/dicom-web/studies?limit=2")
    assert len(json.loads(body)) == 2 and "Warning" not in headers
    _, _, body = get(f"{capped.url}/dicom-web/studies?limit=2&offset=2")
    assert len(json.loads(body)) == 2


def test_cors_only_for_configured_origins(start_server, server, tmp_path):
    assert (
        "Access-Control-Allow-Origin"
        not in get(f"{server.url}/dicom-web/studies", Origin="http://viewer.example")[1]
    )
    minipacs("import", "--data", str(tmp_path / "data"), str(FILES["ct"]))
    open_server = start_server(env={"MINIPACS_CORS_ORIGINS": "http://viewer.example"})
    status, headers, _ = get(
        f"{open_server.url}/dicom-web/studies",
        method="OPTIONS",
        Origin="http://viewer.example",
        **{
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, accept",
        },
    )
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "http://viewer.example"
    assert "Authorization" in headers["Access-Control-Allow-Headers"]
    assert "Accept" in headers["Access-Control-Allow-Headers"]
    _, headers, _ = get(
        f"{instance_url(open_server, 'ct')}/frames/1", Origin="http://viewer.example"
    )
    assert headers["Access-Control-Allow-Origin"] == "http://viewer.example"
    assert headers["Cross-Origin-Resource-Policy"] == "cross-origin"
    _, headers, _ = get(f"{open_server.url}/dicom-web/studies", Origin="http://evil.example")
    assert "Access-Control-Allow-Origin" not in headers


def test_urls_follow_a_trusted_proxy_only(start_server, server, tmp_path):
    forwarded = {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "pacs.example",
        "X-Forwarded-Prefix": "/pacs",
    }
    study = uids("ct")[0]
    answer = studies(server, f"StudyInstanceUID={study}", **forwarded)[0]
    assert answer["00081190"]["Value"][0].startswith(f"{server.url}/dicom-web/")
    minipacs("import", "--data", str(tmp_path / "data"), str(FILES["ct"]))
    proxied = start_server(env={"MINIPACS_TRUST_PROXY": "true"})
    answer = studies(proxied, f"StudyInstanceUID={study}", **forwarded)[0]
    expected = f"https://pacs.example/pacs/dicom-web/studies/{study}"
    assert answer["00081190"]["Value"][0] == expected
    _, _, body = get(f"{proxied.url}/dicom-web/studies/{study}/metadata", **forwarded)
    assert json.loads(body)[0]["7FE00010"]["BulkDataURI"].startswith(expected + "/series/")


# -- OHIF v3 ---------------------------------------------------------------------------


def test_the_requests_ohif_sends(server):
    """Study list, series list, series metadata and frames, as OHIF's DICOMweb data source
    and cornerstone's loader send them (Accept headers verbatim)."""
    study, series, sop = uids("ct")
    base = f"{server.url}/dicom-web"
    listing = (
        "/studies?PatientName=*samples*&00100020=*CT1*&ModalitiesInStudy=CT%2CMR"
        "&StudyDate=20040101-20041231&limit=101&offset=0&fuzzymatching=false"
        "&includefield=00081030%2C00080060%2C00080090%2C00100030"
    )
    status, headers, body = get(base + listing, Accept="application/dicom+json")
    assert status == 200 and headers["Content-Type"] == "application/dicom+json"
    assert study_uids(json.loads(body)) == {study}  # PN is matched ignoring case
    status, _, body = get(
        f"{base}/studies/{study}/series?includefield=0008103E%2C00080021",
        Accept="application/dicom+json",
    )
    assert [s["0020000E"]["Value"][0] for s in json.loads(body)] == [series]
    status, headers, body = get(
        f"{base}/studies/{study}/series/{series}/metadata",
        Accept="application/dicom+json, multipart/related; type=application/octet-stream; "
        "transfer-syntax=*",
    )
    (instance,) = json.loads(body)
    assert all("vr" in element for element in instance.values())
    assert instance["00280010"]["Value"] == [128]  # Rows
    pixels = pydicom.dcmread(FILES["ct"]).PixelData
    for accept in OHIF_FRAME_ACCEPTS:
        status, headers, body = get(
            f"{base}/studies/{study}/series/{series}/instances/{sop}/frames/1", Accept=accept
        )
        assert status == 200
        assert cornerstone_frame(body) == (pixels, "1.2.840.10008.1.2.1")
    status, headers, body = get(
        f"{base}/studies/{study}/series/{series}/thumbnail",
        Accept='multipart/related; type="application/octet-stream"',
    )
    assert status == 200
    (part,) = parts(headers, body)
    assert part.get_payload(decode=True)[:2] == b"\xff\xd8"


def cornerstone_frame(body: bytes) -> tuple[bytes, str]:
    """Parse a frame response as cornerstone's extractMultipart does: boundary from the
    first line, headers up to the first blank line, data up to CRLF + that boundary,
    `Content-Type:` matched case-sensitively."""
    head_end = body.index(b"\r\n\r\n")
    head = body[:head_end].decode("latin-1").split("\r\n")
    boundary = head[0]
    assert boundary.startswith("--")
    content_type = next(line for line in head if line.startswith("Content-Type:"))
    syntax = content_type.split("transfer-syntax=")[1].strip().strip('"')
    data_end = body.index(boundary.encode(), head_end)
    return body[head_end + 4 : data_end - 2], syntax


# -- STOW-RS ---------------------------------------------------------------------------


def stow_body(payloads: list[bytes], boundary: str = "b0undary") -> bytes:
    out = b""
    for payload in payloads:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        out += payload + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def post(server: Server, body, path: str = "/dicom-web/studies", content_type: str | None = None):
    """POST with http.client: a bytes body gets a Content-Length, an iterator is chunked."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=120)
    headers = {"Accept": "application/dicom+json"}
    headers["Content-Type"] = (
        content_type or 'multipart/related; type="application/dicom"; boundary=b0undary'
    )
    chunked = not isinstance(body, bytes)
    connection.request("POST", path, body=body, headers=headers, encode_chunked=chunked)
    response = connection.getresponse()
    payload = response.read()
    connection.close()
    answer = json.loads(payload) if payload else {}
    return response.status, answer


def new_instance(source: Path = FILES["ct"], study_uid: str | None = None) -> tuple[str, bytes]:
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if study_uid:
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return ds.SOPInstanceUID, buffer.getvalue()


def indexed(server: Server, sop_uid: str) -> bool:
    return bool(json.loads(get(f"{server.url}/dicom-web/instances?SOPInstanceUID={sop_uid}")[2]))


def incoming_files(server: Server) -> list[Path]:
    return [p for p in (server.data / ".incoming").iterdir() if p.is_file()]


@pytest.fixture(scope="module")
def stow_server(tmp_path_factory) -> Server:
    """An empty server the STOW-RS tests share: each sends instances of its own (fresh
    UIDs) and checks those, and leaves nothing in .incoming."""
    running = Server(tmp_path_factory.mktemp("stow") / "data", "--no-fsync").start()
    yield running
    running.kill()


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json", 415),
        ('multipart/related; type="application/dicom+json"; boundary=b0undary', 415),
        ('multipart/related; type="application/dicom"', 400),  # no boundary
    ],
)
def test_stow_refuses_wrong_media_types(stow_server, content_type, status):
    _, payload = new_instance()
    code, answer = post(stow_server, stow_body([payload]), content_type=content_type)
    assert code == status and answer["error"]


def test_stow_empty_body_and_garbage(stow_server):
    assert post(stow_server, b"")[0] == 400
    assert post(stow_server, stow_body([]))[0] == 400
    code, answer = post(stow_server, stow_body([b"this is not DICOM" * 100]))
    assert code == 409
    assert answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert incoming_files(stow_server) == []


def test_stow_mixed_good_and_bad_parts_is_202(stow_server):
    good, payload = new_instance()
    code, answer = post(stow_server, stow_body([payload, b"\0" * 300]))
    assert code == 202
    assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] == [good]
    assert len(answer["00081198"]["Value"]) == 1
    assert indexed(stow_server, good)


def test_stow_truncated_body_keeps_the_whole_parts_only(stow_server):
    first, whole = new_instance()
    second, cut = new_instance()
    body = stow_body([whole, cut])
    body = body[: len(body) - len(cut) // 2]  # the second part breaks off
    code, answer = post(stow_server, body)
    assert code == 400 and "1 instance(s) before it were stored" in answer["error"]
    assert indexed(stow_server, first) and not indexed(stow_server, second)
    assert incoming_files(stow_server) == []


def test_stow_connection_dropped_mid_upload_stores_nothing(stow_server):
    sop, payload = new_instance()
    body = stow_body([payload])
    with socket.create_connection(("127.0.0.1", stow_server.http_port)) as sock:
        head = (
            "POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
            'Content-Type: multipart/related; type="application/dicom"; boundary=b0undary\r\n'
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body[: len(body) // 2])
    assert get(f"{stow_server.url}/healthz")[0] == 200
    assert not indexed(stow_server, sop)


def test_stow_wrong_study_in_path_fails_those_instances(stow_server):
    study_uid = generate_uid()
    right, good = new_instance(study_uid=study_uid)
    wrong, bad = new_instance()
    code, answer = post(stow_server, stow_body([good, bad]), path=f"/dicom-web/studies/{study_uid}")
    assert code == 202
    (failed,) = answer["00081198"]["Value"]
    assert failed["00081155"]["Value"] == [wrong] and failed["00081197"]["Value"] == [0xA900]
    assert answer["00081190"]["Value"] == [f"{stow_server.url}/dicom-web/studies/{study_uid}"]
    assert indexed(stow_server, right) and not indexed(stow_server, wrong)


def test_stow_chunked_50_megabytes(stow_server, tmp_path):
    from make_study import make_study

    files = make_study(tmp_path / "big", 7, size=2048)  # 7 × 8 MiB
    assert sum(p.stat().st_size for p in files) > 50_000_000

    def body():
        for path in files:
            yield b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n"
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    yield block
            yield b"\r\n"
        yield b"--b0undary--\r\n"

    code, answer = post(stow_server, body())
    assert code == 200
    assert len(answer["00081199"]["Value"]) == 7
    sop = pydicom.dcmread(files[3], stop_before_pixels=True).SOPInstanceUID
    stored = next(stow_server.data.rglob(f"{sop}.dcm"))
    assert stored.read_bytes() == files[3].read_bytes()


def test_stow_over_the_configured_maximum_is_413(start_server):
    small = start_server("--no-fsync", env={"MINIPACS_MAX_UPLOAD_MB": "1"})
    payloads = [new_instance()[1] for _ in range(30)]  # ~1.2 MB
    assert post(small, stow_body(payloads))[0] == 413
    code, answer = post(small, iter([stow_body(payloads)]))  # chunked: no length up front
    assert code == 413 and answer["error"]


def test_a_frame_list_names_each_frame_once(server):
    """/frames/1,1,1,… multiplied the answer by the length of the list (issue 17)."""
    url = f"{instance_url(server, 'jpeg')}/frames/{','.join(['1'] * 3000)}"
    status, _, body = get(url, Accept='multipart/related; type="application/octet-stream"')
    assert status == 400
    assert "each frame once" in json.loads(body)["error"]


def test_viewport_above_render_max_size_is_refused_before_rendering(server):
    """viewport was capped at 16384: 16384² RGB is ~800 MB a request (issue 17)."""
    url = f"{instance_url(server, 'ct')}/rendered"
    status, _, body = get(f"{url}?viewport=4097,16")
    assert status == 400
    assert "viewport must be between 1 and 4096" in json.loads(body)["error"]
    status, headers, body = get(f"{url}?viewport=4096,64&accept=image/png")
    assert status == 200
    assert Image.open(io.BytesIO(body)).size == (64, 64)  # fits inside, aspect kept


def test_stow_of_a_series_stored_under_another_study_fails_it(stow_server):
    """A series belongs to one study: an instance naming a stored series under another
    study fails (0xA900, 409) and is not filed, where C-STORE refuses it too."""
    study_uid = generate_uid()
    first, payload = new_instance(study_uid=study_uid)
    assert post(stow_server, stow_body([payload]))[0] == 200
    stray = pydicom.dcmread(io.BytesIO(payload))
    stray.StudyInstanceUID = generate_uid()
    stray.SOPInstanceUID = stray.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    stray.save_as(buffer, enforce_file_format=True)
    code, answer = post(stow_server, stow_body([buffer.getvalue()]))
    assert code == 409
    (failed,) = answer["00081198"]["Value"]
    assert failed["00081197"]["Value"] == [0xA900]
    assert indexed(stow_server, first) and not indexed(stow_server, stray.SOPInstanceUID)
    assert not list((stow_server.data / stray.StudyInstanceUID).glob("*/*.dcm"))
    assert incoming_files(stow_server) == []


def test_a_date_that_is_not_one_is_400(server):
    """PS3.18 8.3: an invalid value of a supported parameter is 400. StudyDate=2003-2004
    was compared as text (20040119 left out); a valid DA range finds it."""
    ct = uids("ct")[0]
    for bad in ("2003", "2003-2004", "notadate"):
        code, _, body = get(f"{server.url}/dicom-web/studies?StudyDate={bad}")
        assert code == 400, bad
        assert "StudyDate: not a DA" in json.loads(body)["error"], bad
    assert ct in study_uids(studies(server, "StudyDate=20030101-20041231"))
