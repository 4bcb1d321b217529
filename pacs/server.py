"""`minipacs serve`: the DICOM SCP and the web server on one archive, stopped by a signal."""

import logging
import signal
import threading
import time

import waitress

from pacs.config import Config
from pacs.scp import start_scp
from storage import Archive
from viewer import create_app

log = logging.getLogger(__name__)
DRAIN_SECONDS = 10.0  # in-flight associations get this long to finish after a stop signal


class StartupError(Exception):
    """The server cannot start (port taken, data folder unusable); the message says why."""


def serve(config: Config, ready: threading.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or `stop` is set), then stop both servers cleanly."""
    archive = _open_archive(config)
    scp = http = None
    try:
        try:
            scp = start_scp(config, archive)
        except OSError as exc:
            raise StartupError(
                f"cannot listen for DICOM on {config.host}:{config.port}: {exc.strerror}"
            ) from exc
        try:
            http = waitress.create_server(
                create_app(config, archive), host=config.host, port=config.http_port, threads=8
            )
        except OSError as exc:
            raise StartupError(
                f"cannot listen for HTTP on {config.host}:{config.http_port}: {exc.strerror}"
            ) from exc
        threading.Thread(target=http.run, name="http", daemon=True).start()
        log.info(
            "minipacs %s: DICOM on %s:%s, HTTP on http://%s:%s/, data in %s",
            config.aet,
            config.host,
            scp.server_address[1],
            config.host,
            http.effective_port,
            archive.root,
        )
        _wait_for_signal(ready)
    finally:
        _stop(scp, http, archive)


def _open_archive(config: Config) -> Archive:
    archive = Archive(config.data, fsync=config.fsync, duplicates=config.duplicates)
    try:
        archive.open()
    except Exception as exc:
        raise StartupError(str(exc)) from exc
    if archive.lock(exclusive=True):
        report = archive.reconcile()
        log.info(
            "start-up check: %d temporary file(s) removed, %d file(s) indexed, %d problem(s)",
            report.removed_temporary,
            report.indexed,
            len(report.problems),
        )
    else:
        log.info("another minipacs process uses %s: start-up check skipped", archive.root)
    archive.lock(exclusive=False)
    return archive


def _wait_for_signal(ready: threading.Event | None) -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    stop.wait()
    log.info("stopping")


def _stop(scp, http, archive: Archive) -> None:
    if scp is not None:
        ae = scp.ae
        scp.shutdown()  # stop accepting
        deadline = time.monotonic() + DRAIN_SECONDS
        while ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in ae.active_associations:
            log.warning("aborting association with %s at shutdown", assoc.requestor.ae_title)
            assoc.abort()
    if http is not None:
        http.close()
    archive.close()
    log.info("stopped")
