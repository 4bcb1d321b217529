"""Events for HTTP subscribers: a real receiver on a loopback port checks each signature
and records what comes; it sees instance.created for every instance of a study, then one
study.stable, then study.updated after a later instance, and instance.deleted; while it is
down, and across a restart of minipacs, notifications wait in the index and arrive once it
is back, in order per study. The queue's ordering rule and the schema step are checked
in-process too."""

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer

import pydicom
import pytest
from conftest import Server
from conftest import free_port
from conftest import index_args
from conftest import index_rows
from conftest import minipacs
from conftest import storescu
from conftest import wait_until
from make_study import make_study

from storage import Archive
from storage import events
from storage import routing
from storage.engine import open_database
from storage.schema import SCHEMA_VERSION

SECRET = "a-test-secret-of-some-length"
ALL = ["instance.created", "instance.deleted", "study.stable", "study.updated"]


def verify(secret: str, headers, body: bytes) -> bool:
    """What a receiver does (README, Events): the HMAC of `<timestamp>.<body>`, and a
    timestamp of the last five minutes."""
    stamp = headers.get("X-Minipacs-Timestamp", "")
    mac = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    fresh = stamp.isdigit() and abs(time.time() - int(stamp)) < 300
    return fresh and hmac.compare_digest(headers.get("X-Minipacs-Signature", ""), "sha256=" + mac)


class Receiver:
    """An HTTP receiver on a fixed loopback port that can go down and come back; it keeps
    each notification whose signature holds (answering 204), and refuses others (401)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.received: list[tuple[dict, bytes, dict]] = []  # event, body, headers
        self.refused = 0
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if verify(SECRET, self.headers, body):
                    receiver.received.append((json.loads(body), body, dict(self.headers)))
                    self.send_response(204)
                else:
                    receiver.refused += 1
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    def of_study(self, study_uid: str) -> list[dict]:
        """The study's events in the order they first arrived (a redelivery is a repeat)."""
        seen: dict[str, dict] = {}
        for event, _, _ in self.received:
            if event["subject"] == study_uid:
                seen.setdefault(event["id"], event)
        return list(seen.values())


def kinds(events_: list[dict]) -> list[str]:
    return [e["type"].removeprefix("org.minipacs.") for e in events_]


def study_of(paths) -> str:
    return pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    receiver.start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, receiver, module_engine):
    """minipacs with a subscription to every event from its config file, studies stable
    after a second."""
    folder = tmp_path_factory.mktemp("events")
    config = folder / "minipacs.toml"
    config.write_text(
        f"study_stable = 1\n\n[[subscription]]\nurl = {json.dumps(receiver.url)}\n"
        f"events = {json.dumps(ALL)}\nsecret = {json.dumps(SECRET)}\n"
    )
    server = Server(folder / "data", "--config", str(config), index=module_engine)
    server.start()
    yield server
    server.kill()


def waiting(server, study_uid: str) -> int:
    return server.rows("SELECT count(*) FROM routeitem WHERE study_uid = ?", study_uid)[0][0]


def test_a_study_gives_its_instances_then_stable_then_updated(server, receiver, tmp_path):
    paths = make_study(tmp_path / "study", 4, size=16)
    study = study_of(paths)
    storescu(server.port, *paths[:3])
    assert wait_until(lambda: "study.stable" in kinds(receiver.of_study(study)))
    assert wait_until(lambda: waiting(server, study) == 0)  # no timer left to fire again
    got = receiver.of_study(study)
    assert kinds(got) == ["instance.created"] * 3 + ["study.stable"]
    sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths[:3]}
    assert {e["data"]["SOPInstanceUID"] for e in got[:3]} == sops
    assert len({e["id"] for e in got}) == 4
    created, stable = got[0], got[-1]
    assert created["specversion"] == "1.0"
    assert created["source"] == "/minipacs/MINIPACS"
    assert created["datacontenttype"] == "application/json"
    assert created["data"]["StudyInstanceUID"] == study
    assert created["data"]["callingAET"] == "STORESCU"
    assert stable["data"]["NumberOfStudyRelatedInstances"] == 3
    assert stable["data"]["ModalitiesInStudy"] == ["CT"]
    _, _, headers = receiver.received[-1]
    assert headers["Content-Type"].startswith("application/cloudevents+json")

    storescu(server.port, paths[3])
    assert wait_until(lambda: "study.updated" in kinds(receiver.of_study(study)))
    assert kinds(receiver.of_study(study))[4:] == ["instance.created", "study.updated"]
    assert receiver.of_study(study)[-1]["data"]["NumberOfStudyRelatedInstances"] == 4

    sop = pydicom.dcmread(paths[0], stop_before_pixels=True).SOPInstanceUID
    with Archive(server.data, fsync=False, index_url=server.index) as archive:  # `minipacs delete`
        archive.retention.delete("IMAGE", sop, who="admin")
    assert wait_until(lambda: len(receiver.of_study(study)) == 7)
    gone = receiver.of_study(study)[-1]
    assert (kinds([gone]), gone["data"]["SOPInstanceUID"]) == (["instance.deleted"], sop)
    assert receiver.refused == 0


def test_a_tampered_notification_fails_its_check(receiver):
    """What the receiver kept verifies; the same bytes altered, or replayed much later,
    do not."""
    _, body, headers = receiver.received[0]
    assert verify(SECRET, headers, body)
    assert not verify(SECRET, headers, body.replace(b'"specversion"', b'"specversion" '))
    assert not verify("another-secret-of-length", headers, body)
    old = {**headers, "X-Minipacs-Timestamp": str(int(headers["X-Minipacs-Timestamp"]) - 3600)}
    assert not verify(SECRET, old, body)


