"""The audit trail: every store, query and retrieve (DICOM and web) leaves one event,
hash-chained, readable and verifiable with `minipacs audit`."""

import dataclasses
import json
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request

import pydicom
import pytest
import requests
from conftest import Server
from conftest import index_args
from conftest import minipacs
from conftest import run
from conftest import storescu
from make_study import make_study
from test_auth import CT
from test_auth import PASSWORD
from test_auth import stow

from pacs import scu
from storage import Archive
from storage import audit as audit_chain

pytestmark = pytest.mark.usefixtures("engine")


def audit(server, *args: str, check: bool = True):
    return minipacs(
        "audit", "--data", str(server.data), *index_args(server.index), *args, check=check
    )


def events(server, *args: str, count: int) -> list[dict]:
    """The events `minipacs audit --json` lists with these filters, once there are `count`
    (queries are audited just after)."""
    deadline = time.monotonic() + 10
    while True:
        found = [json.loads(line) for line in audit(server, "--json", *args).stdout.splitlines()]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def trail(server, count: int, **filters: str) -> list[dict]:
    """The events storage's own filter finds (the one `minipacs audit` applies), as the
    CLI prints them, once there are `count`: read in-process, where polling the CLI started
    a Python process each time."""
    deadline = time.monotonic() + 10
    with Archive(server.data, fsync=False, index_url=server.index) as archive:
        while True:
            found = [
                {k: v for k, v in dataclasses.asdict(row).items() if "hash" not in k}
                for row in archive.audit_events(**filters)
            ]
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def test_store_query_retrieve_are_audited_and_chained(server, tmp_path):
    paths = make_study(tmp_path / "s", 3, size=32)
    ds = pydicom.dcmread(paths[0])
    storescu(server.port, *paths)
    stored = trail(server, 3, event="store")
    assert [(e["who"], e["patient_id"], e["study_uid"], e["outcome"]) for e in stored] == [
        ("STORESCU", ds.PatientID, ds.StudyInstanceUID, "success")
    ] * 3
    assert {json.loads(e["detail"])["sop"] for e in stored} == {
        pydicom.dcmread(p).SOPInstanceUID for p in paths
    }
    assert all(e["address"] == "127.0.0.1" for e in stored)
    assert str(ds.PatientName) not in audit(server).stdout  # UIDs and IDs, never names

    run(
        "findscu",
        "-S",
        "-aet",
        "FINDSCU",
        "-aec",
        "MINIPACS",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"PatientID={ds.PatientID}",
        "-k",
        "StudyInstanceUID",
        "127.0.0.1",
        str(server.port),
    )
    (query,) = events(server, "--event", "query", "--who", "FINDSCU", count=1)
    assert query["patient_id"] == ds.PatientID
    assert json.loads(query["detail"])["answers"] == 1
    assert json.loads(query["detail"])["keys"]["PatientID"] == ds.PatientID

    outcome = scu.get(scu.Remote(port=server.port), "STUDY", [ds.StudyInstanceUID], tmp_path / "g")
    assert outcome.ok
    (got,) = trail(server, 1, event="retrieve", who="MINIPACS-SCU")
    assert got["study_uid"] == ds.StudyInstanceUID
    assert json.loads(got["detail"])["instances"] == 3

    base = f"{server.url}/dicom-web/studies/{ds.StudyInstanceUID}"
    urllib.request.urlopen(f"{base}/series/{ds.SeriesInstanceUID}/metadata").read()
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{server.url}/dicom-web/studies/1.2.3/metadata")
    web = events(server, "--event", "retrieve", "--study", ds.StudyInstanceUID, count=2)
    assert [json.loads(e["detail"]).get("by", "HTTP") for e in web] == ["C-GET", "HTTP"]
    assert {e["address"] for e in web} == {"127.0.0.1"}
    failed = trail(server, 1, study_uid="1.2.3")
    assert failed[0]["outcome"] == "failure: HTTP 404"

    by_patient = events(server, "--patient", ds.PatientID, count=5)
    assert {e["event"] for e in by_patient} == {"store", "query", "retrieve"}
    result = audit(server, "--verify")
    assert "problems: 0" in result.stdout


def test_a_changed_or_removed_event_breaks_the_chain(engine, tmp_path):
    """The chain of four imports (audited like C-STOREs, by the same ingest): no server
    is needed to make events or to check them."""
    server = Server(tmp_path / "data", index=engine)  # never started: its data and index
    minipacs("import", "--data", str(server.data), *index_args(engine), "--no-fsync",
             *map(str, make_study(tmp_path / "s", 4, size=32)))  # fmt: skip
    assert len(trail(server, 4, event="store")) == 4
    first, second, third = (
        row[0] for row in server.rows("SELECT id FROM auditevent ORDER BY id")[:3]
    )
    server.rows("UPDATE auditevent SET outcome = 'failure: made up' WHERE id = ?", first)
    server.rows("DELETE FROM auditevent WHERE id = ?", third)
    result = audit(server, "--verify", check=False)
    assert result.returncode == 1
    assert f"event {first}: its content was changed" in result.stdout
    assert f"event {third + 1}: does not follow the event before it" in result.stdout
    assert f"event {second}:" not in result.stdout


