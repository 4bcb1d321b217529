#!/usr/bin/env python3
"""Object storage (issue 21): minipacs on an S3-compatible store beside minipacs on files.

    .venv/bin/python scripts/bench/objects.py [--count 300] [--frames 100] [--reps 10]

What it measures, how, and its targets: scripts/bench/README.md, section objects.py.
"""

import argparse
import time
from functools import partial
from pathlib import Path

import harness as bench

log = bench.log
OPTIONS: bench.Options = {
    "--count": (300, "instances of each CT study"),
    "--frames": (100, "frames of the 512² object"),
    "--reps": (10, "timed runs of each request"),
    "--move-reps": (3, "timed C-MOVE runs"),
}
FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
INGEST_VS_FILE = 0.90  # S3 node's ingest rate ÷ the file node's (the target)
METADATA_VS_FILE = 1.2  # S3 node's /metadata p50 ÷ the file node's: index only, unchanged


class OnBucket(bench.Minipacs):
    """minipacs with its instances in a bucket, the data folder its first stop and cache."""

    def __init__(self, workdir: Path, settings: dict[str, str], args: list[str]) -> None:
        super().__init__(workdir, args=args, name="minipacs-s3")
        self.settings = settings

    def env(self) -> dict[str, str]:
        return {**bench.minipacs_env(), **self.settings}

    def evict(self) -> None:
        """Empty the cache: remove each local copy of an uploaded object (one hard link;
        a file still to upload has two), as the server's own trim would."""
        for path in self.data.glob("*/*/*.dcm"):
            if path.stat().st_nlink == 1:
                path.unlink()

    def metric(self, name: str) -> float:
        status, body = bench.http_get(self.url("/metrics"))
        for line in body.decode().splitlines() if status == 200 else ():
            if line.split(" ")[0] in (name, f"{name}_total"):
                return float(line.split()[1])
        raise bench.BenchError(f"{name} not in /metrics")

    def wait_uploaded(self, timeout: float = 600.0) -> None:
        backlog = partial(self.metric, "minipacs_upload_backlog")
        bench.poll(lambda: backlog() == 0, timeout, "the upload backlog drained")


def multiframe(path: Path, frames: int) -> tuple[str, str, str]:
    """A native 512² 16-bit multi-frame CT of random frames at `path`; its UIDs."""
    import numpy as np
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian
    from pydicom.uid import generate_uid

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    pixels = np.random.default_rng(0).integers(0, 4000, (frames, 512, 512), np.uint16)
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames, ds.PixelRepresentation, ds.PixelData = frames, 0, pixels.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def scenario(opts: argparse.Namespace, root: Path) -> int:
    bench.require(("storescu", "echoscu", "movescu", "storescp"), hint="Debian package dcmtk")
    import s3temp

    try:
        store = s3temp.Store()
    except RuntimeError as exc:
        raise bench.Unavailable(str(exc).splitlines()[0]) from None
    try:
        return measure(opts, root, store)
    finally:
        store.close()


