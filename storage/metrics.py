"""Counters and latency histograms of this process, in Prometheus text format (0.0.4).

The DICOM side (pacs) and the web app (viewer) record into one registry per process;
it lives in storage, which both use, so DICOM processes never import the web side.
DICOM worker processes write theirs to `<data>/.metrics/<pid>-worker-N.json` every few
seconds; `/metrics` in the main process adds them to its own, so one scrape sees the
whole server (a respawned worker starts from zero: a counter reset, as Prometheus
expects of a restart).
"""

import bisect
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HELP = {
    "minipacs_dimse_requests_total": ("counter", "DIMSE requests served, by service"),
    "minipacs_dimse_failures_total": ("counter", "DIMSE requests answered with a failure"),
    "minipacs_dimse_request_seconds": ("histogram", "Time to serve a DIMSE request"),
    "minipacs_instances_stored_total": ("counter", "Instances stored (C-STORE, STOW-RS)"),
    "minipacs_bytes_stored_total": ("counter", "Bytes of the instances stored"),
    "minipacs_associations_active": ("gauge", "DICOM associations open now"),
    "minipacs_http_requests_total": ("counter", "HTTP requests, by method and status"),
    "minipacs_http_request_seconds": ("histogram", "Time to answer an HTTP request"),
    "minipacs_index_queue": ("gauge", "Index writes waiting for the writer"),
    "minipacs_index_backlog": ("gauge", "Instances acknowledged and not yet indexed"),
    "minipacs_index_set_aside": ("gauge", "Acknowledged instances the indexer could not read"),
    "minipacs_route_pending": ("gauge", "Auto-routing items waiting or being sent"),
    "minipacs_route_failed": ("gauge", "Auto-routing items that gave up (minipacs queue)"),
    "minipacs_archive_instances": ("gauge", "Instances in the archive"),
    "minipacs_archive_bytes": ("gauge", "Bytes of the stored files"),
    "minipacs_disk_free_bytes": ("gauge", "Free space on the data folder's filesystem"),
}
WRITE_EVERY = 1.0  # s between a worker's snapshots

Labels = tuple[tuple[str, str], ...]


class Registry:
    """Counters, gauges and histograms keyed by (name, labels); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[Labels, float]] = {}
        # per bucket (the last one +Inf) the observations that fell in it, then sum, count
        self._histograms: dict[str, dict[Labels, list[float]]] = {}
        self._gauges: dict[str, list[Callable[[], float]]] = {}

    def add(self, name: str, value: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values.setdefault(name, {})
            series[key] = series.get(key, 0) + value

    def observe(self, name: str, seconds: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            state = self._histograms.setdefault(name, {}).setdefault(
                key, [0.0] * (len(BUCKETS) + 3)
            )
            state[bisect.bisect_left(BUCKETS, seconds)] += 1  # the first bucket ≥ seconds
            state[-2] += seconds
            state[-1] += 1

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        """A value read when the metrics are (queue depth, open associations); several
        readers of one name (two listeners) add up."""
        with self._lock:
            self._gauges.setdefault(name, []).append(read)

    def snapshot(self) -> dict:
        """Everything as plain data (JSON for a worker's file)."""
        with self._lock:
            values = {n: [[list(k), v] for k, v in s.items()] for n, s in self._values.items()}
            histograms = {
                n: [[list(k), list(v)] for k, v in s.items()] for n, s in self._histograms.items()
            }
            gauges = {name: list(readers) for name, readers in self._gauges.items()}
        for name, readers in gauges.items():
            try:
                values.setdefault(name, []).append([[], float(sum(read() for read in readers))])
            except Exception:  # a gauge that cannot be read is left out, not fatal
                continue
        return {"values": values, "histograms": histograms}


REGISTRY = Registry()


def stored(size: int) -> None:
    """One instance taken into the archive (`size` 0: it was there already)."""
    if size:
        REGISTRY.add("minipacs_instances_stored_total")
        REGISTRY.add("minipacs_bytes_stored_total", size)


def dimse(service: str, started: float, failed: bool) -> None:
    """One DIMSE request served, from `started` (time.monotonic()) until now."""
    REGISTRY.add("minipacs_dimse_requests_total", service=service)
    if failed:
        REGISTRY.add("minipacs_dimse_failures_total", service=service)
    REGISTRY.observe("minipacs_dimse_request_seconds", time.monotonic() - started,
                     service=service)  # fmt: skip


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
        aside.write_text(json.dumps(REGISTRY.snapshot()))
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


def exposition(folder: Path, extra: dict[str, float]) -> str:
    """This process's metrics plus its workers' files, as Prometheus text."""
    snapshots = [REGISTRY.snapshot()]
    mine = f"{os.getpid()}-*.json"
    for path in sorted(folder.glob(mine)) if folder.is_dir() else []:
        try:
            snapshots.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    values: dict[str, dict[Labels, float]] = {}
    histograms: dict[str, dict[Labels, list[float]]] = {}
    for snapshot in snapshots:
        for name, series in snapshot["values"].items():
            for labels, value in series:
                key = tuple(tuple(pair) for pair in labels)
                values.setdefault(name, {})[key] = values.get(name, {}).get(key, 0) + value
        for name, series in snapshot["histograms"].items():
            for labels, state in series:
                key = tuple(tuple(pair) for pair in labels)
                into = histograms.setdefault(name, {}).setdefault(key, [0.0] * len(state))
                histograms[name][key] = [a + b for a, b in zip(into, state, strict=True)]
    for name, value in extra.items():
        values[name] = {(): value}
    lines: list[str] = []
    for name in HELP:
        kind, text = HELP[name]
        if name not in values and name not in histograms:
            continue
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for key, value in sorted(values.get(name, {}).items()):
            lines.append(f"{name}{_labels(key)} {_number(value)}")
        for key, state in sorted(histograms.get(name, {}).items()):
            cumulative = 0.0
            for bound, count in zip([*BUCKETS, "+Inf"], state[:-2], strict=True):
                cumulative += count
                lines.append(f"{name}_bucket{_labels(key, le=str(bound))} {_number(cumulative)}")
            lines.append(f"{name}_sum{_labels(key)} {state[-2]!r}")
            lines.append(f"{name}_count{_labels(key)} {_number(state[-1])}")
    return "\n".join(lines) + "\n"


def _labels(key: Labels, **more: str) -> str:
    pairs = [*key, *more.items()]
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)
