"""DICOM over TLS with a throw-away CA made by `openssl`: dcmtk clients with +tls, our SCU
commands, a C-MOVE to a TLS peer (dcmtk storescp +tls), and the clients that must fail."""

import subprocess
import time

import pydicom
import pytest
from conftest import TEST_FILES
from conftest import free_port
from conftest import minipacs
from conftest import run

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


@pytest.fixture
def tls_server(start_server, pki, tmp_path):
    port = free_port()
    config = tmp_path / "tls.toml"
    config.write_text(
        f'tls_port = {port}\ntls_cert = "{pki / "server.crt"}"\n'
        f'tls_key = "{pki / "server.key"}"\ntls_ca = "{pki / "ca.crt"}"\n'
    )
    server = start_server("--config", str(config))
    server.tls_port = port
    return server


def dcmtk(tool: str, server, pki, *files: str, who: str = "client"):
    """A dcmtk client over TLS with `who`'s certificate; files go after host and port."""
    tls = ["+tls", str(pki / f"{who}.key"), str(pki / f"{who}.crt"), "+cf", str(pki / "ca.crt")]
    address = ["127.0.0.1", str(server.tls_port)]
    return run(tool, *tls, "-aec", "MINIPACS", *address, *files, check=False)


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


def test_move_to_a_tls_peer(start_server, pki, tmp_path):
    dest_port, out = free_port(), tmp_path / "moved"
    out.mkdir()
    storescp = subprocess.Popen(
        [
            "storescp",
            "+tls",
            str(pki / "server.key"),
            str(pki / "server.crt"),
            "+cf",
            str(pki / "ca.crt"),
            "-aet",
            "TLSDEST",
            "-od",
            str(out),
            str(dest_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
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
        time.sleep(0.5)  # storescp listening
        uid = pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID
        moved = minipacs("move", "--port", str(server.port), "--dest", "TLSDEST", uid)
        assert "completed: 1" in moved.stdout + moved.stderr, moved.stdout + moved.stderr
        assert len(list(out.iterdir())) == 1
    finally:
        storescp.terminate()
        storescp.wait(10)
