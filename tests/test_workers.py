"""`--workers N`: several SCP processes on one port and one archive, supervised."""

import os
import signal
from pathlib import Path

from conftest import children
from conftest import running
from conftest import storescu_concurrently
from conftest import wait_until
from make_study import make_study
from scu import echo


def workers(pid: int) -> set[int]:
    """Child processes running the SCP (not the indexer)."""
    return {
        child
        for child in children(pid)
        if b"pacs.worker" in Path(f"/proc/{child}/cmdline").read_bytes()
    }


def test_workers_share_port_and_archive(start_server, tmp_path, engine):
    server = start_server("--workers", "2")
    assert wait_until(lambda: len(workers(server.proc.pid)) == 2)
    assert wait_until(lambda: "DICOM on" in server.log())
    studies = [make_study(tmp_path / f"s{n}", 20, size=64) for n in range(6)]
    halves = [half for paths in studies for half in (paths[:10], paths[10:])]
    errors = storescu_concurrently(server.port, halves)
    assert errors == []
    assert server.rows("SELECT count(*), count(DISTINCT sop_uid) FROM instance") == [(120, 120)]
    assert server.rows("SELECT sum(num_instances) FROM study") == [(120,)]
    # 12 associations: the kernel's hash puts all on one worker with p = 2**-11.
    assert "worker0" in server.log() and "worker1" in server.log()


def test_server_processes_load_only_their_index_driver(start_server, engine):
    """pacs.boot: on SQLite no PostgreSQL driver is loaded (~12 MiB a process)."""
    server = start_server()
    assert wait_until(lambda: "DICOM on" in server.log())
    processes = [server.proc.pid, *workers(server.proc.pid)]
    assert len(processes) == 2
    assert echo(server.port) == 0
    for pid in processes:
        loaded = "psycopg" in Path(f"/proc/{pid}/maps").read_text()
        assert loaded == bool(engine), (pid, engine)


def test_a_dead_worker_is_replaced_and_stop_ends_all(start_server):
    server = start_server("--workers", "2")
    assert wait_until(lambda: len(workers(server.proc.pid)) == 2)
    victim = min(workers(server.proc.pid))
    os.kill(victim, signal.SIGKILL)
    assert wait_until(
        lambda: len(workers(server.proc.pid)) == 2 and victim not in workers(server.proc.pid)
    )
    assert "exited with -9: starting a new one" in server.log()
    assert wait_until(lambda: server.log().count("DICOM on") == 1)
    for _ in range(4):  # whichever process the kernel picks answers
        assert echo(server.port) == 0
    remaining = workers(server.proc.pid)
    assert server.stop() == 0
    for pid in remaining:
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        )


def test_workers_stop_when_their_supervisor_is_killed(start_server):
    server = start_server("--workers", "2")
    assert wait_until(lambda: len(workers(server.proc.pid)) == 2)
    orphans = workers(server.proc.pid)
    server.kill()  # SIGKILL: the supervisor cannot stop them
    assert wait_until(lambda: not any(running(pid) for pid in orphans), seconds=20)
