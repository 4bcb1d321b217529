"""Counters, gauges and latency histograms of this process, on prometheus_client.

The DICOM side (pacs) and the web app (viewer) record into one registry per process;
it lives in storage, which both use, so DICOM processes never import the web side.
DICOM worker processes write their samples to `<data>/.metrics/<pid>-worker-N.json`
every second; `/metrics` in the main process adds them to its own (same name and labels:
summed), so one scrape sees the whole server (a respawned worker starts from zero: a
counter reset, as Prometheus expects of a restart). prometheus_client writes the
exposition: Prometheus text 0.0.4, or OpenMetrics when the scraper asks for it.
"""

import json
import os
import threading
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Histogram
from prometheus_client import disable_created_metrics
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

disable_created_metrics()  # no `_created` series: what we had, and less to merge
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GAUGES = {  # read when the metrics are (`gauge`), or given by the web app at scrape time
    "minipacs_associations_active": "DICOM associations open now",
    "minipacs_index_queue": "Index writes waiting for the writer",
    "minipacs_index_backlog": "Instances acknowledged and not yet indexed",
    "minipacs_index_set_aside": "Acknowledged instances the indexer could not read",
    "minipacs_route_pending": "Auto-routing items waiting or being sent",
    "minipacs_route_failed": "Auto-routing items that gave up (minipacs queue)",
    "minipacs_archive_instances": "Instances in the archive",
    "minipacs_archive_bytes": "Bytes of the stored files",
    "minipacs_disk_free_bytes": "Free space on the data folder's filesystem",
    "minipacs_frame_cache_bytes": "Bytes of decoded frames kept for re-rendering (render_cache_mb)",
    "minipacs_volume_cache_bytes": "Bytes of volumes decoded for MPR (volume_cache_mb)",
    "minipacs_object_cache_bytes": "Bytes of local copies of objects (storage_cache_mb)",
    "minipacs_upload_backlog": "Instances the object store has not confirmed yet",
    "minipacs_object_deletions_pending": "Deletions whose objects are not removed yet",
}
WRITE_EVERY = 1.0  # s between a worker's snapshots


class Readers(Collector):
    """Gauges read when the metrics are (queue depth, open associations): a custom
    collector, as several readers of one name (two listeners) add up, and one that cannot
    be read is left out rather than failing the scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readers: dict[str, list[Callable[[], float]]] = {}

    def add(self, name: str, read: Callable[[], float]) -> None:
        with self._lock:
            self._readers.setdefault(name, []).append(read)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            readers = {name: list(found) for name, found in self._readers.items()}
        for name, found in readers.items():
            try:
                value = float(sum(read() for read in found))
            except Exception:
                continue
            yield GaugeMetricFamily(name, GAUGES[name], value=value)


REGISTRY = CollectorRegistry()
READERS = Readers()
REGISTRY.register(READERS)
DIMSE_REQUESTS = Counter("minipacs_dimse_requests", "DIMSE requests served, by service",
                         ["service"], registry=REGISTRY)  # fmt: skip
DIMSE_FAILURES = Counter("minipacs_dimse_failures", "DIMSE requests answered with a failure",
                         ["service"], registry=REGISTRY)  # fmt: skip
DIMSE_SECONDS = Histogram("minipacs_dimse_request_seconds", "Time to serve a DIMSE request",
                          ["service"], buckets=BUCKETS, registry=REGISTRY)  # fmt: skip
INSTANCES_STORED = Counter("minipacs_instances_stored", "Instances stored (C-STORE, STOW-RS)",
                           registry=REGISTRY)  # fmt: skip
BYTES_STORED = Counter("minipacs_bytes_stored", "Bytes of the instances stored",
                       registry=REGISTRY)  # fmt: skip
INDEX_PREPARSED = Counter("minipacs_index_preparsed",
                          "Journal entries a DICOM worker parsed for the indexer while idle",
                          registry=REGISTRY)  # fmt: skip
OBJECT_CACHE_HITS = Counter("minipacs_object_cache_hits",
                            "Reads of an instance found in the data folder (object store)",
                            registry=REGISTRY)  # fmt: skip
OBJECT_CACHE_MISSES = Counter("minipacs_object_cache_misses",
                              "Reads of an instance fetched from the object store",
                              registry=REGISTRY)  # fmt: skip
OBJECT_CACHE_EVICTED = Counter("minipacs_object_cache_evicted",
                               "Local copies of objects removed to stay within storage_cache_mb",
                               registry=REGISTRY)  # fmt: skip
OBJECTS_UPLOADED = Counter("minipacs_objects_uploaded", "Instances confirmed in the object store",
                           registry=REGISTRY)  # fmt: skip
OBJECT_BYTES_UPLOADED = Counter("minipacs_object_bytes_uploaded",
                                "Bytes of instances confirmed in the object store",
                                registry=REGISTRY)  # fmt: skip
OBJECT_BYTES_FETCHED = Counter("minipacs_object_bytes_fetched",
                               "Bytes read from the object store: whole objects and ranges",
                               registry=REGISTRY)  # fmt: skip
OBJECT_STORE_ERRORS = Counter("minipacs_object_store_errors",
                              "Requests to the object store that failed, by operation",
                              ["operation"], registry=REGISTRY)  # fmt: skip
HTTP_REQUESTS = Counter("minipacs_http_requests", "HTTP requests, by method and status",
                        ["method", "code"], registry=REGISTRY)  # fmt: skip
HTTP_SECONDS = Histogram("minipacs_http_request_seconds", "Time to answer an HTTP request",
                         ["endpoint"], buckets=BUCKETS, registry=REGISTRY)  # fmt: skip


def gauge(name: str, read: Callable[[], float]) -> None:
    """A gauge (one of GAUGES) read when the metrics are."""
    READERS.add(name, read)


def http(method: str, code: int, endpoint: str, seconds: float) -> None:
    """One HTTP request answered."""
    HTTP_REQUESTS.labels(method=method, code=str(code)).inc()
    HTTP_SECONDS.labels(endpoint=endpoint).observe(seconds)


def stored(size: int) -> None:
    """One instance taken into the archive (`size` 0: it was there already)."""
    if size:
        INSTANCES_STORED.inc()
        BYTES_STORED.inc(size)


def dimse(service: str, started: float, failed: bool) -> None:
    """One DIMSE request served, from `started` (time.monotonic()) until now."""
    DIMSE_REQUESTS.labels(service=service).inc()
    if failed:
        DIMSE_FAILURES.labels(service=service).inc()
    DIMSE_SECONDS.labels(service=service).observe(time.monotonic() - started)


def timed(service: str, handler: Callable) -> Callable:
    """A pynetdicom handler that counts and times its requests (generators included:
    until their last answer)."""

    def record(started: float, failed: bool) -> None:
        dimse(service, started, failed)

    def wrapper(*args, **kwargs):
        started = time.monotonic()
        try:
            result = handler(*args, **kwargs)
        except Exception:
            record(started, True)
            raise
        if hasattr(result, "__next__"):
            return _timed_generator(result, started, record)
        status = result[0] if isinstance(result, tuple) else result
        record(started, isinstance(status, int) and status not in (0x0000, 0xB000, 0xB007))
        return result

    return wrapper


def _timed_generator(results, started: float, record):
    failed, last = True, None
    try:
        for last in results:
            yield last
        status = last[0] if isinstance(last, tuple) else None
        failed = isinstance(status, int) and status & 0xF000 in (0xA000, 0xC000)
    finally:
        record(started, failed)


def write_snapshots(folder: Path, name: str, stop: threading.Event) -> None:
    """A worker's loop: its snapshot to `folder/name.json` every WRITE_EVERY seconds."""
    folder.mkdir(exist_ok=True)
    target = folder / f"{name}.json"
    while not stop.wait(WRITE_EVERY):
        aside = target.with_suffix(f".{os.getpid()}.tmp")
        aside.write_text(json.dumps(snapshot()))
        os.replace(aside, target)


