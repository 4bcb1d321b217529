#!/usr/bin/env python3
"""C-FIND and C-MOVE benchmark: minipacs against Orthanc on one corpus, then minipacs at 100k.

    .venv/bin/python scripts/bench/query.py [--studies 2000] [--grow 100000] [--json PATH]

A synthetic corpus (by default ~2,000 studies of ~1,300 patients, ~4,500 small 64×64
instances with varied names, dates and modalities, plus one 500-instance 512×512 CT study)
is imported into minipacs (`minipacs import --no-fsync`) and sent to Orthanc (storescu).
Then, with both servers up at once: C-FIND latency of five queries with dcmtk `findscu`
(whole process) and with pynetdicom on one open association (in-process), answer counts
compared between the servers and with what the generator wrote; C-MOVE of the big study
to dcmtk `storescp`; and last minipacs alone grown to `--grow` instances with more
imported studies, queried again. See scripts/bench/README.md.

Progress goes to stderr (logging); the figures table goes to stdout.
"""

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import date
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any

import _common as bench

log = logging.getLogger("bench.query")

STORESCP_AET = "STORESCP"
PY_SPY = bench.REPO / ".venv" / "bin" / "py-spy"
QUERY_YEAR = 2020  # the StudyDate range query asks for this calendar year
CORPUS_YEARS = (2010, 2025)  # corpus StudyDates, inclusive
GROWTH_YEARS = (1995, 2009)  # grown studies: outside the corpus and the queried year
DOE_SHARE = 0.2  # patients named DOE^...
MR_SHARE = 0.45  # studies with an MR series
TWO_SERIES_SHARE = 0.25  # studies with two series (two modalities)
INSTANCES_PER_SERIES = (1, 1, 2, 2, 3)  # corpus: ~2.25 instances per study
PATIENTS_PER_STUDY = 0.65  # ~1,300 patients for 2,000 studies
GROWTH_PER_SERIES = 5
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "US": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
}
SURNAMES = (  # noqa: SIM905
    "SMITH JOHNSON WILLIAMS BROWN JONES GARCIA MILLER DAVIS RODRIGUEZ MARTINEZ HERNANDEZ "
    "LOPEZ GONZALEZ WILSON ANDERSON THOMAS TAYLOR MOORE JACKSON MARTIN LEE PEREZ "
    "THOMPSON WHITE HARRIS SANCHEZ CLARK RAMIREZ LEWIS ROBINSON WALKER YOUNG ALLEN KING "
    "WRIGHT SCOTT"
).split()
GIVEN_NAMES = (  # noqa: SIM905
    "JOHN JANE JAMES MARY ROBERT PATRICIA MICHAEL JENNIFER WILLIAM LINDA DAVID ELIZABETH "
    "RICHARD BARBARA JOSEPH SUSAN THOMAS JESSICA CHARLES SARAH"
).split()
# Return keys of the study-level queries: what a study list shows. All are Orthanc
# "main DICOM tags" or computed, so Orthanc answers from its database, never its files.
STUDY_RETURN_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
STUDY_LEVEL_TARGET_MS = 100.0
MODALITIES_TARGET = 0.5  # ModalitiesInStudy p50 ≤ half of Orthanc's
PENDING_RE = re.compile(r"Find Response: \d+ \(Pending\)")
FINAL_RE = re.compile(r"Received Final Find Response \(([^)]*)\)")


# --------------------------------------------------------------------------- corpus


@dataclass
class StudyPlan:
    """One study to write: its patient, study attributes and series."""

    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_uid: str
    study_date: str
    study_time: str
    accession: str
    study_id: str
    description: str
    series: list[tuple[str, str, list[str]]]  # (SeriesInstanceUID, Modality, SOP UIDs)

    @property
    def instances(self) -> int:
        return sum(len(sops) for _, _, sops in self.series)

    @property
    def modalities(self) -> set[str]:
        return {modality for _, modality, _ in self.series}


@dataclass
class Corpus:
    """What the generator wrote, and the answers each query should get."""

    studies: int = 0
    patients: int = 0
    series: int = 0
    instances: int = 0
    bytes: int = 0
    expected: dict[str, int] = field(default_factory=dict)
    probe_patient_id: str = ""
    big_study_uid: str = ""
    big_series_uid: str = ""
    big_count: int = 0
    files: list[Path] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("files")
        return data


def _uid() -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid())


def _random_date(rng: random.Random, years: tuple[int, int]) -> str:
    first, last = date(years[0], 1, 1), date(years[1], 12, 31)
    day = first + timedelta(days=rng.randrange((last - first).days + 1))
    return day.strftime("%Y%m%d")


def _random_time(rng: random.Random) -> str:
    return f"{rng.randrange(7, 20):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}"


def _patients(rng: random.Random, count: int, prefix: str, doe_share: float) -> list[tuple]:
    """(PatientID, PatientName, BirthDate, Sex) for `count` patients."""
    out = []
    for number in range(count):
        given = rng.choice(GIVEN_NAMES)
        if rng.random() < doe_share:
            # A tenth of the DOEs in mixed case: PN matching is case-insensitive in both.
            surname = "Doe" if rng.random() < 0.1 else "DOE"
            given = given.title() if surname == "Doe" else given
        else:
            surname = rng.choice(SURNAMES)
        name = f"{surname}^{given}" + (f"^{rng.choice('ABCDEFGH')}" if rng.random() < 0.3 else "")
        birth = _random_date(rng, (1930, 2015))
        out.append((f"{prefix}{number:07d}", name, birth, rng.choice("MF")))
    return out


def plan_studies(
    rng: random.Random,
    studies: int,
    *,
    prefix: str,
    years: tuple[int, int],
    doe_share: float,
    mr_share: float,
    per_series: Callable[[], int],
    series_count: Callable[[], int],
) -> list[StudyPlan]:
    """Studies with patients, dates and modalities drawn from `rng`."""
    patients = _patients(rng, max(1, round(studies * PATIENTS_PER_STUDY)), prefix, doe_share)
    owners = list(range(len(patients))) + [
        rng.randrange(len(patients)) for _ in range(studies - len(patients))
    ]
    rng.shuffle(owners)
    others = ["CT", "CR", "US"]
    plans = []
    for number, owner in enumerate(owners[:studies]):
        patient_id, name, birth, sex = patients[owner]
        nseries = series_count()
        if rng.random() < mr_share:
            modalities = ["MR", *rng.sample(others, nseries - 1)]
        else:
            modalities = rng.sample(others, min(nseries, len(others)))
        rng.shuffle(modalities)
        series = [(_uid(), m, [_uid() for _ in range(per_series())]) for m in modalities]
        plans.append(
            StudyPlan(
                patient_id=patient_id,
                patient_name=name,
                birth_date=birth,
                sex=sex,
                study_uid=_uid(),
                study_date=_random_date(rng, years),
                study_time=_random_time(rng),
                accession=f"{prefix}{number:09d}"[:16],
                study_id=str(number % 100000),
                description="/".join(sorted(set(modalities))) + " synthetic study",
                series=series,
            )
        )
    return plans


