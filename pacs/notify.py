"""Event notifications over HTTP: what storage.events queued, posted by the router's loop
(pacs.router) to each subscription's URL as a CloudEvents JSON document, signed.

Signature: `X-Minipacs-Signature: sha256=<hex>`, the HMAC-SHA256 with the subscription's
secret of `<X-Minipacs-Timestamp>.<body>` (the timestamp in Unix seconds, then a dot, then
the exact body bytes), so a receiver can refuse a replayed or altered notification.

A 2xx answer is delivery; anything else, a timeout or a refused connection is tried again
later (storage.routing backs off). A subscriber's notifications of one study go one after
another, in the order of the queue: one that fails holds back that study's later ones for
that subscriber only. Redirects are not followed (a 3xx is a failure, seen in `minipacs
queue`), the wait for an answer is bounded and so is what is read of it.
"""

import hashlib
import hmac
import logging
import time
import urllib.error
import urllib.request
from collections import defaultdict

from storage import Archive
from storage.rows import RouteEntry

log = logging.getLogger(__name__)
TIMEOUT = 10  # s to connect and to wait for each read of the answer
MAX_BODY = 64 << 10  # bytes: a notification is UIDs and counts, far less
MAX_ANSWER = 64 << 10  # bytes of the answer read (and dropped)


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Minipacs-Signature value of a body sent at `timestamp` (Unix seconds)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class Unreachable(Exception):
    """No HTTP answer at all (refused, timed out, no such host): the subscriber is down."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs) -> None:
        return None  # urllib then raises HTTPError for the 3xx


_opener = urllib.request.build_opener(_NoRedirect)


def post(url: str, secret: str, body: bytes) -> str:
    """POST one notification: '' when the receiver answered 2xx, else its answer; raises
    Unreachable when there was no answer."""
    timestamp = str(int(time.time()))
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/cloudevents+json; charset=utf-8",
            "User-Agent": "minipacs",
            "X-Minipacs-Timestamp": timestamp,
            "X-Minipacs-Signature": signature(secret, timestamp, body),
        },
    )
    try:
        with _opener.open(request, timeout=TIMEOUT) as response:
            response.read(MAX_ANSWER)
            return ""
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"{url} answered {exc.code}"
    except (OSError, ValueError) as exc:  # URLError, timeouts, resets
        raise Unreachable(f"{url}: {getattr(exc, 'reason', exc)}") from None


def deliver(archive: Archive, items: list[RouteEntry]) -> int:
    """Post claimed notifications, each subscriber's studies in queue order; how many went."""
    subscribers = {s.id: s for s in archive.events.subscribers()}
    chains: dict[tuple[int, str], list[RouteEntry]] = defaultdict(list)
    for item in sorted(items, key=lambda i: i.id):
        assert item.subscription is not None
        chains[item.subscription, item.study_uid].append(item)
    sent: list[int] = []
    failed: dict[int, str] = {}
    held: list[int] = []
    down: dict[int, str] = {}  # subscriptions that did not answer this round: not tried again
    for (number, _), chain in chains.items():
        subscriber = subscribers.get(number)
        for n, item in enumerate(chain):
            if subscriber is None:  # removed meanwhile (with its queue): nothing to send
                error = ""
            elif len(item.body) > MAX_BODY:
                error = f"notification of {len(item.body)} bytes, over {MAX_BODY}"
            elif number in down:
                error = down[number]
            else:
                try:
                    error = post(subscriber.url, subscriber.secret, item.body.encode())
                except Unreachable as exc:
                    error = down[number] = str(exc)
            if not error:
                sent.append(item.id)
                continue
            failed[item.id] = error
            held += [later.id for later in chain[n + 1 :]]
            break
    if sent:
        archive.route_queue.sent(sent)
    for item_id, error in failed.items():
        archive.route_queue.not_sent([item_id], error, 0)
    if held:
        archive.route_queue.release(held)
    if failed:
        log.warning("notified %d event(s); %d to retry (%s)", len(sent),
                    len(failed) + len(held), next(iter(failed.values())))  # fmt: skip
    else:
        log.info("notified %d event(s)", len(sent))
    return len(sent)