def forget_dead(folder: Path) -> None:
    """Remove snapshots of servers no longer running (files are `<supervisor pid>-…`;
    servers sharing a data folder each read only their own workers')."""
    for path in folder.glob("*.json") if folder.is_dir() else []:
        pid = path.name.split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            path.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def snapshot() -> list:
    """This process's metrics as plain data (a worker's file): per family its name, type,
    help and samples (name, labels, value)."""
    return [
        [m.name, m.type, m.documentation, [[x.name, x.labels, x.value] for x in m.samples]]
        for m in REGISTRY.collect()
    ]


class Scrape(Collector):
    """What one scrape shows: this process's metrics, its workers' snapshots and the
    gauges the web app reads at scrape time (`extra`), samples of the same name and labels
    summed (histogram buckets are cumulative, so they add up too)."""

    def __init__(self, folder: Path, extra: dict[str, float]) -> None:
        self.folder, self.extra = folder, extra

    def collect(self) -> Iterator[Metric]:
        extra = [[name, "gauge", GAUGES[name], [[name, {}, value]]] for name, value in
                 self.extra.items()]  # fmt: skip
        return iter(_merged([snapshot(), *self._workers(), extra]))

    def _workers(self) -> Iterator[list]:
        mine = f"{os.getpid()}-*.json"
        for path in sorted(self.folder.glob(mine)) if self.folder.is_dir() else []:
            try:
                yield json.loads(path.read_text())
            except (OSError, ValueError):
                continue


def _merged(snapshots: Iterable[list]) -> list[Metric]:
    families: dict[str, Metric] = {}
    totals: dict[str, dict[tuple, float]] = {}
    for found in snapshots:
        for name, kind, text, samples in found:
            if name not in families:
                families[name], totals[name] = Metric(name, text, kind), {}
            for sample, labels, value in samples:
                key = (sample, tuple(labels.items()))
                totals[name][key] = totals[name].get(key, 0.0) + value
    for name, family in families.items():
        for (sample, labels), value in totals[name].items():
            family.add_sample(sample, dict(labels), value)
    return list(families.values())


def exposition(folder: Path, extra: dict[str, float], accept: str = "") -> tuple[bytes, str]:
    """(body, Content-Type) of /metrics in the format the scraper's Accept asks for."""
    encode, content_type = choose_encoder(accept)
    return encode(Scrape(folder, extra)), content_type