def measure(opts: argparse.Namespace, root: Path, store) -> int:
    log.info("writing three %d-instance CT studies and a %d-frame object", opts.count, opts.frames)
    studies = [bench.read_study(bench.make_study(root / f"ct{i}", opts.count)) for i in range(3)]
    big = multiframe(root / "big.dcm", opts.frames)
    storescp = bench.StoreScp(root / "storescp")
    storescp.start()
    peer = ["--peer", f"{storescp.aet}={bench.HOST}:{storescp.port}"]
    on_file = bench.Minipacs(root / "file", args=peer, name="minipacs-file")
    s3 = OnBucket(root / "s3", store.settings(store.bucket()), peer)
    servers = [on_file, s3]
    for server in servers:
        server.start()
    out = bench.Report("Object storage: minipacs on SeaweedFS beside minipacs on files", opts)

    seconds = {server.name: 0.0 for server in servers}
    for i, study in enumerate(studies[:2]):
        for server in servers if i == 0 else servers[::-1]:
            sent = bench.send(server, study.files, tag=f"ct{i}")
            if sent.failed:
                raise bench.BenchError(f"{server.name}: {sent.failed} stores failed")
            seconds[server.name] += sent.seconds
            bench.wait_queryable(server, (i + 1) * opts.count)
    rates = {name: 2 * opts.count / s for name, s in seconds.items()}
    mb = 2 * studies[0].bytes / 1e6
    rows = [[name, rate, mb / seconds[name], seconds[name]] for name, rate in rates.items()]
    out.table(f"C-STORE of two {opts.count}-instance 512² CT studies, one association each",
              ["server", "inst/s", "MB/s", "send s"], rows)  # fmt: skip
    ingest = bench.ratio(rates[s3.name], rates[on_file.name])
    out.target("ingest: S3 node ÷ file node", ingest, INGEST_VS_FILE)
    for server in servers:
        bench.send(server, [root / "big.dcm"], tag="big")
    s3.wait_uploaded()

    clients = {server.name: bench.Client(server.http_port, "/dicom-web") for server in servers}
    ct = studies[0]
    series = f"/studies/{ct.study}/series/{ct.series}"
    frames = [f"{series}/instances/{sop}/frames/1" for sop in ct.sops]
    middle = f"/studies/{big[0]}/series/{big[1]}/instances/{big[2]}/frames/{opts.frames // 2}"
    fetched: list[float] = []

    def cold(server, path: str | list[str]) -> bench.Call:
        """A GET with the S3 node's cache emptied first (untimed); paths in turn."""
        paths, done = [path] if isinstance(path, str) else path, []

        def call(first: bool) -> tuple[float, None]:
            if server is s3:
                s3.evict()
                before = s3.metric("minipacs_object_bytes_fetched")
            answer = clients[server.name].get(paths[len(done) % len(paths)], FRAME)
            done.append(answer)
            if server is s3 and path == middle:
                fetched.append(s3.metric("minipacs_object_bytes_fetched") - before)
            return answer.seconds, None

        return call

    def move(server) -> bench.Call:
        def call(first: bool) -> tuple[float, int]:
            if server is s3:
                s3.evict()
            return bench.movescu(server, storescp, ct.study, opts.count), opts.count

        return call

    kinds = {
        "series /metadata": lambda s: clients[s.name].searcher(f"{series}/metadata"),
        "frame 1 of a CT instance, cold": lambda s: cold(s, frames),
        f"frame {opts.frames // 2} of the {opts.frames}-frame object, cold": lambda s: cold(
            s, middle
        ),
    }
    rows = []
    for kind, make in kinds.items():
        found = bench.interleaved(opts.reps, {s.name: make(s) for s in servers})
        f, o = found[on_file.name], found[s3.name]
        rows.append([kind, f.p50, f.p95, o.p50, o.p95, bench.ratio(o.p50, f.p50)])
        if kind == "series /metadata":
            vs = bench.ratio(o.p50, f.p50)
            out.target("series /metadata p50: S3 node ÷ file node", vs, METADATA_VS_FILE, False)
    out.table(f"WADO-RS, ms: {opts.reps} runs each, interleaved (S3 node's cache emptied "
              "before each frame)", ["request", "file p50", "p95", "S3 p50", "p95", "ratio"],
              rows)  # fmt: skip
    size = (root / "big.dcm").stat().st_size
    if fetched:
        out.note(f"middle frame: {sum(fetched) / len(fetched) / 1e6:.2f} MB fetched a request "
                 f"of a {size / 1e6:.1f} MB object (ranged GETs)")  # fmt: skip
    moved = bench.interleaved(opts.move_reps, {s.name: move(s) for s in servers})
    rows = [[name, opts.count / (lat.p50 / 1000) if lat.p50 else None, lat.p50]
            for name, lat in moved.items()]  # fmt: skip
    out.table(f"C-MOVE of a {opts.count}-instance study to storescp ({opts.move_reps} runs, "
              "S3 node's cache emptied first)", ["server", "inst/s", "p50 ms"], rows)  # fmt: skip

    store.stop()  # the drain: stored while the store is down, uploaded once it is back
    drain = studies[2]
    if bench.send(s3, drain.files, tag="drain").failed:
        raise bench.BenchError("stores refused while the object store was down")
    bench.wait_queryable(s3, 2 * opts.count + 1 + opts.count)
    base = s3.metric("minipacs_objects_uploaded")
    store.start()
    uploaded = partial(s3.metric, "minipacs_objects_uploaded")
    first = base + bench.poll(lambda: uploaded() - base, 600, "an upload once back", 0.02)
    started = time.perf_counter()
    s3.wait_uploaded()
    took = time.perf_counter() - started
    done = s3.metric("minipacs_objects_uploaded") - first
    megabytes = done * drain.bytes / opts.count / 1e6
    out.table(f"Upload backlog drain: a {opts.count}-instance study stored while the store "
              "was down", ["instances", "s", "inst/s", "MB/s"],
              [[int(done), took, done / took, megabytes / took]])  # fmt: skip
    for client in clients.values():
        client.close()
    failed = any(lat.error for lat in moved.values())
    for server in [*servers, storescp]:
        server.stop()
    return out.finish(failed)


if __name__ == "__main__":
    raise SystemExit(bench.main(__doc__, OPTIONS, scenario))
