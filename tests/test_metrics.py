"""/metrics (Prometheus text, read back with prometheus_client's own parser) and /healthz:
figures move with real traffic (storescu, findscu, echoscu, HTTP), DICOM worker processes
are added in, admins only once there are users; /healthz says 503 and why when the data
folder takes no file."""

import re
import time

import pytest
import requests
from conftest import ROOT
from conftest import TEST_FILES
from conftest import Server
from conftest import add_user
from conftest import run
from conftest import storescu
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

CT = TEST_FILES / "CT_small.dcm"


def scrape(server, **kwargs) -> dict[tuple[str, tuple], float]:
    response = requests.get(f"{server.url}/metrics", timeout=10, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_figures_follow_the_traffic(server):
    storescu(server.port, CT)
    run("echoscu", "-aec", "MINIPACS", "127.0.0.1", str(server.port))
    run("findscu", "-S", "-aec", "MINIPACS", "-k", "QueryRetrieveLevel=STUDY",
        "-k", "PatientID=1CT1", "127.0.0.1", str(server.port))  # fmt: skip
    requests.get(f"{server.url}/dicom-web/studies", timeout=10)
    # The DICOM worker and the indexer add their figures in within a second or so.
    samples = scrape_until(server, "minipacs_dimse_requests_total", 1, service="C-FIND")
    samples = scrape_until(server, "minipacs_instances_stored_total", 1)
    assert value(samples, "minipacs_dimse_requests_total", service="C-STORE") == 1
    assert value(samples, "minipacs_dimse_requests_total", service="C-FIND") == 1
    assert value(samples, "minipacs_dimse_requests_total", service="C-ECHO") == 1
    assert value(samples, "minipacs_instances_stored_total") == 1
    (stored,) = server.data.glob("*/*/*.dcm")
    assert value(samples, "minipacs_bytes_stored_total") == stored.stat().st_size
    finds = value(samples, "minipacs_dimse_request_seconds_count", service="C-FIND")
    assert finds == 1
    assert value(samples, "minipacs_dimse_request_seconds_bucket", service="C-FIND", le="+Inf") == 1
    assert value(samples, "minipacs_http_requests_total", method="GET", code="200") >= 1
    assert ("minipacs_associations_active", ()) in samples
    assert value(samples, "minipacs_archive_instances") == 1
    assert value(samples, "minipacs_disk_free_bytes") > 0
    assert ("minipacs_route_pending", ()) in samples
    assert documented_names() - scraped_names(server) == set()
    assert_openmetrics(server)
    storescu(server.port, CT)  # the same instance again: nothing new stored
    scrape_until(server, "minipacs_dimse_requests_total", 2, service="C-STORE")
    assert journal_emptied(server)  # the indexer counted (or not) before unlinking it
    assert value(scrape(server), "minipacs_instances_stored_total") == 1


def journal_emptied(server, timeout: float = 15) -> bool:
    """Whether the indexer has taken every journal entry (within `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while any((server.data / ".queue").iterdir()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def documented_names(object_store: bool = False) -> set[str]:
    """The metric names README's Metrics section lists: those every server has, or (with
    `object_store`) those it names for a server on an object store (tests/test_s3.py)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Metrics and health\n")[1].split("\n## ")[0]
    everywhere, store = re.split(r"With\s+an\s+object\s+store:", section)
    names = set(re.findall(r"\bminipacs_[a-z_]+", store if object_store else everywhere))
    assert len(names) >= (8 if object_store else 16)
    return names


def scraped_names(server) -> set[str]:
    """Sample names of a scrape, and a counter's `_total` even before its first sample."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {sample.name for sample in family.samples} | {family.name}
        if family.type == "counter":
            names.add(f"{family.name}_total")
    return names


PROMETHEUS_ACCEPT = (  # what Prometheus 2.x and 3.x send first
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def assert_openmetrics(server) -> None:
    """A scraper that asks for OpenMetrics gets it (prometheus_client's encoder), with the
    same figures; before, every answer was text 0.0.4."""
    answer = requests.get(
        f"{server.url}/metrics", headers={"Accept": PROMETHEUS_ACCEPT}, timeout=10
    )
    assert answer.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert answer.text.endswith("# EOF\n")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in openmetrics_families(answer.text)
        for s in family.samples
    }
    assert value(samples, "minipacs_dimse_requests_total", service="C-ECHO") == 1
    assert value(samples, "minipacs_instances_stored_total") == 1


def scrape_until(server, name: str, expected: float, **labels: str) -> dict:
    """Scrape until the sample reaches `expected` (at most 15 s): the DICOM processes
    write their figures every second."""
    deadline = time.monotonic() + 15
    while True:
        samples = scrape(server)
        if value(samples, name, **labels) >= expected or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def test_worker_processes_are_added_in(start_server):
    server = start_server("--workers", "2")
    for _ in range(3):
        storescu(server.port, CT)
    deadline = time.monotonic() + 15  # workers write their figures every 5 s
    while True:
        stores = value(scrape(server), "minipacs_dimse_requests_total", service="C-STORE")
        if stores == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert stores == 3


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A server for the tests whose checks no other test's traffic changes (/healthz is
    open to all, users or not)."""
    running = Server(tmp_path_factory.mktemp("metrics") / "data").start()
    yield running
    running.kill()


def test_metrics_are_for_admins_once_there_are_users(shared):
    server = shared
    password = "a long enough password"
    tokens = {  # in-process: what `minipacs user add` and `user token` call
        name: add_user(server.data, name, role, password)
        for name, role in (("rad", "viewer"), ("boss", "admin"))
    }
    assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 401
    viewer = {"Authorization": f"Bearer {tokens['rad']}"}
    assert requests.get(f"{server.url}/metrics", headers=viewer, timeout=10).status_code == 403
    assert scrape(server, headers={"Authorization": f"Bearer {tokens['boss']}"})
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200  # no login


def test_healthz_fails_when_the_data_folder_takes_no_file(shared):
    server = shared
    incoming = server.data / ".incoming"
    aside = server.data / ".incoming-aside"
    incoming.rename(aside)
    incoming.write_text("not a folder")
    try:
        response = requests.get(f"{server.url}/healthz", timeout=10)
        assert response.status_code == 503
        assert response.json()["status"] == "unhealthy"
        assert any("data folder" in p for p in response.json()["problems"])
    finally:
        incoming.unlink()
        aside.rename(incoming)
    assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
