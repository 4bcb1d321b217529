#!/usr/bin/env python3
"""Scale: minipacs on SQLite and on PostgreSQL grown in steps to 1,000,000 instances.

    .venv/bin/python scripts/bench/scale.py [--steps 0,10000,100000,1000000] [--json F]

What it measures, how, and its targets: scripts/bench/README.md, section scale.py.
"""

import argparse
import json
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import harness as bench
from peewee import fn
from pydicom import dcmread
from pydicom.uid import generate_uid

from storage import schema
from storage.dataset import name_key
from storage.dataset import read_instance
from storage.engine import is_sqlite
from storage.engine import open_database
from storage.models import Instance
from storage.models import Patient
from storage.models import Series
from storage.models import Study
from storage.models import StudyModality
from storage.models import db

log = bench.log
SERIES_SIZE = 100  # the real instances of a step: studies of one 100-instance series
GROWN_STUDY_SIZE, GROWN_STUDIES_PER_PATIENT = 10, 2
# Targets of the scale issue, at the last step.
INGEST_KEPT = 0.8  # of the rate at the first step
SEARCH_MS = 50.0
METADATA_MS = 100.0
OPTIONS: bench.Options = {
    "--steps": ([0, 10_000, 100_000, 1_000_000], "archive sizes to measure at"),
    "--engines": (["sqlite", "postgresql"], "sqlite,postgresql"),
    "--real": (5000, "real C-STORE instances a step (≥ 100)"),
    "--reps": (30, "timed searches and metadata requests a step"),
    "--orthanc-budget": (900.0, "seconds Orthanc has to grow (0: none)"),
}