# Audits from 4 threads, a write it waits for, then SIGKILL: no close, no flush.
CRASH_AFTER_WRITE = """
import os, signal, sys, threading
from storage import Archive
from storage.audit import Event
archive = Archive(sys.argv[1], fsync=True, index_url=sys.argv[2]).open()
def queries(thread):
    for n in range(25):
        archive.audit(Event("query", who=f"t{thread}", detail={"n": n}))
threads = [threading.Thread(target=queries, args=(t,)) for t in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
archive.write(lambda: None)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_events_audited_before_a_write_survive_a_crash(engine, tmp_path):
    """Events wait in memory for the writer and are appended a batch at a time
    (Archive.audit); a write someone waits for commits every event audited before it, so a
    process killed right after loses none: all 100, each thread's in its order, the chain
    whole. An unknown event is refused at the call, not by the writer's batch."""
    data = tmp_path / "data"
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER_WRITE, str(data), engine], capture_output=True
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr.decode()
    with Archive(data, fsync=False, index_url=engine) as archive:
        found = [(e.who, json.loads(e.detail)["n"]) for e in archive.audit_events(event="query")]
        assert sorted(found) == [(f"t{t}", n) for t in range(4) for n in range(25)]
        for thread in range(4):
            assert [n for who, n in found if who == f"t{thread}"] == list(range(25))
        assert archive.verify_audit() == []
        with pytest.raises(ValueError, match="unknown audit event"):
            archive.audit(audit_chain.Event("nonsense"))


def add_user(server, name: str, role: str) -> str:
    """Add a user to the server's index (either engine); a bearer token of theirs."""
    where = ["--data", str(server.data), *index_args(server.index)]
    minipacs("user", "add", name, "--role", role, "--password-stdin", *where, input=PASSWORD)
    return minipacs("user", "token", name, *where).stdout.strip()


def test_web_events_say_who_and_which_patients(server):
    """Issue 17: STOW-RS store events carried no user; the worklist (GET, POST, DELETE)
    and reads of /audit were not audited; /study/<uid> page events carried no study or
    patient; QIDO events did not say whose data the answer showed."""
    token = add_user(server, "ana", "admin")
    headers = {"Authorization": f"Bearer {token}"}
    ct = pydicom.dcmread(CT, stop_before_pixels=True)
    assert stow(server, headers).status_code == 200
    (stored,) = trail(server, 1, event="store")
    assert (stored["who"], stored["patient_id"]) == ("ana", ct.PatientID)

    found = requests.get(f"{server.url}/dicom-web/studies", headers=headers, timeout=10)
    assert found.status_code == 200
    (query,) = trail(server, 1, event="query")
    assert (query["who"], query["patient_id"]) == ("ana", ct.PatientID)
    assert json.loads(query["detail"])["patients"] == [ct.PatientID]

    page = requests.get(f"{server.url}/study/{ct.StudyInstanceUID}", headers=headers, timeout=10)
    assert page.status_code == 200
    (view,) = trail(server, 1, event="view")
    assert (view["study_uid"], view["patient_id"]) == (ct.StudyInstanceUID, ct.PatientID)

    worklist = f"{server.url}/api/worklist"
    item = {
        "PatientID": "WL1",
        "PatientName": "Doe^Jane",
        "Modality": "CT",
        "ScheduledStationAETitle": "CT1",
        "ScheduledProcedureStepStartDate": "20261204",
    }
    added = requests.post(worklist, json=item, headers=headers, timeout=10)
    (item_id,) = added.json()["ids"]
    assert requests.get(worklist, headers=headers, timeout=10).status_code == 200
    removed = requests.delete(f"{worklist}/{item_id}", headers=headers, timeout=10)
    assert removed.status_code == 204
    changes = trail(server, 2, event="worklist")
    assert [(e["who"], json.loads(e["detail"])["method"]) for e in changes] == [
        ("ana", "POST"),
        ("ana", "DELETE"),
    ]
    assert json.loads(changes[0]["detail"])["patients"] == ["WL1"]
    listed = trail(server, 2, event="query", who="ana")[-1]
    assert json.loads(listed["detail"])["patients"] == ["WL1"]

    shown = requests.get(
        f"{server.url}/audit?patient_id={ct.PatientID}", headers=headers, timeout=10
    )
    assert shown.status_code == 200
    (read,) = trail(server, 1, event="audit")
    assert read["who"] == "ana" and ct.PatientID in json.loads(read["detail"])["query"]

    login = {"user": "ana", "password": PASSWORD}  # the right password, but no Origin
    refused = requests.post(f"{server.url}/login", data=login, allow_redirects=False, timeout=10)
    assert refused.status_code == 401
    (event,) = trail(server, 1, event="login")
    assert event["outcome"] == "failure: Origin is not this server"


