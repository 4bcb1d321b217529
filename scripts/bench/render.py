#!/usr/bin/env python3
"""Server-side rendering: PNG at 512² and 128² beside Orthanc, series thumbnails, MPR.

    .venv/bin/python scripts/bench/render.py [--repeat 50] [--cold 20] [--mpr-slices 500]

What it measures, how, and its targets: scripts/bench/README.md, section render.py.
"""

import argparse
import http.client
import json
import struct
from pathlib import Path

import harness as bench

log = bench.log
OPTIONS: bench.Options = {
    "--repeat": (50, "warm requests per case"),
    "--cold": (20, "cold requests (instances) per case"),
    "--mpr-slices": (500, "slices of the MPR volume"),
    "--mpr-cold": (3, "fresh servers for the first plane"),
}

ENDPOINTS = ("minipacs", "orthanc core", "orthanc DICOMweb")
PLANES = ("axial", "coronal", "sagittal")
MPR_POSITIONS = 5  # cached planes: indices spread evenly from the first to the last
# Targets of the viewer issue (19).
PNG_VS_ORTHANC = 1.0  # minipacs warm p50 ÷ Orthanc core's, 512² and 128²
THUMBNAIL_MS = 5.0  # series /thumbnail warm p50
MPR_FIRST_MS = 2000.0  # …/mpr and the first plane, volume not cached: p95
MPR_CACHED_MS = 150.0  # every plane once cached: p95 of each


def path(endpoint: str, study: bench.StudyFiles, sop: str, size: int, window: tuple) -> str:
    """The rendering request of one endpoint: a PNG of `size` rows and columns."""
    center, width = window
    if endpoint == "orthanc core":
        thumb = "&width=128&height=128&smooth=1" if size == 128 else ""  # smooth: bilinear
        return f"/instances/{sop}/rendered?window-center={center}&window-width={width}{thumb}"
    thumb = "&viewport=128,128" if size == 128 else ""
    series = f"/dicom-web/studies/{study.study}/series/{study.series}"
    return f"{series}/instances/{sop}/rendered?window={center},{width},linear{thumb}"


def renderer(client: bench.Client, endpoint: str, study, sops: list[str], size: int, warm: bool):
    """A call for bench.interleaved: the next instance of `sops` (cold), or the first one
    again with a new window (warm); raises unless the answer is a PNG of `size`."""
    done = []

    def call(first: bool) -> tuple[float, None]:
        index = len(done)
        done.append(index)
        sop = sops[0] if warm else sops[index]
        window = (40 + index, 400 + 2 * index) if warm else (40, 400)
        return png(client, path(endpoint, study, sop, size, window), (size, size)), None

    return call


def png(client: bench.Client, url: str, size: tuple[int, int]) -> float:
    """GET a rendered image: its seconds; raises unless it is a PNG of `size` (w, h)."""
    answer = client.get(url, "image/png")
    ihdr = struct.unpack(">II", answer.body[16:24]) if len(answer.body) >= 24 else None
    if answer.body[:8] != b"\x89PNG\r\n\x1a\n" or ihdr != size:
        raise bench.BenchError(f"{url[:80]}: not a {size} PNG: {answer.body[:24]!r}")
    return answer.seconds


