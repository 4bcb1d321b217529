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
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import date
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import IO
from typing import Any

from _common import CALLING_AET
from _common import HOST
from _common import ORTHANC_BIN
from _common import PROCS
from _common import REPO
from _common import SCRIPTS
from _common import BenchError
from _common import Interrupted
from _common import Minipacs
from _common import Orthanc
from _common import Server
from _common import StoreScp
from _common import base_env
from _common import count_files
from _common import ensure_orthanc
from _common import fmt
from _common import log_issues
from _common import orthanc_processes
from _common import orthanc_version
from _common import ratio
from _common import send
from _common import setup_logging
from _common import sigterm_unwinds
from _common import tail

log = logging.getLogger("bench.query")

STORESCP_AET = "STORESCP"
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
    sys.path.insert(0, str(SCRIPTS))
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


@dataclass(frozen=True)
class QuerySpec:
    key: str  # short id, also in `Corpus.expected`
    label: str
    level: str
    keys: tuple[tuple[str, str], ...]  # (keyword, value); '' = return key
    study_level: bool = True


def query_specs(corpus: Corpus) -> list[QuerySpec]:
    def study(**match: str) -> tuple[tuple[str, str], ...]:
        return tuple((k, match.get(k, "")) for k in STUDY_RETURN_KEYS)

    return [
        QuerySpec(
            "patient_id", "PatientID exact", "STUDY", study(PatientID=corpus.probe_patient_id)
        ),
        QuerySpec("name_doe", "PatientName DOE*", "STUDY", study(PatientName="DOE*")),
        QuerySpec(
            "date_year",
            f"StudyDate {QUERY_YEAR}",
            "STUDY",
            study(StudyDate=f"{QUERY_YEAR}0101-{QUERY_YEAR}1231"),
        ),
        QuerySpec("modality_mr", "ModalitiesInStudy=MR", "STUDY", study(ModalitiesInStudy="MR")),
        QuerySpec(
            "image_level",
            f"IMAGE, {corpus.big_count}-inst series",
            "IMAGE",
            (
                ("StudyInstanceUID", corpus.big_study_uid),
                ("SeriesInstanceUID", corpus.big_series_uid),
                ("SOPInstanceUID", ""),
            ),
            study_level=False,
        ),
    ]


def findscu_command(server: Server, spec: QuerySpec, quiet: bool) -> list[str]:
    cmd = ["findscu", "-S", "-aet", CALLING_AET, "-aec", server.aet, "-to", "60"]
    cmd.append("-q" if quiet else "-v")
    cmd += [HOST, str(server.port), "-k", f"QueryRetrieveLevel={spec.level}"]
    for keyword, value in spec.keys:
        cmd += ["-k", f"{keyword}={value}" if value else keyword]
    return cmd


