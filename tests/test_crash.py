"""kill -9 (or SIGTERM) during ingest: every acknowledged instance survives, nothing
partial remains."""

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from conftest import children
from conftest import minipacs
from conftest import running
from make_study import make_study

from storage import Archive


def acknowledged(storescu_output: str) -> list[str]:
    """Files whose C-STORE got Success, from `storescu -v` output."""
    done, current = [], None
    for line in storescu_output.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            done.append(current)
            current = None
    return done


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> list[Path]:
    """300 instances of 128 KiB, made once (0.7 CPU-s): each test sends them to a server
    and data folder of its own."""
    return make_study(tmp_path_factory.mktemp("crash") / "study", 300, size=256)


def verify_problems(server) -> list:
    """What `minipacs verify` finds (Archive.maintenance.verify, which it runs), in this
    process (test_maintenance runs the command): files against the index's sizes and
    SHA-256, and files not indexed."""
    with Archive(server.data, fsync=False, index_url=server.index) as archive:
        return list(archive.maintenance.verify())


def sending(port: int, paths: list[Path]) -> subprocess.Popen:
    """storescu -v in the background, its stderr (one line per step) to read as it comes."""
    return subprocess.Popen(
        ["storescu", "-v", "-aec", "MINIPACS", "127.0.0.1", str(port), *map(str, paths)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "TCP_NODELAY": "1"},
    )


@pytest.mark.parametrize(
    ("sig", "seed"),
    [(signal.SIGKILL, 1), (signal.SIGKILL, 2), (signal.SIGKILL, 3), (signal.SIGTERM, 4)],
    ids=["kill-9-a", "kill-9-b", "kill-9-c", "sigterm"],
)
def test_stop_mid_ingest_loses_no_acknowledged_instance(start_server, study, sig, seed, engine):
    rng = random.Random(seed)
    paths = study
    server = start_server()
    client = sending(server.port, paths)
    kill_after = rng.randint(20, 250)
    lines: list[str] = []
    killed = threading.Event()
    for line in client.stderr:
        lines.append(line)
        if not killed.is_set() and len(acknowledged("".join(lines))) >= kill_after:
            time.sleep(rng.uniform(0, 0.01))  # land at an arbitrary point of a later store
            os.kill(server.proc.pid, sig)
            killed.set()
    client.wait(60)
    client.stderr.close()
    exit_code = server.proc.wait(30)
    assert killed.is_set(), "the study finished before the signal"
    acked = acknowledged("".join(lines))
    if sig == signal.SIGKILL:
        assert kill_after <= len(acked) < len(paths)
    else:  # a clean stop lets the running association finish or aborts it, then exits 0
        assert exit_code == 0, server.log()
        assert "stopped" in server.log()
        assert kill_after <= len(acked)

    server.start()  # same data folder: start-up reconciles
    indexed = {row[0] for row in server.rows("SELECT sop_uid FROM instance")}
    for path in acked:
        assert pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID in indexed
    if not server.index:  # a shared (PostgreSQL) index keeps young temporaries: another node's
        assert list((server.data / ".incoming").iterdir()) == []
        assert list((server.data / ".queue").iterdir()) == []  # indexed, or never acknowledged
    server.stop()
    assert verify_problems(server) == []


def test_a_killed_server_leaves_no_child_process_behind(start_server, tmp_path):
    server = start_server()
    minipacs_send = minipacs("send", "--port", str(server.port), str(make_study(tmp_path, 1)[0]))
    assert minipacs_send.returncode == 0
    spawned = children(server.proc.pid)
    commands = [Path(f"/proc/{p}/cmdline").read_bytes() for p in spawned]
    assert [c for c in commands if b"pacs.worker" in c], "a DICOM worker by default"
    server.kill()
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in spawned):
        assert time.monotonic() < deadline, "a child outlived its server"
        time.sleep(0.1)


def test_a_dicom_worker_killed_mid_ingest_loses_nothing_acknowledged(start_server, study):
    """kill -9 of the DICOM worker alone: the supervisor starts another, the indexer
    (in the main process) takes every acknowledged instance from the journal, and what
    the dead worker had half received is removed."""
    paths = study[:200]
    server = start_server(env={"MINIPACS_INDEX_WAIT": "0"})
    (worker,) = [
        pid
        for pid in children(server.proc.pid)
        if b"pacs.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    client = sending(server.port, paths)
    lines: list[str] = []
    for line in client.stderr:
        lines.append(line)
        if len(acknowledged("".join(lines))) >= 50:
            time.sleep(0.003)  # into the middle of a later dataset
            os.kill(worker, signal.SIGKILL)
            break
    lines += client.stderr.read().splitlines(keepends=True)
    client.wait(60)
    client.stderr.close()
    acked = {
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        for p in acknowledged("".join(lines))
    }
    assert 50 <= len(acked) < len(paths)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        indexed = {uid for (uid,) in server.rows("SELECT sop_uid FROM instance")}
        partial = [p for p in (server.data / ".queue").iterdir() if p.suffix == ".part"]
        respawned = "exited with -9: starting a new one" in server.log()
        if acked <= indexed and not partial and respawned:
            break
        time.sleep(0.1)
    assert acked <= indexed
    assert partial == []
    assert respawned
    assert server.proc.poll() is None