def recompute_chain(server) -> None:
    """What someone who can write the index (not read the key) does after editing it: the
    whole chain made again with the plain SHA-256 links."""
    prev = audit_chain.GENESIS
    for row in server.rows(
        f"SELECT id, {', '.join(audit_chain.FIELDS)} FROM auditevent ORDER BY id"
    ):
        values = dict(zip(audit_chain.FIELDS, row[1:], strict=True))
        digest = audit_chain.chain_hash(prev, values)
        server.rows(
            "UPDATE auditevent SET prev_hash = ?, hash = ? WHERE id = ?", prev, digest, row[0]
        )
        prev = digest


def test_a_rewritten_and_recomputed_chain_is_detected(server, tmp_path):
    """Issue 17: an edited row and a removed query event, the chain recomputed, passed
    `--verify` with the plain SHA-256 chain. The links are keyed now."""
    storescu(server.port, *make_study(tmp_path / "s", 3, size=32))
    minipacs("find", "--port", str(server.port), "--json", "StudyInstanceUID")
    (query,) = trail(server, 1, event="query")
    server.stop()
    key = server.data / ".audit-key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = server.rows("SELECT min(id) FROM auditevent")[0][0]
    server.rows("UPDATE auditevent SET who = 'SOMEONE_ELSE' WHERE id = ?", first)
    server.rows("DELETE FROM auditevent WHERE id = ?", query["id"])
    recompute_chain(server)
    result = audit(server, "--verify", check=False)
    assert result.returncode == 1
    assert f"event {first}: its content was changed" in result.stdout


def test_a_chain_from_before_the_key_stays_verifiable(start_server, engine, tmp_path):
    """Events of earlier versions (plain SHA-256, no key file) verify as they are; the
    first keyed event covers them, so rewriting them is still noticed."""
    with Archive(tmp_path / "data", fsync=False, index_url=engine):
        pass  # an index as the server makes it, with no event and no key yet
    assert not (tmp_path / "data" / ".audit-key").exists()
    server = Server(tmp_path / "data", index=engine)  # started below, by start_server
    prev = audit_chain.GENESIS
    for number in range(3):
        values = audit_chain.Event("login", who=f"old{number}").row()
        digest = audit_chain.chain_hash(prev, values)
        server.rows(
            f"INSERT INTO auditevent ({', '.join(audit_chain.FIELDS)}, prev_hash, hash) "
            f"VALUES ({', '.join('?' * (len(audit_chain.FIELDS) + 2))})",
            *(values[name] for name in audit_chain.FIELDS),
            prev,
            digest,
        )
        prev = digest
    assert "no audit key" in audit(server, "--verify", check=False).stdout
    server = start_server(data=server.data)
    storescu(server.port, *make_study(tmp_path / "s", 1, size=32))
    trail(server, 1, event="store")
    server.stop()
    assert "problems: 0" in audit(server, "--verify").stdout
    server.rows("UPDATE auditevent SET who = 'rewritten' WHERE who = 'old1'")
    recompute_chain(server)
    result = audit(server, "--verify", check=False)
    assert result.returncode == 1
    assert "its content was changed" in result.stdout


def test_events_go_to_a_syslog_collector(start_server, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as collector:
        collector.bind(("127.0.0.1", 0))
        collector.settimeout(10)
        config = tmp_path / "syslog.toml"
        config.write_text(f'audit_syslog = "udp://127.0.0.1:{collector.getsockname()[1]}"\n')
        server = start_server("--config", str(config))
        paths = make_study(tmp_path / "s", 1, size=32)
        storescu(server.port, *paths)
        message = collector.recv(65536).decode()
    ds = pydicom.dcmread(paths[0])
    head, _, body = message.partition(" - ")
    assert head.startswith("<110>1 ")  # facility 13 (log audit), severity 6 (info), v1
    assert head.split()[-1] == "store"  # MSGID
    event = json.loads(body)
    assert (event["who"], event["study_uid"]) == ("STORESCU", ds.StudyInstanceUID)
    assert ds.PatientID not in server.log()  # the application log never gets the events
