#!/usr/bin/env python3
"""Server-side rendering benchmark: minipacs WADO-URI against Orthanc, in the same run.

    .venv/bin/python scripts/bench/render.py [--repeat 50] [--cold 20] [--json PATH]

Four images, each imported into minipacs (`minipacs import`) and uploaded to Orthanc
(REST `POST /instances`): a 512×512 16-bit CT (scripts/make_study.py), the same CT
re-encoded JPEG 2000 lossless, a 3-frame 320×240 RGB image built from pydicom's
`examples_rgb_color.dcm`, and pydicom's `examples_ybr_color.dcm` (30 frames,
YBR_FULL_422, JPEG baseline). Then, with both servers up, on one keep-alive HTTP
connection per client: PNG and JPEG at full size and as 128×128 thumbnails, "cold"
(first render of an instance nobody has rendered yet) and "warm" (the same frame again
with a new window every request), from minipacs `/wado`, Orthanc `/instances/{id}/rendered`
and Orthanc's `/wado` (DICOMweb plugin). Last, the minipacs server's memory: peak RSS
after rendering more decoded frames than its cache holds, with the default cache and with
a small one. See scripts/bench/README.md.

Progress goes to stderr (logging); the figures table goes to stdout.
"""

import argparse
import contextlib
import http.client
import io
import json
import logging
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

import _common as bench
import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless
from pydicom.uid import generate_uid

log = logging.getLogger("bench.render")

MIB = 1 << 20
ENDPOINTS = ("minipacs", "orthanc", "orthanc-wado")
ENDPOINT_LABELS = {
    "minipacs": "minipacs /wado",
    "orthanc": "orthanc /rendered",
    "orthanc-wado": "orthanc /wado",
}
ALL_KINDS = ("ct", "j2k", "rgb3", "ybr")
# Debian's orthanc-dicomweb (WADO-URI at /wado) and orthanc-gdcm (JPEG 2000 decoding).
ORTHANC_PLUGINS = {"libOrthancDicomWeb.so": "orthanc-dicomweb", "libOrthancGdcm.so": "orthanc-gdcm"}
J2K_SYNTAXES = [
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.92",
    "1.2.840.10008.1.2.4.93",
]

# Targets of the rendering issue.
TARGET_THUMB_MS = 5.0
RSS_SLACK_MIB = 48.0  # transient buffers of the render in flight, allocator arenas


# --------------------------------------------------------------------------- data


@dataclass
class Instance:
    path: Path
    study: str
    series: str
    sop: str
    orthanc_id: str | None = None


@dataclass
class Kind:
    """One test image: `instances[0]` is the warm one, the rest are the cold pool."""

    key: str
    label: str
    source: str
    frame: int  # rendered frame, from 1
    frames: int
    grey: bool
    window: tuple[float, float]  # base of the warm windows (modality values)
    decoded_frame_bytes: int  # what one decoded frame costs in minipacs' cache (≈)
    instances: list[Instance] = field(default_factory=list)


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    fmt: str  # png or jpeg
    thumb: bool


VARIANTS = (
    Variant("png", "PNG full", "png", False),
    Variant("jpeg", "JPEG full", "jpeg", False),
    Variant("png128", "PNG 128", "png", True),
    Variant("jpeg128", "JPEG 128", "jpeg", True),
)
THUMB = 128
QUALITY = 90


def write_copies(ds: Dataset, out: Path, count: int, patient: str) -> list[Instance]:
    """`count` copies of `ds` in a new study and series, each with a fresh SOP UID."""
    out.mkdir(parents=True, exist_ok=True)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient
    ds.PatientName = f"RENDER^{patient}"
    ds.StudyDescription = "minipacs render benchmark"
    instances = []
    for number in range(1, count + 1):
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = number
        path = out / f"{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        instances.append(Instance(path, ds.StudyInstanceUID, ds.SeriesInstanceUID, sop))
    return instances


