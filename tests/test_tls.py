"""TLS with a throw-away CA made by `openssl`. DICOM: dcmtk clients with +tls, our SCU
commands, a C-MOVE to a TLS peer (dcmtk storescp +tls), and the clients that must fail.
HTTPS: `requests`, `dicomweb-client` and Chromium, and the clients that must fail or stall."""

import base64
import hashlib
import re
import socket
import ssl
import subprocess
import urllib.request

import pydicom
import pytest
import requests
from conftest import TEST_FILES
from conftest import Server
from conftest import closed_within
from conftest import free_port
from conftest import minipacs
from conftest import run
from conftest import storescp
from conftest import storescu
from dicomweb_client.api import DICOMwebClient
from playwright.sync_api import expect
from playwright.sync_api import sync_playwright

CT = TEST_FILES / "CT_small.dcm"
LEAF = (
    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    "extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
)


def openssl(folder, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


def make_ca(folder, name: str) -> None:
    openssl(
        folder,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )


def make_leaf(folder, name: str, ca: str) -> None:
    (folder / "leaf.ext").write_text(LEAF)
    openssl(
        folder,
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
    )
    openssl(
        folder,
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        f"{name}.crt",
        "-extfile",
        "leaf.ext",
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    make_ca(folder, "ca")
    make_ca(folder, "rogue-ca")
    make_leaf(folder, "server", "ca")
    make_leaf(folder, "client", "ca")
    make_leaf(folder, "rogue", "rogue-ca")
    return folder


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    """One DICOM TLS server for the module's client tests (each checks its own answers and
    log lines)."""
    root = tmp_path_factory.mktemp("tls")
    port = free_port()
    config = root / "tls.toml"
    config.write_text(
        f'tls_port = {port}\ntls_cert = "{pki / "server.crt"}"\n'
        f'tls_key = "{pki / "server.key"}"\ntls_ca = "{pki / "ca.crt"}"\n'
        'peer = ["WS1=127.0.0.1:1?cert=server"]\n'  # WS1: only with the "server" certificate
    )
    server = Server(root / "data", "--config", str(config)).start()
    server.tls_port = port
    yield server
    server.kill()


def dcmtk(
    tool: str, server, pki, *files: str, who: str = "client", timeout: float = 120, aet: str = ""
):
    """A dcmtk client over TLS with `who`'s certificate (calling as `aet`, when given);
    files go after host and port."""
    tls = ["+tls", str(pki / f"{who}.key"), str(pki / f"{who}.crt"), "+cf", str(pki / "ca.crt")]
    tls += ["-aet", aet] if aet else []
    address = ["127.0.0.1", str(server.tls_port)]
    return run(tool, *tls, "-aec", "MINIPACS", *address, *files, check=False, timeout=timeout)


def test_dcmtk_and_our_scu_over_mutual_tls(tls_server, pki):
    assert dcmtk("echoscu", tls_server, pki).returncode == 0
    assert dcmtk("storescu", tls_server, pki, str(CT)).returncode == 0
    tls = [
        "--tls-ca",
        str(pki / "ca.crt"),
        "--tls-cert",
        str(pki / "client.crt"),
        "--tls-key",
        str(pki / "client.key"),
    ]
    found = minipacs("find", "--port", str(tls_server.tls_port), *tls, "--json", "StudyInstanceUID")
    uid = pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID
    assert uid in found.stdout
    assert "DICOM TLS on 127.0.0.1" in tls_server.log()


def test_clients_without_a_trusted_certificate_are_refused(tls_server, pki):
    assert dcmtk("echoscu", tls_server, pki, who="rogue").returncode != 0
    anonymous = run(
        "echoscu",
        "+tla",
        "+cf",
        str(pki / "ca.crt"),
        "-aec",
        "MINIPACS",
        "127.0.0.1",
        str(tls_server.tls_port),
        check=False,
    )
    assert anonymous.returncode != 0
    plain = run("echoscu", "-aec", "MINIPACS", "127.0.0.1", str(tls_server.tls_port), check=False)
    assert plain.returncode != 0
    # Our SCU checks the server too: without the CA, the server's certificate is unknown.
    unchecked = minipacs("echo", "--port", str(tls_server.tls_port), "--tls", check=False)
    assert unchecked.returncode != 0
    assert run("echoscu", "-aec", "MINIPACS", "127.0.0.1", str(tls_server.port)).returncode == 0


def test_a_peer_tied_to_a_certificate(tls_server, pki):
    """`cert=CN`: WS1 only over mutual TLS with that certificate, which calls only as WS1."""
    assert dcmtk("echoscu", tls_server, pki, who="server", aet="WS1").returncode == 0
    other_cert = dcmtk("echoscu", tls_server, pki, aet="WS1")  # CN=client
    assert "Calling AE Title Not Recognized" in other_cert.stderr
    plain = run(
        "echoscu", "-aet", "WS1", "-aec", "MINIPACS", "127.0.0.1", str(tls_server.port), check=False
    )
    assert plain.returncode != 0
    as_another = dcmtk("echoscu", tls_server, pki, who="server", aet="SOMEONE")
    assert "Calling AE Title Not Recognized" in as_another.stderr
    log = tls_server.log()
    assert "WS1 must present certificate 'server', not certificate 'client'" in log
    assert "WS1 must present certificate 'server', not no TLS client certificate" in log
    assert "certificate 'server' may call only as WS1" in log


def test_a_silent_client_holds_up_no_other_tls_client(start_server, pki, tmp_path):
    """Connections that open TCP to the TLS port and say nothing: pynetdicom does the
    handshake in its accept thread, so each would hold up every TLS client after it. Ours
    run in a thread per connection, and end after acse_timeout."""
    port = free_port()
    config = tmp_path / "tls.toml"
    config.write_text(
        f'tls_port = {port}\ntls_cert = "{pki / "server.crt"}"\n'
        f'tls_key = "{pki / "server.key"}"\ntls_ca = "{pki / "ca.crt"}"\nacse_timeout = 3\n'
    )
    server = start_server("--config", str(config))
    server.tls_port = port
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
    try:
        assert dcmtk("echoscu", server, pki, timeout=20).returncode == 0
        assert all(closed_within(sock, 15) for sock in silent)
    finally:
        for sock in silent:
            sock.close()
    assert dcmtk("echoscu", server, pki, timeout=20).returncode == 0


def test_move_to_a_tls_peer(start_server, pki, tmp_path):
    dest_port, out = free_port(), tmp_path / "moved"
    tls = ("+tls", str(pki / "server.key"), str(pki / "server.crt"), "+cf", str(pki / "ca.crt"))
    receiver = storescp(dest_port, out, *tls, "-aet", "TLSDEST")
    try:
        config = tmp_path / "tls.toml"
        config.write_text(
            f'tls_cert = "{pki / "client.crt"}"\ntls_key = "{pki / "client.key"}"\n'
            f'tls_ca = "{pki / "ca.crt"}"\ntls_port = {free_port()}\n'
        )
        server = start_server(
            "--config", str(config), "--peer", f"TLSDEST=127.0.0.1:{dest_port}?tls=yes"
        )
        minipacs("send", "--port", str(server.port), str(CT))
        uid = pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID
        moved = minipacs("move", "--port", str(server.port), "--dest", "TLSDEST", uid)
        assert "completed: 1" in moved.stdout + moved.stderr, moved.stdout + moved.stderr
        assert len(list(out.iterdir())) == 1
    finally:
        receiver.terminate()
        receiver.wait(10)


@pytest.fixture(scope="module")
def https_server(pki, tmp_path_factory):
    """One HTTPS server for the module's web tests; each closes what it opened."""
    root = tmp_path_factory.mktemp("https")
    config = root / "https.toml"
    config.write_text(
        f'https_cert = "{pki / "server.crt"}"\nhttps_key = "{pki / "server.key"}"\n'
        "http_timeout = 2\n"
    )
    server = Server(root / "data", "--config", str(config), ca=pki / "ca.crt").start()
    yield server
    server.kill()


def test_dicomweb_over_https(https_server, pki):
    """STOW-RS up and WADO-RS back over HTTPS: a body larger than any TLS record or socket
    buffer crosses intact both ways; the client checks the server against the CA."""
    session = requests.Session()
    session.verify = str(pki / "ca.crt")
    session.trust_env = False  # else REQUESTS_CA_BUNDLE, when set, overrides verify
    web = DICOMwebClient(f"{https_server.url}/dicom-web", session=session)
    stored = pydicom.dcmread(CT)
    stored.NumberOfFrames = 400  # 13 MB, more than loopback's socket buffers
    stored.PixelData = stored.PixelData * 400
    stored.SOPInstanceUID = pydicom.uid.generate_uid()
    web.store_instances([stored])
    back = web.retrieve_instance(
        stored.StudyInstanceUID, stored.SeriesInstanceUID, stored.SOPInstanceUID
    )
    assert back.PixelData == stored.PixelData
    found = web.search_for_studies(search_filters={"PatientID": stored.PatientID})
    assert [s["0020000D"]["Value"][0] for s in found] == [stored.StudyInstanceUID]
    response = session.get(f"{https_server.url}/healthz", timeout=5)
    assert response.headers["Strict-Transport-Security"].startswith("max-age=")
    # urllib says Connection: close: the answer must not lose its tail at the close.
    url = (f"{https_server.url}/dicom-web/studies/{stored.StudyInstanceUID}/series/"
           f"{stored.SeriesInstanceUID}/instances/{stored.SOPInstanceUID}")  # fmt: skip
    request = urllib.request.Request(url, headers={"Accept": "application/dicom"})
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    with urllib.request.urlopen(request, context=context, timeout=30) as answer:
        body = answer.read()
    assert len(body) == int(answer.headers["Content-Length"]) > 13_000_000


def test_https_clients_that_must_fail(https_server, pki):
    logged = len(https_server.log())  # the server is the module's: only what this test adds
    with pytest.raises(requests.exceptions.SSLError):  # the CA is not trusted
        requests.get(f"{https_server.url}/healthz", timeout=5)
    plain = f"http://127.0.0.1:{https_server.http_port}/healthz"
    answer = requests.get(plain, timeout=5)  # no plain HTTP on that port, and it says so
    assert answer.status_code == 400 and "HTTPS only" in answer.text
    assert "TLS with 127.0.0.1 failed" in https_server.log()[logged:]
    ca = str(pki / "ca.crt")
    assert requests.get(f"{https_server.url}/healthz", verify=ca, timeout=5).status_code == 200


def test_silent_and_half_handshakes_hold_nothing(https_server, pki):
    """Clients that connect and say nothing, or stop inside the handshake, neither delay
    others nor stay connected beyond http_timeout."""
    silent = [socket.create_connection(("127.0.0.1", https_server.http_port)) for _ in range(12)]
    half = socket.create_connection(("127.0.0.1", https_server.http_port))
    wire = ssl.MemoryBIO()
    hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), wire, server_hostname="x")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    half.sendall(wire.read()[:60])  # the start of a ClientHello
    ca = str(pki / "ca.crt")
    assert requests.get(f"{https_server.url}/healthz", verify=ca, timeout=5).status_code == 200
    # Served while the stalled clients are still connected, not after they were dropped
    # (a server that handshakes in its accept loop serves it once they are closed).
    assert not any(closed_within(sock, 0.01) for sock in [half, *silent])
    assert closed_within(half, 10)
    assert all(closed_within(sock, 10) for sock in silent)
    for sock in [half, *silent]:
        sock.close()


