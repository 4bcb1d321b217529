"""The DICOM worker processes `minipacs serve` runs beside its own.

The web side and the DICOM side cannot share one GIL fairly: a radiologist's reading
load starved C-STORE. So the main process serves HTTP, indexes what the workers
received (storage.indexer) and supervises `workers` DICOM processes on the shared port
(SO_REUSEPORT), each running the SCP and taking C-STOREs into the journal
(storage.journal). A third process for the indexer would give it a core of its own
only when the web side is busy too, for ~70 MB more (Python, pydicom and numpy in it).

Each worker is `python -m pacs.boot pacs.worker sqlite|postgresql N SUPERVISOR_PID FD`
with the configuration pickled on its stdin: it imports only what it runs (not the web
side, nor drivers its index does not use: pacs.boot), says "ready" on its stdout, and
dies with its supervisor (PR_SET_PDEATHSIG), which a killed supervisor (kill -9) could
otherwise not arrange. FD is a pipe to the supervisor: while no association is active,
the worker parses journal entries for the indexer there (storage.indexer.parse_ahead).
"""

import contextlib
import ctypes
import logging
import os
import pickle
import select
import signal
import ssl
import subprocess
import sys
import threading
import time

from pacs import auditlog
from pacs import boot
from pacs import seam
from pacs.config import Config
from pacs.scp import start_scp
from pacs.tls import check_files
from storage import Archive
from storage import indexer
from storage import metrics

log = logging.getLogger(__name__)
METRICS_FOLDER = ".metrics"  # the DICOM workers' metric snapshots (storage.metrics)
DRAIN_SECONDS = 10.0  # in-flight associations get this long to finish after a stop signal
READY = b"ready\n"
PR_SET_PDEATHSIG = 1
M_MMAP_THRESHOLD = -3  # mallopt parameters (glibc malloc.h)
M_ARENA_MAX = -8


class StartupError(Exception):
    """The server cannot start (port taken, data folder unusable); the message says why."""


