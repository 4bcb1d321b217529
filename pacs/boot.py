"""Where the server's processes start: importing only what their configuration uses.

peewee imports every PostgreSQL driver installed when it is imported (psycopg: ~12 MiB of
RSS), and pydicom imports requests for its test-data downloads (~5 MiB). A server on
SQLite calls neither, in each of its processes; one on files never loads boto3 (~40 MiB
with its S3 model; storage.objectstore imports it on first use, and `+s3` lets it). The
import system's documented marker for "absent" (None in sys.modules) keeps them out, but
only when it is set before peewee and pydicom are first imported: so `minipacs serve`,
once it has read its settings, replaces itself (exec, same PID) with `python -m pacs.boot
pacs.server sqlite[+s3]`, and the server starts each DICOM worker as `python -m pacs.boot
pacs.worker sqlite[+s3] N PID`; both read the configuration pickled on their stdin.
Library users importing `pacs` or `storage` never pass through here.
"""

import importlib
import logging
import os
import pickle
import sys
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pacs.config imports storage, hence peewee: not before main() chose
    from pacs.config import Config

ENTRIES = ("pacs.server", "pacs.worker")
UNUSED = ("requests",)
POSTGRES_DRIVERS = ("psycopg", "psycopg2", "psycopg2cffi")
S3_CLIENT = ("boto3", "botocore", "s3transfer")


def command(entry: str, index: str, *args: str, storage: str = "file") -> list[str]:
    """The command line that runs `entry`'s main(args) for a server whose index is `index`
    and whose instances are on `storage` (called where storage is loaded already: the
    command, the supervisor)."""
    from storage.engine import is_postgres_url

    kind = "postgresql" if is_postgres_url(index) else "sqlite"
    if storage != "file":
        kind += "+s3"
    return [sys.executable, "-m", "pacs.boot", entry, kind, *args]


def exec_server(config: "Config") -> None:
    """Become the server process (never returns): the configuration pickled on its
    stdin, this process's PID, signals and output kept."""
    with tempfile.TemporaryFile() as spool:  # any size, unlike a pipe nobody reads yet
        spool.write(pickle.dumps(config))
        spool.seek(0)
        os.dup2(spool.fileno(), 0)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    argv = command("pacs.server", config.index, storage=config.storage)
    os.execv(argv[0], argv)


def setup_logging(level: str, prefix: str = "") -> None:
    """One log format for the command and every server process (stderr)."""
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s",
    )
    # pynetdicom's INFO is per-PDU chatter and its DEBUG dumps datasets (PHI): DEBUG only.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if level == "DEBUG" else "WARNING")


def main() -> None:
    """`python -m pacs.boot ENTRY sqlite|postgresql[+s3] ARGS...`"""
    entry, kind, *args = sys.argv[1:]
    kind, _, backend = kind.partition("+")
    if entry not in ENTRIES or kind not in ("sqlite", "postgresql") or backend not in ("", "s3"):
        sys.exit(f"usage: python -m pacs.boot {'|'.join(ENTRIES)} sqlite|postgresql[+s3] ARGS...")
    unused = UNUSED + (POSTGRES_DRIVERS if kind == "sqlite" else ())
    for name in unused + (() if backend else S3_CLIENT):
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    importlib.import_module(entry).main(args)


if __name__ == "__main__":
    main()
