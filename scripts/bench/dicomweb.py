#!/usr/bin/env python3
"""DICOMweb: minipacs beside Orthanc's DICOMweb plugin on the same data, in one run.

    .venv/bin/python scripts/bench/dicomweb.py [--count 500] [--reps 20] [--json F]

What it measures, how, and its targets: scripts/bench/README.md, section dicomweb.py.
"""

import argparse
import json
import uuid
from pathlib import Path

import harness as bench

log = bench.log
OPTIONS: bench.Options = {
    "--count": (500, "instances of the CT study"),
    "--background": (300, "small studies (≥ 8)"),
    "--reps": (20, "timed runs of each request"),
}
DICOM = 'multipart/related; type="application/dicom"'
FRAME = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
# Targets of the DICOMweb issue: series metadata of the 500-instance series.
METADATA_MS = 100.0  # minipacs warm p50
METADATA_VS_ORTHANC = 10.0  # Orthanc's p50 ÷ minipacs'


def stow(client: bench.Client, files: list[Path], batch: int = 50) -> tuple[float, int]:
    """STOW-RS of the files, `batch` a request, one request at a time: (seconds of the
    requests, instances the answers list as stored)."""
    seconds, stored = 0.0, 0
    for start in range(0, len(files), batch):
        boundary = uuid.uuid4().hex
        head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        body = b"".join(head + path.read_bytes() + b"\r\n" for path in files[start : start + batch])
        content_type = f"{DICOM}; boundary={boundary}"
        headers = {"Content-Type": content_type, "Accept": bench.DICOM_JSON}
        answer = client.request("POST", "/studies", headers, body + f"--{boundary}--\r\n".encode())
        if answer.status not in (200, 202):
            raise bench.BenchError(f"STOW-RS: HTTP {answer.status} {answer.body[:200]!r}")
        result = json.loads(answer.body)
        result = result[0] if isinstance(result, list) else result  # Orthanc: [dataset]
        seconds += answer.seconds
        stored += len(result.get("00081199", {}).get("Value", []))  # ReferencedSOPSequence
    return seconds, stored


def each(client: bench.Client, paths: list[str], accept: str) -> bench.Call:
    """A call for bench.interleaved that GETs the next of `paths` each time, round robin."""
    done = []

    def call(first: bool) -> tuple[float, None]:
        answer = client.get(paths[len(done) % len(paths)], accept)
        done.append(answer.seconds)
        if not answer.content_type.startswith("multipart/related"):
            raise bench.BenchError(f"not multipart/related: {answer.content_type!r}")
        return answer.seconds, None

    return call


def scenario(opts: argparse.Namespace, root: Path) -> int:
    plugin = "Debian packages dcmtk, orthanc and orthanc-dicomweb"
    bench.require(("echoscu",), (bench.ORTHANC, bench.DICOMWEB_PLUGIN), plugin)
    from make_study import make_studies  # one patient a study: SMALL-0-000000, ...

    log.info("writing the %d-instance CT study and %d small studies", opts.count, opts.background)
    ct = bench.read_study(bench.make_study(root / "ct", opts.count))
    background = make_studies(root / "background", opts.background, 64)
    minipacs = bench.Minipacs(root / "minipacs")
    orthanc = bench.Orthanc(root / "orthanc", [bench.DICOMWEB_PLUGIN])
    clients = {}
    for server in (minipacs, orthanc):
        server.start()
        clients[server.name] = bench.Client(server.http_port, "/dicom-web")
    out = bench.Report(f"DICOMweb beside {bench.orthanc_version()} + its DICOMweb plugin", opts)
    rows = []
    for name, client in clients.items():
        log.info("%s: STOW-RS", name)
        seconds, stored = stow(client, ct.files)
        rows.append([name, stored / seconds, ct.bytes / 1e6 / seconds, seconds, stored])
        stow(client, background)
    title = f"STOW-RS of the {opts.count}-instance CT study, 50 instances a request"
    out.table(title, ["server", "inst/s", "MB/s", "s", "stored"], rows)
    failed = any(row[-1] != opts.count for row in rows)

    series = f"/studies/{ct.study}/series/{ct.series}"
    instances = [f"{series}/instances/{sop}" for sop in ct.sops]
    frames = [f"{path}/frames/1" for path in instances]
    first = [1000 * client.search(f"{series}/metadata")[0] for client in clients.values()]
    rows = [["series metadata, first request", opts.count, first[0], None, first[1], None]]
    requests = {  # name: (the call on a client, answers)
        "series metadata": (lambda c: c.searcher(f"{series}/metadata"), opts.count),
        "instance": (lambda c: each(c, instances, DICOM), None),
        "frame 1": (lambda c: each(c, frames, FRAME), None),
        "QIDO-RS PatientID": (lambda c: c.searcher("/studies?PatientID=SMALL-0-000007"), 1),
        "QIDO-RS PatientName=SMALL^0000*": (
            lambda c: c.searcher("/studies?PatientName=SMALL^0000*"),
            min(100, opts.background),
        ),
        "QIDO-RS series of the CT study": (lambda c: c.searcher(f"/studies/{ct.study}/series"), 1),
        "QIDO-RS instances of the CT series": (
            lambda c: c.searcher(f"{series}/instances"),
            opts.count,
        ),
    }
    for name, (make, answers) in requests.items():
        found = bench.interleaved(opts.reps, {n: make(c) for n, c in clients.items()})
        cells, check = bench.side_by_side(found, answers)
        failed |= check != "ok"
        rows.append([name, answers, *cells, check])
        if name == "series metadata":
            out.target("series metadata: minipacs warm p50 ms", cells[0], METADATA_MS, False)
            vs = bench.ratio(cells[2], cells[0])
            out.target("series metadata: orthanc p50 ÷ minipacs", vs, METADATA_VS_ORTHANC)
    header = ["request", "answers", "minipacs p50", "p95", "orthanc p50", "p95", "ratio", "status"]
    title = f"WADO-RS and QIDO-RS, ms: {opts.reps} runs each (instances in turn), interleaved"
    out.table(title, header, rows)
    for client in clients.values():
        client.close()
    minipacs.stop()
    orthanc.stop()
    return out.finish(failed)


if __name__ == "__main__":
    raise SystemExit(bench.main(__doc__, OPTIONS, scenario))
