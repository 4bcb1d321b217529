#!/usr/bin/env python3
"""Scale: minipacs on SQLite and on PostgreSQL grown in steps to 1,000,000 instances.

At each step: the ingest rate of 5,000 real C-STORE instances (dcmtk storescu), the p50
of a study search by PatientID with C-FIND (dcmtk findscu, its process start included)
and with QIDO-RS, the p50 of a 100-instance series' WADO-RS /metadata, and the index
size. Between steps the
index is grown with bulk-generated rows (no files: stated as such in the report; the
queries and metadata only read the index), studies of 10 instances, 2 studies a
patient. Orthanc (Debian's package, SQLite, DICOMweb plugin) runs the same measurements
at the steps it reaches by real C-STORE within --orthanc-budget seconds.

    .venv/bin/python scripts/bench/scale.py [--steps 0,10000,100000,1000000] [--plot F.png]
"""

import argparse
import json
import logging
import random
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import _common as bench
import pydicom
from pydicom.uid import generate_uid

sys.path.insert(0, str(bench.REPO))
sys.path.insert(0, str(bench.REPO / "scripts"))
import pgtemp  # noqa: E402
from peewee import fn  # noqa: E402

from storage import schema  # noqa: E402
from storage.dataset import name_key  # noqa: E402
from storage.dataset import read_instance  # noqa: E402
from storage.engine import is_sqlite  # noqa: E402
from storage.engine import open_database  # noqa: E402
from storage.models import Instance  # noqa: E402
from storage.models import Patient  # noqa: E402
from storage.models import Series  # noqa: E402
from storage.models import Study  # noqa: E402
from storage.models import StudyModality  # noqa: E402
from storage.models import db  # noqa: E402

log = logging.getLogger("scale")
BATCH_SERIES_SIZE = 100  # the real instances of a step: studies of one 100-instance series
SYN_STUDY_SIZE, SYN_STUDIES_PER_PATIENT = 10, 2


# ----------------------------------------------------------------------------- data


