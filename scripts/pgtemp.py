"""A throw-away PostgreSQL cluster (Debian's `postgresql` package) for tests and benchmarks.

`initdb` into a temporary folder, `pg_ctl start` on a Unix socket in that folder (no TCP
at all), `createdb` per caller. As root, the server runs as the `postgres` user
(PostgreSQL refuses to run as root).
"""

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: install Debian's postgresql package")
    return path


class Cluster:
    """One running cluster; `database()` makes a fresh database and returns its URL."""

    def __init__(self, fsync: bool = False) -> None:
        """fsync off by default: tests need no durability from it; benchmarks turn it on."""
        self.dir = Path(tempfile.mkdtemp(prefix="minipacs-pg-"))
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self.data = self.dir / "data"
        self._run(_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "-E", "UTF8", "--locale=C")  # fmt: skip
        options = f"-k {self.dir} -c listen_addresses='' -c max_connections=200"
        options += "" if fsync else " -c fsync=off"
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-o", options, "-w", "-l",
                  str(self.dir / "log"), "start")  # fmt: skip

    def _run(self, *command: str) -> None:
        subprocess.run([*self._as, *command], check=True, capture_output=True, cwd=self.dir)

    def database(self, name: str | None = None) -> str:
        name = name or f"t{uuid.uuid4().hex[:12]}"
        self._run(_bin("createdb"), "-h", str(self.dir), "-U", "postgres", name)
        return self.url(name)

    def url(self, name: str) -> str:
        return f"postgresql://postgres@/{name}?host={self.dir}"

    def stop(self) -> None:
        subprocess.run([*self._as, _bin("pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True, cwd=self.dir)  # fmt: skip
        shutil.rmtree(self.dir, ignore_errors=True)
