"""The one HTTP error shape of the web side.

Every refusal is a `WebError(status, reason)` (werkzeug's HTTPException, status in `code`),
raised from any blueprint or from `viewer.render`, `viewer.transcode` and `viewer.media`.
Every error response, ours or werkzeug's own (404 for an unknown path, 405, 500), is JSON
`{"error": reason}` with that status, made by the app's one error handler
(`viewer.create_app`), which logs it. STOW-RS answers with
failed instances are not errors: they are the PS3.18 response dataset.
"""

import json
from collections.abc import Iterable

from werkzeug.exceptions import HTTPException


class WebError(HTTPException):
    """An HTTP error answered as {"error": reason} (plus `extra` members) with `code`."""

    code = 400

    def __init__(
        self,
        code: int,
        reason: str,
        headers: Iterable[tuple[str, str]] = (),
        **extra: object,
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.extra_headers = list(headers)
        self.extra = extra

    def __str__(self) -> str:
        return self.description or ""

    def get_body(self, environ=None, scope=None) -> str:
        return json.dumps({"error": self.description, **self.extra})

    def get_headers(self, environ=None, scope=None) -> list[tuple[str, str]]:
        return [("Content-Type", "application/json"), *self.extra_headers]

    @classmethod
    def of(cls, error: HTTPException) -> "WebError":
        """werkzeug's own exception (404, 405, 413, 500…) in our shape, its headers (such
        as 405's Allow) kept."""
        if isinstance(error, WebError):
            return error
        headers = [(k, v) for k, v in error.get_headers() if k.lower() != "content-type"]
        return cls(error.code or 500, error.description or "", headers)


def int_param(
    params, name: str, default: int | None, minimum: int, maximum: int | None = None
) -> int | None:
    """A whole-number query parameter (`default` when absent or empty), refused with 400
    outside minimum..maximum."""
    value = params.get(name)
    if value is None or value == "":
        return default
    return whole_number(name, value, minimum, maximum)


def whole_number(name: str, value: str, minimum: int, maximum: int | None = None) -> int:
    """`value` as an int in minimum..maximum, else 400 saying so: every whole-number
    parameter of the web side (QIDO-RS paging, WADO-URI and viewport sizes, the audit
    listing) is read through here."""
    try:
        number = int(value)
    except ValueError:
        raise WebError(400, f"{name} must be a whole number, not {value[:40]!r}") from None
    if maximum is None and number < minimum:
        raise WebError(400, f"{name} must be at least {minimum}")
    if maximum is not None and not minimum <= number <= maximum:
        raise WebError(400, f"{name} must be between {minimum} and {maximum}")
    return number