def test_a_receiver_down_across_a_restart_gets_everything_in_order(server, receiver, tmp_path):
    receiver.stop()
    first, second = make_study(tmp_path / "a", 2, size=16), make_study(tmp_path / "b", 2, size=16)
    storescu(server.port, *first, *second)
    tries = "SELECT max(attempts) FROM routeitem WHERE subscription IS NOT NULL"
    assert wait_until(lambda: (server.rows(tries)[0][0] or 0) >= 1)
    queue = minipacs("queue", "--data", str(server.data), *index_args(server.index)).stdout
    assert f"subscription 1  {receiver.url}" in queue
    assert "instance.created to " + receiver.url in queue and "Connection refused" in queue
    server.stop()
    receiver.start()
    server.start()
    for study in (study_of(first), study_of(second)):
        assert wait_until(lambda s=study: "study.stable" in kinds(receiver.of_study(s)))
        assert kinds(receiver.of_study(study)) == ["instance.created"] * 2 + ["study.stable"]
    assert wait_until(lambda: server.rows("SELECT count(*) FROM routeitem") == [(0,)])


def test_subscribe_add_list_remove(server, receiver):
    if server.index:
        pytest.skip("the same commands on the other engine: three Python starts saved")
    where = ["--data", str(server.data), *index_args(server.index)]
    url = "http://127.0.0.1:9/x"
    added = minipacs("subscribe", "add", url, "--events", "study.stable", *where)
    number, secret = added.stdout.split()
    assert len(secret) == 64 and "shown only now" in added.stderr
    listed = minipacs("subscribe", "list", "--json", *where).stdout
    assert secret not in listed
    assert {
        (s["url"], tuple(s["events"]), s["origin"]) for s in map(json.loads, listed.splitlines())
    } == {(receiver.url, tuple(ALL), "config"), (url, ("study.stable",), "cli")}
    removed = minipacs("subscribe", "remove", "1", number, *where, check=False)
    assert removed.returncode == 1
    assert "1: in the config file" in removed.stdout
    assert "subscriptions removed: 1" in removed.stdout
    assert [s.url for s in subscribers(server)] == [receiver.url]


def subscribers(server) -> list[events.Subscriber]:
    rows = server.rows("SELECT url, events, secret FROM subscription ORDER BY id")
    return [events.make(url, types, secret) for url, types, secret in rows]


def test_subscriptions_are_checked():
    with pytest.raises(events.SubscriptionError, match="http:// or https://"):
        events.make("ftp://host/")
    with pytest.raises(events.SubscriptionError, match="unknown event type"):
        events.make("http://host/", "study.stable,study.gone")
    with pytest.raises(events.SubscriptionError, match="16 characters"):
        events.make("http://host/", "", "short")
    with pytest.raises(events.SubscriptionError, match="a secret is required"):
        events.parse_setting({"url": "http://host/"})
    text = f"http://host/ events=study.stable+org.minipacs.study.updated secret={SECRET}"
    assert events.parse_setting(text).types == ("study.stable", "study.updated")


# -- in-process: the queue's rule and the schema step ---------------------------------


def test_a_failed_notification_holds_back_its_study_only(tmp_path, engine):
    """Nothing sends here (no server): the queue is claimed by hand."""
    with Archive(tmp_path / "data", fsync=False, index_url=engine) as archive:
        archive.events.add(events.make("http://127.0.0.1:9/", ["instance.created"], SECRET))
        a, b = make_study(tmp_path / "a", 2, size=8), make_study(tmp_path / "b", 1, size=8)
        for path in a + b:
            archive.import_file(path)
        claimed = archive.route_queue.due()
        assert [i.study_uid for i in claimed] == [study_of(a)] * 2 + [study_of(b)]
        assert all(i.event == "instance.created" and i.subscription for i in claimed)
        head, later, other = claimed
        archive.route_queue.not_sent([head.id], "down", 0)  # backs off a second
        archive.route_queue.release([later.id, other.id])
        assert [i.id for i in archive.route_queue.due()] == [other.id]


def test_an_index_at_version_7_gains_the_queue_columns(tmp_path, engine):
    data = tmp_path / "data"
    Archive(data, fsync=False, index_url=engine).open().close()
    database = open_database(engine, data, fsync=False)
    with database.connection_context():
        database.execute_sql("DROP INDEX routeitem_subscription_study_uid")
        for column in ("event", "subscription", "body"):
            database.execute_sql(f"ALTER TABLE routeitem DROP COLUMN {column}")
        database.execute_sql("DROP TABLE subscription")
        database.execute_sql("UPDATE schemaversion SET version = 7")
    if hasattr(database, "close_all"):
        database.close_all()
    routes = (routing.parse_rule("X"),)
    with Archive(data, fsync=False, index_url=engine, routes=routes) as archive:
        archive.events.add(events.make("http://127.0.0.1:9/", [], SECRET))
        archive.import_file(make_study(tmp_path / "s", 1, size=8)[0])
        queued = [(i.destination, i.event) for i in archive.route_queue.items()]
    assert queued == [("X", ""), ("http://127.0.0.1:9/", "instance.created"), ("", "study.stable")]
    assert index_rows(data, "SELECT version FROM schemaversion", index=engine) == [
        (SCHEMA_VERSION,)
    ]