def test_a_dribbled_handshake_is_closed_after_http_timeout(https_server):
    """A ClientHello sent a byte at a time (slowloris inside the handshake) keeps no
    connection: handshake bytes are not activity, so the connection is closed after
    http_timeout (2 s here) from its start, long before the hello is complete."""
    wire = ssl.MemoryBIO()
    hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), wire, server_hostname="x")
    with pytest.raises(ssl.SSLWantReadError):
        hello.do_handshake()
    record = wire.read()  # ~500 bytes: at 0.25 s a byte, two minutes
    sent = 0
    with socket.create_connection(("127.0.0.1", https_server.http_port)) as sock:
        for byte in record:
            if closed_within(sock, 0.25):
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:  # reset: closed
                break
            sent += 1
    assert 0 < sent < len(record) // 4


def spki_hash(certificate) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes: trust this key only."""
    key = subprocess.run(
        ["openssl", "x509", "-in", str(certificate), "-pubkey", "-noout"],
        check=True,
        capture_output=True,
    ).stdout
    der = subprocess.run(
        ["openssl", "pkey", "-pubin", "-outform", "der"], input=key, check=True, capture_output=True
    ).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def test_chromium_logs_in_over_https(https_server, pki):
    """The browser over HTTPS: the login page, then the study list; the session cookie is
    Secure (never sent over plain HTTP)."""
    storescu(https_server.port, CT)
    data = ["--data", str(https_server.data)]
    password = "a long enough password"
    minipacs("user", "add", "rad", "--role", "viewer", "--password-stdin", *data, input=password)
    trust = f"--ignore-certificate-errors-spki-list={spki_hash(pki / 'server.crt')}"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-dev-shm-usage", trust],
        )
        try:
            context = chromium.new_context()
            page = context.new_page()
            page.goto(https_server.url)
            expect(page).to_have_url(re.compile(r"^https://.*/login\?next=/$"))
            page.get_by_label("User").fill("rad")
            page.get_by_label("Password").fill(password)
            page.get_by_role("button", name="Log in").click()
            expect(page.locator("tr.study")).to_have_count(1)
            cookie = next(c for c in context.cookies() if c["name"] == "minipacs_session")
            assert cookie["secure"] and cookie["httpOnly"]
        finally:
            chromium.close()