def scenario(opts: argparse.Namespace, root: Path) -> int:
    plugin = "Debian packages dcmtk, orthanc and orthanc-dicomweb"
    bench.require(("echoscu",), (bench.ORTHANC, bench.DICOMWEB_PLUGIN), plugin)
    count = 1 + 4 * (opts.cold + 1)  # the warm instance; a cold pool per size and server
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    first = bench.make_study(root / "images", 1)[0]
    ds = dcmread(first)
    for number in range(2, count + 1):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        ds.save_as(root / "images" / f"{number:05d}.dcm", enforce_file_format=True)
    study = bench.read_study(sorted((root / "images").iterdir()))
    log.info("writing the %d-slice MPR volume and a 3-slice warm-up one", opts.mpr_slices)
    volume = bench.read_study(bench.make_study(root / "mpr" / "volume", opts.mpr_slices))
    warmup = bench.read_study(bench.make_study(root / "mpr" / "warmup", 3, 64))
    bench.minipacs_import(root / "minipacs-data", [root / "images", root / "mpr"])
    minipacs = bench.Minipacs(root / "minipacs", root / "minipacs-data")
    orthanc = bench.Orthanc(root / "orthanc", [bench.DICOMWEB_PLUGIN])
    minipacs.start()
    orthanc.start()
    clients = {
        "minipacs": bench.Client(minipacs.http_port),
        "orthanc core": bench.Client(orthanc.http_port),
        "orthanc DICOMweb": bench.Client(orthanc.http_port),
    }
    orthanc_ids = {}
    for file, sop in zip(study.files, study.sops, strict=True):
        answer = clients["orthanc core"].request("POST", "/instances", {}, file.read_bytes())
        orthanc_ids[sop] = json.loads(answer.body)["ID"]

    out = bench.Report(f"Rendered PNG beside {bench.orthanc_version()} (+ DICOMweb plugin)", opts)
    rows, failed = [], False
    pools = [study.sops[1 + n * (opts.cold + 1) : 1 + (n + 1) * (opts.cold + 1)] for n in range(4)]
    for number, size in enumerate((512, 128)):
        for mode in ("warm", "cold"):
            calls = {}
            for endpoint, client in clients.items():
                # Cold: minipacs and Orthanc core take the same instances (other servers),
                # Orthanc's DICOMweb others, so that no Orthanc request meets a rendered one.
                pool = pools[2 * number + (endpoint == "orthanc DICOMweb")]
                sops = pool if mode == "cold" else study.sops[:1]
                if endpoint == "orthanc core":
                    sops = [orthanc_ids[sop] for sop in sops]
                calls[endpoint] = renderer(client, endpoint, study, sops, size, mode == "warm")
            found = bench.interleaved(opts.repeat if mode == "warm" else opts.cold, calls)
            failed |= any(lat.error for lat in found.values())
            vs = bench.ratio(found["minipacs"].p50, found["orthanc core"].p50)
            cells = [value for lat in found.values() for value in (lat.p50, lat.p95)]
            rows.append([f"PNG {size}²", mode, *cells, vs])
            if mode == "warm":  # Orthanc core's, measured in this run
                out.target(
                    f"warm PNG {size}²: minipacs p50 ÷ orthanc core", vs, PNG_VS_ORTHANC, False
                )
    header = ["output", "mode", *(f"{e} {p}" for e in ENDPOINTS for p in ("p50", "p95"))]
    title = f"rendered PNG, ms: {opts.repeat} warm, {opts.cold} cold requests each"
    out.table(title, [*header, "minipacs ÷ core"], rows)

    # The series' middle instance (what its thumbnail shows) is in the cold pool of
    # Orthanc's DICOMweb at 512²: minipacs has not rendered it yet.
    thumbnail = f"/dicom-web/studies/{study.study}/series/{study.series}/thumbnail"
    client = clients["minipacs"]
    first = client.get(thumbnail, "image/png").seconds * 1000
    calls = {"minipacs": lambda first: (client.get(thumbnail, "image/png").seconds, None)}
    warm = bench.interleaved(opts.repeat, calls)["minipacs"]
    title = f"series /thumbnail of the {count}-instance series (Orthanc's plugin has none), ms"
    out.table(
        title, ["server", "first", "warm p50", "p95"], [["minipacs", first, warm.p50, warm.p95]]
    )
    out.target("series /thumbnail: minipacs warm p50 ms", warm.p50, THUMBNAIL_MS, False)
    for client in clients.values():
        client.close()
    minipacs.stop()
    orthanc.stop()
    try:
        failed |= bool(warm.error) | mpr(opts, root, [warmup, volume], out)
    except (bench.BenchError, OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        # the figures above are still reported
        log.error("MPR: %s", exc)
        out.note(f"MPR failed: {str(exc)[:200]}")
        failed = True
    return out.finish(failed)


def mpr(opts: argparse.Namespace, root: Path, volumes: list, out: bench.Report) -> bool:
    """The MPR table and targets; whether a request failed. Each cold run is a fresh
    server: the small volume's description and a plane (imports, the MPR code warmed
    up), then the big one's (GET …/mpr: its plan from the index) and its middle axial
    plane. The last server then serves cached planes, the three interleaved."""
    names = ("GET …/mpr", "first plane (axial, middle)", "GET …/mpr + first plane")
    cold = {name: bench.Latency() for name in names}
    for number in range(opts.mpr_cold):
        server = bench.Minipacs(root / f"minipacs-mpr-{number}", root / "minipacs-data")
        server.start()
        client = bench.Client(server.http_port)
        for volume in volumes:  # the warm-up one first
            base = f"/api/studies/{volume.study}/series/{volume.series}/mpr"
            described = client.get(base, "application/json")
            planes = json.loads(described.body)["planes"]
            axial = f"{base}/axial/{planes['axial']['count'] // 2}?format=png&window=40,400"
            seconds = png(client, axial, (planes["axial"]["width"], planes["axial"]["height"]))
        times = (described.seconds, seconds, described.seconds + seconds)
        for latency, took in zip(cold.values(), times, strict=True):
            latency.runs_ms.append(1000 * took)
        if number < opts.mpr_cold - 1:
            client.close()
            server.stop()

    def plane(name: str) -> bench.Call:
        width, height, count = (planes[name][key] for key in ("width", "height", "count"))
        spread = [round(i * (count - 1) / (MPR_POSITIONS - 1)) for i in range(MPR_POSITIONS)]
        done: list[int] = []

        def call(first: bool) -> tuple[float, None]:
            n = len(done)
            done.append(n)
            window = f"{40 + n},{400 + 2 * n}"  # a new one each time: nothing rendered twice
            path = f"{base}/{name}/{spread[n % MPR_POSITIONS]}?format=png&window={window}"
            return png(client, path, (width, height)), None

        return call

    cached = bench.interleaved(opts.repeat, {name: plane(name) for name in PLANES})
    client.close()
    server.stop()
    rows = [
        [f"{name}, volume not cached", opts.mpr_cold, lat.p50, lat.p95]
        for name, lat in cold.items()
    ]
    for name, lat in cached.items():
        size = f"{planes[name]['width']}×{planes[name]['height']}"
        rows.append(
            [f"{name} ({size}), cached, {MPR_POSITIONS} places", opts.repeat, lat.p50, lat.p95]
        )
    title = f"MPR of a {opts.mpr_slices}-slice 512² CT volume, PNG, ms (Orthanc has none)"
    out.table(
        title, ["request", "runs", "p50", "p95", "orthanc"], [[*row, "no peer"] for row in rows]
    )
    out.target(
        "MPR …/mpr + first plane, not cached: p95 ms", cold[names[2]].p95, MPR_FIRST_MS, False
    )
    for name, lat in cached.items():
        out.target(f"MPR {name} plane, cached: p95 ms", lat.p95, MPR_CACHED_MS, False)
    return any(lat.error for lat in cached.values())


if __name__ == "__main__":
    raise SystemExit(bench.main(__doc__, OPTIONS, scenario))
