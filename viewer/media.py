"""HTTP media types for DICOMweb: Accept headers in, multipart/related out and in.

Accept parsing follows RFC 9110 12.5.1 (lists, q-values, quoted parameters, wildcards)
because clients differ: OHIF quotes `type`, dicomweb-client does not, curl sends `*/*`.
The multipart reader streams: a part's body is handed over in chunks as it arrives, so a
2 GB STOW-RS body never sits in memory (werkzeug's parser insists on form-data headers).
"""

import re
import secrets
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from typing import BinaryIO

from viewer.errors import WebError

CRLF = b"\r\n"
CHUNK = 1 << 20
MAX_PART_HEADERS = 16 << 10
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf'\s*;\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*)')
_RANGE = re.compile(rf"\s*({_TOKEN})/({_TOKEN})")


class MediaError(WebError):
    """A header or body that cannot be parsed or is incomplete: 400."""

    def __init__(self, reason: str) -> None:
        super().__init__(400, reason)


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header (or a Content-Type): type/subtype, parameters, q."""

    type: str
    subtype: str
    params: dict[str, str] = field(default_factory=dict, hash=False)
    q: float = 1.0

    @property
    def media_type(self) -> str:
        return f"{self.type}/{self.subtype}"

    def matches(self, media_type: str) -> bool:
        kind, _, sub = media_type.partition("/")
        return self.type in ("*", kind) and self.subtype in ("*", sub)


def parse_media_type(text: str) -> MediaRange:
    """A Content-Type value; MediaError when it is not type/subtype[;params]."""
    ranges = parse_accept(text)
    if len(ranges) != 1:
        raise MediaError(f"not one media type: {text!r}")
    return ranges[0]


def parse_accept(text: str) -> list[MediaRange]:
    """Media ranges of an Accept header, best first (higher q, then more specific, then
    header order); q=0 entries are dropped. An empty header is `*/*`."""
    if not text.strip():
        return [MediaRange("*", "*")]
    ranges = []
    pos = 0
    while pos < len(text):
        match = _RANGE.match(text, pos)
        if not match:
            raise MediaError(f"malformed media range at {text[pos:]!r}")
        pos = match.end()
        params: dict[str, str] = {}
        while param := _PARAM.match(text, pos):
            name, value = param.group(1).lower(), param.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[name] = value
            pos = param.end()
        rest = text[pos:].lstrip()
        if rest and not rest.startswith(","):
            raise MediaError(f"malformed media range at {rest!r}")
        pos = len(text) - len(rest) + 1
        q = _quality(params.pop("q", "1"))
        if q > 0:
            ranges.append(MediaRange(match.group(1).lower(), match.group(2).lower(), params, q))
    order = {id(r): i for i, r in enumerate(ranges)}
    return sorted(ranges, key=lambda r: (-r.q, r.type == "*", r.subtype == "*", order[id(r)]))


def _quality(value: str) -> float:
    try:
        q = float(value)
    except ValueError:
        raise MediaError(f"q={value!r} is not a number") from None
    if not 0 <= q <= 1:
        raise MediaError(f"q={value!r} is not between 0 and 1")
    return q


def new_boundary() -> str:
    return secrets.token_hex(16)


def multipart(parts: Iterable[tuple[dict[str, str], Iterable[bytes]]], boundary: str):
    """Stream a multipart/related body: each part is (headers, body chunks)."""
    for headers, body in parts:
        yield _part_head(headers, boundary)
        yield from body
        yield CRLF
    yield _closing(boundary)


def multipart_length(headers: Iterable[dict[str, str]], sizes: Iterable[int], boundary: str):
    """The byte length of the body `multipart` makes from parts of these headers and
    sizes: a Content-Length keeps HTTP/1.1 connections open for the next request."""
    parts = sum(len(_part_head(h, boundary)) + n + 2 for h, n in zip(headers, sizes, strict=True))
    return parts + len(_closing(boundary))


def _part_head(headers: dict[str, str], boundary: str) -> bytes:
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return b"--" + boundary.encode("ascii") + CRLF + lines.encode("latin-1") + CRLF


def _closing(boundary: str) -> bytes:
    return b"--" + boundary.encode("ascii") + b"--" + CRLF


def file_chunks(path, start: int = 0, length: int | None = None) -> Iterator[bytes]:
    """A file's bytes in CHUNK pieces, opened only when the stream reaches it."""
    with open(path, "rb") as handle:
        handle.seek(start)
        left = length
        while left is None or left > 0:
            block = handle.read(CHUNK if left is None else min(CHUNK, left))
            if not block:
                return
            if left is not None:
                left -= len(block)
            yield block


class MultipartReader:
    """Read a multipart body part by part from a stream, each body in chunks.

    `parts()` yields (headers, chunks); the chunks of one part must be consumed before
    the next part is asked for. A body that ends before the close delimiter raises
    MediaError: the caller must not keep a part it did not see end.
    """

    def __init__(self, stream: BinaryIO, boundary: str, limit: int | None = None) -> None:
        if not boundary or len(boundary) > 70:
            raise MediaError("the multipart boundary is missing or longer than 70 characters")
        self._stream = stream
        self._delimiter = CRLF + b"--" + boundary.encode("latin-1")
        self._buffer = CRLF  # so a delimiter at the very start is found like any other
        self._eof = False
        self._limit = limit
        self.received = 0

    def _fill(self) -> bool:
        if self._eof:
            return False
        block = self._stream.read(CHUNK)
        if not block:
            self._eof = True
            return False
        self.received += len(block)
        if self._limit is not None and self.received > self._limit:
            raise TooLarge(self._limit)
        self._buffer += block
        return True

    def parts(self) -> Iterator[tuple[dict[str, str], Iterator[bytes]]]:
        self._skip_to_delimiter()
        while True:
            while len(self._buffer) < 2 and self._fill():
                pass
            if self._buffer.startswith(b"--"):
                return  # close delimiter; the epilogue is ignored
            headers = self._headers()
            yield headers, self._body()

    def _skip_to_delimiter(self) -> None:
        while (at := self._buffer.find(self._delimiter)) < 0:
            self._buffer = self._buffer[-len(self._delimiter) :]
            if not self._fill():
                raise MediaError("no multipart boundary in the body")
        self._buffer = self._buffer[at + len(self._delimiter) :]

    def _headers(self) -> dict[str, str]:
        while (end := self._buffer.find(CRLF + CRLF)) < 0:
            if len(self._buffer) > MAX_PART_HEADERS:
                raise MediaError("part headers too long")
            if not self._fill():
                raise MediaError("the body ends inside part headers")
        # After the delimiter: optional transport padding, CRLF, header lines.
        lines = self._buffer[:end].decode("latin-1").split("\r\n")
        self._buffer = self._buffer[end + 4 :]
        if lines[0].strip():
            raise MediaError("garbage after a multipart boundary")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise MediaError(f"malformed part header {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        return headers

    def _body(self) -> Iterator[bytes]:
        keep = len(self._delimiter) - 1
        while True:
            at = self._buffer.find(self._delimiter)
            if at >= 0:
                if at:
                    yield bytes(self._buffer[:at])
                self._buffer = self._buffer[at + len(self._delimiter) :]
                return
            if len(self._buffer) > keep:
                yield bytes(self._buffer[:-keep])
                self._buffer = self._buffer[-keep:]
            if not self._fill():
                raise MediaError("the body ends inside a part (truncated upload)")


class TooLarge(MediaError):
    """A body over max_upload_mb: 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the body is larger than the configured maximum of {limit} bytes")
        self.code = 413
        self.limit = limit