def testdata(name: str) -> str:
    """A pydicom test file that ships with the package (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        raise bench.BenchError(f"pydicom test file {name} is not installed")
    return str(path)


def make_kinds(root: Path, keys: list[str], count: int) -> list[Kind]:
    sys.path.insert(0, str(bench.SCRIPTS))
    from make_study import make_study

    ct_path = make_study(root / "source", 1, 512)[0]
    kinds = []
    for key in keys:
        if key == "ct":
            ds = dcmread(ct_path)
            kind = Kind(
                key,
                "CT 512² 16-bit",
                "make_study(out, 1, 512): CT_small.dcm resampled, Explicit VR LE",
                1,
                1,
                True,
                (40.0, 400.0),
                512 * 512 * 4,
            )
        elif key == "j2k":
            ds = dcmread(ct_path)
            ds.compress(JPEG2000Lossless)  # pylibjpeg-openjpeg
            kind = Kind(
                key,
                "CT 512² J2K lossless",
                "the same CT, JPEG 2000 lossless (pydicom + pylibjpeg-openjpeg)",
                1,
                1,
                True,
                (40.0, 400.0),
                512 * 512 * 4,
            )
        elif key == "rgb3":
            ds = dcmread(testdata("examples_rgb_color.dcm"))
            rgb = ds.pixel_array
            frames = np.stack([rgb, rgb[::-1, ::-1], 255 - rgb])
            ds.PixelData = np.ascontiguousarray(frames).tobytes()
            ds.NumberOfFrames = 3
            ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # Ultrasound Multi-frame Image
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            kind = Kind(
                key,
                "RGB 320×240 3 frames",
                "examples_rgb_color.dcm ×3 frames (as is, flipped, inverted), native RGB",
                2,
                3,
                False,
                (128.0, 256.0),
                320 * 240 * 3,
            )
        elif key == "ybr":
            ds = dcmread(testdata("examples_ybr_color.dcm"))
            kind = Kind(
                key,
                "YBR JPEG 320×240 ×30",
                "examples_ybr_color.dcm: 30 frames YBR_FULL_422, JPEG baseline",
                2,
                30,
                False,
                (128.0, 256.0),
                320 * 240 * 3,
            )
        else:
            raise bench.BenchError(f"unknown kind {key}")
        log.info("writing %d × %s", count, kind.label)
        kind.instances = write_copies(ds, root / "images" / key, count, f"RENDER-{key.upper()}")
        kinds.append(kind)
    return kinds


# --------------------------------------------------------------------------- servers


def main_kib(server: bench.Server, key: str) -> int | None:
    """VmRSS or VmHWM of the main process (the HTTP side runs there: workers = 1)."""
    return bench.status_kib(server.proc.pid, key) if server.proc is not None else None


def orthanc_plugins(spec: str) -> list[Path]:
    """The plugin files to load: `auto` = DICOMweb + GDCM (those installed: Debian packages
    orthanc-dicomweb, orthanc-gdcm), `none`, or a comma-separated list of .so paths."""
    if spec == "none":
        return []
    if spec != "auto":
        paths = [Path(p.strip()) for p in spec.split(",") if p.strip()]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise bench.BenchError(f"Orthanc plugin(s) not found: {', '.join(missing)}")
        return paths
    found = [
        bench.ORTHANC_PLUGIN_DIR / n
        for n in ORTHANC_PLUGINS
        if (bench.ORTHANC_PLUGIN_DIR / n).exists()
    ]
    for name, pkg in ORTHANC_PLUGINS.items():
        if not (bench.ORTHANC_PLUGIN_DIR / name).exists():
            log.warning("%s (%s) missing: Orthanc runs without it", name, pkg)
    return found


def request_for(
    endpoint: str,
    kind: Kind,
    inst: Instance,
    variant: Variant,
    window: tuple[float, float] | None,
    frame: int | None = None,
) -> tuple[str, dict[str, str]]:
    """The path and headers of one rendering request on `endpoint`."""
    frame = kind.frame if frame is None else frame
    mime = f"image/{variant.fmt}"
    if endpoint == "orthanc":
        if inst.orthanc_id is None:
            raise bench.BenchError(f"{inst.path} was not uploaded to Orthanc")
        base = f"/instances/{inst.orthanc_id}"
        base += f"/frames/{frame - 1}/rendered" if kind.frames > 1 else "/rendered"
        query: dict[str, str] = {}
        if variant.fmt == "jpeg":
            query["quality"] = str(QUALITY)
        if variant.thumb:
            query.update(width=str(THUMB), height=str(THUMB), smooth="1")
        if window is not None:
            query["window-center"], query["window-width"] = (f"{v:g}" for v in window)
        suffix = "?" + urllib.parse.urlencode(query) if query else ""
        return base + suffix, {"Accept": mime}
    query = {
        "requestType": "WADO",
        "studyUID": inst.study,
        "seriesUID": inst.series,
        "objectUID": inst.sop,
        "contentType": mime,
    }
    if kind.frames > 1:
        query["frameNumber"] = str(frame)
    if variant.fmt == "jpeg":
        query["imageQuality"] = str(QUALITY)
    if variant.thumb:
        query.update(rows=str(THUMB), columns=str(THUMB))
    if window is not None:
        query["windowCenter"], query["windowWidth"] = (f"{v:g}" for v in window)
    # "/" unescaped: Orthanc's DICOMweb plugin (1.7) does not percent-decode contentType.
    return "/wado?" + urllib.parse.urlencode(query, safe="/"), {}


def warm_window(kind: Kind, index: int) -> tuple[float, float]:
    """A different window for every warm request."""
    return kind.window[0] + index, kind.window[1] + 2 * index


def sniff(body: bytes) -> str:
    if body.startswith(b"\x89PNG"):
        return "png"
    if body.startswith(b"\xff\xd8"):
        return "jpeg"
    return "?"


def image_size(body: bytes) -> str | None:
    try:
        with Image.open(io.BytesIO(body)) as picture:
            return f"{picture.size[0]}×{picture.size[1]}"
    except Exception:
        return None


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    kind: str
    variant: str
    mode: str  # cold or warm
    endpoint: str
    status: str = "pending"  # ok, unsupported, failed, skipped
    detail: str = ""
    n: int = 0
    times_ms: list[float] = field(default_factory=list)
    out_size: str | None = None
    out_format: str | None = None
    content_type: str | None = None
    median_bytes: int | None = None

    @property
    def p50(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None

    @property
    def p95(self) -> float | None:
        if not self.times_ms:
            return None
        ordered = sorted(self.times_ms)
        return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            p50_ms=self.p50,
            p95_ms=self.p95,
            mean_ms=statistics.fmean(self.times_ms) if self.times_ms else None,
            min_ms=min(self.times_ms) if self.times_ms else None,
            max_ms=max(self.times_ms) if self.times_ms else None,
        )
        return data


@dataclass
class Capability:
    """What an endpoint did with a kind in the untimed first requests."""

    ok: bool = True
    status: int = 200
    message: str = ""
    notes: list[str] = field(default_factory=list)
    variants: dict[str, str] = field(default_factory=dict)  # variant → "" or why unusable


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def passed(self) -> bool:
        return time.monotonic() > self.end


def probe(
    client: bench.Client, endpoint: str, kind: Kind, opts: argparse.Namespace
) -> tuple[Capability, list[str]]:
    """Untimed first requests on the warm instance: every variant once, plus whether the
    endpoint honours the window and frame parameters. Also warms the server up (lazy
    imports, codecs) before anything is timed."""
    cap = Capability()
    issues: list[str] = []
    inst = kind.instances[0]
    for variant in VARIANTS:
        path, headers = request_for(endpoint, kind, inst, variant, None)
        answer = client.request("GET", path, headers)
        status, ctype, body = answer.status, answer.content_type, answer.body
        if status != 200:
            text = body.decode(errors="replace").strip()
            message = json_message(text) or text.splitlines()[0][:120] if text else ""
            cap.variants[variant.key] = f"HTTP {status} {message}".strip()
            if variant.key == "png":
                cap.ok, cap.status, cap.message = False, status, message
                cap.variants = {v.key: cap.variants[variant.key] for v in VARIANTS}
                break
            continue
        cap.variants[variant.key] = ""
        if sniff(body) != variant.fmt:
            note = f"{variant.label}: sent {sniff(body)}"
            cap.notes.append(note)
        if not ctype.startswith(f"image/{variant.fmt}"):
            cap.notes.append(f"{variant.label}: Content-Type {ctype!r} for a {sniff(body)} body")
    if not cap.ok:
        issues.append(f"{ENDPOINT_LABELS[endpoint]} cannot render {kind.label}: {cap.message}")
        return cap, issues
    png = VARIANTS[0]
    if kind.grey:
        bodies = [
            client.request(
                "GET", *request_for(endpoint, kind, inst, png, warm_window(kind, i))
            ).body
            for i in (0, 200)
        ]
        if bodies[0] == bodies[1]:
            cap.notes.append("window parameters ignored")
    if kind.frames > 1:
        bodies = [
            client.request("GET", *request_for(endpoint, kind, inst, png, None, frame=f)).body
            for f in (1, kind.frame)
        ]
        if bodies[0] == bodies[1]:
            cap.notes.append(f"frame {kind.frame} answered as frame 1 (frameNumber ignored)")
    return cap, issues


def json_message(text: str) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(text).get("Message", ""))
    return ""


def run_case(
    client: bench.Client,
    case: Case,
    kind: Kind,
    variant: Variant,
    instances: list[Instance],
    windows: list[tuple[float, float] | None],
) -> None:
    sizes: list[int] = []
    for inst, window in zip(instances, windows, strict=True):
        path, headers = request_for(case.endpoint, kind, inst, variant, window)
        answer = client.request("GET", path, headers)
        status, ctype, body, elapsed = (
            answer.status, answer.content_type, answer.body, answer.seconds
        )  # fmt: skip
        if status != 200:
            text = body.decode(errors="replace").strip()
            case.status = "failed"
            case.detail = f"HTTP {status}: {text.splitlines()[0][:160] if text else ''}"
            return
        case.times_ms.append(elapsed * 1000)
        sizes.append(len(body))
        if case.out_size is None:
            case.out_size = image_size(body)
            case.out_format = sniff(body)
            case.content_type = ctype
    case.n = len(case.times_ms)
    case.median_bytes = int(statistics.median(sizes)) if sizes else None
    case.status = "ok"


def measure(
    kinds: list[Kind],
    clients: dict[str, bench.Client],
    opts: argparse.Namespace,
    deadline: Deadline,
    minipacs: bench.Minipacs,
) -> tuple[list[Case], dict[str, dict[str, Capability]], list[str], int | None]:
    """Every case; returns them, the capabilities, issues, and minipacs' RSS (KiB) after
    the probes (its baseline: every code path imported, little in the cache)."""
    cases: list[Case] = []
    caps: dict[str, dict[str, Capability]] = {}
    issues: list[str] = []
    for kind in kinds:
        caps[kind.key] = {}
        for endpoint, client in clients.items():
            cap, found = probe(client, endpoint, kind, opts)
            caps[kind.key][endpoint] = cap
            issues += found
            if cap.notes:
                log.info(
                    "%s on %s: %s", ENDPOINT_LABELS[endpoint], kind.label, "; ".join(cap.notes)
                )
    baseline = main_kib(minipacs, "VmRSS")
    k = opts.cold
    for kind in kinds:
        pool = kind.instances[1:]
        for vindex, variant in enumerate(VARIANTS):
            for mode in ("cold", "warm"):
                for endpoint, client in clients.items():
                    case = Case(kind.key, variant.key, mode, endpoint)
                    cases.append(case)
                    why = caps[kind.key][endpoint].variants.get(variant.key)
                    if why:
                        case.status, case.detail = "unsupported", why
                        continue
                    if deadline.passed():
                        case.status, case.detail = "skipped", "time limit reached"
                        continue
                    if mode == "cold":
                        # Never-rendered instances: minipacs and Orthanc /rendered take the
                        # same slice (different servers); Orthanc /wado the next one, so
                        # that each Orthanc request meets an instance Orthanc has not
                        # rendered (nor cached) yet.
                        offset = (
                            len(VARIANTS) * k if endpoint == "orthanc-wado" else 0
                        ) + vindex * k
                        targets = pool[offset : offset + k]
                        windows: list[tuple[float, float] | None] = [warm_window(kind, 0)] * k
                    else:
                        targets = [kind.instances[0]] * opts.repeat
                        windows = [warm_window(kind, i + 1) for i in range(opts.repeat)]
                        # one untimed request: the frame is decoded (and cached) again
                        first = request_for(endpoint, kind, kind.instances[0], variant, None)
                        client.request("GET", *first)
                    try:
                        run_case(client, case, kind, variant, targets, windows)
                    except (OSError, http.client.HTTPException) as exc:
                        case.status, case.detail = "failed", f"{type(exc).__name__}: {exc}"
                    log.info(
                        "%-5s %-9s %-5s %-18s p50 %s ms, p95 %s ms%s",
                        kind.key,
                        variant.label,
                        mode,
                        ENDPOINT_LABELS[endpoint],
                        bench.fmt(case.p50, ".2f"),
                        bench.fmt(case.p95, ".2f"),
                        f" ({case.status}: {case.detail})" if case.status != "ok" else "",
                    )
    return cases, caps, issues, baseline


# --------------------------------------------------------------------------- memory


@dataclass
class MemoryRun:
    label: str
    cache_mb: int
    rss_start_mib: float | None = None  # after start-up, before any render
    rss_baseline_mib: float | None = None  # after one render of each image kind
    peak_mib: float | None = None  # VmHWM at the end
    rss_end_mib: float | None = None
    decoded_mib: float = 0.0  # decoded frames rendered during the run (≈, once each)
    frames: int = 0
    seconds: float | None = None
    rss_samples_mib: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def growth_mib(self) -> float | None:
        if self.peak_mib is None or self.rss_baseline_mib is None:
            return None
        return self.peak_mib - self.rss_baseline_mib

    @property
    def bounded(self) -> bool | None:
        growth = self.growth_mib
        return None if growth is None else growth <= self.cache_mb + RSS_SLACK_MIB

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(growth_mib=self.growth_mib, bounded=self.bounded)
        return data


def sweep(
    client: bench.Client,
    server: bench.Minipacs,
    kinds: list[Kind],
    run: MemoryRun,
    deadline: Deadline,
) -> None:
    """Render every instance's first frames once (128² PNG: the decoding is what fills the
    cache), sampling the server's RSS."""
    thumb = VARIANTS[2]
    start = time.perf_counter()
    for kind in kinds:
        for inst in kind.instances:
            for frame in range(1, min(kind.frames, 3) + 1):
                if deadline.passed():
                    run.error = "time limit reached during the sweep"
                    return
                path, headers = request_for("minipacs", kind, inst, thumb, None, frame=frame)
                answer = client.request("GET", path, headers)
                if answer.status != 200:
                    raise bench.BenchError(
                        f"sweep: HTTP {answer.status} for {path}: {answer.body[:200]!r}"
                    )
                run.frames += 1
                run.decoded_mib += kind.decoded_frame_bytes / MIB
                if run.frames % 50 == 0:
                    rss = main_kib(server, "VmRSS")
                    if rss is not None:
                        run.rss_samples_mib.append(round(rss / 1024, 1))
    run.seconds = time.perf_counter() - start


