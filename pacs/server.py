"""`minipacs serve`: the DICOM SCP and the web server on one archive, stopped by a signal.

With `workers = 1` everything runs in this process. With more, this process serves
HTTP and supervises N worker processes that each run the SCP on the same port
(SO_REUSEPORT) and the same archive: pynetdicom is GIL-bound at ~115 instances/s a
process (shared/notes/pynetdicom-ingest.md), so more cores need more processes.
"""

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import ssl
import threading
import time

import waitress

from pacs import auditlog
from pacs import router
from pacs import seam
from pacs.config import LOOPBACK
from pacs.config import Config
from pacs.scp import start_scp
from pacs.tls import TLSChannel
from pacs.tls import check_files
from pacs.tls import https_context
from storage import Archive
from storage import users
from storage.engine import describe
from viewer import create_app
from viewer import metrics

log = logging.getLogger(__name__)
METRICS_FOLDER = ".metrics"  # the DICOM workers' metric snapshots (viewer.metrics)
DRAIN_SECONDS = 10.0  # in-flight associations get this long to finish after a stop signal


class StartupError(Exception):
    """The server cannot start (port taken, data folder unusable); the message says why."""


def serve(config: Config) -> None:
    """Run until SIGINT/SIGTERM, then stop both servers cleanly."""
    _install_seam()  # here too: with workers, only the router uses it in this process
    stop = _stop_on_signals()
    auditlog.install(config.audit_syslog)
    archive = _open_archive(config, repair=True)
    metrics.forget_dead(config.data / METRICS_FOLDER)
    if config.host not in LOOPBACK and not archive.accounts(users.count):
        archive.close()
        raise StartupError(
            f"refusing to listen on {config.host} with no user: anyone who can reach it would "
            "see patient data. Add one first: minipacs user add NAME --role admin"
        )
    http = None
    scps: list = []
    workers: list[multiprocessing.Process] = []
    port_holder: socket.socket | None = None
    try:
        if config.tls_cert:  # in this process also with workers: TLS is not the hot path
            scps.append(_listen(config, archive, shared_port=False, tls=True))
            log.info("DICOM TLS on %s:%s", config.host, scps[-1].server_address[1])
        if config.workers == 1:
            scps.append(_listen(config, archive, shared_port=False))
            port = scps[-1].server_address[1]
        else:
            port_holder = _reserve_port(config)
            port = port_holder.getsockname()[1]
            config = dataclasses.replace(config, port=port)
            workers = [_spawn(config, n) for n in range(config.workers)]
            _wait_until_listening(workers)
        http = _web_server(config, archive)
        threading.Thread(target=http.run, name="http", daemon=True).start()
        threading.Thread(
            target=router.run, args=(archive, config, stop), name="router", daemon=True
        ).start()
        if config.quota_mb or config.quota_instances:
            threading.Thread(
                target=_retention, args=(config, archive, stop), name="retention", daemon=True
            ).start()
        log.info(
            "minipacs %s: DICOM on %s:%s (%d process(es)), web on %s://%s:%s/, data in %s, "
            "index %s",
            config.aet,
            config.host,
            port,
            config.workers,
            http.adj.url_scheme,
            config.host,
            http.effective_port,
            archive.root,
            describe(config.index),
        )
        while not stop.wait(0.5):
            workers = [_respawn_if_dead(config, n, w) for n, w in enumerate(workers)]
        log.info("stopping")
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(DRAIN_SECONDS + 5)
            if worker.is_alive():
                worker.kill()
        _stop(scps, http, archive)
        if port_holder is not None:
            port_holder.close()