def write_batch(folder: Path, tag: str, studies: int) -> list[Path]:
    """Real instances: `studies` studies, one patient each, of one SERIES_SIZE series;
    CT_small with 2×2 pixels (Orthanc's own scale benchmark uses 2×2 files)."""
    ds = dcmread(bench.make_study(folder / "template", 1, 2)[0])
    paths = []
    for number in range(studies):
        ds.PatientID, ds.PatientName = f"REAL{tag}-{number}", f"REAL^{tag}^{number}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.AccessionNumber = f"R{tag}{number}"[:16]
        for instance in range(1, SERIES_SIZE + 1):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = instance
            paths.append(folder / f"{number:03d}-{instance:04d}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
    return paths


class Grower:
    """Rows into a stopped server's index through the models (storage.models, the schema
    made or migrated by storage.schema.upgrade as at start-up), shaped like ingest's own:
    no second copy of the schema to drift from the real one."""

    def __init__(self, template: Path) -> None:
        self.parsed = read_instance(template)
        self.rng = random.Random(7)
        self.patients = 0

    def grow(self, index: str, data: Path, count: int) -> None:
        data.mkdir(parents=True, exist_ok=True)
        database = open_database(index, data, fsync=False)
        db.initialize(database)
        try:
            with db.connection_context():
                schema.upgrade(db)
                self._fill(count)
            if not is_sqlite(database):
                database.execute_sql("ANALYZE")  # autovacuum would, a little later
        finally:
            database.close_all()

    def _fill(self, count: int) -> None:
        models = (Patient, Study, StudyModality, Series, Instance)
        ids = {m: m.select(fn.MAX(m.id)).scalar() or 0 for m in models}
        rows: dict[Any, list[dict]] = {m: [] for m in models}
        for _ in range(count // (GROWN_STUDY_SIZE * GROWN_STUDIES_PER_PATIENT)):
            self._patient(ids, rows)
            if len(rows[Instance]) >= 50_000:
                _insert(rows)
        _insert(rows)
        if not is_sqlite(db.obj):  # explicit ids: move the sequences past them
            for model, last in ids.items():
                table = model._meta.table_name
                db.execute_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {last})")

    def _patient(self, ids: dict, rows: dict) -> None:
        """One patient with GROWN_STUDIES_PER_PATIENT studies of one CT series."""
        p, now = self.parsed, time.strftime("%Y-%m-%d %H:%M:%S")
        self.patients += 1
        ids[Patient] += 1
        pid, name = f"SYN{self.patients:07d}", f"SYN^P{self.patients:07d}"
        per = GROWN_STUDIES_PER_PATIENT
        rows[Patient].append(
            dict(
                id=ids[Patient],
                patient_id=pid,
                patient_name=name,
                name_key=name_key(name),
                birth_date="19700101",
                sex="O",
                num_studies=per,
                num_series=per,
                num_instances=per * GROWN_STUDY_SIZE,
            )
        )
        for _ in range(per):
            for model in (Study, Series, StudyModality):
                ids[model] += 1
            study_uid, series_uid = generate_uid(), generate_uid()
            date = f"{self.rng.randint(2010, 2026)}{self.rng.randint(1, 12):02d}01"
            rows[Study].append(
                dict(
                    id=ids[Study],
                    study_uid=study_uid,
                    patient=ids[Patient],
                    study_date=date,
                    study_time="120000",
                    time_key="120000.000000",
                    accession_number=f"S{ids[Study]}",
                    study_id="1",
                    description="synthetic",
                    modalities="CT",
                    sop_classes=p.sop_class_uid,
                    num_series=1,
                    num_instances=GROWN_STUDY_SIZE,
                    updated_at=now,
                )
            )
            rows[StudyModality].append(dict(id=ids[StudyModality], study=ids[Study], modality="CT"))
            rows[Series].append(
                dict(
                    id=ids[Series],
                    series_uid=series_uid,
                    study=ids[Study],
                    modality="CT",
                    series_number=1,
                    num_instances=GROWN_STUDY_SIZE,
                )
            )
            body = (
                p.json.replace(p.study_uid, study_uid)
                .replace(p.series_uid, series_uid)
                .replace(p.patient["patient_id"], pid)
            )
            for n in range(GROWN_STUDY_SIZE):
                ids[Instance] += 1
                sop = generate_uid()
                rows[Instance].append(
                    dict(
                        id=ids[Instance],
                        sop_uid=sop,
                        series=ids[Series],
                        sop_class_uid=p.sop_class_uid,
                        instance_number=n + 1,
                        transfer_syntax=p.transfer_syntax,
                        path=f"{study_uid}/{series_uid}/{sop}.dcm",
                        size=0,
                        sha256="",
                        received_at=now,
                        calling_aet="BULK",
                        json=body.replace(p.sop_uid, sop),
                    )
                )


def _insert(rows: dict) -> None:
    """Insert and clear the collected rows, parents first, in one transaction."""
    with db.atomic():
        for model, items in rows.items():
            for start in range(0, len(items), 500):
                model.insert_many(items[start : start + 500]).execute()
            items.clear()


# --------------------------------------------------------------------------- measuring


def whole_series(client: bench.Client, metadata: str) -> bool:
    answer = client.request("GET", metadata, {"Accept": bench.DICOM_JSON})
    return answer.status == 200 and len(json.loads(answer.body)) >= SERIES_SIZE


def measure(server: bench.Server, batch: list[Path], reps: int, patients: int) -> list:
    """The step's real instances in, then the searches and the metadata: the figures."""
    sent = bench.send(server, batch, 2)
    client = bench.Client(server.http_port, "/dicom-web")
    for path in (batch[-1], batch[0]):  # indexing may follow Success: wait for both series
        head = dcmread(path, stop_before_pixels=True)
        metadata = f"/studies/{head.StudyInstanceUID}/series/{head.SeriesInstanceUID}/metadata"
        whole = partial(whole_series, client, metadata)
        bench.poll(whole, 60, f"{server.name}: the step's series queryable")
    rng = random.Random(len(batch) + patients)
    real = [dcmread(path, stop_before_pixels=True).PatientID for path in batch[::SERIES_SIZE]]

    def patient() -> str:  # a grown patient, or one of the step's real ones at step 0
        return f"SYN{rng.randint(1, patients):07d}" if patients else rng.choice(real)

    def cfind(first: bool) -> tuple[float, int]:
        keys = {"QueryRetrieveLevel": "STUDY", "PatientID": patient(), "StudyInstanceUID": ""}
        seconds, answers = bench.findscu(server, {**keys, "StudyDate": ""}, count=True)
        if not answers:
            raise bench.BenchError(f"C-FIND on {server.name}: no study of the patient")
        return seconds, answers

    def qido(first: bool) -> tuple[float, int]:
        seconds, studies = client.search(f"/studies?PatientID={patient()}")
        if not studies:
            raise bench.BenchError(f"QIDO-RS on {server.name}: no study of the patient")
        return seconds, studies

    calls = {"C-FIND": cfind, "QIDO-RS": qido, "metadata": client.searcher(metadata)}
    found = {name: bench.interleaved(reps, {name: call})[name] for name, call in calls.items()}
    client.close()
    if any(latency.error for latency in found.values()):
        raise bench.BenchError(f"{server.name}: a search failed")
    return [len(batch) / sent.seconds, *(latency.p50 for latency in found.values())]


def run_minipacs(engine: str, root: Path, batches: list, opts: argparse.Namespace) -> list:
    """Rows grown between the steps; at each step, the server started and measured."""
    import pgtemp

    cluster = pgtemp.Cluster(fsync=True) if engine == "postgresql" else None
    index = cluster.database("scale") if cluster else ""
    args = ["--index", index] if index else []
    server = bench.Minipacs(root / engine, args=args, name=f"minipacs-{engine}")
    grower = Grower(batches[0][0])
    rows, total = [], 0
    try:
        for step, batch in zip(opts.steps, batches, strict=True):
            if step > total:
                started = time.monotonic()
                grower.grow(index, server.data, step - total)
                log.info("%s: grown to %d rows in %.0f s", engine, step, time.monotonic() - started)
            server.start()
            figures = measure(server, batch, opts.reps, grower.patients)
            server.stop()
            total = step + len(batch)
            rows.append([server.name, step, *figures, index_mb(index, server.data)])
    finally:
        server.stop()
        if cluster:
            cluster.stop()
    return rows


def index_mb(index: str, data: Path) -> float:
    if not index:
        return sum(f.stat().st_size for f in data.glob("index.sqlite*")) / 1e6
    import psycopg

    with psycopg.connect(index) as conn:
        return conn.execute("SELECT pg_database_size(current_database())").fetchone()[0] / 1e6


def run_orthanc(root: Path, batches: list, opts: argparse.Namespace) -> list:
    """Real C-STORE up to each step while the budget lasts."""
    server = bench.Orthanc(root / "orthanc", [bench.DICOMWEB_PLUGIN])
    server.start()
    rows, total, deadline = [], 0, time.monotonic() + opts.orthanc_budget
    for number, (step, batch) in enumerate(zip(opts.steps, batches, strict=True)):
        missing = step - total
        if missing > 0:
            rate = rows[-1][2] if rows else 300
            if time.monotonic() + missing / rate > deadline:
                log.info("orthanc: %d more instances would not fit the budget", missing)
                break
            fill = write_batch(root / f"fill{number}", f"F{number}", missing // SERIES_SIZE)
            for start in range(0, len(fill), 5000):  # storescu's argument list is finite
                bench.send(server, fill[start : start + 5000], 2)
        figures = measure(server, batch, opts.reps, 0)
        total = step + len(batch)
        size = sum(f.stat().st_size for f in (root / "orthanc" / "index").iterdir()) / 1e6
        rows.append(["orthanc", step, *figures, size])
    server.stop()
    return rows


def scenario(opts: argparse.Namespace, root: Path) -> int:
    bench.require(("storescu", "findscu", "echoscu"), hint="Debian package dcmtk")
    if opts.orthanc_budget > 0:
        bench.require(files=(bench.ORTHANC, bench.DICOMWEB_PLUGIN), hint="orthanc-dicomweb")
    log.info("writing %d real instances a step", opts.real)
    studies = opts.real // SERIES_SIZE
    batches = [write_batch(root / f"batch{n}", str(n), studies) for n in range(len(opts.steps))]
    runs = [partial(run_minipacs, engine, root, batches, opts) for engine in opts.engines]
    if opts.orthanc_budget > 0:
        runs.append(partial(run_orthanc, root, batches, opts))
    rows, failed = [], False
    for run in runs:  # a server's failure is logged and the others still run
        try:
            rows += run()
        except bench.BenchError as exc:
            log.error("%s", exc)
            failed = True
    out = bench.Report("Scale: an archive grown in steps", opts)
    header = ["server", "archive before", "ingest inst/s", "C-FIND p50 ms", "QIDO p50 ms"]
    title = f"each step: {opts.real:,} real C-STOREs; rows before it made through the models"
    out.table(title, header + ["series metadata p50 ms", "index MB"], rows)
    for engine in opts.engines:
        mine = [row for row in rows if row[0] == f"minipacs-{engine}"]
        if len(mine) > 1:
            (_, _, first, *_), (_, step, last, cfind, qido, metadata, _) = mine[0], mine[-1]
            out.target(
                f"{engine}: ingest at {step:,} ÷ at the first step", last / first, INGEST_KEPT
            )
            out.target(f"{engine}: C-FIND p50 ms at {step:,}", cfind, SEARCH_MS, False)
            out.target(f"{engine}: QIDO-RS p50 ms at {step:,}", qido, SEARCH_MS, False)
            out.target(
                f"{engine}: series metadata p50 ms at {step:,}", metadata, METADATA_MS, False
            )
    return out.finish(failed)


if __name__ == "__main__":
    raise SystemExit(bench.main(__doc__, OPTIONS, scenario))
