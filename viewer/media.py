"""HTTP media types for DICOMweb: Accept headers in, multipart/related out and in.

Accept parsing follows RFC 9110 12.5.1 (lists, q-values, quoted parameters, wildcards)
with werkzeug's list and parameter parsers, because clients differ: dicomweb-client and
OHIF quote `type`, cornerstone's frame loader does not, curl sends `*/*`.
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

from werkzeug.http import parse_list_header
from werkzeug.http import parse_options_header

from viewer.errors import WebError

CRLF = b"\r\n"
CHUNK = 1 << 20
MAX_PART_HEADERS = 16 << 10
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 9110 5.6.2
# A parameter whose unquoted value holds "/" (not a token character): `; type=image/jpeg`.
_BARE_SLASH = re.compile(rf'(;[ \t]*{_TOKEN}[ \t]*=[ \t]*)([^\s";,]*/[^\s";,]*)')


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
    kind, params = parse_options_header(_quote_bare_slashes(text))
    return _media_range(kind, params)


def parse_accept(text: str) -> list[MediaRange]:
    """Media ranges of an Accept header, best first (higher q, then more specific, then
    header order); q=0 entries are dropped. An empty header is `*/*`. werkzeug splits the
    list and the parameters (quoted strings, escapes); its own Accept class is not used
    because it ranks specificity above q and drops a bad q silently (we answer 400)."""
    if not text.strip():
        return [MediaRange("*", "*")]
    items = parse_list_header(_quote_bare_slashes(text))
    ranges = [_media_range(*parse_options_header(item)) for item in items]
    ranges = [r for r in ranges if r.q > 0]  # a stable sort keeps header order on ties
    return sorted(ranges, key=lambda r: (-r.q, r.type == "*", r.subtype == "*"))


def _quote_bare_slashes(text: str) -> str:
    """`type=application/dicom` as cornerstone sends it ("/" is not a token character, so
    RFC 9110 wants it quoted; werkzeug would read `application`)."""
    return _BARE_SLASH.sub(r'\1"\2"', text)


def _media_range(kind: str, params: dict[str, str]) -> MediaRange:
    """One parsed item; MediaError unless it is type/subtype with a numeric q in 0-1."""
    main, slash, sub = kind.strip().lower().partition("/")
    if not (slash and re.fullmatch(_TOKEN, main) and re.fullmatch(_TOKEN, sub)):
        raise MediaError(f"malformed media range {kind[:80]!r}")
    return MediaRange(main, sub, params, _quality(params.pop("q", "1")))


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
