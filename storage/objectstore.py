"""The object store: instance files as objects of one S3-compatible bucket, through boto3.

boto3 is imported when the first request is made (about 40 MiB of RSS with its S3 model):
a server on files never loads it, and a DICOM worker only once its cache misses. Its own
credential chain applies (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, the
config and credentials files, instance roles): minipacs holds no secret of its own.

Every object is `<prefix>/<study>/<series>/<sop>.dcm`, the file's path under the data
folder. An upload carries the SHA-256 the index recorded (`ChecksumSHA256`): the store
refuses bytes that differ. Objects above MULTIPART go up in parts (boto3's transfer
manager, PART bytes each, THREADS at once); their checksum is the store's "composite" one,
the SHA-256 of the parts' SHA-256s, which `put` computes from the file and compares.

A store that does not answer costs a bounded wait (timeouts, ATTEMPTS tries), after which
calls fail at once for DOWN_FOR seconds (StoreUnavailable): a C-MOVE of many instances
does not wait for each.
"""

import base64
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage import metrics
from storage.errors import ObjectMissing
from storage.errors import ObjectStoreError
from storage.errors import StoreUnavailable
from storage.files import CHUNK

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 3  # s
READ_TIMEOUT = 10  # s without a byte from the store
ATTEMPTS = 2  # tries of one request (boto3's "standard" retries)
DOWN_FOR = 5.0  # s a store that did not answer is not asked again
MULTIPART = 64 << 20  # bytes: larger files go up in parts
PART = 8 << 20  # bytes of a part (THREADS parts in memory at most)
THREADS = 2  # parts of one file uploaded at once
CONTENT_TYPE = "application/dicom"


@dataclass(frozen=True)
class Settings:
    """Where the objects go and how to reach the store (pacs.config's storage_* settings)."""

    url: str  # s3://bucket/prefix
    endpoint: str = ""  # e.g. http://127.0.0.1:8333 for an on-premises store; '' for AWS
    region: str = ""
    path_style: bool = False  # http://host/bucket/key rather than http://bucket.host/key
    cache_bytes: int = 4 << 30  # local copies of uploaded objects kept at most
    sync: bool = False  # Success only once the object is confirmed

    @property
    def bucket(self) -> str:
        return parse_url(self.url)[0]

    @property
    def prefix(self) -> str:
        return parse_url(self.url)[1]


@dataclass(frozen=True)
class Head:
    """What the store says of an object: its size, its checksum (base64 SHA-256, with
    `-N` when composite of N parts; '' when the store keeps none) and the SHA-256 (hex)
    we recorded in its metadata."""

    size: int
    checksum: str
    sha256: str


