#!/usr/bin/env python3
"""DICOMweb benchmark: minipacs against Orthanc (DICOMweb plugin) on the same data, in one run.

    .venv/bin/python scripts/bench/dicomweb.py [--quick] [--stow-gb 2] [--json PATH]

Both servers start empty, side by side on 127.0.0.1. The 500-instance 512×512 CT study of
scripts/make_study.py is loaded into each with STOW-RS (50 instances a request, one
request at a time: the ingest rate), then a background of small one-instance studies
(not timed). Then, servers interleaved run by run on one keep-alive connection each:
WADO-RS series /metadata of the 500-instance series (the first request, then warm
repeats), /frames/1 of its instances, and QIDO-RS searches; last, each server's memory
while it receives one STOW-RS request of `--stow-gb` GB streamed with chunked transfer
encoding (instances with fresh SOP Instance UIDs made on the fly, never the whole body in
memory). See scripts/bench/README.md.

Progress goes to stderr (logging); the figures table goes to stdout.
"""

import argparse
import contextlib
import http.client
import io
import json
import logging
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
import uuid
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
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

log = logging.getLogger("bench.dicomweb")
BigStudy = bench.StudyFiles

ALL_SERVERS = ("minipacs", "orthanc")
ROOT = "/dicom-web"
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
MB = 1_000_000
GB = 1_000_000_000

# Targets of the DICOMweb issue: series metadata of the 500-instance series.
METADATA_TARGET_MS = 100.0
METADATA_TARGET_RATIO = 10.0  # Orthanc's p50 ÷ minipacs' p50

# Background studies: surnames, a quarter of them starting with A (PatientName=A*).
SURNAMES = (  # noqa: SIM905
    "ADAMS ALLEN ANDERSON ARNOLD BAKER BROWN CLARK DAVIS EVANS GARCIA HARRIS JONES "
    "KING LEWIS MILLER MOORE SCOTT TAYLOR WALKER WHITE"
).split()
GIVEN_NAMES = ["ANNA", "JOHN", "MARY", "PAUL", "LINDA", "MARK", "SARAH", "PETER"]
BACKGROUND_SIZE = 64  # rows = columns of the background images
TOP_PATIENT_STUDIES = 5  # studies of the patient the PatientID query asks for
QUERY_YEAR = 2020


# --------------------------------------------------------------------------- data


@dataclass
class Background:
    """Small one-instance studies (Part 10 bytes in memory) and what each query must find."""

    files: list[bytes] = field(default_factory=list)
    patient_id: str = ""
    a_names: int = 0
    in_year: int = 0


def make_big_study(root: Path, count: int, size: int) -> BigStudy:
    """`make_study(root/study, count, size)`, as ingest.py and query.py make it."""
    log.info("writing the %d-instance %d² CT study", count, size)
    return bench.read_study(bench.make_study(root / "study", count, size))


