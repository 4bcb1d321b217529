"""Instances on an S3-compatible object store (`storage = "s3://…"`), against a real one:
SeaweedFS started once per run (conftest.s3store, scripts/s3temp.py), its S3 gateway
checking signatures and checksums; minipacs reaches it through a TCP gate (tests/gate.py)
that the tests close to take the store away. Node A serves on a PostgreSQL index; node B
shares that index and the bucket with a data folder of its own (and storage_sync).
"""

import email
import email.policy
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from conftest import Server
from conftest import index_rows
from conftest import minipacs
from conftest import storescu
from dicom_files import dataset_bytes
from gate import Gate
from make_study import make_study
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.encaps import encapsulate_extended
from pydicom.encaps import get_frame
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import RLELossless
from pydicom.uid import generate_uid
from test_metrics import documented_names
from test_metrics import scraped_names

from pacs import scu
from storage import Archive
from storage import frames
from storage import metrics
from storage import objects
from storage import objectstore
from storage.dataset import read_head
from storage.dataset import read_head_instance
from storage.dataset import read_instance
from storage.errors import InvalidDataset
from storage.files import hash_file

PREFIX = "archive"
AS_STORED = {"Accept": "application/dicom; transfer-syntax=*"}


def wait_for(check, timeout: float = 30.0, what: str = "condition"):
    """Poll `check()` until it returns something true (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return found


def rel(path: Path, data: Path) -> str:
    return path.relative_to(data).as_posix()


def uploads(data: Path) -> list[str]:
    return sorted(os.listdir(data / objects.UPLOAD))


def keys(s3, bucket: str) -> set[str]:
    found = s3.list_objects_v2(Bucket=bucket, Prefix=f"{PREFIX}/").get("Contents", [])
    return {item["Key"] for item in found}


def evict(data: Path) -> int:
    """Remove every local copy of an uploaded object, as the cache's trim would."""
    removed = 0
    for path in data.glob("*/*/*.dcm"):
        if path.stat().st_nlink == 1:
            path.unlink()
            removed += 1
    return removed


def metric(server: Server, name: str) -> float:
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name} ") or line.startswith(f"{name}_total "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def gate(s3store):
    """The store's S3 port as minipacs sees it: closed, the store is down (at once, where
    SeaweedFS takes ~3 s to start again)."""
    opened = Gate(s3store.ports["s3"])
    yield opened
    opened.close()


def settings(s3store, gate: Gate, bucket: str) -> dict[str, str]:
    """A server's or command's settings for `bucket`, through the gate."""
    endpoint = f"http://127.0.0.1:{gate.port}"
    return {**s3store.settings(bucket, PREFIX), "MINIPACS_STORAGE_ENDPOINT": endpoint}


@pytest.fixture(scope="module")
def nodes(s3store, gate, postgres, tmp_path_factory):
    """(node A, node B, bucket, S3 client): two servers on one PostgreSQL index and one
    bucket, each with its own data folder; B answers Success only once uploaded."""
    bucket = s3store.bucket()
    index = postgres.database()
    root = tmp_path_factory.mktemp("s3")
    env = settings(s3store, gate, bucket)
    a = Server(root / "a", env=env, index=index).start()
    b = Server(root / "b", env={**env, "MINIPACS_STORAGE_SYNC": "true"}, index=index).start()
    yield a, b, bucket, s3store.client()
    a.kill()
    b.kill()


@pytest.fixture
def store_up(gate):
    """The store as minipacs reaches it (`stop()`, `start()`), reachable again when the test
    ends, whatever the test did to it."""
    yield gate
    if not gate.is_open:
        gate.open()


