"""Limits that keep one client from starving the others: association count, silent DICOM
peers, idle and dribbling HTTP clients, oversized request heads. Bounded in count and time."""

import socket
import time

import pytest
import requests
from conftest import Server
from conftest import closed_within
from pynetdicom import AE
from pynetdicom.sop_class import Verification

LIMITS = "max_associations = 2\nacse_timeout = 2\nhttp_timeout = 2\nhttp_header_kb = 8\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server with these limits for the module; each test leaves it as it found it
    (its associations released, its sockets closed)."""
    config = tmp_path_factory.mktemp("limits") / "limits.toml"
    config.write_text(LIMITS)
    running = Server(config.parent / "data", "--config", str(config)).start()
    yield running
    running.kill()


def associate(port: int):
    ae = AE(ae_title="FLOOD")
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="MINIPACS")


def test_association_flood_beyond_the_limit_is_rejected(server):
    held = [associate(server.port) for _ in range(2)]
    assert all(a.is_established for a in held)
    extra = [associate(server.port) for _ in range(3)]
    assert not any(a.is_established for a in extra)
    assert all(a.is_rejected for a in extra)
    for assoc in held:
        assoc.release()
    deadline = time.monotonic() + 10  # the server counts a released association out soon
    while not (again := associate(server.port)).is_established:
        assert time.monotonic() < deadline, "no association accepted after the release"
        time.sleep(0.1)
    again.release()


def test_a_silent_dicom_client_is_dropped(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        assert closed_within(sock, 8)  # acse_timeout = 2
    after = associate(server.port)
    assert after.is_established
    after.release()


def test_idle_and_dribbling_http_clients_hold_no_thread(server):
    idle = socket.create_connection(("127.0.0.1", server.http_port))
    dribblers = [socket.create_connection(("127.0.0.1", server.http_port)) for _ in range(12)]
    for sock in dribblers:  # more than the 8 worker threads, each half a request head
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    assert closed_within(idle, 10)  # http_timeout = 2, checked every second
    for sock in [idle, *dribblers]:
        sock.close()


def test_an_oversized_request_head_is_refused(server):
    response = requests.get(f"{server.url}/healthz", headers={"X-Big": "a" * 20000}, timeout=10)
    assert response.status_code == 431
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