def template_dataset() -> pydicom.Dataset:
    """CT_small with 2×2 pixels (Orthanc's own scale benchmark uses 2×2 files)."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.PixelData = ds.pixel_array[:2, :2].copy().tobytes()
    ds.Rows = ds.Columns = 2
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return ds


def write_batch(folder: Path, tag: str, studies: int, per_series: int) -> list[Path]:
    """Real instances: `studies` studies (one patient each) of one `per_series` series."""
    ds, paths = template_dataset(), []
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(studies):
        ds.PatientID, ds.PatientName = f"REAL{tag}-{s}", f"REAL^{tag}^{s}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.AccessionNumber = f"R{tag}{s}"[:16]
        for n in range(per_series):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = n + 1
            paths.append(folder / f"{s:03d}-{n:04d}.dcm")
            ds.save_as(paths[-1], enforce_file_format=True)
    return paths


class Grower:
    """Bulk rows into a stopped server's index through the models (storage.models, the
    schema made or migrated by storage.schema.upgrade as at start-up), shaped like
    ingest's own: no second copy of the schema to drift from the real one."""

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
        for _ in range(count // (SYN_STUDY_SIZE * SYN_STUDIES_PER_PATIENT)):
            self._patient(ids, rows)
            if len(rows[Instance]) >= 50_000:
                _insert(rows)
        _insert(rows)
        if not is_sqlite(db.obj):  # explicit ids: move the sequences past them
            for model, last in ids.items():
                table = model._meta.table_name
                db.execute_sql(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {last})")

    def _patient(self, ids: dict, rows: dict) -> None:
        """One synthetic patient with SYN_STUDIES_PER_PATIENT studies of one CT series."""
        p, now = self.parsed, time.strftime("%Y-%m-%d %H:%M:%S")
        self.patients += 1
        ids[Patient] += 1
        pid, name = f"SYN{self.patients:07d}", f"SYN^P{self.patients:07d}"
        per = SYN_STUDIES_PER_PATIENT
        rows[Patient].append(
            dict(id=ids[Patient], patient_id=pid, patient_name=name, name_key=name_key(name),
                 birth_date="19700101", sex="O", num_studies=per, num_series=per,
                 num_instances=per * SYN_STUDY_SIZE)
        )  # fmt: skip
        for _ in range(per):
            for model in (Study, Series, StudyModality):
                ids[model] += 1
            study_uid, series_uid = generate_uid(), generate_uid()
            date = f"{self.rng.randint(2010, 2026)}{self.rng.randint(1, 12):02d}01"
            rows[Study].append(
                dict(id=ids[Study], study_uid=study_uid, patient=ids[Patient], study_date=date,
                     study_time="120000", time_key="120000.000000",
                     accession_number=f"S{ids[Study]}", study_id="1", description="synthetic",
                     modalities="CT", sop_classes=p.sop_class_uid, num_series=1,
                     num_instances=SYN_STUDY_SIZE, updated_at=now)
            )  # fmt: skip
            rows[StudyModality].append(dict(id=ids[StudyModality], study=ids[Study], modality="CT"))
            rows[Series].append(
                dict(id=ids[Series], series_uid=series_uid, study=ids[Study], modality="CT",
                     series_number=1, num_instances=SYN_STUDY_SIZE)
            )  # fmt: skip
            body = (
                p.json.replace(p.study_uid, study_uid)
                .replace(p.series_uid, series_uid)
                .replace(p.patient["patient_id"], pid)
            )
            for n in range(SYN_STUDY_SIZE):
                ids[Instance] += 1
                sop = generate_uid()
                rows[Instance].append(
                    dict(id=ids[Instance], sop_uid=sop, series=ids[Series],
                         sop_class_uid=p.sop_class_uid, instance_number=n + 1,
                         transfer_syntax=p.transfer_syntax,
                         path=f"{study_uid}/{series_uid}/{sop}.dcm", size=0, sha256="",
                         received_at=now, calling_aet="BULK", json=body.replace(p.sop_uid, sop))
                )  # fmt: skip


def _insert(rows: dict) -> None:
    """Insert and clear the collected rows, parents first, in one transaction."""
    with db.atomic():
        for model, items in rows.items():
            for start in range(0, len(items), 500):
                model.insert_many(items[start : start + 500]).execute()
            items.clear()


# ---------------------------------------------------------------------------- measuring


def timed(fn, reps: int) -> float | None:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return bench.percentile(times, 0.5)


def http(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def metadata_of(root: str, path: Path) -> str:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return f"{root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/metadata"


def wait_series(url: str, timeout: float) -> None:
    """Until the series' /metadata lists BATCH_SERIES_SIZE instances (404 meanwhile)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            count = len(json.loads(http(url) or b"[]"))
        except urllib.error.HTTPError:
            count = 0
        assert count <= BATCH_SERIES_SIZE, count
        if count == BATCH_SERIES_SIZE:
            return
        assert time.monotonic() < deadline, f"{count} of {BATCH_SERIES_SIZE} after {timeout} s"
        time.sleep(0.05)


def measure(server, root: str, batch: list[Path], opts, patients: int) -> dict:
    """Ingest the step's real instances, then the searches and the metadata."""
    elapsed = bench.send(server, batch, opts.associations, timeout=1800)
    rng = random.Random(len(batch) + patients)
    real = [pydicom.dcmread(path, stop_before_pixels=True).PatientID for path in batch[::100]]
    pids = [
        f"SYN{rng.randint(1, patients):07d}" if patients else rng.choice(real)
        for _ in range(opts.reps * 2)
    ]
    queue = iter(pids)

    def cfind() -> None:  # dcmtk findscu, as scripts and workstations would
        command = [
            "findscu",
            "-v",
            "-S",
            "-aet",
            "BENCHSCU",
            "-aec",
            server.aet,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"PatientID={next(queue)}",
            "-k",
            "StudyInstanceUID",
            "-k",
            "StudyDate",
            bench.HOST,
            str(server.port),
        ]
        result = subprocess.run(command, capture_output=True, text=True, env=bench.base_env())
        assert result.returncode == 0 and "Find Response: 1 " in result.stderr, result.stderr

    def qido() -> None:
        body = http(f"{root}/studies?PatientID={next(queue)}")
        assert json.loads(body or b"[]"), "no study found"

    urls = [metadata_of(root, path) for path in (batch[-1], batch[0])]
    for url in urls:  # indexing may follow Success by a bounded delay: wait for it
        wait_series(url, timeout=60)
    metadata_url = urls[-1]
    return {
        "ingest_per_s": len(batch) / elapsed,
        "cfind_ms": timed(cfind, opts.reps),
        "qido_ms": timed(qido, opts.reps),
        "metadata_ms": timed(lambda: http(metadata_url), opts.metadata_reps),
    }


# ------------------------------------------------------------------------------ engines


def run_minipacs(engine: str, workdir: Path, batches, grower: Grower, opts) -> list[dict]:
    cluster = pgtemp.Cluster(fsync=True) if engine == "postgresql" else None
    index = cluster.database("scale") if cluster else ""
    server = bench.Minipacs(workdir, opts, args=["--index", index] if index else [])
    results, total, synthetic = [], 0, 0
    grower.patients = 0  # this engine's own synthetic patients
    try:
        for step, batch in zip(opts.steps, batches, strict=True):
            if step > total:
                started = time.monotonic()
                grower.patients = synthetic // (SYN_STUDY_SIZE * SYN_STUDIES_PER_PATIENT)
                grower.grow(index, server.data, step - total)
                synthetic += step - total
                total = step
                log.info(
                    "%s: grown to %d rows in %.0f s", engine, total, time.monotonic() - started
                )
            server.start()
            figures = measure(
                server,
                f"http://{bench.HOST}:{server.http_port}/dicom-web",
                batch,
                opts,
                grower.patients,
            )
            total += len(batch)
            server.stop()
            figures.update(step=step, instances=total, size_mb=index_size(index, server.data))
            log.info("%s: %s", engine, figures)
            results.append(figures)
    finally:
        server.stop()
        if cluster:
            cluster.stop()
    return results


def index_size(index: str, data: Path) -> float:
    if index:
        import psycopg

        with psycopg.connect(index) as conn:
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    else:
        size = sum(f.stat().st_size for f in data.glob("index.sqlite*"))
    return size / 1e6


def run_orthanc(workdir: Path, batches, opts) -> list[dict]:
    """Real C-STORE up to each step while the budget lasts (Orthanc has no bulk path)."""
    # DICOMweb for QIDO-RS and /metadata; our calling AE known (C-FIND answers only those).
    server = bench.Orthanc(workdir, opts, plugins=[bench.ORTHANC_DICOMWEB], peers={})
    server.start()
    results, total, deadline = [], 0, time.monotonic() + opts.orthanc_budget
    try:
        for step, batch in zip(opts.steps, batches, strict=True):
            missing = step - total
            if missing > 0:
                rate = results[-1]["ingest_per_s"] if results else 300
                if time.monotonic() + missing / rate > deadline:
                    log.info("orthanc: %d more instances would not fit the budget", missing)
                    break
                fill = write_batch(workdir / f"fill{step}", f"F{step}", missing // 100, 100)
                for start in range(0, len(fill), 5000):  # storescu's argument list is finite
                    part = fill[start : start + 5000]
                    bench.send(server, part, opts.associations, timeout=opts.orthanc_budget * 2)
                total = step
            figures = measure(
                server, f"http://{bench.HOST}:{server.http_port}/dicom-web", batch, opts, 0
            )
            total += len(batch)
            figures.update(step=step, instances=total, size_mb=index_size_orthanc(workdir))
            log.info("orthanc: %s", figures)
            results.append(figures)
    finally:
        server.stop()
    return results


def index_size_orthanc(workdir: Path) -> float:
    return sum(f.stat().st_size for f in (workdir / "index").glob("*")) / 1e6


# ------------------------------------------------------------------------------- report


def report(runs: dict[str, list[dict]]) -> str:
    lines = [
        "| server | step (instances before) | ingest inst/s | C-FIND p50 ms | QIDO p50 ms | "
        "series /metadata p50 ms | index MB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, results in runs.items():
        for r in results:
            lines.append(
                f"| {name} | {r['step']:,} | {bench.fmt(r['ingest_per_s'])} | "
                f"{bench.fmt(r['cfind_ms'])} | {bench.fmt(r['qido_ms'])} | "
                f"{bench.fmt(r['metadata_ms'])} | {bench.fmt(r['size_mb'], '.0f')} |"
            )
    for name, results in runs.items():
        if name.startswith("minipacs") and len(results) > 1:
            first, last = results[0], results[-1]
            ratio = last["ingest_per_s"] / first["ingest_per_s"]
            lines.append(
                f"\n{name}: ingest at {last['step']:,} = {ratio:.0%} of the rate at "
                f"{first['step']:,} (target ≥ 80 %) "
                f"{bench.verdict(ratio, 0.8)}; C-FIND "
                f"{bench.fmt(last['cfind_ms'])} ms, QIDO {bench.fmt(last['qido_ms'])} ms "
                f"(target < 50) {bench.verdict(max(last['cfind_ms'], last['qido_ms']) < 50)}; "
                f"metadata {bench.fmt(last['metadata_ms'])} ms (target < 100) "
                f"{bench.verdict(last['metadata_ms'] < 100)}"
            )
    return "\n".join(lines)


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("ingest_per_s", "ingest (instances/s)"),
        ("cfind_ms", "C-FIND study p50 (ms)"),
        ("qido_ms", "QIDO-RS study p50 (ms)"),
        ("metadata_ms", "series /metadata p50 (ms)"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, (key, label) in zip(axes, keys, strict=True):
        for name, results in runs.items():
            xs = [max(r["step"], 1000) for r in results]
            ax.plot(xs, [r[key] for r in results], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("instances in the archive (0 drawn at 10³)")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def keep_going(run, *args) -> list[dict]:
    """One server's run; a failure is logged and the others still run."""
    try:
        return run(*args)
    except Exception:
        log.exception("%s failed", run.__name__)
        return []


def save(runs: dict, opts) -> None:
    """The figures so far into the --json file (kept if a later server's run fails)."""
    if opts.json and opts.json != "-":
        bench.write_json(runs, opts.json)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--steps", default="0,10000,100000,1000000", help="archive sizes (instances) to measure at"
    )
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--associations", type=int, default=2, help="storescu at once")
    parser.add_argument(
        "--real", type=int, default=5000, help="real C-STORE instances a step (100 a study)"
    )
    parser.add_argument("--reps", type=int, default=30, help="timed searches per step")
    parser.add_argument("--metadata-reps", type=int, default=10)
    parser.add_argument(
        "--orthanc-budget",
        type=float,
        default=900,
        help="seconds Orthanc gets to grow by real C-STORE (0: skip it)",
    )
    parser.add_argument(
        "--reuse", type=Path, help="start from the figures of an earlier --json (same code)"
    )
    parser.add_argument("--plot", type=Path, help="write the figures as a PNG (matplotlib)")
    parser.add_argument(
        "--wait-idle", type=float, default=600, help="seconds to wait for other benchmarks/tests"
    )
    bench.add_common_args(parser, startup=120, folders=False, strict=False)
    opts = parser.parse_args(argv)
    opts.steps = [int(s) for s in opts.steps.split(",")]
    if opts.real < BATCH_SERIES_SIZE:
        parser.error(f"--real must be ≥ {BATCH_SERIES_SIZE}")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    bench.setup_logging(opts.verbose)
    if not bench.require(("storescu", "findscu", "echoscu"), hint="dcmtk"):
        return 2
    if opts.orthanc_budget > 0 and not bench.require(
        files=(opts.orthanc, bench.ORTHANC_DICOMWEB),
        hint="Debian packages orthanc and orthanc-dicomweb, or --orthanc-budget 0",
    ):
        return 2
    busy = bench.wait_for_quiet(opts.wait_idle)
    try:
        with bench.sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="minipacs-scale-") as tmp:
            root = Path(tmp)
            log.info("writing %d real instances per step", opts.real)
            batches = [
                write_batch(
                    root / f"batch{n}", str(n), opts.real // BATCH_SERIES_SIZE, BATCH_SERIES_SIZE
                )
                for n in range(len(opts.steps))
            ]
            grower = Grower(batches[0][0])
            runs = json.loads(opts.reuse.read_text()) if opts.reuse else {}
            for engine in filter(None, opts.engines.split(",")):
                workdir = root / engine
                workdir.mkdir()
                runs[f"minipacs {engine}"] = keep_going(
                    run_minipacs, engine, workdir, batches, grower, opts
                )
                save(runs, opts)
            if opts.orthanc_budget > 0:
                workdir = root / "orthanc"
                workdir.mkdir()
                runs["orthanc sqlite"] = keep_going(run_orthanc, workdir, batches, opts)
    except (KeyboardInterrupt, bench.Interrupted):
        log.error("interrupted: cleaning up")
        return 130
    finally:
        bench.PROCS.stop_all()  # every server and storescu, on any exit
    text = report(runs)
    print(f"commit {bench.git_commit()}; other work during the run: {busy or 'none'}")
    print(
        "rows between steps are bulk-generated through the models (no files); each step's "
        f"{opts.real:,} are real C-STORE"
    )
    print(text)
    if opts.json:
        bench.write_json(runs, opts.json)
    if opts.plot:
        plot(runs, opts.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