def _template(size: int):
    """CT_small.dcm resampled to size×size, private tags and padding removed."""
    import numpy as np
    from pydicom import dcmread
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    pixels = ds.pixel_array
    index = np.arange(size) * pixels.shape[0] // size
    pixels = pixels[np.ix_(index, index * pixels.shape[1] // pixels.shape[0])]
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.Rows, ds.Columns = pixels.shape
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.remove_private_tags()
    for keyword in ("DataSetTrailingPadding", "OtherPatientIDsSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.ReferringPhysicianName = "REFERRER^ANNA"
    ds.SpecificCharacterSet = "ISO_IR 100"
    return ds


def write_studies(job: tuple[Path, list[StudyPlan], int]) -> tuple[int, int]:
    """Write the instances of `plans` into `out` (one file each); (files, bytes)."""
    out, plans, size = job
    out.mkdir(parents=True, exist_ok=True)
    ds = _template(size)
    files = written = 0
    for plan in plans:
        ds.PatientID = plan.patient_id
        ds.PatientName = plan.patient_name
        ds.PatientBirthDate = plan.birth_date
        ds.PatientSex = plan.sex
        ds.StudyInstanceUID = plan.study_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = plan.study_date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = plan.study_time
        ds.AccessionNumber = plan.accession
        ds.StudyID = plan.study_id
        ds.StudyDescription = plan.description
        for series_number, (series_uid, modality, sops) in enumerate(plan.series, 1):
            ds.SeriesInstanceUID = series_uid
            ds.Modality = modality
            ds.SeriesNumber = series_number
            ds.SeriesDescription = f"{modality} series {series_number}"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
            ds.FrameOfReferenceUID = series_uid + ".1" if len(series_uid) < 62 else series_uid
            for number, sop_uid in enumerate(sops, 1):
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
                ds.InstanceNumber = number
                ds.ImagePositionPatient = [0, 0, number]
                ds.SliceLocation = number
                path = out / f"{sop_uid}.dcm"
                ds.save_as(path, enforce_file_format=True)
                files += 1
                written += path.stat().st_size
    return files, written


def write_parallel(
    out: Path, plans: list[StudyPlan], size: int, processes: int, per_folder: int = 2000
) -> tuple[int, int]:
    """Write the studies into folders of about `per_folder` files with `processes` workers."""
    jobs: list[tuple[Path, list[StudyPlan], int]] = []
    batch: list[StudyPlan] = []
    in_batch = 0
    for plan in plans:
        batch.append(plan)
        in_batch += plan.instances
        if in_batch >= per_folder:
            jobs.append((out / f"part{len(jobs):04d}", batch, size))
            batch, in_batch = [], 0
    if batch:
        jobs.append((out / f"part{len(jobs):04d}", batch, size))
    if processes <= 1 or len(jobs) == 1:
        results = [write_studies(job) for job in jobs]
    else:
        # spawn: a fresh interpreter, not a fork of one holding sockets and threads.
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            results = pool.map(write_studies, jobs)
    return sum(r[0] for r in results), sum(r[1] for r in results)


def make_corpus(root: Path, opts: argparse.Namespace) -> Corpus:
    """The small-image corpus and the big CT study; the answers each query should get."""
    rng = random.Random(opts.seed)
    plans = plan_studies(
        rng,
        opts.studies,
        prefix="P",
        years=CORPUS_YEARS,
        doe_share=DOE_SHARE,
        mr_share=MR_SHARE,
        per_series=lambda: rng.choice(INSTANCES_PER_SERIES),
        series_count=lambda: 2 if rng.random() < TWO_SERIES_SHARE else 1,
    )
    started = time.perf_counter()
    files, written = write_parallel(root / "corpus", plans, opts.size, opts.processes)
    sys.path.insert(0, str(bench.SCRIPTS))
    from make_study import make_study

    big = make_study(root / "big", opts.big_count, opts.big_size)
    log.info(
        "corpus: %d small files and the %d-instance %d×%d study written in %.1f s",
        files,
        len(big),
        opts.big_size,
        opts.big_size,
        time.perf_counter() - started,
    )
    from pydicom import dcmread

    head = dcmread(big[0], stop_before_pixels=True)
    corpus = Corpus(
        studies=len(plans) + 1,
        patients=len({p.patient_id for p in plans} | {str(head.PatientID)}),
        series=sum(len(p.series) for p in plans) + 1,
        instances=files + len(big),
        bytes=written + sum(path.stat().st_size for path in big),
        big_study_uid=str(head.StudyInstanceUID),
        big_series_uid=str(head.SeriesInstanceUID),
        big_count=len(big),
        files=sorted((root / "corpus").rglob("*.dcm")) + big,
    )
    # The probe patient: the one with most studies (the PatientID query's answers).
    per_patient: dict[str, int] = {}
    for plan in plans:
        per_patient[plan.patient_id] = per_patient.get(plan.patient_id, 0) + 1
    corpus.probe_patient_id = max(per_patient, key=lambda k: (per_patient[k], k))
    lo, hi = f"{QUERY_YEAR}0101", f"{QUERY_YEAR}1231"
    every = [*plans]
    big_date, big_name = str(head.StudyDate), str(head.PatientName)
    corpus.expected = {
        "patient_id": per_patient[corpus.probe_patient_id],
        "name_doe": sum(p.patient_name.upper().startswith("DOE") for p in every)
        + big_name.upper().startswith("DOE"),
        "date_year": sum(lo <= p.study_date <= hi for p in every) + (lo <= big_date <= hi),
        "modality_mr": sum("MR" in p.modalities for p in every) + (str(head.Modality) == "MR"),
        "image_level": len(big),
    }
    return corpus


def grow_plans(rng: random.Random, instances: int, series_max: int = 3) -> list[StudyPlan]:
    """Studies of GROWTH_PER_SERIES-instance series adding up to about `instances`: no
    DOE patients, no MR, dates before the corpus, so the measured queries' answers stay
    the same and the archive around them grows."""
    mean = GROWTH_PER_SERIES * (1 + series_max) / 2
    count = max(1, round(instances / mean))
    plans = plan_studies(
        rng,
        count,
        prefix="G",
        years=GROWTH_YEARS,
        doe_share=0.0,
        mr_share=0.0,
        per_series=lambda: GROWTH_PER_SERIES,
        series_count=lambda: rng.randint(1, series_max),
    )
    # Trim or pad the last study so the total is exact.
    total = sum(p.instances for p in plans)
    while total > instances and plans:
        last = plans[-1]
        sops = last.series[-1][2]
        cut = min(total - instances, len(sops))
        del sops[len(sops) - cut :]
        if not sops:
            last.series.pop()
        if not last.series:
            plans.pop()
        total -= cut
    if total < instances:
        plans[-1].series[-1][2].extend(_uid() for _ in range(instances - total))
    return plans


# --------------------------------------------------------------------------- queries


def query_specs(corpus: Corpus) -> list[bench.QuerySpec]:
    def study(**match: str) -> tuple[tuple[str, str], ...]:
        return tuple((k, match.get(k, "")) for k in STUDY_RETURN_KEYS)

    return [
        bench.QuerySpec(
            "patient_id", "PatientID exact", "STUDY", study(PatientID=corpus.probe_patient_id)
        ),
        bench.QuerySpec("name_doe", "PatientName DOE*", "STUDY", study(PatientName="DOE*")),
        bench.QuerySpec(
            "date_year",
            f"StudyDate {QUERY_YEAR}",
            "STUDY",
            study(StudyDate=f"{QUERY_YEAR}0101-{QUERY_YEAR}1231"),
        ),
        bench.QuerySpec(
            "modality_mr", "ModalitiesInStudy=MR", "STUDY", study(ModalitiesInStudy="MR")
        ),
        bench.QuerySpec(
            "image_level",
            f"IMAGE, {corpus.big_count}-inst series",
            "IMAGE",
            (
                ("StudyInstanceUID", corpus.big_study_uid),
                ("SeriesInstanceUID", corpus.big_series_uid),
                ("SOPInstanceUID", ""),
            ),
        ),
    ]


def findscu_command(server: bench.Server, spec: bench.QuerySpec, quiet: bool) -> list[str]:
    cmd = ["findscu", "-S", "-aet", bench.CALLING_AET, "-aec", server.aet, "-to", "60"]
    cmd.append("-q" if quiet else "-v")
    cmd += [bench.HOST, str(server.port), "-k", f"QueryRetrieveLevel={spec.level}"]
    for keyword, value in spec.keys:
        cmd += ["-k", f"{keyword}={value}" if value else keyword]
    return cmd


def findscu_count(server: bench.Server, spec: bench.QuerySpec, timeout: float) -> int:
    """Answers of one findscu run (verbose, output parsed); raise unless it ends Success."""
    result = subprocess.run(
        findscu_command(server, spec, quiet=False),
        env=bench.base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    final = FINAL_RE.search(result.stdout)
    if result.returncode != 0 or final is None or final.group(1) != "Success":
        raise bench.BenchError(
            f"findscu {spec.label} on {server.name}: exit {result.returncode}, final "
            f"{final.group(1) if final else 'none'}:\n" + "\n".join(result.stdout.splitlines()[-8:])
        )
    return len(PENDING_RE.findall(result.stdout))


def findscu_time(server: bench.Server, spec: bench.QuerySpec, timeout: float) -> float:
    """Seconds from starting a quiet findscu to its exit (answers not printed)."""
    cmd = findscu_command(server, spec, quiet=True)
    started = time.perf_counter()
    result = subprocess.run(
        cmd, env=bench.base_env(), capture_output=True, timeout=timeout, check=False
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or result.stdout.strip() or result.stderr.strip():
        raise bench.BenchError(
            f"findscu {spec.label} on {server.name}: exit {result.returncode}: "
            f"{(result.stdout + result.stderr)[-500:]!r}"
        )
    return elapsed


class FindClient:
    """pynetdicom C-FIND SCU on one association kept open (TCP_NODELAY on its socket)."""

    def __init__(self, server: bench.Server) -> None:
        import socket

        from pynetdicom import AE
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        self.model = StudyRootQueryRetrieveInformationModelFind
        self.server = server
        ae = AE(ae_title=bench.CALLING_AET)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(self.model)
        self.assoc = ae.associate(bench.HOST, server.port, ae_title=server.aet)
        if not self.assoc.is_established:
            raise bench.BenchError(f"{server.name}: pynetdicom association refused or failed")
        raw = self.assoc.dul.socket.socket
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def run(self, spec: bench.QuerySpec, collect: dict[str, dict[str, str]] | None = None):
        """(seconds, answers) of one C-FIND; raises unless it ends Success. With `collect`,
        each answer's return keys go into it, under its unique key's value."""
        from pydicom.dataset import Dataset

        ds = Dataset()
        ds.QueryRetrieveLevel = spec.level
        for keyword, value in spec.keys:
            setattr(ds, keyword, value)
        answers, final = 0, None
        started = time.perf_counter()
        for status, identifier in self.assoc.send_c_find(ds, self.model):
            code = int(status.Status) if status is not None and "Status" in status else None
            if code in (0xFF00, 0xFF01):
                answers += 1
                if collect is not None and identifier is not None:
                    unique = "SOPInstanceUID" if spec.level == "IMAGE" else "StudyInstanceUID"
                    collect[_text(identifier, unique)] = {
                        keyword: _text(identifier, keyword) for keyword, value in spec.keys
                    }
            else:
                final = code
        elapsed = time.perf_counter() - started
        if final != 0x0000:
            raise bench.BenchError(
                f"pynetdicom C-FIND {spec.label} on {self.server.name}: final status "
                f"{'none (association lost?)' if final is None else f'0x{final:04X}'}"
            )
        return elapsed, answers

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.assoc.release()


def _text(ds: Any, keyword: str) -> str:
    """A returned value as comparable text: trimmed, multiple values sorted, '' if absent."""
    value = ds.get(keyword)
    if value is None or value == "":
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(sorted(str(v).strip() for v in value))
    return str(value).strip()


def compare_answers(
    label: str, name_a: str, a: dict[str, dict[str, str]], name_b: str, b: dict[str, dict[str, str]]
) -> list[str]:
    """Differences between two servers' answers to one query: entities only one returned,
    and return-key values that differ (per keyword: how many, and one example)."""
    out = []
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        out.append(
            f"{label}: {len(only_a)} entities only from {name_a}, {len(only_b)} only from "
            f"{name_b} (e.g. {(only_a or only_b)[0]})"
        )
    differing: dict[str, list[tuple[str, str, str]]] = {}
    for unique in sorted(set(a) & set(b)):
        for keyword, value in a[unique].items():
            other = b[unique].get(keyword, "")
            if value != other:
                differing.setdefault(keyword, []).append((unique, value, other))
    for keyword, cases in sorted(differing.items()):
        unique, value, other = cases[0]
        out.append(
            f"{label}: {keyword} differs in {len(cases)} of {len(set(a) & set(b))} answers, "
            f"e.g. {name_a} {value!r} vs {name_b} {other!r}"
        )
    return out


# results[query key][server name][client] where client is "findscu" or "pynetdicom"
Results = dict[str, dict[str, dict[str, bench.Latency]]]


def settle(idle: float = 0.9, window: float = 1.0, limit: float = 60.0) -> None:
    """Flush what loading left dirty and wait until the CPUs are idle for a whole `window`
    (or `limit` passes): the first runs of the first query measured the writeback of a few
    hundred megabytes and the servers' post-load work (~45 ms instead of ~30 for both)."""
    os.sync()
    deadline = time.monotonic() + limit

    def ticks() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3]  # all ticks, idle ticks (cpu line of proc(5))

    while time.monotonic() < deadline:
        total0, idle0 = ticks()
        time.sleep(window)
        total1, idle1 = ticks()
        if total1 > total0 and (idle1 - idle0) / (total1 - total0) >= idle:
            return
    log.warning("the machine did not settle within %.0f s; measuring anyway", limit)


def measure_queries(
    servers: list[bench.Server],
    specs: list[bench.QuerySpec],
    opts: argparse.Namespace,
    contents: dict[str, dict[str, dict[str, dict[str, str]]]] | None = None,
) -> Results:
    """Each query `opts.reps` times per server and client, servers interleaved run by run
    (so that background load hits both alike), after one counting run that warms up."""
    results: Results = {
        s.key: {
            srv.name: {"findscu": bench.Latency(), "pynetdicom": bench.Latency()} for srv in servers
        }
        for s in specs
    }
    clients: dict[str, FindClient] = {}
    try:
        for server in servers:
            try:
                clients[server.name] = FindClient(server)
            except Exception as exc:
                log.error("%s: no pynetdicom association: %s", server.name, exc)
        for spec in specs:
            for server in servers:
                cell = results[spec.key][server.name]
                try:
                    cell["findscu"].answers = findscu_count(server, spec, opts.query_timeout)
                except (bench.BenchError, subprocess.TimeoutExpired) as exc:
                    cell["findscu"].error = str(exc)
                    log.error("%s", exc)
                if server.name in clients:
                    try:
                        collected: dict[str, dict[str, str]] = {}
                        client = clients[server.name]
                        cell["pynetdicom"].answers = client.run(spec, collected)[1]
                        if contents is not None:
                            contents.setdefault(spec.key, {})[server.name] = collected
                    except Exception as exc:
                        cell["pynetdicom"].error = str(exc)
                        log.error("%s", exc)
            for _rep in range(opts.reps):
                for server in servers:
                    cell = results[spec.key][server.name]
                    if cell["findscu"].error is None:
                        try:
                            cell["findscu"].runs_ms.append(
                                1000 * findscu_time(server, spec, opts.query_timeout)
                            )
                        except (bench.BenchError, subprocess.TimeoutExpired) as exc:
                            cell["findscu"].error = str(exc)
                            log.error("%s", exc)
                    if server.name in clients and cell["pynetdicom"].error is None:
                        try:
                            seconds, answers = clients[server.name].run(spec)
                            cell["pynetdicom"].runs_ms.append(1000 * seconds)
                            if answers != cell["pynetdicom"].answers:
                                raise bench.BenchError(
                                    f"{spec.label} on {server.name}: {answers} answers, "
                                    f"first run had {cell['pynetdicom'].answers}"
                                )
                        except Exception as exc:
                            cell["pynetdicom"].error = str(exc)
                            log.error("%s", exc)
            log.info(
                "%-28s %s",
                spec.label,
                "  ".join(
                    f"{srv.name}: {results[spec.key][srv.name]['findscu'].answers} answers, "
                    f"findscu p50 {bench.fmt(results[spec.key][srv.name]['findscu'].p50)} ms, "
                    f"in-process p50 {bench.fmt(results[spec.key][srv.name]['pynetdicom'].p50)} ms"
                    for srv in servers
                ),
            )
    finally:
        for client in clients.values():
            client.close()
    return results


# The query engine alone: storage.query.find in a separate process (the project's venv),
# on the archive's index opened read-only, answers consumed as DICOM JSON. Same keys as the
# DICOM queries; no network, no pynetdicom, no Dataset.from_json.
ENGINE_SNIPPET = """
import json, sys, time
from peewee import SqliteDatabase
from pydicom.dataset import Dataset
from storage import query
from storage.models import db
job = json.load(sys.stdin)
db.initialize(SqliteDatabase("file:" + job["index"] + "?mode=ro", uri=True,
                             pragmas={"cache_size": -16000}))
out = {}
with db.connection_context():
    for key, level, pairs in job["specs"]:
        ds = Dataset()
        ds.QueryRetrieveLevel = level
        for keyword, value in pairs:
            setattr(ds, keyword, value)
        keys = query.keys_from_dataset(ds)
        options = query.Options(retrieve_aet="MINIPACS")
        runs, answers = [], None
        for _ in range(job["reps"] + 1):
            started = time.perf_counter()
            count = sum(1 for _ in query.find(level, keys, "STUDY", options))
            runs.append(1000 * (time.perf_counter() - started))
            answers = count
        out[key] = {"answers": answers, "runs_ms": runs[1:]}
json.dump(out, sys.stdout)
"""


def measure_engine(
    opts: argparse.Namespace, data: Path, specs: list[bench.QuerySpec]
) -> dict[str, bench.Latency] | None:
    """p50 of storage.query.find per query (after one warm-up run); None when the project's
    query API cannot be called this way (it is internal, and may change)."""
    python = opts.minipacs.parent / "python"
    job = {
        "index": str(data / "index.sqlite"),
        "reps": opts.reps,
        "specs": [[s.key, s.level, [list(k) for k in s.keys]] for s in specs],
    }
    try:
        result = subprocess.run(
            [str(python), "-c", ENGINE_SNIPPET],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            cwd=opts.code or bench.REPO,
            env=bench.minipacs_env(opts),
            timeout=opts.query_timeout * len(specs),
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.warning("query engine measurement timed out: skipped")
        return None
    if result.returncode != 0:
        log.warning("query engine measurement failed (skipped):\n%s", result.stderr[-1500:])
        return None
    out = {}
    for key, value in json.loads(result.stdout).items():
        out[key] = bench.Latency(answers=value["answers"], runs_ms=value["runs_ms"])
    log.info("engine p50 ms: %s", {k: (v.answers, round(v.p50 or 0, 2)) for k, v in out.items()})
    return out


# --------------------------------------------------------------------------- C-MOVE


@dataclass
class MoveResult:
    server: str
    count: int
    runs_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def p50_s(self) -> float | None:
        return statistics.median(self.runs_s) if self.runs_s else None

    @property
    def inst_per_s(self) -> float | None:
        return self.count / self.p50_s if self.p50_s else None

    @property
    def best_inst_per_s(self) -> float | None:
        return self.count / min(self.runs_s) if self.runs_s else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            p50_s=self.p50_s, inst_per_s=self.inst_per_s, best_inst_per_s=self.best_inst_per_s
        )
        return data


def clear_folder(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def measure_moves(
    servers: list[bench.Server], storescp: bench.StoreScp, corpus: Corpus, opts: argparse.Namespace
) -> list[MoveResult]:
    """movescu of the big study to storescp, `opts.move_reps` times per server, interleaved;
    each run must leave every instance in storescp's folder."""
    results = {srv.name: MoveResult(srv.name, corpus.big_count) for srv in servers}
    for rep in range(opts.move_reps):
        for server in servers:
            result = results[server.name]
            if result.error is not None:
                continue
            clear_folder(storescp.out)
            cmd = [
                "movescu",
                "-S",
                "-aet",
                bench.CALLING_AET,
                "-aec",
                server.aet,
                "-aem",
                STORESCP_AET,
            ]
            cmd += ["-to", "60", "-k", "QueryRetrieveLevel=STUDY"]
            cmd += ["-k", f"StudyInstanceUID={corpus.big_study_uid}", bench.HOST, str(server.port)]
            started = time.perf_counter()
            try:
                done = subprocess.run(
                    cmd,
                    env=bench.base_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    errors="replace",
                    timeout=opts.move_timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                result.error = f"movescu did not finish within {opts.move_timeout:.0f} s"
                log.error("%s: %s", server.name, result.error)
                continue
            elapsed = time.perf_counter() - started
            received = bench.count_files(storescp.out)
            if done.returncode != 0 or received != corpus.big_count:
                result.error = (
                    f"movescu exit {done.returncode}, {received} of {corpus.big_count} "
                    f"instances at storescp: {done.stdout[-400:]!r}"
                )
                log.error("%s C-MOVE: %s", server.name, result.error)
                continue
            result.runs_s.append(elapsed)
            log.info(
                "C-MOVE %d/%d from %s: %.2f s, %.1f inst/s",
                rep + 1,
                opts.move_reps,
                server.name,
                elapsed,
                corpus.big_count / elapsed,
            )
    clear_folder(storescp.out)
    return list(results.values())


# --------------------------------------------------------------------------- servers


def index_counts(data: Path) -> dict[str, int]:
    """Rows per table of a minipacs index, read-only."""
    db = sqlite3.connect(f"file:{data / 'index.sqlite'}?mode=ro", uri=True, timeout=10.0)
    try:
        return {
            table: int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
            for table in ("patient", "study", "series", "instance")
        }
    finally:
        db.close()


def wait_orthanc_count(server: bench.Orthanc, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = server.count_queryable()
        if seen >= count:
            return
        server.check_alive()
        time.sleep(0.05)
    raise bench.BenchError(f"orthanc holds {seen} of {count} instances after {timeout:.0f} s")


# --------------------------------------------------------------------------- profiling


@contextlib.contextmanager
def profiled(server: bench.Server, out: Path | None, phase: str) -> Iterator[None]:
    """py-spy (raw collapsed stacks, non-idle threads, non-blocking) on the server while
    the block runs, when `out` is set; a summary of the hottest frames goes to the log."""
    if out is None or server.proc is None or not server.alive():
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{server.name}-{phase}.txt"
    log_path = out / f"{server.name}-{phase}.py-spy.log"
    cmd = [str(PY_SPY), "record", "--pid", str(server.proc.pid), "--format", "raw"]
    cmd += ["--nonblocking", "--rate", "200", "--output", str(path)]
    with log_path.open("wb") as out_file:
        spy = bench.PROCS.start(cmd, env=bench.base_env(), out=out_file)
        time.sleep(1.0)  # attach before the measured work starts
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(timeout=30)
            bench.PROCS.stop(spy, grace=5.0)
    if path.exists():
        log.info("py-spy %s %s: %s\n%s", server.name, phase, path, summarize_profile(path))
    else:
        log.warning("py-spy wrote nothing:\n%s", bench.tail(log_path))


def summarize_profile(path: Path, top: int = 25) -> str:
    """The frames with most samples on their stack (inclusive), from py-spy raw output."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples; inclusive:"]
    for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    lines.append("  self:")
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:15]:
        lines.append(f"  {100 * count / total:5.1f}%  {frame}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- report


def _pp(lat: bench.Latency | None) -> str:
    """'p50/p95' of a latency cell."""
    if lat is None or not lat.runs_ms:
        return "ERR" if lat is not None and lat.error else "-"
    return f"{lat.p50:.1f}/{lat.p95:.1f}"


def _answers(lat: bench.Latency | None) -> str:
    return "-" if lat is None or lat.answers is None else str(lat.answers)


def find_table(
    results: Results,
    specs: list[bench.QuerySpec],
    names: list[str],
    expected: dict[str, int],
    engine: dict[str, bench.Latency] | None,
) -> list[str]:
    """One row per query: answers per server and the corpus, p50/p95 per client and server."""
    two = len(names) == 2
    width = 15
    head = f"  {'query':<27} " + " ".join(f"{n[:8]:>8}" for n in names) + f" {'corpus':>7} |"
    for _client in ("findscu", "pynetdicom"):
        head += " " + " ".join(f"{n:>{width}}" for n in names) + (f" {'ratio':>5}" if two else "")
        head += " |"
    head += f" {'engine':>7}"
    group = f"  {'':<27} " + f"{'answers':^{9 * len(names) + 7}} |"
    span = (width + 1) * len(names) + (6 if two else 0)
    group += (
        f" {'findscu process':^{span - 1}} | {'pynetdicom, one assoc.':^{span - 1}} | {'p50':>7}"
    )
    lines = [group, head]
    for spec in specs:
        cells = results[spec.key]
        row = f"  {spec.label:<27} "
        row += " ".join(f"{_answers(cells[n]['findscu']):>8}" for n in names)
        row += f" {expected.get(spec.key, 0):>7} |"
        for client in ("findscu", "pynetdicom"):
            row += " " + " ".join(f"{_pp(cells[n][client]):>{width}}" for n in names)
            if two:
                value = bench.ratio(cells[names[0]][client].p50, cells[names[1]][client].p50)
                row += f" {bench.fmt(value, '.2f'):>5}"
            row += " |"
        lat = engine.get(spec.key) if engine else None
        row += f" {bench.fmt(lat.p50 if lat else None, '.1f'):>7}"
        counts = {c.answers for n in names for c in cells[n].values()}
        if lat is not None and lat.answers is not None:
            counts.add(lat.answers)
        if counts != {expected.get(spec.key)}:
            row += "  ≠ MISMATCH"
        lines.append(row)
    return lines


def check_counts(
    results: Results,
    specs: list[bench.QuerySpec],
    expected: dict[str, int],
    engine: dict[str, bench.Latency] | None = None,
) -> list[str]:
    """Every answer count that differs from what the corpus holds, and every failure."""
    out = []
    for spec in specs:
        cells = {(srv, c): lat for srv, d in results[spec.key].items() for c, lat in d.items()}
        if engine and spec.key in engine:
            cells[("minipacs", "engine")] = engine[spec.key]
        for (server, client), lat in cells.items():
            if lat.error:
                out.append(f"{spec.label}: {server} ({client}) failed: {lat.error.splitlines()[0]}")
            elif lat.answers != expected[spec.key]:
                out.append(
                    f"{spec.label}: {server} ({client}) {lat.answers} answers, "
                    f"the corpus has {expected[spec.key]}"
                )
    return out


def evaluate_targets(
    specs: list[bench.QuerySpec],
    base: Results,
    moves: list[MoveResult],
    grown: Results | None,
    grown_instances: int | None,
) -> list[dict[str, Any]]:
    """The targets: value on findscu (the verdict) and on the in-process client (shown)."""
    targets: list[dict[str, Any]] = []

    def p50(results: Results | None, key: str, server: str, client: str) -> float | None:
        if results is None or server not in results.get(key, {}):
            return None
        return results[key][server][client].p50

    def add(label: str, value: float | None, other: float | None, goal: float, higher: bool):
        targets.append(
            {
                "target": label,
                "value": value,
                "verdict": bench.verdict(value, goal, higher),
                "in_process_value": other,
                "in_process_verdict": bench.verdict(other, goal, higher)
                if other is not None
                else None,
                "goal": goal,
            }
        )

    for spec in specs:
        goal = MODALITIES_TARGET if spec.key == "modality_mr" else 1.0
        values = [
            bench.ratio(p50(base, spec.key, "minipacs", c), p50(base, spec.key, "orthanc", c))
            for c in ("findscu", "pynetdicom")
        ]
        add(f"{spec.label}: p50 ≤ {goal:.1f} × orthanc's", *values, goal, False)
    by = {m.server: m for m in moves}
    add(
        "C-MOVE inst/s ≥ 1.0 × orthanc's",
        bench.ratio(
            by["minipacs"].inst_per_s if "minipacs" in by else None,
            by["orthanc"].inst_per_s if "orthanc" in by else None,
        ),
        None,
        1.0,
        True,
    )
    if grown is not None:
        for spec in specs:
            if spec.level == "STUDY":
                add(
                    f"at {grown_instances or 0:,}: {spec.label} p50 < "
                    f"{STUDY_LEVEL_TARGET_MS:.0f} ms",
                    p50(grown, spec.key, "minipacs", "findscu"),
                    p50(grown, spec.key, "minipacs", "pynetdicom"),
                    STUDY_LEVEL_TARGET_MS,
                    False,
                )
    return targets


def report(
    payload: dict[str, Any],
    specs: list[bench.QuerySpec],
    base: Results,
    moves: list[MoveResult],
    grown: Results | None,
    engines: dict[str, dict[str, bench.Latency] | None],
) -> tuple[str, list[dict[str, Any]]]:
    meta, corpus = payload["meta"], payload["corpus"]
    names = meta["servers"]
    expected = corpus["expected"]
    lines = [
        f"C-FIND / C-MOVE, {' vs '.join(names)}"
        + (f" ({meta['orthanc_version']})" if "orthanc_version" in meta else "")
        + f", {meta['date']}, minipacs {meta.get('commit', '?')}, 127.0.0.1, TCP_NODELAY=1, "
        f"{meta['cpus']} CPUs",
        f"corpus: {corpus['studies']:,} studies, {corpus['patients']:,} patients, "
        f"{corpus['series']:,} series, {corpus['instances']:,} instances "
        f"({corpus['instances'] - corpus['big_count']:,} × {meta['size']}² in varied studies "
        f"+ one {corpus['big_count']} × {meta['big_size']}² CT study; "
        f"{corpus['bytes'] / 1e6:.0f} MB)",
        "loaded: " + ", ".join(f"{k} {v:.1f} s" for k, v in payload["load_s"].items()),
        "load average (1 min) at start / end: "
        f"{meta['load_avg_start'][0]:.2f} / {meta.get('load_avg_end', [float('nan')])[0]:.2f}",
        "",
        f"C-FIND, ms, p50/p95 of {meta['reps']} runs per query, client and server (servers "
        "interleaved run by run); ratio = minipacs p50 ÷ orthanc p50",
        "findscu: the whole `findscu -S -q` process, start to exit (association included);",
        "pynetdicom: send_c_find on one association opened beforehand, in this process;",
        "engine: minipacs' storage.query.find alone, answers as DICOM JSON, no DICOM network",
    ]
    lines += find_table(base, specs, names, expected, engines.get("base"))
    lines += [
        "",
        f"C-MOVE of the {corpus['big_count']}-instance study to storescp (movescu start to exit,"
        f" {meta['move_reps']} runs per server, interleaved)",
        f"  {'server':<10} {'inst/s p50':>10} {'best':>7} {'s p50':>6}  status",
    ]
    for move in moves:
        status = "ok" if move.error is None else "FAILED: " + move.error.splitlines()[0][:70]
        lines.append(
            f"  {move.server:<10} {bench.fmt(move.inst_per_s):>10} "
            f"{bench.fmt(move.best_inst_per_s):>7} {bench.fmt(move.p50_s, '.2f'):>6}  {status}"
        )
    growth = payload.get("growth")
    if grown is not None and growth:
        counts = growth["counts"]
        lines += [
            "",
            f"minipacs grown to {counts['instance']:,} instances, {counts['study']:,} studies, "
            f"{counts['patient']:,} patients: +{growth['added']:,} instances "
            f"({growth['size']}² images, {GROWTH_PER_SERIES} per series, no DOE, no MR, "
            f"{GROWTH_YEARS[0]}–{GROWTH_YEARS[1]})",
            f"  written in {growth['write_s']:.0f} s; `minipacs import --no-fsync` × "
            f"{growth['import_processes']} in {growth['import_s']:.0f} s "
            f"({growth['added'] / growth['import_s']:.0f} inst/s); serve start-up "
            f"{growth['startup_s']:.1f} s",
        ]
        lines += find_table(grown, specs, ["minipacs"], expected, engines.get("grown"))

    targets = evaluate_targets(
        specs, base, moves, grown, growth["counts"]["instance"] if growth else None
    )
    lines += ["", "targets (verdict on findscu / movescu; [pynetdicom in-process])"]
    for t in targets:
        spec_fmt = ".1f" if "ms" in t["target"] else ".2f"
        line = f"  {t['target']:<50} {bench.fmt(t['value'], spec_fmt):>7}  {t['verdict']:<4}"
        if t["in_process_value"] is not None:
            line += f"   [{bench.fmt(t['in_process_value'], spec_fmt)} {t['in_process_verdict']}]"
        lines.append(line)
    problems = payload.get("problems", [])
    lines += ["", "problems:" if problems else "problems: none (answer counts agree, logs clean)"]
    lines += [f"  {p}" for p in problems]
    return "\n".join(lines), targets


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--studies", type=int, default=2000, help="small-image studies")
    parser.add_argument("--size", type=int, default=64, help="rows = columns of those images")
    parser.add_argument("--big-count", type=int, default=500, help="instances of the CT study")
    parser.add_argument("--big-size", type=int, default=512, help="rows = columns of the CT")
    parser.add_argument(
        "--grow",
        type=int,
        default=100_000,
        help="grow minipacs to this many instances and query again (0: skip)",
    )
    parser.add_argument("--grow-size", type=int, default=8, help="rows = columns, grown images")
    parser.add_argument(
        "--import-processes", type=int, default=2, help="`minipacs import` processes for growth"
    )
    parser.add_argument(
        "--processes", type=int, default=2, help="processes writing the synthetic files"
    )
    parser.add_argument("--reps", type=int, default=20, help="timed runs per query and client")
    parser.add_argument("--move-reps", type=int, default=3, help="C-MOVE runs per server")
    parser.add_argument("--load-parallel", type=int, default=4, help="storescu to Orthanc")
    parser.add_argument("--seed", type=int, default=20261125, help="corpus random seed")
    parser.add_argument("--no-orthanc", action="store_true", help="measure minipacs alone")
    parser.add_argument(
        "--minipacs-args",
        default="",
        help="extra arguments for `minipacs serve`; use the = form: --minipacs-args=--workers=2",
    )
    parser.add_argument(
        "--storescp-args", default="+B +xa", help="storescp options besides --fork, -aet, -od"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="record minipacs with py-spy into this folder during each phase (perturbs the "
        "figures: not for the recorded run)",
    )
    parser.add_argument("--query-timeout", type=float, default=120.0, help="seconds per query")
    parser.add_argument("--move-timeout", type=float, default=300.0, help="seconds per C-MOVE")
    parser.add_argument(
        "--import-timeout", type=float, default=1800.0, help="seconds per import step"
    )
    parser.add_argument(
        "--live-code",
        action="store_true",
        help="run minipacs from the working tree as it is at each start, not from a copy "
        "taken when the run begins",
    )
    bench.add_common_args(parser, startup=600.0)
    opts = parser.parse_args(argv)
    opts.code = None
    if opts.studies < 2 or opts.big_count < 1 or opts.reps < 1 or opts.move_reps < 1:
        parser.error("--studies must be ≥ 2, --big-count, --reps and --move-reps ≥ 1")
    return opts


def grow(opts: argparse.Namespace, root: Path, data: Path) -> dict[str, Any]:
    """Import synthetic studies until the archive holds `opts.grow` instances."""
    have = index_counts(data)["instance"]
    need = opts.grow - have
    plans = grow_plans(random.Random(opts.seed + 1), need)
    folder = root / "growth"
    started = time.perf_counter()
    files, written = write_parallel(folder, plans, opts.grow_size, opts.processes, 5000)
    write_s = time.perf_counter() - started
    log.info(
        "growth: %d files (%.0f MB, %d studies) written in %.1f s; importing with %d process(es)",
        files,
        written / 1e6,
        len(plans),
        write_s,
        opts.import_processes,
    )
    import_s = bench.minipacs_import(
        opts, data, sorted(folder.iterdir()), root / "logs" / "import-growth.log",
        opts.import_processes, opts.import_timeout,
    )  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    counts = index_counts(data)
    log.info(
        "growth: %d instances imported in %.1f s (%.0f inst/s); archive now %s",
        files,
        import_s,
        files / import_s,
        counts,
    )
    return {
        "added": files,
        "added_bytes": written,
        "added_studies": len(plans),
        "size": opts.grow_size,
        "write_s": write_s,
        "import_s": import_s,
        "import_processes": opts.import_processes,
        "counts": counts,
    }


def start_timed(server: bench.Server) -> float:
    started = time.perf_counter()
    server.start()
    elapsed = time.perf_counter() - started
    log.info("%s: ready on DICOM %d after %.1f s", server.name, server.port, elapsed)
    return elapsed


def server_log_problems(servers: list[bench.Server]) -> tuple[list[str], dict[str, Any]]:
    problems, summary = [], {}
    for server in servers:
        hits, sample = bench.log_issues(server.log_path, server.log_issue)
        summary[str(server.log_path.parent.name)] = {"issues": hits, "sample": sample}
        if hits:
            problems.append(
                f"{server.log_path.parent.name} log: {hits} warning/error line(s), e.g. "
                + " | ".join(s[:160] for s in sample[:3])
            )
    return problems, summary


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    bench.setup_logging(opts.verbose)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    if not bench.require(("findscu", "movescu", "storescu", "echoscu", "storescp"), hint="dcmtk"):
        return 2
    if not opts.no_orthanc and not bench.require(
        files=(opts.orthanc,), hint="Debian package orthanc, or --no-orthanc"
    ):
        return 2
    if not opts.minipacs.exists():
        log.error("%s not found: create the venv (./scripts/serve does)", opts.minipacs)
        return 2
    if opts.profile and not PY_SPY.exists():
        log.error("%s not found: pip install py-spy into the venv", PY_SPY)
        return 2

    root: Path | None = None
    started: list[bench.Server] = []
    try:
        with bench.sigterm_unwinds():
            use_orthanc = not opts.no_orthanc
            if use_orthanc:
                bench.warn_other_orthancs()
            root = Path(tempfile.mkdtemp(prefix="minipacs-query-bench-", dir=opts.tmp))
            (root / "logs").mkdir()
            meta: dict[str, Any] = {
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "servers": ["minipacs"] + (["orthanc"] if use_orthanc else []),
                "size": opts.size,
                "big_size": opts.big_size,
                "reps": opts.reps,
                "move_reps": opts.move_reps,
                "seed": opts.seed,
                "minipacs_args": opts.minipacs_args,
                "storescp_args": opts.storescp_args,
                "cpus": os.cpu_count(),
                "load_avg_start": os.getloadavg(),
                "tmp": str(root),
                "commit": bench.git_commit() if opts.live_code else bench.snapshot_code(root, opts),
                "code": "live working tree" if opts.live_code else "snapshot at start",
            }
            if use_orthanc:
                meta["orthanc_version"] = bench.orthanc_version(opts.orthanc)
            log.info("writing the corpus (%d studies) under %s", opts.studies, root)
            corpus = make_corpus(root, opts)
            log.info("corpus: %s", {k: v for k, v in corpus.as_dict().items() if k != "expected"})
            log.info("expected answers: %s", corpus.expected)

            def workdir(name: str) -> Path:
                path = root / name
                path.mkdir()
                return path

            storescp = bench.StoreScp(workdir("storescp"), opts)
            started.append(storescp)
            storescp.start()
            peers = {STORESCP_AET: storescp.port}

            load_s: dict[str, float] = {}
            data = root / "minipacs-data"
            load_s["minipacs import --no-fsync"] = bench.minipacs_import(
                opts, data, [root / "corpus", root / "big"], root / "logs" / "import-corpus.log",
                timeout=opts.import_timeout,
            )  # fmt: skip
            counts = index_counts(data)
            if counts["instance"] != corpus.instances:
                raise bench.BenchError(
                    f"minipacs indexed {counts} after import, not {corpus.instances}"
                )
            peer_args = [
                a for aet, port in peers.items() for a in ("--peer", f"{aet}={bench.HOST}:{port}")
            ]
            minipacs = bench.Minipacs(workdir("minipacs"), opts, data, peer_args)
            started.append(minipacs)
            start_timed(minipacs)
            servers: list[bench.Server] = [minipacs]
            if use_orthanc:
                orthanc = bench.Orthanc(workdir("orthanc"), opts, peers=peers)
                started.append(orthanc)
                start_timed(orthanc)
                timeout = 120 + corpus.instances / 10
                load_s[f"orthanc storescu ×{opts.load_parallel}"] = bench.send(
                    orthanc, corpus.files, opts.load_parallel, timeout
                )
                wait_orthanc_count(orthanc, corpus.instances, 120)
                servers.append(orthanc)
            log.info("loaded: %s", {k: round(v, 1) for k, v in load_s.items()})
            settle()

            specs = query_specs(corpus)
            log.info(
                "C-FIND: %d queries × %d runs × %d server(s)", len(specs), opts.reps, len(servers)
            )
            contents: dict[str, dict[str, dict[str, dict[str, str]]]] = {}
            with profiled(minipacs, opts.profile, "find"):
                base = measure_queries(servers, specs, opts, contents)
            engines: dict[str, dict[str, bench.Latency] | None] = {
                "base": measure_engine(opts, data, specs)
            }
            log.info("C-MOVE: %d runs × %d server(s)", opts.move_reps, len(servers))
            with profiled(minipacs, opts.profile, "move"):
                moves = measure_moves(servers, storescp, corpus, opts)
            for server in servers[1:]:
                server.stop()  # Orthanc is done: free the CPU and memory for the growth

            grown: Results | None = None
            growth: dict[str, Any] | None = None
            if opts.grow > corpus.instances:
                minipacs.stop()
                growth = grow(opts, root, data)
                again = bench.Minipacs(workdir("minipacs-grown"), opts, data, peer_args)
                started.append(again)
                growth["startup_s"] = start_timed(again)
                grown_contents: dict[str, dict[str, dict[str, dict[str, str]]]] = {}
                with profiled(again, opts.profile, "find-grown"):
                    grown = measure_queries([again], specs, opts, grown_contents)
                engines["grown"] = measure_engine(opts, data, specs)
            elif opts.grow:
                log.warning(
                    "--grow %d is not above the corpus' %d instances: skipped",
                    opts.grow,
                    corpus.instances,
                )

            problems = check_counts(base, specs, corpus.expected, engines.get("base"))
            if grown is not None:
                problems += [
                    f"at {opts.grow:,}: {p}"
                    for p in check_counts(grown, specs, corpus.expected, engines.get("grown"))
                ]
            problems += [f"C-MOVE {m.server}: {m.error}" for m in moves if m.error]
            # Same answers? minipacs against Orthanc, and minipacs at --grow against itself
            # before (the grown studies match none of the queries).
            differences: list[str] = []
            for spec in specs:
                got = contents.get(spec.key, {})
                if "minipacs" in got and "orthanc" in got:
                    differences += compare_answers(
                        spec.label, "minipacs", got["minipacs"], "orthanc", got["orthanc"]
                    )
                if grown is not None and "minipacs" in got:
                    later = grown_contents.get(spec.key, {}).get("minipacs")
                    if later is not None:
                        differences += compare_answers(
                            spec.label, "minipacs", got["minipacs"], "minipacs grown", later
                        )
            compared = sum(len(v) for d in contents.values() for v in d.values())
            log.info(
                "return keys compared over %d answers (%s): %d difference(s)",
                compared,
                " and ".join(
                    (["minipacs vs orthanc"] if "orthanc" in meta["servers"] else [])
                    + (["minipacs before vs after growth"] if grown is not None else [])
                ),
                len(differences),
            )
            for line in differences:
                log.warning("answers differ: %s", line)
            problems += [f"answers differ: {line}" for line in differences]
            for server in started:
                server.stop()
            log_problems, log_summary = server_log_problems(started)
            for path in sorted((root / "logs").glob("import-*.log")):
                hits, sample = bench.log_issues(path)
                log_summary[path.name] = {"issues": hits, "sample": sample}
                if hits:
                    log_problems.append(
                        f"{path.name}: {hits} warning/error line(s), e.g. " + " | ".join(sample[:3])
                    )
            problems += log_problems
            meta["load_avg_end"] = os.getloadavg()
            payload: dict[str, Any] = {
                "meta": meta,
                "corpus": corpus.as_dict(),
                "load_s": load_s,
                "queries": [asdict(s) for s in specs],
                "find": {
                    k: {srv: {c: lat.as_dict() for c, lat in v.items()} for srv, v in d.items()}
                    for k, d in base.items()
                },
                "move": [m.as_dict() for m in moves],
                "growth": growth,
                "find_grown": (
                    {
                        k: {srv: {c: lat.as_dict() for c, lat in v.items()} for srv, v in d.items()}
                        for k, d in grown.items()
                    }
                    if grown is not None
                    else None
                ),
                "engine": {
                    phase: {k: lat.as_dict() for k, lat in cells.items()} if cells else None
                    for phase, cells in engines.items()
                },
                "logs": log_summary,
                "problems": problems,
            }
            table, targets = report(payload, specs, base, moves, grown, engines)
            payload["targets"] = targets
            print(table)
            if opts.json:
                bench.write_json(payload, opts.json)
            sys.stdout.flush()
            failed = any(m.error for m in moves) or any(
                lat.error
                for r in (base, grown or {})
                for d in r.values()
                for v in d.values()
                for lat in v.values()
            )
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
        for server in started:
            with contextlib.suppress(Exception):
                server.stop()
        if root is not None:
            if opts.log_dir:
                opts.log_dir.mkdir(parents=True, exist_ok=True)
                for path in list(root.glob("*/*.log")) + list((root / "logs").glob("*.log")):
                    shutil.copy2(path, opts.log_dir / f"{path.parent.name}-{path.name}")
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