def small_cache_run(
    kinds: list[Kind],
    data: Path,
    root: Path,
    opts: argparse.Namespace,
    deadline: Deadline,
) -> tuple[MemoryRun, tuple[int, list[str]]]:
    run = MemoryRun("sweep, small cache", opts.small_cache_mb)
    workdir = Path(tempfile.mkdtemp(prefix="minipacs-small-", dir=root))
    config = workdir / "minipacs.toml"
    config.write_text(f"render_cache_mb = {opts.small_cache_mb}\n")
    server = bench.Minipacs(workdir, opts, data, ["--config", str(config)])
    client: bench.Client | None = None
    try:
        server.start()
        run.rss_start_mib = kib_to_mib(main_kib(server, "VmRSS"))
        client = bench.Client(server.http_port or 0, opts.request_timeout)
        for kind in kinds:  # every code path once
            client.request(
                "GET", *request_for("minipacs", kind, kind.instances[0], VARIANTS[2], None)
            )
        run.rss_baseline_mib = kib_to_mib(main_kib(server, "VmRSS"))
        sweep(client, server, kinds, run, deadline)
        run.peak_mib = kib_to_mib(main_kib(server, "VmHWM"))
        run.rss_end_mib = kib_to_mib(main_kib(server, "VmRSS"))
    except (bench.BenchError, OSError, http.client.HTTPException) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        log.error("small-cache run failed: %s", exc)
    finally:
        if client is not None:
            client.close()
        server.stop()
        issues = bench.log_issues(server.log_path)
        keep_logs(opts, workdir, "small-cache")
    return run, issues