def findscu_count(server: Server, spec: QuerySpec, timeout: float) -> int:
    """Answers of one findscu run (verbose, output parsed); raise unless it ends Success."""
    result = subprocess.run(
        findscu_command(server, spec, quiet=False),
        env=base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    final = FINAL_RE.search(result.stdout)
    if result.returncode != 0 or final is None or final.group(1) != "Success":
        raise BenchError(
            f"findscu {spec.label} on {server.name}: exit {result.returncode}, final "
            f"{final.group(1) if final else 'none'}:\n" + "\n".join(result.stdout.splitlines()[-8:])
        )
    return len(PENDING_RE.findall(result.stdout))


def findscu_time(server: Server, spec: QuerySpec, timeout: float) -> float:
    """Seconds from starting a quiet findscu to its exit (answers not printed)."""
    cmd = findscu_command(server, spec, quiet=True)
    started = time.perf_counter()
    result = subprocess.run(cmd, env=base_env(), capture_output=True, timeout=timeout, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or result.stdout.strip() or result.stderr.strip():
        raise BenchError(
            f"findscu {spec.label} on {server.name}: exit {result.returncode}: "
            f"{(result.stdout + result.stderr)[-500:]!r}"
        )
    return elapsed


class FindClient:
    """pynetdicom C-FIND SCU on one association kept open (TCP_NODELAY on its socket)."""

    def __init__(self, server: Server) -> None:
        import socket

        from pynetdicom import AE
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        self.model = StudyRootQueryRetrieveInformationModelFind
        self.server = server
        ae = AE(ae_title=CALLING_AET)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        ae.add_requested_context(self.model)
        self.assoc = ae.associate(HOST, server.port, ae_title=server.aet)
        if not self.assoc.is_established:
            raise BenchError(f"{server.name}: pynetdicom association refused or failed")
        raw = self.assoc.dul.socket.socket
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def run(self, spec: QuerySpec) -> tuple[float, int]:
        """(seconds, answers) of one C-FIND; raises unless it ends Success."""
        from pydicom.dataset import Dataset

        ds = Dataset()
        ds.QueryRetrieveLevel = spec.level
        for keyword, value in spec.keys:
            setattr(ds, keyword, value)
        answers, final = 0, None
        started = time.perf_counter()
        for status, _identifier in self.assoc.send_c_find(ds, self.model):
            code = int(status.Status) if status is not None and "Status" in status else None
            if code in (0xFF00, 0xFF01):
                answers += 1
            else:
                final = code
        elapsed = time.perf_counter() - started
        if final != 0x0000:
            raise BenchError(
                f"pynetdicom C-FIND {spec.label} on {self.server.name}: final status "
                f"{'none (association lost?)' if final is None else f'0x{final:04X}'}"
            )
        return elapsed, answers

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.assoc.release()


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (p50 = the median for odd counts)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * fraction // 1)))
    return ordered[int(rank) - 1]


@dataclass
class Latency:
    """One query on one server by one client: answers and timings in ms."""

    answers: int | None = None
    runs_ms: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def p50(self) -> float | None:
        return statistics.median(self.runs_ms) if self.runs_ms else None

    @property
    def p95(self) -> float | None:
        return percentile(self.runs_ms, 0.95)

    def as_dict(self) -> dict[str, Any]:
        return {
            "answers": self.answers,
            "p50_ms": self.p50,
            "p95_ms": self.p95,
            "runs_ms": [round(v, 3) for v in self.runs_ms],
            "error": self.error,
        }


# results[query key][server name][client] where client is "findscu" or "pynetdicom"
Results = dict[str, dict[str, dict[str, Latency]]]


def measure_queries(
    servers: list[Server], specs: list[QuerySpec], opts: argparse.Namespace
) -> Results:
    """Each query `opts.reps` times per server and client, servers interleaved run by run
    (so that background load hits both alike), after one counting run that warms up."""
    results: Results = {
        s.key: {srv.name: {"findscu": Latency(), "pynetdicom": Latency()} for srv in servers}
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
                except (BenchError, subprocess.TimeoutExpired) as exc:
                    cell["findscu"].error = str(exc)
                    log.error("%s", exc)
                if server.name in clients:
                    try:
                        cell["pynetdicom"].answers = clients[server.name].run(spec)[1]
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
                        except (BenchError, subprocess.TimeoutExpired) as exc:
                            cell["findscu"].error = str(exc)
                            log.error("%s", exc)
                    if server.name in clients and cell["pynetdicom"].error is None:
                        try:
                            seconds, answers = clients[server.name].run(spec)
                            cell["pynetdicom"].runs_ms.append(1000 * seconds)
                            if answers != cell["pynetdicom"].answers:
                                raise BenchError(
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
                    f"findscu p50 {fmt(results[spec.key][srv.name]['findscu'].p50)} ms, "
                    f"in-process p50 {fmt(results[spec.key][srv.name]['pynetdicom'].p50)} ms"
                    for srv in servers
                ),
            )
    finally:
        for client in clients.values():
            client.close()
    return results


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
    servers: list[Server], storescp: StoreScp, corpus: Corpus, opts: argparse.Namespace
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
                CALLING_AET,
                "-aec",
                server.aet,
                "-aem",
                STORESCP_AET,
                "-to",
                "60",
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={corpus.big_study_uid}",
                HOST,
                str(server.port),
            ]
            started = time.perf_counter()
            try:
                done = subprocess.run(
                    cmd,
                    env=base_env(),
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
            received = count_files(storescp.out)
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


class QueryMinipacs(Minipacs):
    """minipacs on an archive imported beforehand, with storescp as its one peer."""

    def __init__(
        self, workdir: Path, opts: argparse.Namespace, data: Path, peers: dict[str, int]
    ) -> None:
        super().__init__(workdir, opts)
        self.data = data
        self.peers = peers

    def extra_args(self) -> list[str]:
        peers = [a for aet, port in self.peers.items() for a in ("--peer", f"{aet}={HOST}:{port}")]
        return peers + super().extra_args()


class QueryOrthanc(Orthanc):
    """Orthanc that knows storescp (C-MOVE destination) and us (C-FIND/C-MOVE allowed)."""

    def __init__(self, workdir: Path, opts: argparse.Namespace, peers: dict[str, int]) -> None:
        super().__init__(workdir, opts)
        self.peers = peers

    def config(self) -> dict[str, Any]:
        config = super().config()
        # Orthanc answers C-FIND and C-MOVE only for AEs it knows (DicomAlwaysAllowFind and
        # DicomAlwaysAllowMove are false by default): list our calling AE as well. Its port
        # is never used.
        modalities = {
            aet: {"AET": aet, "Host": HOST, "Port": port} for aet, port in self.peers.items()
        }
        modalities[CALLING_AET] = {"AET": CALLING_AET, "Host": HOST, "Port": 104}
        config["DicomModalities"] = modalities
        return config


def run_logged(cmd: list[str], log_path: Path, timeout: float) -> tuple[int, float]:
    """Run a command to completion with its output in `log_path`: (status, seconds)."""
    with log_path.open("wb") as out:
        started = time.perf_counter()
        proc = PROCS.start(cmd, env=base_env(), out=out)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{cmd[0]} {cmd[1]} did not finish within {timeout:.0f} s") from None
        finally:
            PROCS.stop(proc, grace=5.0)
        return code, time.perf_counter() - started


def minipacs_import(
    opts: argparse.Namespace, data: Path, folders: list[Path], log_path: Path, parallel: int = 1
) -> float:
    """`minipacs import --no-fsync` of the folders (split over `parallel` processes at once);
    the wall time. Raises unless every process exits 0."""
    groups = [folders[n::parallel] for n in range(parallel)]
    groups = [g for g in groups if g]
    procs: list[tuple[Any, IO[bytes], Path]] = []
    started = time.perf_counter()
    try:
        for number, group in enumerate(groups):
            path = log_path.with_name(f"{log_path.stem}-{number}{log_path.suffix}")
            out = path.open("wb")
            cmd = [str(opts.minipacs), "import", "--data", str(data), "--no-fsync", "--json"]
            cmd += [str(f) for f in group]
            procs.append((PROCS.start(cmd, env=base_env(), out=out), out, path))
        deadline = started + opts.import_timeout
        for proc, _out, path in procs:
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                raise BenchError(
                    f"minipacs import did not finish within {opts.import_timeout:.0f} s"
                ) from None
            if code != 0:
                raise BenchError(f"minipacs import exited {code}:\n{tail(path)}")
        return time.perf_counter() - started
    finally:
        for proc, out, _path in procs:
            PROCS.stop(proc, grace=5.0)
            out.close()


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


def wait_orthanc_count(server: Orthanc, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = server.count_queryable()
        if seen >= count:
            return
        server.check_alive()
        time.sleep(0.05)
    raise BenchError(f"orthanc holds {seen} of {count} instances after {timeout:.0f} s")


# --------------------------------------------------------------------------- report


def _cell(lat: Latency | None) -> tuple[str, str]:
    if lat is None:
        return "-", "-"
    if lat.error is not None and not lat.runs_ms:
        return "ERR", "ERR"
    return fmt(lat.p50), fmt(lat.p95)


def latency_table(
    title: str,
    results: Results,
    specs: list[QuerySpec],
    names: list[str],
    client: str,
    expected: dict[str, int],
) -> list[str]:
    lines = [title]
    head = f"  {'query':<28} {'expected':>8} " + " ".join(f"{n + ' answers':>16}" for n in names)
    for name in names:
        head += f" {name + ' p50':>13} {'p95':>7}"
    if len(names) == 2:
        head += f" {'p50 ratio':>9}"
    lines.append(head)
    for spec in specs:
        row = f"  {spec.label:<28} {expected.get(spec.key, 0):>8} "
        cells = [results[spec.key][n][client] for n in names]
        counts = [c.answers for c in cells]
        row += " ".join(f"{'-' if c is None else c:>16}" for c in counts)
        for lat in cells:
            p50, p95 = _cell(lat)
            row += f" {p50:>13} {p95:>7}"
        if len(names) == 2:
            row += f" {fmt(ratio(cells[0].p50, cells[1].p50), '.2f'):>9}"
        if len(set(counts)) > 1 or any(c != expected.get(spec.key) for c in counts):
            row += "  ≠ MISMATCH"
        lines.append(row)
    return lines


def check_counts(results: Results, specs: list[QuerySpec], expected: dict[str, int]) -> list[str]:
    """Every answer count that differs from another client's, server's or the expected one."""
    out = []
    for spec in specs:
        for server, clients in results[spec.key].items():
            for client, lat in clients.items():
                if lat.error:
                    out.append(
                        f"{spec.label}: {server} {client} failed: {lat.error.splitlines()[0]}"
                    )
                elif lat.answers != expected[spec.key]:
                    out.append(
                        f"{spec.label}: {server} ({client}) {lat.answers} answers, "
                        f"the corpus has {expected[spec.key]}"
                    )
    return out


def report(
    payload: dict[str, Any],
    specs: list[QuerySpec],
    base: Results,
    moves: list[MoveResult],
    grown: Results | None,
) -> tuple[str, list[dict[str, Any]]]:
    meta, corpus = payload["meta"], payload["corpus"]
    names = meta["servers"]
    lines = [
        f"C-FIND / C-MOVE, {' vs '.join(names)}, {meta['date']}, 127.0.0.1, TCP_NODELAY=1, "
        f"{meta['cpus']} CPUs",
        f"corpus: {corpus['studies']:,} studies, {corpus['patients']:,} patients, "
        f"{corpus['series']:,} series, {corpus['instances']:,} instances "
        f"({corpus['bytes'] / 1e6:.0f} MB; {corpus['instances'] - corpus['big_count']:,} "
        f"× {meta['size']}² + {corpus['big_count']} × {meta['big_size']}² CT)",
        "loaded: " + ", ".join(f"{k} {v:.1f} s" for k, v in payload["load_s"].items()),
        "",
    ]
    lines += latency_table(
        f"C-FIND, ms — findscu process, start to exit ({meta['reps']} runs each, -q; "
        "ratio = minipacs ÷ orthanc)",
        base,
        specs,
        names,
        "findscu",
        corpus["expected"],
    )
    lines.append("")
    lines += latency_table(
        f"C-FIND, ms — pynetdicom in-process, one open association ({meta['reps']} runs each)",
        base,
        specs,
        names,
        "pynetdicom",
        corpus["expected"],
    )
    lines += [
        "",
        f"C-MOVE of the {corpus['big_count']}-instance study to storescp "
        f"(movescu start to exit, {meta['move_reps']} runs each)",
    ]
    lines.append(f"  {'server':<10} {'inst/s (p50)':>12} {'best':>7} {'s p50':>7}  status")
    for move in moves:
        status = "ok" if move.error is None else "FAILED: " + move.error.splitlines()[0][:70]
        lines.append(
            f"  {move.server:<10} {fmt(move.inst_per_s):>12} {fmt(move.best_inst_per_s):>7} "
            f"{fmt(move.p50_s, '.2f'):>7}  {status}"
        )
    growth = payload.get("growth")
    if grown is not None and growth:
        counts = growth["counts"]
        lines += [
            "",
            f"minipacs grown to {counts['instance']:,} instances ({counts['study']:,} studies, "
            f"{counts['patient']:,} patients): {growth['added']:,} instances "
            f"({growth['size']}² images, {GROWTH_PER_SERIES} per series) written in "
            f"{growth['write_s']:.0f} s, imported in {growth['import_s']:.0f} s "
            f"({growth['added'] / growth['import_s']:.0f} inst/s, {growth['import_processes']} "
            f"import process(es), --no-fsync); serve start-up {growth['startup_s']:.1f} s",
        ]
        lines += latency_table(
            "  findscu, ms", grown, specs, ["minipacs"], "findscu", corpus["expected"]
        )
        lines += latency_table(
            "  pynetdicom in-process, ms",
            grown,
            specs,
            ["minipacs"],
            "pynetdicom",
            corpus["expected"],
        )

    targets: list[dict[str, Any]] = []

    def p50(results: Results | None, key: str, server: str, client: str) -> float | None:
        if results is None or server not in results.get(key, {}):
            return None
        return results[key][server][client].p50

    def target(label: str, values: dict[str, float | None], goal: float, higher: bool) -> None:
        verdicts = {}
        for client, value in values.items():
            if value is None:
                verdicts[client] = "n/a"
            else:
                ok = value >= goal if higher else value <= goal
                verdicts[client] = "PASS" if ok else "FAIL"
        targets.append({"target": label, "values": values, "goal": goal, "verdicts": verdicts})

    clients = ("findscu", "pynetdicom")
    for spec in specs:
        goal = MODALITIES_TARGET if spec.key == "modality_mr" else 1.0
        target(
            f"{spec.label}: p50 ≤ {goal:g} × orthanc",
            {
                c: ratio(p50(base, spec.key, "minipacs", c), p50(base, spec.key, "orthanc", c))
                for c in clients
            },
            goal,
            False,
        )
    mp = next((m for m in moves if m.server == "minipacs"), None)
    oc = next((m for m in moves if m.server == "orthanc"), None)
    move_ratio = ratio(mp.inst_per_s if mp else None, oc.inst_per_s if oc else None)
    target("C-MOVE inst/s ≥ orthanc's", {"findscu": move_ratio, "pynetdicom": None}, 1.0, True)
    if grown is not None:
        for spec in specs:
            if spec.study_level:
                target(
                    f"at {growth['counts']['instance'] if growth else '?':,}: {spec.label} p50 < "
                    f"{STUDY_LEVEL_TARGET_MS:.0f} ms",
                    {c: p50(grown, spec.key, "minipacs", c) for c in clients},
                    STUDY_LEVEL_TARGET_MS,
                    False,
                )
    lines += ["", f"targets{'':<43} {'findscu':>14} {'in-process':>14}"]
    for t in targets:
        cells = []
        for client in clients:
            value = t["values"].get(client)
            spec_fmt = ".1f" if "ms" in t["target"] else ".2f"
            cells.append(
                f"{fmt(value, spec_fmt):>8} {t['verdicts'][client]:<5}"
                if value is not None
                else f"{'':>8} {'-':<5}"
            )
        lines.append(f"  {t['target']:<48} {cells[0]:>14} {cells[1]:>14}")
    lines.append("  (C-MOVE is movescu for both columns' purposes: shown once)")

    problems = payload.get("problems", [])
    if problems:
        lines += ["", "problems:"] + [f"  {p}" for p in problems]
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
        "--minipacs", type=Path, default=REPO / ".venv" / "bin" / "minipacs", help="executable"
    )
    parser.add_argument("--orthanc", type=Path, default=ORTHANC_BIN, help="Orthanc executable")
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="also write the figures as JSON to PATH (stdout when no PATH is given)",
    )
    parser.add_argument(
        "--tmp", type=Path, default=None, help="parent of the temporary folder (None: system's)"
    )
    parser.add_argument("--log-dir", type=Path, help="keep every server and tool log here")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--query-timeout", type=float, default=120.0, help="seconds per query")
    parser.add_argument("--move-timeout", type=float, default=300.0, help="seconds per C-MOVE")
    parser.add_argument(
        "--import-timeout", type=float, default=1800.0, help="seconds per import step"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 3 when a measured target is missed"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    opts = parser.parse_args(argv)
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
    import_s = minipacs_import(
        opts,
        data,
        sorted(folder.iterdir()),
        root / "logs" / "import-growth.log",
        opts.import_processes,
    )
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


def start_timed(server: Server) -> float:
    started = time.perf_counter()
    server.start()
    elapsed = time.perf_counter() - started
    log.info("%s: ready on DICOM %d after %.1f s", server.name, server.port, elapsed)
    return elapsed


def server_log_problems(servers: list[Server]) -> tuple[list[str], dict[str, Any]]:
    problems, summary = [], {}
    for server in servers:
        hits, sample = log_issues(server.log_path, server.log_issue)
        summary[str(server.log_path.parent.name)] = {"issues": hits, "sample": sample}
        if hits:
            problems.append(
                f"{server.log_path.parent.name} log: {hits} warning/error line(s), e.g. "
                + " | ".join(s[:160] for s in sample[:3])
            )
    return problems, summary


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    setup_logging(opts.verbose)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    for tool in ("findscu", "movescu", "storescu", "echoscu", "storescp"):
        if shutil.which(tool) is None:
            log.error("%s not found: install dcmtk (apt-get install dcmtk)", tool)
            return 2
    if not opts.minipacs.exists():
        log.error("%s not found: create the venv (./scripts/serve does)", opts.minipacs)
        return 2

    root: Path | None = None
    started: list[Server] = []
    try:
        with sigterm_unwinds():
            use_orthanc = not opts.no_orthanc and ensure_orthanc(opts.orthanc)
            if use_orthanc and orthanc_processes():
                log.warning("other Orthanc processes are running: they share the CPU")
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
            }
            if use_orthanc:
                meta["orthanc_version"] = orthanc_version(opts.orthanc)
            log.info("writing the corpus (%d studies) under %s", opts.studies, root)
            corpus = make_corpus(root, opts)
            log.info("corpus: %s", {k: v for k, v in corpus.as_dict().items() if k != "expected"})
            log.info("expected answers: %s", corpus.expected)

            def workdir(name: str) -> Path:
                path = root / name
                path.mkdir()
                return path

            storescp = StoreScp(workdir("storescp"), opts)
            started.append(storescp)
            storescp.start()
            peers = {STORESCP_AET: storescp.port}

            load_s: dict[str, float] = {}
            data = root / "minipacs-data"
            load_s["minipacs import --no-fsync"] = minipacs_import(
                opts, data, [root / "corpus", root / "big"], root / "logs" / "import-corpus.log"
            )
            counts = index_counts(data)
            if counts["instance"] != corpus.instances:
                raise BenchError(f"minipacs indexed {counts} after import, not {corpus.instances}")
            minipacs = QueryMinipacs(workdir("minipacs"), opts, data, peers)
            started.append(minipacs)
            start_timed(minipacs)
            servers: list[Server] = [minipacs]
            if use_orthanc:
                orthanc = QueryOrthanc(workdir("orthanc"), opts, peers)
                started.append(orthanc)
                start_timed(orthanc)
                timeout = 120 + corpus.instances / 10
                load_s[f"orthanc storescu ×{opts.load_parallel}"] = send(
                    orthanc, corpus.files, opts.load_parallel, timeout
                )
                wait_orthanc_count(orthanc, corpus.instances, 120)
                servers.append(orthanc)
            log.info("loaded: %s", {k: round(v, 1) for k, v in load_s.items()})

            specs = query_specs(corpus)
            log.info(
                "C-FIND: %d queries × %d runs × %d server(s)", len(specs), opts.reps, len(servers)
            )
            base = measure_queries(servers, specs, opts)
            log.info("C-MOVE: %d runs × %d server(s)", opts.move_reps, len(servers))
            moves = measure_moves(servers, storescp, corpus, opts)
            for server in servers[1:]:
                server.stop()  # Orthanc is done: free the CPU and memory for the growth

            grown: Results | None = None
            growth: dict[str, Any] | None = None
            if opts.grow > corpus.instances:
                minipacs.stop()
                growth = grow(opts, root, data)
                again = QueryMinipacs(workdir("minipacs-grown"), opts, data, peers)
                started.append(again)
                growth["startup_s"] = start_timed(again)
                grown = measure_queries([again], specs, opts)
            elif opts.grow:
                log.warning(
                    "--grow %d is not above the corpus' %d instances: skipped",
                    opts.grow,
                    corpus.instances,
                )

            problems = check_counts(base, specs, corpus.expected)
            if grown is not None:
                problems += [
                    f"at {opts.grow:,}: {p}" for p in check_counts(grown, specs, corpus.expected)
                ]
            problems += [f"C-MOVE {m.server}: {m.error}" for m in moves if m.error]
            for server in started:
                server.stop()
            log_problems, log_summary = server_log_problems(started)
            for path in sorted((root / "logs").glob("import-*.log")):
                hits, sample = log_issues(path)
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
                "logs": log_summary,
                "problems": problems,
            }
            table, targets = report(payload, specs, base, moves, grown)
            payload["targets"] = targets
            print(table)
            if opts.json:
                text = json.dumps(payload, indent=2, ensure_ascii=False)
                if opts.json == "-":
                    print(text)
                else:
                    Path(opts.json).write_text(text + "\n")
                    log.info("figures written to %s", opts.json)
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
            if opts.strict and any("FAIL" in t["verdicts"].values() for t in targets):
                return 3
            return 0
    except BenchError as exc:
        log.error("%s", exc)
        return 1
    except (KeyboardInterrupt, Interrupted):
        log.error("interrupted: cleaning up")
        return 130
    finally:
        PROCS.stop_all()
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
