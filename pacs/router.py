"""The auto-router: forwards what `storage.routing` queued — to a peer over C-STORE or to a
DICOMweb server over STOW-RS, event notifications to their subscribers (pacs.notify) —
and backs off when the destination is down. It runs in
the main process of `minipacs serve`; the queue lives in the index, so a restart resumes
where the last run stopped (an item being sent when the server died goes again after its
lease: delivery is at least once, and receivers take the same SOP Instance UID twice
without harm).
"""

import logging
import threading
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from pathlib import Path

from pacs import notify
from pacs import scu
from pacs import seam
from pacs.config import Config
from storage import Archive
from storage import audit
from storage.errors import StorageError
from storage.query import Key
from storage.rows import RouteEntry

log = logging.getLogger(__name__)
POLL = 0.25  # s between looks at the queue: two indexed reads when idle; what an event waits
STOW_TIMEOUT = 300  # s for one STOW-RS request


def run(archive: Archive, config: Config, stop: threading.Event) -> None:
    """Rounds back to back while there is work, a look every POLL seconds when idle."""
    busy = True  # a first look at once: a restart may find work waiting
    while not stop.wait(0 if busy else POLL):
        try:
            busy = forward_due(archive, config) > 0
        except Exception:  # never let one bad round end routing for good
            log.exception("routing round failed")
            busy = False


def forward_due(archive: Archive, config: Config) -> int:
    """One round: studies that became stable turned into notifications, then every due
    item (up to the claim limit), grouped by destination; how many items it took."""
    fired = archive.events.fire_due()
    by_destination: dict[str, list[RouteEntry]] = defaultdict(list)
    notifications = []
    for item in archive.route_queue.due():
        if item.subscription is None:
            by_destination[item.destination].append(item)
        else:
            notifications.append(item)
    if notifications:
        notify.deliver(archive, notifications)
    for destination, items in by_destination.items():
        try:
            files = _files(archive, items)
        except StorageError as exc:  # the object store does not answer: all of them later
            archive.route_queue.not_sent([i.id for i in items], str(exc), config.route_retry)
            continue
        failures = _forward(config, destination, files)
        done = [i for i in files if i not in failures]
        if done:
            archive.route_queue.sent(done)
        for item_id, error in failures.items():
            archive.route_queue.not_sent([item_id], error, config.route_retry)
        count = sum(len(files[i]) for i in done)
        log.info("routed %d instance(s) to %s; %d item(s) to retry", count, destination,
                 len(failures))  # fmt: skip
        archive.audit(
            audit.Event(
                "export",
                "success" if not failures else f"failure: {next(iter(failures.values()))}",
                who="auto-routing",
                detail={"to": destination, "instances": count, "retry": len(failures)},
            )
        )
    return fired + len(notifications) + sum(len(items) for items in by_destination.values())


def _files(archive: Archive, items: list[RouteEntry]) -> dict[int, list[Path]]:
    """Each item's stored files now: its instance (one query for all of them), or its
    whole study (a deleted one: none); fetched first when only the object store has them."""
    by_sop = {item.sop_uid: item.id for item in items if item.sop_uid}
    files: dict[int, list[Path]] = {item.id: [] for item in items}
    if by_sop:
        for row in archive.catalog.locate("IMAGE", [Key(0x00080018, "UI", list(by_sop))]):
            files[by_sop[row.sop_uid]].append(archive.files.local(row.path))
    for item in items:
        if not item.sop_uid:
            study = [Key(0x0020000D, "UI", item.study_uid)]
            found = archive.catalog.locate("STUDY", study)
            files[item.id] = [archive.files.local(row.path) for row in found]
    return files


def _forward(config: Config, destination: str, files: dict[int, list[Path]]) -> dict[int, str]:
    """Send every item's files; the items that failed, with why."""
    if destination.startswith(("http://", "https://")):
        return {i: e for i, paths in files.items() if paths and (e := _stow(destination, paths))}
    peer = next((p for p in config.peer if p.aet == destination), None)
    if peer is None:
        return {i: f"{destination} is not a configured peer" for i in files}
    remote = scu.Remote.for_peer(config, peer)
    paths = [p for item_paths in files.values() for p in item_paths]
    if not paths:
        return {}
    # As the server's AE: its sends take the seam's fast path (stored bytes, direct write).
    outcome = scu.send(remote, paths, parallel=config.move_associations, make_ae=seam.ServerAE)
    if outcome.problems:
        return {i: "; ".join(outcome.problems)[:200] for i in files}
    failed = set(outcome.failed_uids)
    return {
        i: f"{peer.aet} did not store {len(bad)} instance(s)"
        for i, item_paths in files.items()
        if (bad := [p for p in item_paths if str(p) in failed])
    }


def _stow(url: str, paths: list[Path]) -> str:
    """STOW-RS of the files to `<url>/studies`; '' on success, else why not."""
    boundary = uuid.uuid4().hex
    parts = []
    for path in paths:
        parts += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                  path.read_bytes(), b"\r\n"]  # fmt: skip
    parts.append(f"--{boundary}--\r\n".encode())
    request = urllib.request.Request(
        f"{url.rstrip('/')}/studies",
        data=b"".join(parts),
        method="POST",
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=STOW_TIMEOUT) as response:
            if response.status == 202:  # PS3.18: some stored, some not; not worth resending all
                log.warning("STOW-RS to %s: 202, some instances were not stored", url)
            return "" if response.status in (200, 202) else f"STOW-RS answered {response.status}"
    except urllib.error.HTTPError as exc:
        return f"STOW-RS answered {exc.code}"
    except OSError as exc:
        return f"STOW-RS to {url} failed: {exc}"