def test_ingest_uploads_with_the_index_checksum_and_keeps_a_cache_copy(nodes, tmp_path):
    a, _, bucket, s3 = nodes
    sent = make_study(tmp_path / "study", 3, size=64)
    storescu(a.port, *sent)
    wait_for(lambda: not uploads(a.data), what="the uploads")
    rows = a.rows("SELECT path, size, sha256 FROM instance WHERE sop_uid IN (?, ?, ?)",
                  *(pydicom.dcmread(p).SOPInstanceUID for p in sent))  # fmt: skip
    assert len(rows) == 3
    assert {f"{PREFIX}/{path}" for path, _, _ in rows} <= keys(s3, bucket)
    for path, size, sha in rows:
        head = s3.head_object(Bucket=bucket, Key=f"{PREFIX}/{path}", ChecksumMode="ENABLED")
        assert head["ContentLength"] == size
        assert head["ChecksumSHA256"] == objectstore.checksum(sha)  # the store checked it
        body = s3.get_object(Bucket=bucket, Key=f"{PREFIX}/{path}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == sha
        assert (a.data / path).stat().st_nlink == 1  # uploaded: an evictable copy now


def test_every_object_store_figure_readme_names_is_in_metrics(nodes):
    a, _, _, _ = nodes
    assert documented_names(object_store=True) - scraped_names(a) == set()


def test_reads_fetch_from_the_bucket_once_the_cache_is_empty(nodes, tmp_path):
    a, _, _, _ = nodes
    sent = make_study(tmp_path / "study", 2, size=64)
    storescu(a.port, *sent)
    wait_for(lambda: not uploads(a.data), what="the uploads")
    ds = pydicom.dcmread(sent[0])
    study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
    misses = metric(a, "minipacs_object_cache_misses")
    (stored,) = a.data.glob(f"{study}/{series}/{sop}.dcm")
    expected = dataset_bytes(stored)  # as the archive keeps it (storescu's transfer syntax)
    assert evict(a.data) >= 2
    url = f"{a.url}/dicom-web/studies/{study}/series/{series}/instances/{sop}"
    answer = requests.get(url, headers=AS_STORED, timeout=30)
    assert answer.status_code == 200
    assert dataset_bytes_of(answer.content) == expected
    assert metric(a, "minipacs_object_cache_misses") == misses + 1
    evict(a.data)
    wado = requests.get(
        f"{a.url}/wado",
        params={
            "requestType": "WADO",
            "studyUID": study,
            "seriesUID": series,
            "objectUID": sop,
            "contentType": "application/dicom",
            "transferSyntax": "*",
        },  # fmt: skip
        timeout=30,
    )
    assert wado.status_code == 200
    assert dataset_bytes_of(wado.content) == expected
    evict(a.data)
    got = scu.get(scu.Remote(port=a.port), "SERIES", [series], tmp_path / "got")
    assert got.ok and got.completed == 2
    assert {p.name for p in (tmp_path / "got").iterdir()} == {
        f"{pydicom.dcmread(p).SOPInstanceUID}.dcm" for p in sent
    }
    rendered = requests.get(f"{url}/rendered", headers={"Accept": "image/png"}, timeout=30)
    assert rendered.status_code == 200 and rendered.content.startswith(b"\x89PNG")


def dataset_bytes_of(content: bytes) -> bytes:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"minipacs-s3-{os.getpid()}.dcm"
    path.write_bytes(content)
    try:
        return dataset_bytes(path)
    finally:
        path.unlink()


def test_node_b_serves_what_node_a_stored_with_an_empty_folder(nodes, tmp_path):
    a, b, _, _ = nodes
    sent = make_study(tmp_path / "study", 1, size=64)
    storescu(a.port, *sent)
    wait_for(lambda: not uploads(a.data), what="the upload")
    ds = pydicom.dcmread(sent[0])
    (stored,) = a.data.glob(f"*/*/{ds.SOPInstanceUID}.dcm")
    assert not list(b.data.glob(f"*/*/{ds.SOPInstanceUID}.dcm"))
    url = (
        f"{b.url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    answer = requests.get(url, headers=AS_STORED, timeout=30)
    assert answer.status_code == 200
    assert dataset_bytes_of(answer.content) == dataset_bytes(stored)
    assert list(b.data.glob(f"*/*/{ds.SOPInstanceUID}.dcm"))  # now in B's cache


def test_storage_sync_answers_success_once_the_object_is_there(nodes, tmp_path):
    _, b, bucket, s3 = nodes
    sent = make_study(tmp_path / "study", 2, size=64)
    storescu(b.port, *sent)
    sop = pydicom.dcmread(sent[1]).SOPInstanceUID
    wanted = b.rows("SELECT path FROM instance WHERE sop_uid = ?", sop)
    assert f"{PREFIX}/{wanted[0][0]}" in keys(s3, bucket)  # no waiting: it was there at Success


def test_store_down_at_ingest_success_then_upload_when_back(nodes, store_up, tmp_path):
    a, _, bucket, s3 = nodes
    sent = make_study(tmp_path / "study", 2, size=64)
    store_up.stop()
    result = storescu(a.port, *sent)
    assert result.returncode == 0  # durable in the data folder: Success
    sops = {pydicom.dcmread(p).SOPInstanceUID for p in sent}
    count = "SELECT count(*) FROM instance WHERE sop_uid IN (?, ?)"
    wait_for(lambda: a.rows(count, *sops)[0][0] == 2, what="indexing")
    assert {f"{s}.dcm" for s in sops} <= set(uploads(a.data))
    assert metric(a, "minipacs_upload_backlog") >= 2
    store_up.start()
    wait_for(lambda: not uploads(a.data), timeout=90, what="the uploads after the store came back")
    paths = [r[0] for r in a.rows("SELECT path FROM instance WHERE sop_uid IN (?, ?)", *sops)]
    assert {f"{PREFIX}/{p}" for p in paths} <= keys(s3, bucket)


def test_store_down_at_read_is_a_503_and_a_dimse_failure(nodes, store_up, tmp_path):
    a, _, _, _ = nodes
    sent = make_study(tmp_path / "study", 1, size=64)
    storescu(a.port, *sent)
    wait_for(lambda: not uploads(a.data), what="the upload")
    ds = pydicom.dcmread(sent[0])
    evict(a.data)
    store_up.stop()
    url = (
        f"{a.url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    answer = requests.get(url, headers=AS_STORED, timeout=60)
    assert answer.status_code == 503
    assert "object store unavailable" in answer.json()["error"]
    got = scu.get(scu.Remote(port=a.port), "IMAGE", [ds.SOPInstanceUID], tmp_path / "got")
    assert got.failed == 1 and got.status == 0xA702  # every sub-operation failed
    store_up.start()
    wait_for(lambda: requests.get(url, headers=AS_STORED, timeout=60).ok,
             what="reads once the store is back")  # fmt: skip


def test_kill_9_with_a_backlog_loses_no_upload(nodes, store_up, tmp_path):
    a, _, bucket, s3 = nodes
    sent = make_study(tmp_path / "study", 4, size=64)
    store_up.stop()
    storescu(a.port, *sent)
    sops = [pydicom.dcmread(p).SOPInstanceUID for p in sent]
    wait_for(lambda: {f"{s}.dcm" for s in sops} <= set(uploads(a.data)), what="the backlog")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    store_up.start()
    a.start()
    wait_for(lambda: not uploads(a.data), timeout=90, what="the uploads after the restart")
    paths = a.rows("SELECT path FROM instance WHERE sop_uid IN (?, ?, ?, ?)", *sops)
    assert {f"{PREFIX}/{p}" for (p,) in paths} <= keys(s3, bucket)
    assert len(paths) == 4


def test_delete_removes_the_objects_and_verify_checks_them(nodes, s3store, tmp_path):
    a, _, bucket, s3 = nodes
    kept, gone = (
        make_study(tmp_path / "kept", 1, size=64),
        make_study(tmp_path / "gone", 2, size=64),
    )
    storescu(a.port, *kept, *gone)
    wait_for(lambda: not uploads(a.data), what="the uploads")
    study = pydicom.dcmread(gone[0]).StudyInstanceUID
    objects_of_study = {k for k in keys(s3, bucket) if f"/{study}/" in k}
    assert len(objects_of_study) == 2
    cli = {**s3store.settings(bucket, PREFIX)}
    args = ("--data", str(a.data), "--index", a.index)
    minipacs("delete", *args, "--study", study, env=cli)
    wait_for(lambda: not {k for k in keys(s3, bucket) if f"/{study}/" in k},
             what="the deleted study's objects to go")  # fmt: skip
    verified = minipacs("verify", *args, "--json", env=cli, check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    sop = pydicom.dcmread(kept[0]).SOPInstanceUID
    (path,) = a.rows("SELECT path FROM instance WHERE sop_uid = ?", sop)
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/{path[0]}", Body=b"not the instance")
    verified = minipacs("verify", *args, env=cli, check=False)
    assert verified.returncode != 0
    assert f"{path[0]}: object's size is 16" in verified.stdout


# -- in-process: the cache's trim and multipart uploads -----------------------------------


def test_trim_removes_the_least_recently_used_copies_never_a_pending_one(
    s3store, tmp_path, monkeypatch
):
    for name, value in s3store.env.items():
        monkeypatch.setenv(name, value)
    sent = make_study(tmp_path / "study", 3, size=64)
    size = sent[0].stat().st_size  # all three the same size
    settings = objectstore.Settings(
        f"s3://{s3store.bucket()}/{PREFIX}",
        endpoint=s3store.endpoint,
        path_style=True,
        cache_bytes=size * 3 // 2,  # room for one copy
    )
    with Archive(tmp_path / "data", fsync=False, object_store=settings) as archive:
        files = archive.files
        assert isinstance(files, objects.ObjectFiles)
        stored = [archive.import_file(p) for p in sent]
        paths = [archive.root / s.path for s in stored]
        files.upload_now(stored[0].sop_uid)
        files.upload_now(stored[1].sop_uid)  # the third stays to upload
        old = time.time() - 3600
        os.utime(paths[0], (old - 60, old))  # the least recently used
        os.utime(paths[1], (old, old))
        os.utime(paths[2], (old - 120, old))  # older still, but not in the bucket yet
        files.trim()
        assert not paths[0].exists()
        assert paths[1].exists() and paths[2].exists()
        assert files.cached == paths[1].stat().st_size
        assert files.local(paths[0]) == paths[0]  # fetched back, whole
        assert dataset_bytes(paths[0]) == dataset_bytes(sent[0])


def test_multipart_upload_is_checked_against_the_composite_checksum(s3store, tmp_path, monkeypatch):
    monkeypatch.setattr(objectstore, "MULTIPART", 6 << 20)
    monkeypatch.setattr(objectstore, "PART", 5 << 20)  # S3's smallest part
    bucket = s3store.bucket()
    for name, value in s3store.env.items():
        monkeypatch.setenv(name, value)
    store = objectstore.ObjectStore(
        objectstore.Settings(f"s3://{bucket}/x", endpoint=s3store.endpoint, path_style=True)
    )
    big = tmp_path / "big"
    big.write_bytes(os.urandom(12 << 20))
    sha = hashlib.sha256(big.read_bytes()).hexdigest()
    store.put("a/b/c.dcm", big, 12 << 20, sha)
    head = store.head("a/b/c.dcm")
    assert head is not None
    assert head.size == 12 << 20 and head.checksum.endswith("-3") and head.sha256 == sha
    assert head.checksum == objectstore.composite(big, 5 << 20)
    store.fetch("a/b/c.dcm", tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == big.read_bytes()


def test_import_uploads_what_it_placed(s3store, tmp_path):
    """`minipacs import` needs no server to get its instances into the bucket."""
    bucket = s3store.bucket()
    sent = make_study(tmp_path / "study", 2, size=64)
    env = s3store.settings(bucket, PREFIX)
    result = minipacs(
        "import", "--data", str(tmp_path / "data"), "--json", *map(str, sent), env=env
    )
    assert json.loads(result.stdout)["not_uploaded"] == 0
    assert not uploads(tmp_path / "data")
    placed = {rel(p, tmp_path / "data") for p in (tmp_path / "data").glob("*/*/*.dcm")}
    assert len(placed) == 2
    assert {f"{PREFIX}/{p}" for p in placed} == keys(s3store.client(), bucket)


# -- moving an archive: migrate-storage, and reindex from the bucket ----------------------


def test_migrate_storage_up_resumes_verifies_and_comes_back(s3store, store_up, tmp_path):
    """A file archive into a bucket: a corrupt file is refused (exit 1), a store that is
    down ends the run (exit 3), a second run copies only what is missing; then back."""
    bucket, data = s3store.bucket(), tmp_path / "data"
    sent = make_study(tmp_path / "study", 3, size=64)
    minipacs("import", "--data", str(data), *map(str, sent))
    rows = index_rows(data, "SELECT path, sha256 FROM instance ORDER BY path")
    through = settings(s3store, store_up, bucket)
    store = {k: v for k, v in through.items() if k != "MINIPACS_STORAGE"}
    up = ("migrate-storage", "--data", str(data), "--to", f"s3://{bucket}/{PREFIX}", "--json")
    good = (data / rows[0][0]).read_bytes()
    (data / rows[0][0]).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    first = minipacs(*up, env=store, check=False)
    assert first.returncode == 1, first.stderr
    report = json.loads(first.stdout)
    assert (report["copied"], report["problems"]) == (2, 1)
    assert report["details"][0]["path"] == rows[0][0]
    assert keys(s3store.client(), bucket) == {f"{PREFIX}/{p}" for p, _ in rows[1:]}
    (data / rows[0][0]).write_bytes(good)
    store_up.stop()
    down = minipacs(*up, env=store, check=False)
    assert down.returncode == 3 and "run migrate-storage again" in down.stderr
    store_up.start()
    second = minipacs(*up, env=store)
    assert json.loads(second.stdout) == {"copied": 1, "present": 2, "problems": 0, "details": []}
    assert "set storage = 's3://" in second.stderr
    s3 = s3store.client()
    for path, sha in rows:
        head = s3.head_object(Bucket=bucket, Key=f"{PREFIX}/{path}", ChecksumMode="ENABLED")
        assert head["ChecksumSHA256"] == objectstore.checksum(sha)
    (data / rows[1][0]).unlink()  # evicted
    (data / rows[2][0]).write_bytes(b"a stale copy")
    on_bucket = s3store.settings(bucket, PREFIX)
    back = minipacs("migrate-storage", "--data", str(data), "--to", "file", "--json",
                    env=on_bucket)  # fmt: skip
    assert json.loads(back.stdout)["copied"] == 2
    for path, sha in rows:
        assert hashlib.sha256((data / path).read_bytes()).hexdigest() == sha


def test_reindex_from_the_bucket_alone(s3store, tmp_path):
    """A new, empty data folder on the same bucket: reindex reads each object's header by
    ranged GETs (a long one, and one with no pixel data, the whole object), and the rows
    are those the files gave; then the instances are found and retrieved through a server."""
    bucket, first, fresh = s3store.bucket(), tmp_path / "first", tmp_path / "fresh"
    sent = make_study(tmp_path / "study", 3, size=64)
    long_header = pydicom.dcmread(sent[1])
    block = long_header.private_block(0x0029, "MINIPACS TEST", create=True)
    block.add_new(0x10, "OB", os.urandom(100 << 10))  # past the first 64 KiB read
    long_header.save_as(sent[1])
    no_pixels = pydicom.dcmread(sent[2])
    del no_pixels.PixelData
    no_pixels.save_as(sent[2])
    env = s3store.settings(bucket, PREFIX)
    minipacs("import", "--data", str(first), *map(str, sent), env=env)
    result = minipacs("reindex", "--data", str(fresh), env=env)
    assert "indexed: 3  problems: 0" in result.stdout
    columns = "SELECT sop_uid, path, size, sha256, transfer_syntax, json FROM instance"
    assert index_rows(fresh, f"{columns} ORDER BY sop_uid") == index_rows(
        first, f"{columns} ORDER BY sop_uid"
    )
    server = Server(fresh, env=env).start()
    try:
        study = pydicom.dcmread(sent[0]).StudyInstanceUID
        found = requests.get(f"{server.url}/dicom-web/studies/{study}/instances", timeout=30)
        assert len(found.json()) == 3
        got = scu.get(scu.Remote(port=server.port), "STUDY", [study], tmp_path / "got")
        assert got.ok and got.completed == 3
        for path in sent:
            sop = pydicom.dcmread(path).SOPInstanceUID
            (stored,) = first.glob(f"*/*/{sop}.dcm")
            assert dataset_bytes(tmp_path / "got" / f"{sop}.dcm") == dataset_bytes(stored)
    finally:
        server.kill()


def test_reindex_reads_each_byte_of_an_object_once(s3store, tmp_path, monkeypatch):
    """parse_object reads an object's head by ranged GETs that go on where the last one
    ended, parses it in memory (a head cut before the Pixel Data is not enough, one that
    reaches it parses as the whole file), and fetches only the rest when the head does
    not do: no byte of the object is fetched twice."""
    for name, value in s3store.env.items():
        monkeypatch.setenv(name, value)
    long_header, no_pixels = make_study(tmp_path / "study", 2, size=768)
    for path in (long_header, no_pixels):
        ds = pydicom.dcmread(path)
        block = ds.private_block(0x0029, "MINIPACS TEST", create=True)
        block.add_new(0x10, "OB", os.urandom(200 << 10))  # past the first 64 KiB read
        if path == no_pixels:
            del ds.PixelData
        ds.save_as(path)
    settings = objectstore.Settings(
        f"s3://{s3store.bucket()}/{PREFIX}", endpoint=s3store.endpoint, path_style=True
    )

    def fetched() -> float:
        return metrics.REGISTRY.get_sample_value("minipacs_object_bytes_fetched_total") or 0.0

    with Archive(tmp_path / "data", fsync=False, object_store=settings) as archive:
        files = archive.files
        assert isinstance(files, objects.ObjectFiles)
        for path in (long_header, no_pixels):
            stored = archive.import_file(path)
            files.upload_now(stored.sop_uid)
            local = archive.root / stored.path
            size = local.stat().st_size
            before = fetched()
            parsed, sha = files.parse_object(stored.path, size)
            read = fetched() - before
            assert (parsed, sha) == (read_instance(local), hash_file(local)[1])
            if path == long_header:  # 64 KiB, then up to 1 MiB: the head, from memory
                assert size > frames.HEAD_READS[1]
                assert read == frames.HEAD_READS[1]
                data = local.read_bytes()
                pixels = read_head(data)[0].pixel_offset
                assert pixels is not None
                with pytest.raises(InvalidDataset):
                    read_head_instance(data[: pixels - 12])  # before its element header
                assert read_head_instance(data[:pixels]) == parsed
            else:  # 64 KiB, then the rest
                assert read == size


def test_reindex_checks_the_fetched_rest_against_the_recorded_sha256(
    s3store, tmp_path, monkeypatch
):
    """An object whose header outgrows the first read and has no Pixel Data is indexed from
    its head plus the rest, fetched by a ranged GET that boto3's whole-object checksum does
    not cover: a SHA-256 recorded in its metadata that differs from the bytes' makes it a
    problem of reindex, not a row with an unchecked hash."""
    for name, value in s3store.env.items():
        monkeypatch.setenv(name, value)
    good, bad = make_study(tmp_path / "study", 2, size=64)
    ds = pydicom.dcmread(bad)
    block = ds.private_block(0x0029, "MINIPACS TEST", create=True)
    block.add_new(0x10, "OB", os.urandom(200 << 10))  # past the first 64 KiB read
    del ds.PixelData
    ds.save_as(bad)
    bucket = s3store.bucket()
    settings = objectstore.Settings(
        f"s3://{bucket}/{PREFIX}", endpoint=s3store.endpoint, path_style=True
    )
    with Archive(tmp_path / "data", fsync=False, object_store=settings) as archive:
        files = archive.files
        assert isinstance(files, objects.ObjectFiles)
        stored = [archive.import_file(path) for path in (good, bad)]
        for one in stored:
            files.upload_now(one.sop_uid)
        wrong = hashlib.sha256(b"not these bytes").hexdigest()
        s3store.client().put_object(
            Bucket=bucket,
            Key=f"{PREFIX}/{stored[1].path}",
            Body=(archive.root / stored[1].path).read_bytes(),
            Metadata={"sha256": wrong},
        )
        report = archive.maintenance.reindex()
        assert report.indexed == 1
        assert [problem.path for problem in report.problems] == [stored[1].path]
        assert "SHA-256" in report.problems[0].reason
        assert archive.catalog.instance_file(stored[0].sop_uid) is not None
        assert archive.catalog.instance_file(stored[1].sop_uid) is None


# -- frames of a large multi-frame object by ranged GETs ----------------------------------


def multiframe(path: Path, frames: int, rows: int, seed: int) -> np.ndarray:
    """A native multi-frame CT of random 16-bit frames, written to `path`; its pixels."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    pixels = np.random.default_rng(seed).integers(0, 4000, (frames, rows, rows), np.uint16)
    ds.Rows = ds.Columns = rows
    ds.NumberOfFrames, ds.PixelRepresentation = frames, 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return pixels


def frame_parts(answer: requests.Response) -> list[bytes]:
    head = f"Content-Type: {answer.headers['Content-Type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + answer.content, policy=email.policy.HTTP)
    return [part.get_payload(decode=True) for part in message.iter_parts()]


def test_a_frame_of_a_large_object_not_in_the_cache_is_read_by_ranges(nodes, tmp_path):
    a, _, _, _ = nodes
    big = tmp_path / "big.dcm"
    pixels = multiframe(big, 48, 256, seed=1)  # 6 MiB: above RANGED_ABOVE
    assert big.stat().st_size > objects.RANGED_ABOVE
    private = pydicom.dcmread(big)
    blob = os.urandom(4096)  # bulk data before the pixels
    block = private.private_block(0x0029, "MINIPACS TEST", create=True)
    block.add_new(0x10, "OB", blob)
    private.save_as(big)
    storescu(a.port, big)
    wait_for(lambda: not uploads(a.data), what="the upload")
    ds = pydicom.dcmread(big, stop_before_pixels=True)
    (stored,) = a.data.glob(f"*/*/{ds.SOPInstanceUID}.dcm")
    evict(a.data)
    url = (
        f"{a.url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/frames/30,7"
    )
    fetched = metric(a, "minipacs_object_bytes_fetched")
    accept = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    answer = requests.get(url, headers={"Accept": accept}, timeout=30)
    assert answer.status_code == 200
    assert frame_parts(answer) == [pixels[29].tobytes(), pixels[6].tobytes()]
    read = metric(a, "minipacs_object_bytes_fetched") - fetched
    assert 2 * pixels[0].nbytes <= read < big.stat().st_size // 8
    bulk = requests.get(url.replace("frames/30,7", f"bulkdata/{block.get_tag(0x10):08X}"),
                        headers={"Accept": accept}, timeout=30)  # fmt: skip
    assert bulk.status_code == 200, bulk.text
    assert frame_parts(bulk) == [blob]
    assert not stored.exists()  # not fetched whole into the cache
    beyond = requests.get(url.replace("30,7", "49"), headers={"Accept": accept}, timeout=30)
    assert beyond.status_code == 404


@pytest.mark.parametrize("table", ["basic", "none", "extended"])
def test_encapsulated_frames_by_ranges_whatever_the_offset_table(
    s3store, tmp_path, monkeypatch, table
):
    """storage.frames over ranged GETs of a real object: RLE frames found by the Basic
    Offset Table, by walking the items (no table), or by the Extended Offset Table."""
    path = tmp_path / "rle.dcm"
    pixels = multiframe(path, 40, 128, seed=2)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless, pixels, encoding_plugin="pydicom")
    stored = [get_frame(ds.PixelData, i, number_of_frames=40) for i in range(40)]
    if table == "extended":
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
            stored
        )
    else:
        ds.PixelData = encapsulate(stored, has_bot=table == "basic")
    ds.save_as(path, enforce_file_format=True)
    store = objectstore.ObjectStore(
        objectstore.Settings(
            f"s3://{s3store.bucket()}/x", endpoint=s3store.endpoint, path_style=True
        )  # fmt: skip
    )
    for name, value in s3store.env.items():
        monkeypatch.setenv(name, value)
    store.put(
        "a/b/rle.dcm", path, path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
    )
    read = []

    def ranged(start: int, length: int) -> bytes:
        data = store.read("a/b/rle.dcm", start, length).data
        read.append(len(data))
        return data

    subset = frames.subset(ranged, [40, 1, 17])
    assert subset is not None and subset.count == 40
    assert [get_frame(subset.dataset.PixelData, i, number_of_frames=3) for i in range(3)] == [
        stored[39],
        stored[0],
        stored[16],
    ]
    assert (subset.dataset.pixel_array == pixels[[39, 0, 16]]).all()  # and they decode
    assert sum(read) < path.stat().st_size // 2