@dataclass(frozen=True)
class Part:
    """Bytes of an object read by a ranged GET, with the object's whole size and the
    SHA-256 (hex) we recorded in its metadata ('' when none)."""

    data: bytes
    size: int
    sha256: str


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket[/prefix]`; ValueError for anything else."""
    if not url.startswith("s3://"):
        raise ValueError(f"an object store is s3://bucket/prefix, not {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    if not bucket or not all(c.isalnum() or c in ".-" for c in bucket):
        raise ValueError(f"{url!r}: the bucket name must be letters, digits, '.' and '-'")
    return bucket, prefix.strip("/")


def checksum(sha256_hex: str) -> str:
    """The SHA-256 as S3 writes it (base64 of the digest)."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def composite(path: Path, part: int) -> str:
    """The store's checksum of a multipart object uploaded from `path` in `part`-byte
    parts: base64 SHA-256 of the parts' SHA-256 digests, then `-<parts>`."""
    digests = []
    with open(path, "rb") as fp:
        while True:
            digest = hashlib.sha256()
            left = part
            while left and (chunk := fp.read(min(CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
            if left == part:
                break
            digests.append(digest.digest())
    total = base64.b64encode(hashlib.sha256(b"".join(digests)).digest()).decode()
    return f"{total}-{len(digests)}"


class ObjectStore:
    """One bucket and prefix; safe to share between threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.bucket, self.prefix = parse_url(settings.url)
        self._lock = threading.Lock()
        self._s3: Any = None
        self._down_until = 0.0
        self._down_reason = ""

    def key(self, rel: str) -> str:
        """The object key of a file's path under the data folder."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def put(self, rel: str, path: Path, size: int, sha256: str) -> None:
        """Upload a file and return once the store holds exactly these bytes (its checksum
        is the recorded SHA-256, or their composite for a multipart upload)."""
        extra = {
            "ChecksumAlgorithm": "SHA256",
            "ContentType": CONTENT_TYPE,
            "Metadata": {"sha256": sha256},
        }
        key = self.key(rel)
        if size <= MULTIPART:
            with open(path, "rb") as body:
                self._call(
                    "upload",
                    rel,
                    lambda s3: s3.put_object(
                        Bucket=self.bucket,
                        Key=key,
                        Body=body,
                        ContentLength=size,
                        ChecksumSHA256=checksum(sha256),
                        **extra,
                    ),
                )
            return
        transfer = self._transfer_config()
        part = self._part_size(size)
        self._call(
            "upload",
            rel,
            lambda s3: s3.upload_file(
                str(path), self.bucket, key, ExtraArgs=extra, Config=transfer
            ),
        )
        head = self.head(rel)
        expected = composite(path, part)
        if head is None or head.size != size or (head.checksum and head.checksum != expected):
            raise ObjectStoreError(f"{rel}: the store's copy differs from the file after upload")

    def fetch(self, rel: str, target: Path, head: bytes = b"") -> None:
        """Download an object into `target` (created; removed again on failure), its
        checksum checked by boto3 where the store gives a whole-object one. `head`: its
        first bytes, read already (by `read`): written first, and only the rest is asked
        for, by a ranged GET that no whole-object checksum covers."""
        try:
            with open(target, "xb") as out:
                out.write(head)
                self._call("download", rel, lambda s3: self._copy(s3, rel, out, len(head)))
        except BaseException:
            target.unlink(missing_ok=True)
            raise

    def read(self, rel: str, start: int, length: int) -> Part:
        """Bytes `start` to `start + length` (fewer at the object's end) by a ranged GET."""
        key = self.key(rel)
        end = start + length - 1

        def get(s3: Any) -> Part:
            answer = s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}")
            data = answer["Body"].read()
            total = answer.get("ContentRange", "").rpartition("/")[2]
            metrics.OBJECT_BYTES_FETCHED.inc(len(data))
            sha256 = answer.get("Metadata", {}).get("sha256", "")
            return Part(data, int(total) if total.isdigit() else len(data), sha256)

        return self._call("download", rel, get)

    def listing(self) -> Iterator[tuple[str, int]]:
        """(path under the data folder, size) of every object under the prefix."""
        start = f"{self.prefix}/" if self.prefix else ""
        token: dict[str, str] = {}
        while True:
            page = self._call(
                "list",
                start,
                lambda s3, more=token: s3.list_objects_v2(Bucket=self.bucket, Prefix=start, **more),
            )
            for item in page.get("Contents", []):
                yield item["Key"][len(start) :], int(item["Size"])
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def head(self, rel: str) -> Head | None:
        """The object's size and checksums; None when there is no such object."""
        try:
            found = self._call(
                "check",
                rel,
                lambda s3: s3.head_object(
                    Bucket=self.bucket, Key=self.key(rel), ChecksumMode="ENABLED"
                ),
            )
        except ObjectMissing:
            return None
        return Head(
            int(found["ContentLength"]),
            found.get("ChecksumSHA256", ""),
            found.get("Metadata", {}).get("sha256", ""),
        )

    def delete(self, rel: str) -> None:
        """Remove an object (an absent one is no error: S3 answers 204 either way)."""
        self._call(
            "delete", rel, lambda s3: s3.delete_object(Bucket=self.bucket, Key=self.key(rel))
        )

    def _copy(self, s3: Any, rel: str, out, start: int) -> None:
        where = {"Range": f"bytes={start}-"} if start else {"ChecksumMode": "ENABLED"}
        answer = s3.get_object(Bucket=self.bucket, Key=self.key(rel), **where)
        body = answer["Body"]
        size = 0
        while chunk := body.read(CHUNK):  # the checksum is checked as the last chunk is read
            out.write(chunk)
            size += len(chunk)
            metrics.OBJECT_BYTES_FETCHED.inc(len(chunk))
        if size != answer["ContentLength"]:
            raise StoreUnavailable(f"{rel}: the download broke off after {size} bytes")

    def _call(self, what: str, rel: str, request):
        """Run one request on the client; the store's failures as our errors (counted,
        but for an object that is not there)."""
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(f"object store unavailable: {self._down_reason}")
        try:
            result = self._request(what, rel, request)
        except ObjectMissing:
            raise
        except ObjectStoreError:
            metrics.OBJECT_STORE_ERRORS.labels(operation=what).inc()
            raise
        self._down_until = 0.0
        return result

    def _request(self, what: str, rel: str, request):
        from botocore.exceptions import BotoCoreError
        from botocore.exceptions import ClientError
        from botocore.exceptions import ConnectionError as NoConnection
        from botocore.exceptions import HTTPClientError

        try:
            return request(self._client())
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if error.get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise ObjectMissing(f"{rel} is not in the object store") from None
            if status >= 500:
                raise self._down(f"{what} {rel}: the store answered {status}") from None
            raise ObjectStoreError(f"{what} {rel}: {error.get('Message') or exc}") from None
        except (NoConnection, HTTPClientError) as exc:  # no connection, timeouts, cut off
            raise self._down(f"{what} {rel}: {exc}") from None
        except BotoCoreError as exc:  # no credentials, a bad checksum, …
            raise ObjectStoreError(f"{what} {rel}: {exc}") from None

    def _down(self, reason: str) -> StoreUnavailable:
        self._down_reason = reason
        self._down_until = time.monotonic() + DOWN_FOR
        return StoreUnavailable(f"object store unavailable: {reason}")

    def _client(self) -> Any:
        with self._lock:
            if self._s3 is None:
                import boto3  # here, not at the top: see the module's docstring
                from botocore.config import Config

                config = Config(
                    connect_timeout=CONNECT_TIMEOUT,
                    read_timeout=READ_TIMEOUT,
                    retries={"max_attempts": ATTEMPTS, "mode": "standard"},
                    s3={"addressing_style": "path" if self.settings.path_style else "auto"},
                    max_pool_connections=16,
                )
                self._s3 = boto3.session.Session().client(
                    "s3",
                    endpoint_url=self.settings.endpoint or None,
                    region_name=self.settings.region or None,
                    config=config,
                )
            return self._s3

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART,
            multipart_chunksize=PART,
            max_concurrency=THREADS,
            max_io_queue=THREADS * 2,
        )

    def _part_size(self, size: int) -> int:
        """The part size the transfer manager uses for `size` bytes (larger than PART
        only past S3's 10,000 parts)."""
        from s3transfer.utils import ChunksizeAdjuster

        return ChunksizeAdjuster().adjust_chunksize(PART, size)