def kib_to_mib(kib: int | None) -> float | None:
    return kib / 1024 if kib is not None else None


# --------------------------------------------------------------------------- report


def cell(case: Case | None, mark: str = " ") -> str:
    if case is None:
        return f"{'':>17}{mark}"
    if case.status == "ok":
        return f"{bench.fmt(case.p50, '.2f'):>8} {bench.fmt(case.p95, '.2f'):>8}{mark}"
    if case.status == "unsupported":
        match = re.match(r"HTTP (\d+)", case.detail)
        return f"{'(' + (match.group(1) if match else 'n/a') + ')':>17}{mark}"
    return f"{case.status:>17}{mark}"


def report(
    kinds: list[Kind],
    cases: list[Case],
    caps: dict[str, dict[str, Capability]],
    memory: list[MemoryRun],
    meta: dict[str, Any],
    endpoints: list[str],
) -> tuple[str, list[dict[str, Any]]]:
    by = {(c.kind, c.variant, c.mode, c.endpoint): c for c in cases}
    lines = [
        f"Server-side rendering, {meta['date']}: {meta['repeat']} warm and {meta['cold']} cold "
        f"requests per case, one keep-alive connection per client, {bench.HOST}",
        f"minipacs {meta.get('minipacs_commit', '?')}, render_cache_mb {meta['cache_mb']}; "
        f"{meta.get('orthanc_version', 'no Orthanc')}, "
        f"plugins: {', '.join(meta.get('orthanc_plugins') or ['none'])}",
        "",
        f"{'image':<21} {'output':<9} {'mode':<4} "
        + " ".join(f"{ENDPOINT_LABELS[e]:>17} " for e in endpoints)
        + f" {'mp÷orth':>7}",
        f"{'':<36}" + " ".join(f"{'p50':>8} {'p95':>8} " for _ in endpoints) + f" {'p50':>7}",
    ]
    marks = False
    for kind in kinds:
        for variant in VARIANTS:
            for mode in ("cold", "warm"):
                row = [by.get((kind.key, variant.key, mode, e)) for e in endpoints]
                mp = by.get((kind.key, variant.key, mode, "minipacs"))
                cells = []
                for endpoint, case in zip(endpoints, row, strict=True):
                    mark = " "
                    if (
                        case is not None
                        and endpoint != "minipacs"
                        and case.out_size
                        and mp is not None
                        and mp.out_size
                        and case.out_size != mp.out_size
                    ):
                        mark = "†"
                        marks = True
                    cells.append(cell(case, mark))
                orth = by.get((kind.key, variant.key, mode, "orthanc"))
                quotient = bench.ratio(mp.p50 if mp else None, orth.p50 if orth else None)
                lines.append(
                    f"{kind.label:<21} {variant.label:<9} {mode:<4} "
                    + " ".join(cells)
                    + f" {bench.fmt(quotient, '.2f'):>7}"
                )
    lines.append("(NNN): HTTP status of an answer the endpoint cannot give (not timed)")
    if marks:
        lines.append("†: answered at another size than asked (rows/columns ignored)")
    sizes = []
    for kind in kinds:
        for endpoint in endpoints:
            found = []
            for v in VARIANTS:
                case = by.get((kind.key, v.key, "warm", endpoint))
                if case is not None and case.out_size:
                    kb = (case.median_bytes or 0) / 1000
                    found.append(f"{v.label} {case.out_size} {kb:.1f} kB")
            if found:
                text = ", ".join(found)
                sizes.append(f"  {kind.key:<5} {ENDPOINT_LABELS[endpoint]:<18} {text}")
    if sizes:
        lines += ["", "output (warm, median bytes):", *sizes]
    notes = []
    for kind in kinds:
        for endpoint in endpoints:
            cap = caps.get(kind.key, {}).get(endpoint)
            if cap is None:
                continue
            items = list(cap.notes)
            if not cap.ok:
                items.insert(0, f"HTTP {cap.status}: {cap.message}")
            if items:
                notes.append(f"  {kind.key:<5} {ENDPOINT_LABELS[endpoint]:<18} {'; '.join(items)}")
    if notes:
        lines += ["", "endpoint notes:", *notes]

    lines += [
        "",
        "minipacs memory (MiB): start = RSS after start-up, base = RSS after the first renders, "
        "peak = VmHWM at the end, growth = peak - base,",
        "  decoded = decoded frames rendered (≈ MiB in the frame cache if nothing were evicted)",
        f"  {'run':<26} {'cache':>5} {'start':>6} {'base':>6} {'peak':>6} {'growth':>6} "
        f"{'decoded':>8} {'frames':>6}",
    ]
    for run in memory:
        lines.append(
            f"  {run.label:<26} {run.cache_mb:>5} {bench.fmt(run.rss_start_mib):>6} "
            f"{bench.fmt(run.rss_baseline_mib):>6} {bench.fmt(run.peak_mib):>6} "
            f"{bench.fmt(run.growth_mib):>6} "
            f"{run.decoded_mib:>8.0f} {run.frames:>6}" + (f"  {run.error}" if run.error else "")
        )
    for run in memory:
        if run.rss_samples_mib:
            samples = " ".join(f"{v:.0f}" for v in run.rss_samples_mib)
            lines.append(f"  RSS every 50 frames, {run.label}: {samples}")
    if meta.get("orthanc_peak_mib") is not None:
        lines.append(f"  Orthanc peak RSS (VmHWM) after its cases: {meta['orthanc_peak_mib']:.1f}")

    targets: list[dict[str, Any]] = []

    def target(label: str, value: float | None, goal: float, passed: bool | None) -> None:
        targets.append(
            {"target": label, "value": value, "goal": goal, "verdict": bench.verdict(passed)}
        )

    def p50(kind: str, variant: str, mode: str, endpoint: str) -> float | None:
        case = by.get((kind, variant, mode, endpoint))
        return case.p50 if case else None

    mp_png = p50("ct", "png", "warm", "minipacs")
    or_png = p50("ct", "png", "warm", "orthanc")
    value = bench.ratio(mp_png, or_png)
    target(
        "CT warm PNG 512 p50 ≤ Orthanc /rendered", value, 1.0, None if value is None else value <= 1
    )
    for variant in ("png128", "jpeg128"):
        value = p50("ct", variant, "warm", "minipacs")
        target(
            f"CT warm {variant.upper().replace('128', ' 128')} p50 ≤ {TARGET_THUMB_MS:g} ms",
            value,
            TARGET_THUMB_MS,
            None if value is None else value <= TARGET_THUMB_MS,
        )
    for run in memory:
        target(
            f"RSS growth ≤ cache {run.cache_mb} + {RSS_SLACK_MIB:g} MiB ({run.label})",
            run.growth_mib,
            run.cache_mb + RSS_SLACK_MIB,
            run.bounded,
        )
    lines += ["", "targets:"]
    for t in targets:
        digits = ".2f" if "Orthanc" in t["target"] else ".1f"
        lines.append(f"  {t['target']:<52} {bench.fmt(t['value'], digits):>7}  {t['verdict']}")
    return "\n".join(lines), targets


