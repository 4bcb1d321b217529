"""`minipacs serve`: the web server and the indexer in this process, the DICOM workers
in processes it supervises (pacs.worker), on one archive; stopped by a signal."""

import dataclasses
import logging
import os
import pickle
import socket
import ssl
import sys
import threading
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from http import HTTPStatus
from typing import cast

import waitress
from flask import Flask
from flask import Response
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.utilities import Error

from pacs import auditlog
from pacs import router
from pacs.boot import setup_logging
from pacs.config import Config
from pacs.tls import TLSChannel
from pacs.tls import check_files
from pacs.tls import https_context
from pacs.worker import METRICS_FOLDER
from pacs.worker import Child
from pacs.worker import StartupError
from pacs.worker import install_seam
from pacs.worker import listen
from pacs.worker import open_archive
from pacs.worker import stop_children
from pacs.worker import stop_on_signals
from pacs.worker import stop_scps
from pacs.worker import tune_malloc
from storage import Archive
from storage import indexer
from storage import metrics
from storage import querytags
from storage import users
from storage.engine import describe
from storage.objects import ObjectFiles
from viewer import create_app
from viewer import export_jobs
from viewer.auth import HEAD_BODY
from viewer.auth import check_head

log = logging.getLogger(__name__)
__all__ = ["StartupError", "main", "serve"]


def main(args: list[str]) -> None:
    """The server process's entry point (pacs.boot; `minipacs serve` becomes it): the
    configuration pickled on stdin. A start-up failure is one line and exit status 2."""
    config: Config = pickle.load(sys.stdin.buffer)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    setup_logging(config.log_level)
    try:
        serve(config)
    except StartupError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(2)


def serve(config: Config) -> None:
    """Run until SIGINT/SIGTERM, then stop everything cleanly."""
    tune_malloc()
    install_seam()  # the router and the TLS SCP use it in this process
    stop = stop_on_signals()
    auditlog.install(config.audit_syslog)
    archive = open_archive(config, repair=True)
    archive.events.sync(config.subscription)  # the config file's, as it now says
    metrics.forget_dead(config.data / METRICS_FOLDER)
    metrics.gauge("minipacs_index_backlog", archive.journal.pending)
    metrics.gauge("minipacs_index_set_aside", archive.set_aside)
    if config.beyond_loopback and not archive.accounts(users.count):
        archive.close()
        raise StartupError(
            f"refusing to listen on {config.host} with no user: anyone who can reach it would "
            "see patient data. Add one first: minipacs user add NAME --role admin"
        )
    http = None
    scps: list = []
    children: list[Child] = []
    indexed = threading.Event()  # set once the workers are gone: their releases may wait
    indexing = threading.Thread(target=indexer.run, args=(archive, indexed), name="indexer")
    port_holder = _reserve_port(config)
    try:
        config = dataclasses.replace(config, port=port_holder.getsockname()[1])
        indexing.start()
        children = [Child(config, n, archive) for n in range(config.workers)]
        for child in children:
            child.wait_ready()
        if config.tls_cert:  # in this process: TLS is not the hot path
            scps.append(listen(config, archive, shared_port=False, tls=True))
            log.info("DICOM TLS on %s:%s", config.host, scps[-1].server_address[1])
        http = _web_server(config, archive)
        threading.Thread(target=http.run, name="http", daemon=True).start()
        threading.Thread(
            target=router.run, args=(archive, config, stop), name="router", daemon=True
        ).start()
        threading.Thread(  # extended query tags: back-fill and removal, resumed after a stop
            target=querytags.run, args=(archive.query_tags, stop), name="query-tags", daemon=True
        ).start()
        if archive.files.remote:  # the object store: uploads, deletions, the cache's size
            _watch_objects(archive)
            threading.Thread(
                target=archive.files.run, args=(stop,), name="objects", daemon=True
            ).start()
        threading.Thread(  # HTTP export jobs, one at a time; an unfinished one resumes
            target=export_jobs.run, args=(archive, config, stop), name="exports", daemon=True
        ).start()
        if config.quota_mb or config.quota_instances or config.changefeed_days:
            threading.Thread(
                target=_retention, args=(config, archive, stop), name="retention", daemon=True
            ).start()
        log.info(
            "minipacs %s: DICOM on %s:%s (%d process(es)), web on %s://%s:%s/, data in %s, "
            "index %s",
            config.aet,
            config.host,
            config.port,
            config.workers,
            http.adj.url_scheme,
            config.host,
            http.effective_port,
            archive.root,
            describe(config.index),
        )
        while not stop.wait(0.5):
            for child in children:
                child.respawn_if_dead()
        log.info("stopping")
    finally:
        try:
            stop_children(children)
            stop_scps(scps)
        finally:
            indexed.set()
            if indexing.is_alive():
                indexing.join()
            if http is not None:
                http.close()
            archive.close()
            port_holder.close()
            log.info("stopped")


