#!/usr/bin/env python3
"""Server-side rendering: minipacs beside Orthanc, PNG at 512² and as 128² thumbnails.

    .venv/bin/python scripts/bench/render.py [--repeat 50] [--cold 20] [--json F]

What it measures, how, and its targets: scripts/bench/README.md, section render.py.
"""

import argparse
import json
import struct
from pathlib import Path

import harness as bench

OPTIONS: bench.Options = {
    "--repeat": (50, "warm requests per case"),
    "--cold": (20, "cold requests (instances) per case"),
}

ENDPOINTS = ("minipacs", "orthanc core", "orthanc DICOMweb")
# Targets of the rendering issue.
PNG512_VS_ORTHANC = 1.0  # minipacs warm p50 ÷ Orthanc core's
PNG128_MS = 5.0  # minipacs warm p50


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
        answer = client.get(path(endpoint, study, sop, size, window), "image/png")
        png = answer.body[:8] == b"\x89PNG\r\n\x1a\n"
        if not png or struct.unpack(">II", answer.body[16:24]) != (size, size):  # IHDR
            raise bench.BenchError(f"{endpoint}: not a {size}² PNG: {answer.body[:24]!r}")
        return answer.seconds, None

    return call


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
    bench.minipacs_import(root / "minipacs-data", [root / "images"])
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
            if mode == "warm" and size == 512:
                out.target(
                    "warm PNG 512²: minipacs p50 ÷ orthanc core", vs, PNG512_VS_ORTHANC, False
                )
            if mode == "warm" and size == 128:
                out.target(
                    "warm PNG 128²: minipacs p50 ms", found["minipacs"].p50, PNG128_MS, False
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
    for client in clients.values():
        client.close()
    minipacs.stop()
    orthanc.stop()
    return out.finish(failed or bool(warm.error))


if __name__ == "__main__":
    raise SystemExit(bench.main(__doc__, OPTIONS, scenario))