class Child:
    """A supervised DICOM worker process."""

    def __init__(self, config: Config, number: int, archive: Archive) -> None:
        self.config = config
        self.number = number
        self.name = f"DICOM worker {number}"
        self.archive = archive
        self.proc = self._start()

    def _start(self) -> subprocess.Popen:
        parsed, parsed_out = os.pipe()  # what it parses for the indexer (parse_ahead)
        try:
            proc = subprocess.Popen(
                boot.command(
                    "pacs.worker",
                    self.config.index,
                    str(self.number),
                    str(os.getpid()),
                    str(parsed_out),
                    storage=self.config.storage,
                ),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(parsed_out,),
            )
        except BaseException:
            os.close(parsed)
            raise
        finally:
            os.close(parsed_out)
        threading.Thread(
            target=self._take_parsed, args=(parsed,), name=f"{self.name} parsed", daemon=True
        ).start()
        assert proc.stdin is not None
        proc.stdin.write(pickle.dumps(self.config))
        proc.stdin.close()
        return proc

    def _take_parsed(self, parsed: int) -> None:
        try:
            indexer.read_parsed(parsed, self.archive.offer_parsed)
        except (OSError, ValueError, TypeError, KeyError) as exc:  # a worker killed mid-write
            log.warning("%s: parsed entries no longer taken: %s", self.name, exc)
        finally:
            os.close(parsed)

    def wait_ready(self, timeout: float = 60) -> None:
        """Return once the child is ready; raise StartupError if it exits or is too slow."""
        assert self.proc.stdout is not None
        if select.select([self.proc.stdout], [], [], timeout)[0]:
            line = self.proc.stdout.readline()
            if line == READY:
                return
        self.proc.kill()
        code = self.proc.wait()
        raise StartupError(f"{self.name} did not start (exit status {code}): see the log above")

    def respawn_if_dead(self) -> None:
        """A new worker for a dead one (whose half-received datasets are removed)."""
        if self.proc.poll() is None:
            return
        log.error("%s exited with %s: starting a new one", self.name, self.proc.returncode)
        self.archive.journal.discard_partial(self.proc.pid)
        try:
            self.proc = self._start()
        except OSError as exc:  # out of memory or processes: again at the next look
            log.error("cannot start %s: %s", self.name, exc)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def join(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s: killed", self.name, timeout)
            self.proc.kill()
            self.proc.wait()


def stop_children(children: list[Child]) -> None:
    for child in children:
        child.terminate()
    for child in children:
        child.join(DRAIN_SECONDS + 5)


def main(args: list[str]) -> None:
    """A worker's entry point (pacs.boot): NUMBER SUPERVISOR_PID, the configuration
    pickled on stdin."""
    number, supervisor, parsed_out = int(args[0]), int(args[1]), int(args[2])
    _die_with(supervisor)
    tune_malloc()
    config: Config = pickle.load(sys.stdin.buffer)
    boot.setup_logging(config.log_level, prefix=f"worker{number} ")
    stop = stop_on_signals()
    auditlog.install(config.audit_syslog)
    try:
        archive = open_archive(config, repair=False)
        _run(config, archive, (number, parsed_out), stop, f"{supervisor}-worker-{number}")
    except StartupError as exc:
        log.error("%s", exc)
        sys.exit(2)


def _run(
    config: Config, archive: Archive, worker: tuple[int, int], stop: threading.Event, name: str
) -> None:
    """Serve until `stop`; `worker`: this worker's number and its pipe to the indexer."""
    threading.Thread(  # this process's metrics, for the main process's /metrics
        target=metrics.write_snapshots,
        args=(config.data / METRICS_FOLDER, name, stop),
        daemon=True,
    ).start()
    scps = [listen(config, archive, shared_port=True)]
    number, parsed_out = worker
    threading.Thread(
        target=indexer.parse_ahead,
        args=(archive, parsed_out, lambda: associations(scps[0]) > 0, stop),
        kwargs={"share": (number, config.workers)},
        name="parse-ahead",
        daemon=True,
    ).start()
    try:
        _ready()
        stop.wait()
    finally:
        stop_scps(scps)
        archive.close()


def _ready() -> None:
    sys.stdout.buffer.write(READY)
    sys.stdout.buffer.flush()


def tune_malloc() -> None:
    """Two glibc malloc arenas for the process instead of eight a core: with many
    threads (waitress's, an association's) the arenas each kept freed memory, ~25 MB of
    RSS under a reading load. And a fixed mmap threshold: glibc's moving one rises to
    the largest block freed, after which decoded frames and their intermediates (each
    0.25-2 MB) were carved from arenas that kept them; mmapped, they go back to the
    system when freed (~10 MB less under the reading load). Called before the threads
    start; a no-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, 2)
        libc.mallopt(M_MMAP_THRESHOLD, 256 << 10)


def _die_with(supervisor: int) -> None:
    """SIGKILL this process when the supervisor dies (Linux), whatever killed it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != supervisor:  # it died before the request took effect
        os._exit(1)


def listen(config: Config, archive: Archive, shared_port: bool, tls: bool = False):
    """Start the SCP (plain or TLS) in this process."""
    port = config.tls_port if tls else config.port
    missing = check_files(config.tls_cert, config.tls_key, config.tls_ca) if tls else []
    if missing:
        raise StartupError(f"DICOM TLS: no such file: {', '.join(missing)}")
    install_seam()
    try:
        scp = start_scp(config, archive, shared_port=shared_port, tls=tls)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror or str(exc)
        raise StartupError(f"cannot listen for DICOM on {config.host}:{port}: {reason}") from exc
    metrics.gauge("minipacs_associations_active", lambda: associations(scp))
    return scp


def associations(scp) -> int:
    """Associations `scp` serves now: on pynetdicom and on our storage engine."""
    store = getattr(scp, "store_scp", None)
    return len(scp.ae.active_associations) + (store.active if store else 0)


def install_seam() -> None:
    """pacs.seam in this process, or one line saying why not: it replaces pynetdicom
    internals, and refuses a pynetdicom whose internals differ from those it knows."""
    try:
        seam.install()
    except seam.SeamMismatch as exc:
        raise StartupError(str(exc)) from None


def open_archive(config: Config, repair: bool) -> Archive:
    """The archive, opened; `repair`: the supervisor's start-up check first (temporaries
    removed, interrupted deletions finished, acknowledged instances indexed)."""
    archive = Archive(
        config.data,
        fsync=config.fsync,
        duplicates=config.duplicates,
        parse_processes=config.parse_processes if repair else 0,
        index_url=config.index,
        routes=config.route,
        event_options=config.event_options(),
        pixel_budget=config.pixel_budget_mb << 20,
        disk_reserve=config.disk_reserve_mb << 20,
        object_store=config.object_store(),
    )
    try:
        archive.open()
    except Exception as exc:
        raise StartupError(str(exc)) from exc
    if repair and archive.lock(exclusive=True):
        report = archive.maintenance.reconcile()
        log.info(
            "start-up check: %d temporary file(s) removed, %d deletion(s) finished, "
            "%d file(s) indexed, %d problem(s)",
            report.removed_temporary,
            report.deletions_finished,
            report.indexed,
            len(report.problems),
        )
    elif repair:
        log.info("another minipacs process uses %s: start-up check skipped", archive.root)
    archive.lock(exclusive=False)
    metrics.gauge("minipacs_index_queue", archive.pending_writes)
    return archive


def stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def stop_scps(scps: list) -> None:
    """Stop accepting, let associations finish for DRAIN_SECONDS, abort the rest."""
    for scp in scps:
        scp.shutdown()
    deadline = time.monotonic() + DRAIN_SECONDS
    for scp in scps:
        store = getattr(scp, "store_scp", None)
        if store is not None:
            store.stop(max(0.0, deadline - time.monotonic()))
        while scp.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in scp.ae.active_associations:
            log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
