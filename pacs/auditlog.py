"""Audit events to a syslog collector as RFC 5424 messages (IHE ATNA's transport).

storage.audit hands every event it appends to the `minipacs.audit` logger, which never
reaches the application log (Patient IDs are in the events); with `audit_syslog` set,
this handler sends each as one message: facility 13 (log audit), severity info (warning
for failures), MSGID the event, the event's JSON as the message, over UDP (RFC 5426):
a collector that is down never holds up the index writer that appends the events.
"""

import json
import logging
import os
import socket
from datetime import UTC
from datetime import datetime
from urllib.parse import urlsplit

from storage.audit import LOGGER_NAME

FACILITY_LOG_AUDIT = 13


class SyslogHandler(logging.Handler):
    def __init__(self, url: str) -> None:
        super().__init__()
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 514)
        self.host = socket.gethostname()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "audit", None)
        if event is None:
            return
        severity = 6 if event.get("outcome") == "success" else 4
        stamp = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
        line = (
            f"<{FACILITY_LOG_AUDIT * 8 + severity}>1 {stamp} {self.host} minipacs "
            f"{os.getpid()} {event['event']} - {json.dumps(event, ensure_ascii=False)}"
        ).encode()
        try:
            self.sock.sendto(line, self.address)
        except OSError:
            self.handleError(record)


def install(url: str) -> None:
    """Send audit events to `url` (udp://host:port); '' does nothing."""
    if not url:
        return
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, SyslogHandler) for h in logger.handlers):
        logger.addHandler(SyslogHandler(url))
        logger.setLevel(logging.INFO)