def _reserve_port(config: Config) -> socket.socket:
    """Bind (not listen) the shared port so that port 0 resolves once for every worker and a
    port something already listens on fails here, with a clear message. The holder's
    SO_REUSEPORT (the workers share the port) would also let it share a port with another
    minipacs started by the same user, the instances split between two archives: a plain
    bind first fails on any listener (SO_REUSEADDR only lets it past TIME_WAIT connections
    left by a stopped server)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    holder = socket.socket(family)
    try:
        if config.port:
            with socket.socket(family) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((config.host, config.port))
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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
    app = create_app(config, archive)
    try:
        http = waitress.create_server(
            app,
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
    http.channel_class = _checking_heads(TLSChannel if context else HTTPChannel, app)
    return http


class _Refused(Error):
    """A refusal of viewer.auth.check_head, answered by waitress (which then closes the
    connection) instead of reading the request's body."""

    def __init__(self, response: Response) -> None:
        self.code = response.status_code
        self.reason = HTTPStatus(self.code).phrase
        self.body = response.get_data()
        self.headers = [(k, v) for k, v in response.headers.items() if k != "Content-Length"]

    def to_response(self, ident=None) -> tuple[str, list[tuple[str, str]], bytes]:
        return f"{self.code} {self.reason}", self.headers, self.body


class _HeadChecked(HTTPRequestParser):
    """waitress reads a whole request body (up to max_upload_mb) before the app sees the
    request: a body over viewer.auth.HEAD_BODY (or chunked) is read only once the head's
    credentials and role would let the request on."""

    def __init__(self, adj, app: Flask, address: str) -> None:
        super().__init__(adj)
        self._app, self._address = app, address

    def parse_header(self, header_plus: bytes) -> None:
        super().parse_header(header_plus)
        if not self.chunked and self.content_length <= HEAD_BODY:
            return
        refusal = check_head(self._app, self.command, self.path, self.headers, self._address)
        if refusal is not None:
            self.error = _Refused(refusal)
            self.completed = True  # the body is never read
            self.expect_continue = False  # no "100 Continue" before the refusal


def _checking_heads(channel: type[HTTPChannel], app: Flask) -> type[HTTPChannel]:
    """`channel` whose requests are parsed by _HeadChecked."""

    class Checking(channel):  # type: ignore[valid-type, misc]
        def parser_class(self, adj) -> _HeadChecked:  # waitress calls self.parser_class(adj)
            return _HeadChecked(adj, app, str(self.addr[0]) if self.addr else "")

    return Checking


def _watch_objects(archive: Archive) -> None:
    """The object store's gauges, read in this process only (the uploader is here)."""
    files = cast(ObjectFiles, archive.files)
    metrics.gauge("minipacs_object_cache_bytes", lambda: files.cached)
    metrics.gauge("minipacs_upload_backlog", files.backlog)
    metrics.gauge("minipacs_object_deletions_pending", files.deletions_pending)


def _retention(config: Config, archive: Archive, stop: threading.Event) -> None:
    """Keep the archive within its quota and prune the change feed: at start-up, then
    every retention_interval."""
    while True:
        try:
            if config.quota_mb or config.quota_instances:
                archive.retention.enforce_quota(config.quota_mb << 20, config.quota_instances)
            if config.changefeed_days:
                before = datetime.now(UTC) - timedelta(days=config.changefeed_days)
                if pruned := archive.changes.prune(before):
                    log.info("change feed: %d entries older than %s pruned", pruned, before)
        except Exception:  # never let one failed round end retention for good
            log.exception("retention round failed")
        if stop.wait(config.retention_interval):
            return