def run_worker(config: Config, number: int, listening, supervisor: int) -> None:
    """A DICOM worker process: the SCP on the shared port until SIGTERM, or until its
    supervisor is gone (killed: nobody would ever stop this worker otherwise)."""
    logging.basicConfig(
        level=config.log_level,
        format=f"%(asctime)s %(levelname)s worker{number} %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel("DEBUG" if config.log_level == "DEBUG" else "WARNING")
    stop = _stop_on_signals()
    threading.Thread(target=_watch_supervisor, args=(supervisor, stop), daemon=True).start()
    auditlog.install(config.audit_syslog)
    archive = _open_archive(config, repair=False)
    threading.Thread(
        target=metrics.write_snapshots,
        args=(config.data / METRICS_FOLDER, f"{supervisor}-worker-{number}", stop),
        daemon=True,
    ).start()
    scps = []
    try:
        scps.append(_listen(config, archive, shared_port=True))
        listening.set()
        stop.wait()
    finally:
        _stop(scps, None, archive)


def _watch_supervisor(supervisor: int, stop: threading.Event) -> None:
    while os.getppid() == supervisor and not stop.wait(1):
        pass
    if not stop.is_set():
        log.warning("the supervising process is gone: stopping")
        stop.set()


def _spawn(config: Config, number: int) -> multiprocessing.Process:
    # spawn, not fork: this process already runs threads (index writer, HTTP).
    context = multiprocessing.get_context("spawn")
    listening = context.Event()
    worker = context.Process(
        target=run_worker,
        args=(config, number, listening, os.getpid()),
        name=f"dicom-worker-{number}",
    )
    worker.listening = listening  # type: ignore[attr-defined]
    worker.start()
    return worker


def _wait_until_listening(workers: list[multiprocessing.Process], timeout: float = 60) -> None:
    """Start-up is over when every worker listens (or one has died trying)."""
    deadline = time.monotonic() + timeout
    for worker in workers:
        while not worker.listening.wait(0.1):  # type: ignore[attr-defined]
            if not worker.is_alive():
                raise StartupError(f"DICOM worker {worker.name} exited with {worker.exitcode}")
            if time.monotonic() > deadline:
                raise StartupError(f"DICOM worker {worker.name} did not start listening")


def _respawn_if_dead(config: Config, number: int, worker: multiprocessing.Process):
    if worker.is_alive():
        return worker
    log.error("DICOM worker %d exited with %s: starting a new one", number, worker.exitcode)
    return _spawn(config, number)


def _reserve_port(config: Config) -> socket.socket:
    """Bind (not listen) the shared port so that port 0 resolves once for every worker and a
    port taken by another program fails here, with a clear message."""
    holder = socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        holder.bind((config.host, config.port))
    except OSError as exc:
        holder.close()
        raise StartupError(
            f"cannot listen for DICOM on {config.host}:{config.port}: {exc.strerror}"
        ) from exc
    return holder


def _web_server(config: Config, archive: Archive):
    """waitress on http_port: plain HTTP, or HTTPS only when given a certificate."""
    missing = check_files(config.https_cert, config.https_key)
    if config.https_key and not config.https_cert:
        raise StartupError("HTTPS: https_key is set but https_cert is not")
    if missing:
        raise StartupError(f"HTTPS: no such file: {', '.join(missing)}")
    try:
        context = https_context(config.https_cert, config.https_key) if config.https_cert else None
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"HTTPS: cannot use {config.https_cert}: {exc}") from exc
    try:
        http = waitress.create_server(
            create_app(config, archive),
            host=config.host,
            port=config.http_port,
            url_scheme="https" if context else "http",
            threads=8,
            channel_timeout=config.http_timeout,
            cleanup_interval=max(1, config.http_timeout // 2),
            connection_limit=config.http_connections,
            max_request_header_size=config.http_header_kb << 10,
            max_request_body_size=(config.max_upload_mb << 20) + (1 << 20),
            # X-Forwarded-* reach the app (its ProxyFix) only when told to trust them.
            clear_untrusted_proxy_headers=not config.trust_proxy,
        )
    except OSError as exc:
        raise StartupError(
            f"cannot listen for HTTP on {config.host}:{config.http_port}: {exc.strerror}"
        ) from exc
    if context:
        http.tls_context = context
        http.channel_class = TLSChannel
    return http


def _listen(config: Config, archive: Archive, shared_port: bool, tls: bool = False):
    port = config.tls_port if tls else config.port
    missing = check_files(config.tls_cert, config.tls_key, config.tls_ca) if tls else []
    if missing:
        raise StartupError(f"DICOM TLS: no such file: {', '.join(missing)}")
    _install_seam()
    try:
        scp = start_scp(config, archive, shared_port=shared_port, tls=tls)
        metrics.REGISTRY.gauge(
            "minipacs_associations_active", lambda: len(scp.ae.active_associations)
        )
        return scp
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror or str(exc)
        raise StartupError(f"cannot listen for DICOM on {config.host}:{port}: {reason}") from exc


def _install_seam() -> None:
    """pacs.seam in this process, or one line saying why not: it replaces pynetdicom
    internals, and refuses a pynetdicom whose internals differ from those it knows."""
    try:
        seam.install()
    except seam.SeamMismatch as exc:
        raise StartupError(str(exc)) from None


def _open_archive(config: Config, repair: bool) -> Archive:
    archive = Archive(
        config.data,
        fsync=config.fsync,
        duplicates=config.duplicates,
        # DICOM worker processes (repair=False) are parallel already.
        parse_processes=config.parse_processes if repair else 0,
        index_url=config.index,
        routes=config.route,
    )
    try:
        archive.open()
    except Exception as exc:
        raise StartupError(str(exc)) from exc
    if repair and archive.lock(exclusive=True):
        report = archive.reconcile()
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
    metrics.REGISTRY.gauge("minipacs_index_queue", archive.pending_writes)
    return archive


def _retention(config: Config, archive: Archive, stop: threading.Event) -> None:
    """Keep the archive within its quota: at start-up, then every retention_interval."""
    while True:
        try:
            archive.enforce_quota(config.quota_mb << 20, config.quota_instances)
        except Exception:  # never let one failed round end retention for good
            log.exception("retention round failed")
        if stop.wait(config.retention_interval):
            return


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def _stop(scps: list, http, archive: Archive) -> None:
    for scp in scps:
        scp.shutdown()  # stop accepting
    deadline = time.monotonic() + DRAIN_SECONDS
    for ae in (scp.ae for scp in scps):
        while ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in ae.active_associations:
            log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
    if http is not None:
        http.close()
    archive.close()
    log.info("stopped")