def make_background(count: int, seed: int) -> Background:
    """`count` one-instance 64² CT studies of ~2/3 × count patients; the first patient has
    TOP_PATIENT_STUDIES of them. Names, dates and counts are seeded: the expected answers
    of the queries are counted here."""
    rng = random.Random(seed)
    template = dcmread(get_testdata_file("CT_small.dcm"))
    pixels = template.pixel_array
    step = max(1, pixels.shape[0] // BACKGROUND_SIZE)
    small = np.ascontiguousarray(pixels[::step, ::step][:BACKGROUND_SIZE, :BACKGROUND_SIZE])
    template.PixelData = small.tobytes()
    template.Rows, template.Columns = small.shape
    template.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    template.StudyDescription = "minipacs dicomweb bench background"
    patients = max(2, count * 2 // 3)
    names = [f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN_NAMES)}" for _ in range(patients)]
    out = Background(patient_id="BG-00000")
    for index in range(count):
        patient = 0 if index < TOP_PATIENT_STUDIES else rng.randrange(1, patients)
        year = rng.randint(2010, 2025)
        template.PatientID = f"BG-{patient:05d}"
        template.PatientName = names[patient]
        template.StudyDate = f"{year}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        template.StudyInstanceUID = fresh_uid()
        template.SeriesInstanceUID = fresh_uid()
        template.SOPInstanceUID = fresh_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.AccessionNumber = f"BG{index:06d}"
        buffer = io.BytesIO()
        template.save_as(buffer, enforce_file_format=True)
        out.files.append(buffer.getvalue())
        out.a_names += names[patient].startswith("A")
        out.in_year += year == QUERY_YEAR
    return out


def fresh_uid() -> str:
    """A random 2.25 UID of fixed length (44 characters, even: no padding): the big STOW
    patches it into a serialized instance byte for byte."""
    return f"2.25.{10**38 + uuid.uuid4().int % (9 * 10**38)}"


# --------------------------------------------------------------------------- servers


def reset_hwm(server: bench.Server) -> bool:
    """Reset VmHWM to the current RSS (`echo 5 > /proc/PID/clear_refs`, Linux ≥ 4.0), so
    that the VmHWM read afterwards is the peak of what follows only."""
    if server.proc is None:
        return False
    try:
        for pid in bench.task_tree(server.proc.pid):
            Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError as exc:
        log.warning(
            "%s: cannot reset VmHWM (%s): the peak is the process's lifetime one", server.name, exc
        )
        return False
    return True


def error_text(answer: bench.Answer) -> str:
    """The status and the start of the body, HTML tags and runs of spaces removed."""
    text = re.sub(r"<[^>]*>", " ", answer.body[:600].decode(errors="replace"))
    text = re.sub(r"\s+", " ", text).strip()
    return f"HTTP {answer.status}" + (f": {text[:160]}" if text else "")


def boundary_of(content_type: str) -> str | None:
    match = re.search(r'boundary="?([^";,\s]+)"?', content_type, re.IGNORECASE)
    return match.group(1) if match else None


def parse_multipart(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart body: (headers with lower-case names, content)."""
    boundary = boundary_of(content_type)
    if not content_type.lower().startswith("multipart/") or boundary is None:
        raise ValueError(f"not a multipart answer: Content-Type {content_type!r}")
    delimiter = b"\r\n--" + boundary.encode()
    parts = []
    for piece in (b"\r\n" + body).split(delimiter)[1:]:
        if piece.startswith(b"--"):
            break
        _padding, _, rest = piece.partition(b"\r\n")
        head, sep, content = rest.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part without a blank line after its headers")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip():
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def new_boundary() -> str:
    return f"minipacs-bench-{uuid.uuid4().hex}"


def stow_content_type(boundary: str) -> str:
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


def part_head(boundary: str) -> bytes:
    return f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()


def multipart_body(instances: list[bytes], boundary: str) -> bytes:
    """A STOW-RS request body: one application/dicom part per Part 10 file."""
    head = part_head(boundary)
    out = bytearray()
    for data in instances:
        out += head
        out += data
        out += b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def stow_counts(answer: bench.Answer) -> tuple[int | None, int | None, str]:
    """(stored, failed, note) from a STOW-RS response: ReferencedSOPSequence (0008,1199)
    and FailedSOPSequence (0008,1198) items of its DICOM JSON."""
    try:
        value = json.loads(answer.body)
    except ValueError:
        return None, None, f"response not JSON ({answer.content_type!r})"
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, dict):
        return None, None, "response JSON not a dataset"

    def items(tag: str) -> int:
        element = value.get(tag) or {}
        return len(element.get("Value") or [])

    return items("00081199"), items("00081198"), ""


# --------------------------------------------------------------------------- figures


@dataclass
class StowRun:
    """STOW-RS of the study in batches: the sum of request times and what was stored."""

    requests_ms: list[float] = field(default_factory=list)
    sent: int = 0
    stored: int = 0
    failed: int = 0
    queryable: int | None = None  # NumberOfStudyRelatedInstances after the load
    statuses: dict[int, int] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(self.requests_ms) / 1000

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = self.seconds
        return data


@dataclass
class BigStow:
    """One chunked STOW-RS request of `bytes_target` bytes; the server's memory meanwhile."""

    bytes_target: int
    bytes_sent: int = 0
    instances_sent: int = 0
    upload_s: float | None = None  # until the last byte of the body was handed to the socket
    total_s: float | None = None  # until the last byte of the answer
    status: int | None = None
    stored: int | None = None
    failed: int | None = None
    queryable: int | None = None
    hwm_before_kib: int | None = None  # VmHWM before the request (the process's lifetime)
    rss_start_kib: int | None = None
    hwm_during_kib: int | None = None  # VmHWM after the request, reset at its start
    hwm_after_kib: int | None = None  # lifetime VmHWM after the request
    rss_peak_sampled_kib: int | None = None
    rss_end_kib: int | None = None
    hwm_was_reset: bool = False
    rss_samples_mib: list[float] = field(default_factory=list)  # VmRSS about every second
    error: str | None = None

    @property
    def growth_mib(self) -> float | None:
        if self.hwm_during_kib is None or self.rss_start_kib is None:
            return None
        return (self.hwm_during_kib - self.rss_start_kib) / 1024


def mib(kib: int | None) -> float | None:
    return kib / 1024 if kib is not None else None


# --------------------------------------------------------------------------- measuring


def dicomweb_status(server: bench.Server, timeout: float) -> tuple[int | None, str]:
    """How the server answers `GET /dicom-web/studies` now: (status, a short reason)."""
    client = bench.Client(server.http_port or 0, timeout, ROOT)
    try:
        answer = client.request("GET", "/studies", {"Accept": bench.DICOM_JSON})
        return answer.status, error_text(answer)
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def study_instances(client: bench.Client, study: str) -> int | None:
    """NumberOfStudyRelatedInstances of one study through QIDO-RS (None: not found)."""
    query = urllib.parse.urlencode({"StudyInstanceUID": study, "includefield": "00201208"})
    answer, found = client.get_json(f"/studies?{query}")
    if not found:
        return None if found is None else 0
    with contextlib.suppress(KeyError, IndexError, TypeError, ValueError):
        return int(found[0]["00201208"]["Value"][0])
    return None


def stow_study(client: bench.Client, files: list[bytes] | list[Path], batch: int) -> StowRun:
    """Every file, `batch` a request, one request at a time; only the requests are timed
    (the body is read and assembled before)."""
    run = StowRun()
    for start in range(0, len(files), batch):
        group = files[start : start + batch]
        parts = [f if isinstance(f, bytes) else f.read_bytes() for f in group]
        boundary = new_boundary()
        body = multipart_body(parts, boundary)
        headers = {"Content-Type": stow_content_type(boundary), "Accept": bench.DICOM_JSON}
        try:
            answer = client.request("POST", "/studies", headers, body)
        except (OSError, http.client.HTTPException) as exc:
            run.error = f"batch {start // batch + 1}: {type(exc).__name__}: {exc}"
            return run
        run.sent += len(group)
        run.statuses[answer.status] = run.statuses.get(answer.status, 0) + 1
        run.requests_ms.append(answer.seconds * 1000)
        stored, failed, note = stow_counts(answer)
        if answer.status not in (200, 202):
            run.error = f"batch {start // batch + 1}: {error_text(answer)}"
            return run
        if stored is None:
            run.notes.append(note)
            stored, failed = len(group), 0
        run.stored += stored
        run.failed += failed or 0
    return run


def measure_stow(
    clients: dict[str, bench.Client], study: BigStudy, bg: Background, opts: argparse.Namespace
) -> dict[str, StowRun]:
    """The timed STOW-RS of the big study into each server in turn (each one's own
    machine time), then the background studies (untimed)."""
    runs = {}
    for name, client in clients.items():
        log.info("%s: STOW-RS of %d instances, %d a request", name, len(study.files), opts.batch)
        run = stow_study(client, study.files, opts.batch)
        if run.error is None:
            run.queryable = study_instances(client, study.study)
            if run.queryable != len(study.files):
                run.notes.append(
                    f"QIDO reports {run.queryable} instances in the study, not {len(study.files)}"
                )
        log.info(
            "%s: %d/%d stored in %.2f s (%s)%s",
            name,
            run.stored,
            len(study.files),
            run.seconds,
            ", ".join(f"HTTP {k} ×{v}" for k, v in sorted(run.statuses.items())),
            f" — {run.error}" if run.error else "",
        )
        runs[name] = run
    for name, client in clients.items():
        if runs[name].error:
            continue
        log.info("%s: STOW-RS of %d background studies (untimed)", name, len(bg.files))
        extra = stow_study(client, bg.files, opts.batch)
        if extra.error or extra.stored != len(bg.files):
            runs[name].notes.append(
                f"background load: {extra.stored}/{len(bg.files)} stored "
                f"{extra.error or ''}".strip()
            )
    return runs


def measure_metadata(
    clients: dict[str, bench.Client], study: BigStudy, reps: int
) -> dict[str, tuple[bench.Latency, bench.Latency]]:
    """Series /metadata: the first request on each server (cold), then `reps` more
    (warm), servers interleaved. Checks that every instance is described once."""
    path = f"/studies/{study.study}/series/{study.series}/metadata"
    out = {name: (bench.Latency(), bench.Latency()) for name in clients}
    expected = set(study.sops)
    for rep in range(reps + 1):
        for name, client in clients.items():
            cold, warm = out[name]
            target = cold if rep == 0 else warm
            if cold.error:
                continue
            try:
                answer, items = client.get_json(path)
            except (OSError, http.client.HTTPException) as exc:
                cold.error = f"{type(exc).__name__}: {exc}"
                continue
            if items is None:
                cold.error = error_text(answer)
                continue
            target.runs_ms.append(answer.seconds * 1000)
            if rep == 0:
                cold.answers, cold.bytes = len(items), len(answer.body)
                warm.answers, warm.bytes = len(items), len(answer.body)
                sops = {_first(i, "00080018") for i in items}
                if sops != expected:
                    cold.notes.append(
                        f"{len(items)} items, {len(sops & expected)} of the series' "
                        f"{len(expected)} SOP Instance UIDs"
                    )
                pixel = [i.get("7FE00010") or {} for i in items]
                inline = sum("InlineBinary" in p for p in pixel)
                if inline:
                    cold.notes.append(f"PixelData inline in {inline} items")
                if not any("BulkDataURI" in p for p in pixel):
                    cold.notes.append("no BulkDataURI for PixelData")
                if not answer.content_type.startswith(bench.DICOM_JSON):
                    cold.notes.append(f"Content-Type {answer.content_type!r}")
        if rep == 0:
            for name, (cold, _warm) in out.items():
                log.info(
                    "%s: series metadata cold %s ms, %s items, %s kB%s",
                    name,
                    bench.fmt(cold.p50),
                    cold.answers,
                    bench.fmt((cold.bytes or 0) / 1000, ".0f"),
                    f" — {cold.error}" if cold.error else "",
                )
    return out


def _first(item: dict[str, Any], tag: str) -> str | None:
    with contextlib.suppress(KeyError, IndexError, TypeError):
        return str(item[tag]["Value"][0])
    return None


def measure_frames(
    clients: dict[str, bench.Client], study: BigStudy, reps: int
) -> dict[str, bench.Latency]:
    """/frames/1 of `reps` instances of the series in turn (each instance once while reps
    ≤ the count), servers interleaved; after one untimed request each."""
    expected_len = study.rows * study.columns * 2
    out = {name: bench.Latency() for name in clients}
    for rep in range(reps + 1):
        sop = study.sops[(rep - 1) % len(study.sops)] if rep else study.sops[-1]
        path = f"/studies/{study.study}/series/{study.series}/instances/{sop}/frames/1"
        for name, client in clients.items():
            lat = out[name]
            if lat.error:
                continue
            try:
                answer = client.request("GET", path, {"Accept": FRAME_ACCEPT})
            except (OSError, http.client.HTTPException) as exc:
                lat.error = f"{type(exc).__name__}: {exc}"
                continue
            if answer.status != 200:
                lat.error = error_text(answer)
                continue
            if rep == 0:
                check_frame(lat, answer, expected_len)
                continue
            lat.runs_ms.append(answer.seconds * 1000)
    return out


def check_frame(lat: bench.Latency, answer: bench.Answer, expected_len: int) -> None:
    """The first answer: one octet-stream part of Rows × Columns × 2 bytes."""
    lat.bytes = len(answer.body)
    try:
        parts = parse_multipart(answer.content_type, answer.body)
    except ValueError as exc:
        lat.notes.append(str(exc))
        return
    lat.answers = len(parts)
    if len(parts) != 1:
        lat.notes.append(f"{len(parts)} parts, not 1")
    part_type = ""
    if parts:
        headers, content = parts[0]
        part_type = headers.get("content-type", "")
        if not part_type.startswith("application/octet-stream"):
            lat.notes.append(f"part Content-Type {part_type!r}")
        if len(content) != expected_len:
            lat.notes.append(f"frame of {len(content)} bytes, not {expected_len}")
    if "content-length" in answer.headers:
        framing = "Content-Length"
    elif "chunked" in answer.headers.get("transfer-encoding", "").lower():
        framing = "chunked"
    else:
        framing = "no length: connection closed after each answer"
    lat.notes.append(f"framing {framing}")
    syntax = re.search(r"transfer-syntax=([0-9.*]+)", answer.content_type + " " + part_type)
    lat.notes.append(f"transfer-syntax {syntax.group(1) if syntax else 'not given'}")


def query_specs(study: BigStudy, bg: Background) -> list[bench.QuerySpec]:
    year = f"{QUERY_YEAR}0101-{QUERY_YEAR}1231"
    uids = (("StudyInstanceUID", study.study), ("SeriesInstanceUID", study.series))
    return [
        bench.QuerySpec("patient_id", "studies PatientID exact", "STUDY",
                  (("PatientID", bg.patient_id),), TOP_PATIENT_STUDIES),
        bench.QuerySpec("patient_name", "studies PatientName=A*", "STUDY",
                  (("PatientName", "A*"),), bg.a_names),
        bench.QuerySpec("study_date", f"studies StudyDate {QUERY_YEAR}", "STUDY",
                  (("StudyDate", year),), bg.in_year),
        bench.QuerySpec("series", "series of the CT study", "SERIES", uids[:1], 1),
        bench.QuerySpec("instances", f"instances of the {len(study.sops)}-inst series", "IMAGE",
                  uids, len(study.sops)),
    ]  # fmt: skip


def measure_qido(
    clients: dict[str, bench.Client], specs: list[bench.QuerySpec], reps: int
) -> dict[str, dict[str, bench.Latency]]:
    """Each query `reps` times per server after one untimed run that counts the answers;
    servers interleaved run by run."""
    out = {s.key: {name: bench.Latency() for name in clients} for s in specs}
    for rep in range(reps + 1):
        for spec in specs:
            for name, client in clients.items():
                lat = out[spec.key][name]
                if lat.error:
                    continue
                try:
                    answer, found = client.get_json(spec.qido_path())
                except (OSError, http.client.HTTPException) as exc:
                    lat.error = f"{type(exc).__name__}: {exc}"
                    continue
                if found is None:
                    lat.error = error_text(answer)
                    continue
                if rep == 0:
                    lat.answers, lat.bytes = len(found), len(answer.body)
                    if answer.status == 204:
                        lat.notes.append("204 No Content")
                    continue
                if len(found) != lat.answers:
                    lat.notes.append(f"run {rep}: {len(found)} answers, first run {lat.answers}")
                lat.runs_ms.append(answer.seconds * 1000)
    return out


class Counter:
    def __init__(self) -> None:
        self.bytes = 0
        self.instances = 0
        self.done_at: float | None = None


def big_body(
    template: bytes, placeholder: str, boundary: str, target: int, counter: Counter
) -> Iterator[bytes]:
    """Instances until `target` bytes, each the template with a fresh SOP Instance UID
    patched in (same length); yielded piece by piece: at most one instance is built at a
    time, the pixel data is the same bytes object every time."""
    pieces = template.split(placeholder.encode())
    head = part_head(boundary)
    while counter.bytes < target:
        uid = fresh_uid().encode()
        lead = head + uid.join(pieces[:-1]) + uid
        for chunk in (lead, pieces[-1], b"\r\n"):
            counter.bytes += len(chunk)
            yield chunk
        counter.instances += 1
    tail = f"--{boundary}--\r\n".encode()
    counter.bytes += len(tail)
    yield tail
    counter.done_at = time.perf_counter()


def big_template(study: BigStudy) -> tuple[bytes, str, str]:
    """The CT instance in a study and series of its own, with a placeholder SOP Instance
    UID that occurs exactly twice (file meta and dataset). Returns (bytes, placeholder,
    study UID)."""
    ds = dcmread(study.files[0])
    ds.StudyInstanceUID = fresh_uid()
    ds.SeriesInstanceUID = fresh_uid()
    ds.PatientID = "STOW-BIG"
    ds.PatientName = "STOW^BIG"
    ds.StudyDescription = "minipacs dicomweb bench: big chunked STOW-RS"
    placeholder = fresh_uid()
    ds.SOPInstanceUID = placeholder
    ds.file_meta.MediaStorageSOPInstanceUID = placeholder
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    if data.count(placeholder.encode()) != 2:
        raise bench.BenchError("the big STOW template does not hold its SOP Instance UID twice")
    return data, placeholder, str(ds.StudyInstanceUID)


def measure_big_stow(server: bench.Server, study: BigStudy, opts: argparse.Namespace) -> BigStow:
    """One STOW-RS request of `--stow-gb` GB with Transfer-Encoding: chunked on a new
    connection, the server's RSS sampled meanwhile; VmHWM before, reset, and after."""
    target = int(opts.stow_gb * GB)
    run = BigStow(bytes_target=target)
    template, placeholder, study_uid = big_template(study)
    boundary = new_boundary()
    counter = Counter()
    run.hwm_before_kib = server.tree_kib("VmHWM")
    run.hwm_was_reset = reset_hwm(server)
    run.rss_start_kib = server.tree_kib("VmRSS")
    log.info(
        "%s: chunked STOW-RS of %.2f GB (~%d instances); RSS %s MiB, VmHWM so far %s MiB",
        server.name,
        target / GB,
        target // len(template),
        bench.fmt(mib(run.rss_start_kib)),
        bench.fmt(mib(run.hwm_before_kib)),
    )
    conn = http.client.HTTPConnection(bench.HOST, server.http_port or 0, timeout=opts.big_timeout)
    headers = {"Content-Type": stow_content_type(boundary), "Accept": bench.DICOM_JSON}
    started = time.perf_counter()
    answer: bench.Answer | None = None
    with bench.RssSampler(server.proc.pid if server.proc else 0, interval=0.2) as sampler:
        try:
            # An iterable body and no Content-Length: http.client sends it chunked.
            conn.request(
                "POST",
                ROOT + "/studies",
                body=big_body(template, placeholder, boundary, target, counter),
                headers=headers,
                encode_chunked=True,
            )
        except (OSError, http.client.HTTPException) as exc:
            run.error = (
                f"sending stopped after {counter.bytes / GB:.2f} GB: {type(exc).__name__}: {exc}"
            )
        try:
            response = conn.getresponse()
            body = response.read()
            answer = bench.Answer(
                response.status,
                response.getheader("Content-Type", ""),
                body,
                time.perf_counter() - started,
            )
        except (OSError, http.client.HTTPException) as exc:
            if run.error is None:
                run.error = f"no answer: {type(exc).__name__}: {exc}"
        finally:
            conn.close()
    run.total_s = time.perf_counter() - started
    run.upload_s = counter.done_at - started if counter.done_at else None
    run.bytes_sent, run.instances_sent = counter.bytes, counter.instances
    run.rss_peak_sampled_kib = sampler.peak_kib or None
    run.rss_samples_mib = [round(v / 1024, 1) for v in sampler.samples_kib[::5]]
    run.hwm_after_kib = server.tree_kib("VmHWM")
    run.hwm_during_kib = run.hwm_after_kib if run.hwm_was_reset else None
    run.rss_end_kib = server.tree_kib("VmRSS")
    if answer is not None:
        run.status = answer.status
        run.stored, run.failed, note = stow_counts(answer)
        if answer.status not in (200, 202):
            run.error = (run.error + "; " if run.error else "") + error_text(answer)
        elif note:
            log.info("%s: %s", server.name, note)
    if server.alive():
        client = bench.Client(server.http_port or 0, opts.request_timeout, ROOT)
        try:
            run.queryable = study_instances(client, study_uid)
        except (OSError, http.client.HTTPException) as exc:
            log.warning("%s: QIDO after the big STOW: %s", server.name, exc)
        finally:
            client.close()
    else:
        run.error = (run.error + "; " if run.error else "") + "server died"
    log.info(
        "%s: %.2f GB, %d instances in %.1f s: HTTP %s, stored %s, queryable %s; "
        "VmHWM during %s MiB (RSS at start %s, sampled peak %s)%s",
        server.name,
        run.bytes_sent / GB,
        run.instances_sent,
        run.total_s,
        run.status,
        run.stored,
        run.queryable,
        bench.fmt(mib(run.hwm_during_kib)),
        bench.fmt(mib(run.rss_start_kib)),
        bench.fmt(mib(run.rss_peak_sampled_kib)),
        f" — {run.error}" if run.error else "",
    )
    return run


# --------------------------------------------------------------------------- report


def _pp(lat: bench.Latency | None) -> str:
    if lat is None:
        return f"{'':>15}"
    if lat.error:
        return f"{'failed':>15}"
    return f"{bench.fmt(lat.p50):>7}/{bench.fmt(lat.p95):<7}"


def _ratio(a: float | None, b: float | None) -> str:
    return bench.fmt(a / b, ".2f") if a is not None and b else "n/a"


def report(payload: dict[str, Any], names: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """The figures table and the targets."""
    meta = payload["meta"]
    study = meta["study"]
    stow: dict[str, StowRun] = payload["_stow"]
    metadata: dict[str, tuple[bench.Latency, bench.Latency]] = payload["_metadata"]
    frames: dict[str, bench.Latency] = payload["_frames"]
    qido: dict[str, dict[str, bench.Latency]] = payload["_qido"]
    specs: list[bench.QuerySpec] = payload["_specs"]
    big: dict[str, BigStow] = payload["_big"]
    orth = "orthanc" in names and "minipacs" in names
    lines = [
        f"DICOMweb, {' vs '.join(names)}"
        + (
            f" ({meta['orthanc_version']} + DICOMweb plugin {meta['dicomweb_plugin']})"
            if "orthanc" in names
            else ""
        )
        + f", {meta['date']}, minipacs {meta['commit']}, {bench.HOST}, {meta['cpus']} CPUs",
        f"data: {study['count']}-instance {study['size']}² CT study ({study['mb']:.1f} MB) + "
        f"{meta['background']} background studies ({BACKGROUND_SIZE}², 1 instance each)",
    ]
    for name, why in meta["skipped"].items():
        lines.append(f"{name}: SKIPPED — {why}")
    lines += [
        "",
        f"STOW-RS of the {study['count']}-instance study, {meta['batch']} instances a request "
        "(multipart/related, Content-Length), one request at a time",
        f"  {'server':<9} {'inst/s':>8} {'MB/s':>7} {'total s':>8} {'req p50 ms':>11} "
        f"{'stored':>7} {'queryable':>9}  status",
    ]
    for name in names:
        run = stow.get(name)
        if run is None:
            continue
        rate = run.stored / run.seconds if run.seconds else None
        mbs = study["mb"] * run.stored / study["count"] / run.seconds if run.seconds else None
        status = run.error or ", ".join(f"HTTP {k}×{v}" for k, v in sorted(run.statuses.items()))
        lines.append(
            f"  {name:<9} {bench.fmt(rate):>8} {bench.fmt(mbs):>7} "
            f"{bench.fmt(run.seconds, '.2f'):>8} "
            f"{bench.fmt(statistics.median(run.requests_ms) if run.requests_ms else None):>11} "
            f"{run.stored:>7} "
            f"{bench.fmt(run.queryable, 'd') if run.queryable is not None else 'n/a':>9}"
            f"  {status}"
        )
    if orth and stow.get("minipacs") and stow.get("orthanc"):
        a, b = stow["minipacs"], stow["orthanc"]
        ra = a.stored / a.seconds if a.seconds else None
        rb = b.stored / b.seconds if b.seconds else None
        lines.append(f"  rate minipacs ÷ orthanc: {_ratio(ra, rb)}")

    lines += [
        "",
        f"WADO-RS series metadata ({study['count']} instances, Accept: {bench.DICOM_JSON}), ms: "
        f"the first request (cold), then {meta['metadata_reps']} (warm)",
        f"  {'server':<9} {'cold':>8} {'warm p50':>9} {'p95':>8} {'items':>6} {'kB':>7}",
    ]
    for name in names:
        if name not in metadata:
            lines.append(f"  {name:<9} not measured: the STOW-RS load failed")
            continue
        cold, warm = metadata[name]
        if cold.error:
            lines.append(f"  {name:<9} failed: {cold.error}")
            continue
        lines.append(
            f"  {name:<9} {bench.fmt(cold.p50):>8} {bench.fmt(warm.p50):>9} "
            f"{bench.fmt(warm.p95):>8} "
            f"{cold.answers if cold.answers is not None else 'n/a':>6} "
            f"{bench.fmt((cold.bytes or 0) / 1000, '.0f'):>7}"
        )
    mp_meta = metadata.get("minipacs", (None, None))[1]
    or_meta = metadata.get("orthanc", (None, None))[1]
    if orth:
        lines.append(
            "  warm p50 orthanc ÷ minipacs: "
            f"{_ratio(or_meta.p50 if or_meta else None, mp_meta.p50 if mp_meta else None)}"
        )

    lines += [
        "",
        f"WADO-RS /frames/1, Accept: {FRAME_ACCEPT}, {meta['frame_reps']} instances in turn, ms",
        f"  {'server':<9} {'p50/p95':>15} {'bytes':>9}  answer",
    ]
    for name in names:
        lat = frames.get(name)
        if lat is None:
            lines.append(f"  {name:<9} not measured: the STOW-RS load failed")
            continue
        what = lat.error or "; ".join(lat.notes)
        lines.append(
            f"  {name:<9} {_pp(lat)} {bench.fmt(lat.bytes, 'd') if lat.bytes else 'n/a':>9}  {what}"
        )

    lines += [
        "",
        f"QIDO-RS (Accept: {bench.DICOM_JSON}), ms p50/p95 of {meta['qido_reps']} runs; "
        f"answers {'/'.join(names)}/expected"
        + ("; ratio = minipacs p50 ÷ orthanc p50" if orth else ""),
        f"  {'query':<32} {'answers':>14} "
        + " ".join(f"{n:^15}" for n in names)
        + (f" {'ratio':>6}" if orth else ""),
    ]
    for spec in specs:
        row = qido.get(spec.key, {})
        counts = "/".join(
            (bench.fmt(row[n].answers, "d") if n in row and row[n].answers is not None else "-")
            for n in names
        )
        line = f"  {spec.label:<32} {counts + '/' + str(spec.expected):>14} " + " ".join(
            _pp(row.get(n)) for n in names
        )
        if orth:
            mp, ot = row.get("minipacs"), row.get("orthanc")
            line += f" {_ratio(mp.p50 if mp else None, ot.p50 if ot else None):>6}"
        lines.append(line)

    if big:
        lines += [
            "",
            f"STOW-RS of {meta['stow_gb']:g} GB in one request (Transfer-Encoding: chunked, "
            "instances made on the fly), server memory in MiB",
            "  HWM before = VmHWM before the request (process lifetime); RSS start = VmRSS when "
            "it began; peak = VmHWM after it, reset at its start (/proc/PID/clear_refs 5);",
            "  upl s = until the last byte of the body was sent; s = until the last byte of the "
            "answer",
            f"  {'server':<9} {'GB':>5} {'inst':>6} {'upl s':>6} {'s':>6} {'MB/s':>6} {'HTTP':>5} "
            f"{'stored':>7} {'query':>6} {'HWM bef':>8} {'RSS start':>9} {'peak':>7} "
            f"{'growth':>7}  status",
        ]
    for name in names:
        run = big.get(name)
        if run is None:
            continue
        mbs = run.bytes_sent / MB / run.total_s if run.total_s else None
        lines.append(
            f"  {name:<9} {run.bytes_sent / GB:>5.2f} {run.instances_sent:>6} "
            f"{bench.fmt(run.upload_s):>6} {bench.fmt(run.total_s):>6} {bench.fmt(mbs):>6} "
            f"{run.status or '-':>5} "
            f"{run.stored if run.stored is not None else '-':>7} "
            f"{run.queryable if run.queryable is not None else '-':>6} "
            f"{bench.fmt(mib(run.hwm_before_kib)):>8} {bench.fmt(mib(run.rss_start_kib)):>9} "
            f"{bench.fmt(mib(run.hwm_during_kib)):>7} {bench.fmt(run.growth_mib):>7}  "
            f"{run.error or 'ok'}"
        )

    lines += ["", "server VmRSS (MiB) at the start and at the end of each phase"]
    for name in names:
        values = meta.get("rss_mib", {}).get(name, {})
        lines.append(f"  {name:<9} " + ", ".join(f"{k} {bench.fmt(v)}" for k, v in values.items()))
    closed = {
        name: {k: v for k, v in meta.get("connections", {}).get(name, {}).items() if any(v)}
        for name in names
    }
    lines += [
        "",
        "keep-alive connections the server closed: said so (Connection: close, no length) / "
        "found dropped when reused",
    ]
    for name in names:
        text = ", ".join(f"{k} {c}/{d}" for k, (c, d) in closed[name].items()) or "none"
        lines.append(f"  {name:<9} {text}")

    targets: list[dict[str, Any]] = []

    def target(label: str, value: float | None, ok: bool | None) -> None:
        targets.append({"target": label, "value": value, "verdict": bench.verdict(ok)})

    mp_p50 = mp_meta.p50 if mp_meta else None
    or_p50 = or_meta.p50 if or_meta else None
    target(
        f"series metadata warm p50 < {METADATA_TARGET_MS:g} ms",
        mp_p50,
        None if mp_p50 is None else mp_p50 < METADATA_TARGET_MS,
    )
    rel = or_p50 / mp_p50 if mp_p50 and or_p50 else None
    target(
        f"series metadata: orthanc p50 ÷ minipacs p50 ≥ {METADATA_TARGET_RATIO:g}",
        rel,
        None if rel is None else rel >= METADATA_TARGET_RATIO,
    )
    lines += ["", "targets:"]
    for t in targets:
        lines.append(f"  {t['target']:<48} {bench.fmt(t['value'], '.2f'):>8}  {t['verdict']}")
    problems = payload["problems"]
    lines += ["", "problems: " + ("none" if not problems else "")]
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines), targets


def collect_problems(payload: dict[str, Any], names: list[str], study_count: int) -> list[str]:
    """Count mismatches, failures, notes and log lines worth a look."""
    problems: list[str] = []
    for name, run in payload["_stow"].items():
        if run.error:
            problems.append(f"{name} STOW-RS: {run.error}")
        elif run.stored != study_count or run.failed:
            problems.append(f"{name} STOW-RS: stored {run.stored}, failed {run.failed}")
        problems += [f"{name} STOW-RS: {n}" for n in run.notes]
    for name, (cold, _warm) in payload["_metadata"].items():
        if cold.error:
            problems.append(f"{name} metadata: {cold.error}")
        problems += [f"{name} metadata: {n}" for n in cold.notes]
    for name, lat in payload["_frames"].items():
        if lat.error:
            problems.append(f"{name} frames: {lat.error}")
        problems += [
            f"{name} frames: {n}"
            for n in lat.notes
            if not n.startswith(("transfer-syntax ", "framing Content-Length", "framing chunked"))
        ]
    for spec in payload["_specs"]:
        for name, lat in payload["_qido"].get(spec.key, {}).items():
            if lat.error:
                problems.append(f"{name} QIDO {spec.label}: {lat.error}")
            elif lat.answers != spec.expected:
                problems.append(
                    f"{name} QIDO {spec.label}: {lat.answers} answers, expected {spec.expected}"
                )
            problems += [f"{name} QIDO {spec.label}: {n}" for n in lat.notes[:3]]
    for name, run in payload["_big"].items():
        if run.error:
            problems.append(f"{name} big STOW-RS: {run.error}")
        elif run.queryable != run.instances_sent:
            problems.append(
                f"{name} big STOW-RS: {run.queryable} of {run.instances_sent} instances queryable"
            )
    for name, info in payload["logs"].items():
        if info["count"]:
            problems.append(
                f"{name} log: {info['count']} warning/error line(s), e.g. "
                + " | ".join(s[:160] for s in info["sample"][:3])
            )
    return problems


def run_failed(payload: dict[str, Any]) -> bool:
    """A measurement could not be carried out (an error, not a slow or odd answer)."""
    lats: list[bench.Latency] = [c for c, _w in payload["_metadata"].values()]
    lats += list(payload["_frames"].values())
    lats += [lat for row in payload["_qido"].values() for lat in row.values()]
    return (
        any(r.error for r in payload["_stow"].values())
        or any(lat.error for lat in lats)
        or any(r.error for r in payload["_big"].values())
    )


class Phases:
    """Per phase and server: VmRSS at its end, and the connections the server closed
    (said so / found dropped) during it."""

    def __init__(self, servers: dict[str, bench.Server], clients: dict[str, bench.Client]) -> None:
        self.servers = servers
        self.clients = clients
        self.rss_mib: dict[str, dict[str, float | None]] = {n: {} for n in servers}
        self.connections: dict[str, dict[str, list[int]]] = {n: {} for n in servers}
        self._seen = {n: (c.closes, c.drops) for n, c in clients.items()}
        for name, server in servers.items():
            self.rss_mib[name]["start"] = mib(server.tree_kib("VmRSS"))

    def done(self, phase: str) -> None:
        for name, server in self.servers.items():
            self.rss_mib[name][phase] = mib(server.tree_kib("VmRSS"))
            client = self.clients[name]
            closes, drops = self._seen[name]
            self.connections[name][phase] = [client.closes - closes, client.drops - drops]
            self._seen[name] = (client.closes, client.drops)


# --------------------------------------------------------------------------- main


QUICK = {
    "count": 50,
    "background": 50,
    "stow_gb": 0.1,
    "qido_reps": 5,
    "metadata_reps": 3,
    "frame_reps": 20,
}
DEFAULTS = {
    "count": 500,
    "background": 300,
    "stow_gb": 2.0,
    "qido_reps": 20,
    "metadata_reps": 10,
    "frame_reps": 100,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run with smaller figures (below)",
    )
    sized = {
        "count": (int, "instances of the CT study"),
        "background": (int, "one-instance 64² background studies"),
        "stow_gb": (float, "size of the chunked STOW-RS in 10⁹ bytes (0: skip it)"),
        "qido_reps": (int, "timed runs per QIDO-RS query"),
        "metadata_reps": (int, "warm series /metadata runs"),
        "frame_reps": (int, "timed /frames/1 requests"),
    }
    for key, (kind, text) in sized.items():
        parser.add_argument(
            "--" + key.replace("_", "-"),
            type=kind,
            default=argparse.SUPPRESS,
            help=f"{text} (default {DEFAULTS[key]:g}, --quick {QUICK[key]:g})",
        )
    parser.add_argument("--size", type=int, default=512, help="rows = columns of the CT study")
    parser.add_argument("--batch", type=int, default=50, help="instances per STOW-RS request")
    parser.add_argument(
        "--servers", default=",".join(ALL_SERVERS), help="any of " + ",".join(ALL_SERVERS)
    )
    parser.add_argument(
        "--minipacs-args",
        default="",
        help="extra arguments for `minipacs serve`; use the = form: --minipacs-args=--no-fsync",
    )
    parser.add_argument("--seed", type=int, default=20261125, help="background random seed")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request")
    parser.add_argument(
        "--big-timeout", type=float, default=1800.0, help="socket timeout of the big STOW-RS (s)"
    )
    parser.add_argument(
        "--live-code",
        action="store_true",
        help="run minipacs from the working tree, not from a copy taken when the run begins",
    )
    bench.add_common_args(parser, startup=120.0)
    opts = parser.parse_args(argv)
    for key, value in (QUICK if opts.quick else DEFAULTS).items():
        if getattr(opts, key, None) is None:
            setattr(opts, key, value)
    names = [n.strip() for n in opts.servers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ALL_SERVERS))
    if unknown or not names:
        parser.error(f"--servers: unknown {unknown}; choose from {','.join(ALL_SERVERS)}")
    opts.servers = [n for n in ALL_SERVERS if n in names]
    if min(opts.count, opts.batch, opts.qido_reps, opts.metadata_reps, opts.frame_reps) < 1:
        parser.error("--count, --batch and the --*-reps must be ≥ 1")
    if opts.background < TOP_PATIENT_STUDIES or opts.stow_gb < 0:
        parser.error(f"--background must be ≥ {TOP_PATIENT_STUDIES}, --stow-gb ≥ 0")
    opts.code = None
    return opts


def start_servers(
    opts: argparse.Namespace, root: Path, skipped: dict[str, str]
) -> dict[str, bench.Server]:
    """Start each server on an empty folder; keep those that answer QIDO-RS on
    /dicom-web/studies (200, or 204 for no studies); stop the others with a reason."""
    servers: dict[str, bench.Server] = {}
    for name in opts.servers:
        workdir = root / name
        workdir.mkdir()
        if name == "minipacs":
            server: bench.Server = bench.Minipacs(workdir, opts)
        else:
            server = bench.Orthanc(workdir, opts, plugins=[bench.ORTHANC_DICOMWEB])
        started = time.perf_counter()
        try:
            server.start()
        except bench.BenchError as exc:
            server.stop()
            raise bench.BenchError(f"{name} did not start: {exc}") from exc
        status, text = dicomweb_status(server, opts.request_timeout)
        if status not in (200, 204):
            why = f"GET {ROOT}/studies answered {text if status else 'nothing: ' + text}"
            if name == "minipacs":
                why += " — minipacs does not serve DICOMweb (yet)"
            log.warning("%s: %s: not measured", name, why)
            skipped[name] = why
            server.stop()
            continue
        log.info(
            "%s: ready after %.1f s, HTTP %d, %s/studies answers %d",
            name,
            time.perf_counter() - started,
            server.http_port,
            ROOT,
            status,
        )
        servers[name] = server
    return servers


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    bench.setup_logging(opts.verbose)
    if "minipacs" in opts.servers and not opts.minipacs.exists():
        log.error("%s not found: create the venv (./scripts/serve does)", opts.minipacs)
        return 2
    if not bench.require(("echoscu",), hint="dcmtk"):
        return 2
    if "orthanc" in opts.servers and not bench.require(
        files=(opts.orthanc, bench.ORTHANC_DICOMWEB),
        hint="Debian packages orthanc and orthanc-dicomweb, or --servers minipacs",
    ):
        return 2

    root: Path | None = None
    servers: dict[str, bench.Server] = {}
    clients: dict[str, bench.Client] = {}
    try:
        with bench.sigterm_unwinds():
            skipped: dict[str, str] = {}
            if "orthanc" in opts.servers:
                bench.warn_other_orthancs()
            busy = bench.other_work()
            if busy:
                log.warning("other benchmarks/tests are running: %s", "; ".join(busy))
            root = Path(tempfile.mkdtemp(prefix="minipacs-dicomweb-", dir=opts.tmp))
            commit = bench.git_commit()
            if "minipacs" in opts.servers and not opts.live_code:
                bench.snapshot_code(root, opts)
            study = make_big_study(root, opts.count, opts.size)
            log.info("writing %d background studies", opts.background)
            bg = make_background(opts.background, opts.seed)
            meta: dict[str, Any] = {
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "commit": commit,
                "code": "live working tree" if opts.live_code else "snapshot at start",
                "cpus": os.cpu_count(),
                "load_avg_start": os.getloadavg(),
                "other_work_start": busy,
                "study": {
                    "count": opts.count,
                    "size": opts.size,
                    "mb": study.total_bytes / MB,
                    "study_uid": study.study,
                },
                "background": opts.background,
                "batch": opts.batch,
                "stow_gb": opts.stow_gb,
                "qido_reps": opts.qido_reps,
                "metadata_reps": opts.metadata_reps,
                "frame_reps": opts.frame_reps,
                "minipacs_args": opts.minipacs_args,
                "skipped": skipped,
            }
            if "orthanc" in opts.servers:
                meta["orthanc_version"] = bench.orthanc_version(opts.orthanc)
                meta["dicomweb_plugin"] = bench.dpkg_version("orthanc-dicomweb")

            servers = start_servers(opts, root, skipped)
            if not servers:
                raise bench.BenchError("no server to measure: " + "; ".join(skipped.values()))
            names = list(servers)
            clients = {
                n: bench.Client(s.http_port or 0, opts.request_timeout, ROOT)
                for n, s in servers.items()
            }
            phases = Phases(servers, clients)
            stow = measure_stow(clients, study, bg, opts)
            phases.done("STOW-RS")
            loaded = {n: c for n, c in clients.items() if not stow[n].error}
            log.info("series metadata: 1 + %d runs × %d server(s)", opts.metadata_reps, len(loaded))
            metadata = measure_metadata(loaded, study, opts.metadata_reps)
            phases.done("metadata")
            log.info("frames: %d runs × %d server(s)", opts.frame_reps, len(loaded))
            frames = measure_frames(loaded, study, opts.frame_reps)
            phases.done("frames")
            specs = query_specs(study, bg)
            log.info(
                "QIDO-RS: %d queries × %d runs × %d server(s)",
                len(specs),
                opts.qido_reps,
                len(loaded),
            )
            qido = measure_qido(loaded, specs, opts.qido_reps)
            phases.done("QIDO-RS")
            meta["rss_mib"], meta["connections"] = phases.rss_mib, phases.connections
            for client in clients.values():
                client.close()
            big: dict[str, BigStow] = {}
            if opts.stow_gb > 0:
                for name, server in servers.items():
                    big[name] = measure_big_stow(server, study, opts)
            meta["load_avg_end"] = os.getloadavg()
            meta["other_work_end"] = bench.other_work()
            meta["reconnects"] = {n: c.reconnects for n, c in clients.items()}
            for server in servers.values():
                server.stop()
            logs = {}
            for name, server in servers.items():
                count, sample = bench.log_issues(
                    server.log_path, bench.ORTHANC_ISSUE if name == "orthanc" else server.log_issue
                )
                logs[name] = {"count": count, "sample": sample}
            payload: dict[str, Any] = {
                "meta": meta,
                "logs": logs,
                "_stow": stow,
                "_metadata": metadata,
                "_frames": frames,
                "_qido": qido,
                "_specs": specs,
                "_big": big,
            }
            payload["problems"] = collect_problems(payload, names, opts.count)
            table, targets = report(payload, names)
            extra = []
            if meta["other_work_start"] or meta["other_work_end"]:
                extra.append(
                    "other benchmarks/tests were running: "
                    + "; ".join(dict.fromkeys(meta["other_work_start"] + meta["other_work_end"]))
                )
            extra.append(
                f"load average {meta['load_avg_start'][0]:.2f} at the start, "
                f"{meta['load_avg_end'][0]:.2f} at the end"
            )
            print(table + "\n" + "\n".join(extra))
            if opts.json:
                data = {
                    "meta": meta,
                    "stow": {n: r.as_dict() for n, r in stow.items()},
                    "metadata": {
                        n: {"cold": c.as_dict(), "warm": w.as_dict()}
                        for n, (c, w) in metadata.items()
                    },
                    "frames": {n: lat.as_dict() for n, lat in frames.items()},
                    "qido": {
                        s.key: {
                            "path": s.qido_path(),
                            "expected": s.expected,
                            **{n: lat.as_dict() for n, lat in qido[s.key].items()},
                        }
                        for s in specs
                    },
                    "big_stow": {
                        n: {**asdict(r), "growth_mib": r.growth_mib} for n, r in big.items()
                    },
                    "logs": logs,
                    "problems": payload["problems"],
                    "targets": targets,
                }
                bench.write_json(data, opts.json)
            sys.stdout.flush()
            failed = bool(skipped) or run_failed(payload)
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
        for client in clients.values():
            client.close()
        bench.PROCS.stop_all()
        for server in servers.values():
            with contextlib.suppress(Exception):
                server.stop()
        if root is not None:
            if opts.log_dir:
                opts.log_dir.mkdir(parents=True, exist_ok=True)
                for path in root.glob("*/*.log"):
                    shutil.copy2(path, opts.log_dir / f"{path.parent.name}-{path.name}")
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
