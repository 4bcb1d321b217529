"""Following a server's change feed from Python: what `minipacs changes` uses.

    from pacs import changes
    for entry in changes.follow("http://127.0.0.1:8080", since=41, token=TOKEN):
        print(entry["Sequence"], entry["Action"], entry["SopInstanceUid"])

`read` gives every entry numbered above `since` and ends once it has caught up; `follow`
goes on, polling. Entries are the JSON objects of GET /changefeed (viewer.changefeed:
Azure's v2 fields, ours under "Minipacs"), read a page at a time with `after`, so an
entry is never skipped or given twice. Entries pruned before they were read are lost: the
server says where its feed starts, and a warning names the numbers missed.
"""

import json
import logging
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

log = logging.getLogger(__name__)
PAGE = 200  # entries a request asks for: the server's most
START_HEADER = "Minipacs-Feed-Start"


class FeedError(Exception):
    """The server refused (`status`, its reason) or could not be reached (`status` 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def read(
    url: str,
    since: int = 0,
    *,
    token: str = "",
    metadata: bool = False,
    context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> Iterator[dict]:
    """Every entry numbered above `since`, in order, until caught up. `url`: the server's
    web address (http://host:8080); `token`: a bearer token when it has users;
    `metadata`: with each current instance's DICOM JSON."""
    after = since
    while True:
        page, start = _page(url, after, token, metadata, context, timeout)
        if after + 1 < start:
            log.warning("change feed: entries %d to %d were pruned unread", after + 1, start - 1)
        for entry in page:
            yield entry
            after = entry["Sequence"]
        if len(page) < PAGE:
            return


def follow(
    url: str,
    since: int = 0,
    *,
    token: str = "",
    interval: float = 1.0,
    metadata: bool = False,
    context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> Iterator[dict]:
    """`read`, then each new entry as it comes (looking every `interval` seconds); it
    ends only when the caller stops iterating."""
    after = since
    while True:
        for entry in read(
            url, after, token=token, metadata=metadata, context=context, timeout=timeout
        ):
            yield entry
            after = entry["Sequence"]
        time.sleep(interval)


def _page(
    url: str,
    after: int,
    token: str,
    metadata: bool,
    context: ssl.SSLContext | None,
    timeout: float,
) -> tuple[list[dict], int]:
    """One GET /changefeed: its entries, and where the server's feed starts (0: not said)."""
    query = urllib.parse.urlencode(
        {"after": after, "limit": PAGE, "includemetadata": str(metadata).lower()}
    )
    request = urllib.request.Request(f"{url.rstrip('/')}/changefeed?{query}")
    request.add_header("Accept", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return json.load(response), int(response.headers.get(START_HEADER) or 0)
    except urllib.error.HTTPError as exc:
        raise FeedError(f"{url}: HTTP {exc.code}: {_reason(exc)}", exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FeedError(f"cannot reach {url}: {reason}") from None
    except ValueError as exc:  # not JSON, or a header that is no number
        raise FeedError(f"{url}: not a change feed answer ({exc})") from None


def _reason(error: urllib.error.HTTPError) -> str:
    """The {"error": …} of a minipacs refusal, else the status's phrase."""
    try:
        return str(json.load(error)["error"])
    except (ValueError, KeyError, TypeError, OSError):
        return str(error.reason)