# --------------------------------------------------------------------------- main


def keep_logs(opts: argparse.Namespace, workdir: Path, prefix: str) -> None:
    if opts.log_dir:
        opts.log_dir.mkdir(parents=True, exist_ok=True)
        for path in workdir.glob("*.log"):
            shutil.copy2(path, opts.log_dir / f"{prefix}-{path.name}")


def upload(client: bench.Client, kinds: list[Kind]) -> None:
    for kind in kinds:
        for inst in kind.instances:
            headers = {"Content-Type": "application/dicom"}
            answer = client.request("POST", "/instances", headers, inst.path.read_bytes())
            if answer.status != 200:
                raise bench.BenchError(
                    f"Orthanc upload of {inst.path}: HTTP {answer.status} {answer.body[:200]!r}"
                )
            inst.orthanc_id = json.loads(answer.body)["ID"]


@contextlib.contextmanager
def clients_for(ports: dict[str, int], timeout: float) -> Iterator[dict[str, bench.Client]]:
    made = {name: bench.Client(port, timeout) for name, port in ports.items()}
    try:
        yield made
    finally:
        for client in made.values():
            client.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repeat", type=int, default=50, help="warm requests per case")
    parser.add_argument("--cold", type=int, default=20, help="cold requests (instances) per case")
    parser.add_argument(
        "--kinds", default=",".join(ALL_KINDS), help="subset of " + ",".join(ALL_KINDS)
    )
    parser.add_argument("--no-orthanc", action="store_true", help="measure minipacs alone")
    parser.add_argument(
        "--orthanc-plugins",
        default="auto",
        help="auto (DICOMweb + GDCM, those installed), none, or .so paths",
    )
    parser.add_argument(
        "--small-cache-mb", type=int, default=16, help="render_cache_mb of the memory run"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip both memory sweeps")
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds a request")
    parser.add_argument(
        "--time-limit", type=float, default=900.0, help="seconds for the whole run, data included"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="first wait up to this many seconds while other benchmarks or tests run",
    )
    bench.add_common_args(parser, startup=60.0)
    opts = parser.parse_args(argv)
    kinds = [k.strip() for k in opts.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(ALL_KINDS))
    if unknown or not kinds:
        parser.error(f"--kinds: unknown {unknown}; choose from {','.join(ALL_KINDS)}")
    opts.kinds = [k for k in ALL_KINDS if k in kinds]
    if opts.repeat < 1 or opts.cold < 1 or opts.small_cache_mb < 1:
        parser.error("--repeat, --cold and --small-cache-mb must be ≥ 1")
    opts.minipacs_args = ""
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    bench.setup_logging(opts.verbose)
    if not opts.minipacs.exists():
        log.error("%s not found: create the venv (./scripts/serve does)", opts.minipacs)
        return 2
    if not bench.require(("echoscu",), hint="dcmtk"):
        return 2
    if not opts.no_orthanc and not bench.require(
        files=(opts.orthanc,), hint="Debian package orthanc, or --no-orthanc"
    ):
        return 2

    root: Path | None = None
    try:
        with bench.sigterm_unwinds():
            busy = (
                bench.wait_for_quiet(opts.wait_idle) if opts.wait_idle > 0 else bench.other_work()
            )
            if busy:
                log.warning("other benchmarks/tests are running: %s", "; ".join(busy))
            deadline = Deadline(opts.time_limit)
            endpoints = ["minipacs"]
            plugins: list[Path] = []
            if not opts.no_orthanc:
                plugins = orthanc_plugins(opts.orthanc_plugins)
                endpoints.append("orthanc")
                if any("DicomWeb" in p.name for p in plugins):
                    endpoints.append("orthanc-wado")
                bench.warn_other_orthancs()

            root = Path(tempfile.mkdtemp(prefix="minipacs-render-", dir=opts.tmp))
            count = 1 + 2 * len(VARIANTS) * opts.cold
            kinds = make_kinds(root, opts.kinds, count)
            meta: dict[str, Any] = {
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "repeat": opts.repeat,
                "cold": opts.cold,
                "cache_mb": 24,  # the default render_cache_mb
                "instances_per_kind": count,
                "kinds": {
                    k.key: {"label": k.label, "source": k.source, "frame": k.frame} for k in kinds
                },
                "cpus": os.cpu_count(),
                "minipacs_commit": bench.git_commit(),
                "loadavg_start": os.getloadavg(),
                "other_work_start": busy,
                "orthanc_plugins": [p.name for p in plugins],
            }
            if "orthanc" in endpoints:
                meta["orthanc_version"] = bench.orthanc_version(opts.orthanc)

            data = root / "minipacs-data"
            folders = [root / "images" / k.key for k in kinds]
            bench.minipacs_import(opts, data, folders, root / "import.log", timeout=opts.time_limit)
            mp_dir = Path(tempfile.mkdtemp(prefix="minipacs-", dir=root))
            minipacs = bench.Minipacs(mp_dir, opts, data)
            orthanc: bench.Orthanc | None = None
            memory: list[MemoryRun] = []
            failed = False
            try:
                minipacs.start()
                main_run = MemoryRun("timed cases" + ("" if opts.no_memory else " + sweep"), 256)
                main_run.rss_start_mib = kib_to_mib(main_kib(minipacs, "VmRSS"))
                ports = {"minipacs": minipacs.http_port or 0}
                if "orthanc" in endpoints:
                    # GDCM for JPEG 2000 only: every other syntax stays with Orthanc's own
                    # DCMTK decoder, which is what Orthanc uses without the plugin.
                    gdcm = {"Enable": True, "RestrictTransferSyntaxes": J2K_SYNTAXES}
                    extra = {"Gdcm": gdcm} if any("Gdcm" in p.name for p in plugins) else {}
                    orthanc_dir = Path(tempfile.mkdtemp(prefix="orthanc-", dir=root))
                    orthanc = bench.Orthanc(orthanc_dir, opts, plugins, extra=extra)
                    orthanc.start()
                    ports["orthanc"] = orthanc.http_port or 0
                    if "orthanc-wado" in endpoints:
                        ports["orthanc-wado"] = orthanc.http_port or 0
                    log.info("uploading %d instances to Orthanc", count * len(kinds))
                    with clients_for({"up": ports["orthanc"]}, opts.request_timeout) as up:
                        upload(up["up"], kinds)
                with clients_for(ports, opts.request_timeout) as clients:
                    cases, caps, issues, baseline = measure(
                        kinds, clients, opts, deadline, minipacs
                    )
                    meta["reconnects"] = {k: c.reconnects for k, c in clients.items()}
                    main_run.rss_baseline_mib = kib_to_mib(baseline)
                    if orthanc is not None:
                        kib, _ = orthanc.peak_rss_kib()
                        meta["orthanc_peak_mib"] = kib_to_mib(kib)
                    if not opts.no_memory:
                        log.info("memory sweep on the default-cache server")
                        sweep(clients["minipacs"], minipacs, kinds, main_run, deadline)
                if opts.no_memory:  # the sweep counts every frame it renders; else, timed ones
                    main_run.decoded_mib = sum(
                        k.decoded_frame_bytes / MIB * (1 + len(VARIANTS) * opts.cold) for k in kinds
                    )
                main_run.peak_mib = kib_to_mib(main_kib(minipacs, "VmHWM"))
                main_run.rss_end_mib = kib_to_mib(main_kib(minipacs, "VmRSS"))
                memory.append(main_run)
            finally:
                minipacs.stop()
                if orthanc is not None:
                    orthanc.stop()
                keep_logs(opts, mp_dir, "main")
                if orthanc is not None:
                    keep_logs(opts, orthanc.workdir, "main")
            mp_issues = bench.log_issues(minipacs.log_path)
            or_issues = (
                bench.log_issues(orthanc.log_path, bench.ORTHANC_ISSUE) if orthanc else (0, [])
            )
            small_issues: tuple[int, list[str]] = (0, [])
            if not opts.no_memory:
                small, small_issues = small_cache_run(kinds, data, root, opts, deadline)
                memory.append(small)
                failed |= small.error is not None
            meta["loadavg_end"] = os.getloadavg()
            meta["other_work_end"] = bench.other_work()
            meta["log_issues"] = {
                "minipacs": {"count": mp_issues[0], "sample": mp_issues[1]},
                "minipacs_small_cache": {"count": small_issues[0], "sample": small_issues[1]},
                "orthanc": {"count": or_issues[0], "sample": or_issues[1]},
            }
            meta["issues"] = issues

            table, targets = report(kinds, cases, caps, memory, meta, endpoints)
            lines = [table, "", "logs:"]
            for name, (hits, sample) in (
                ("minipacs", mp_issues),
                ("minipacs (small cache)", small_issues),
                ("orthanc (E/F lines)", or_issues),
            ):
                lines.append(f"  {name}: {hits} warning/error line(s)")
                lines += [f"    {line[:160]}" for line in sample[:4]]
            if meta["other_work_start"] or meta["other_work_end"]:
                lines.append(
                    "  other benchmarks/tests were running: "
                    + "; ".join(meta["other_work_start"] + meta["other_work_end"])
                )
            print("\n".join(lines))
            if opts.json:
                payload = {
                    "meta": meta,
                    "cases": [c.as_dict() for c in cases],
                    "capabilities": {
                        k: {e: asdict(c) for e, c in v.items()} for k, v in caps.items()
                    },
                    "memory": [m.as_dict() for m in memory],
                    "targets": targets,
                }
                bench.write_json(payload, opts.json)
            sys.stdout.flush()
            failed |= any(
                c.status in ("failed", "skipped") for c in cases if c.endpoint == "minipacs"
            )
            failed |= any(c.status == "skipped" for c in cases)
            if failed:
                return 1
            if opts.strict and any(t["verdict"] == "FAIL" for t in targets):
                return 3
            return 0
    except bench.BenchError as exc:
        log.error("%s", exc)
        return 1
    except (KeyboardInterrupt, bench.Interrupted):
        log.error("interrupted: cleaning up")
        return 130
    finally:
        bench.PROCS.stop_all()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
