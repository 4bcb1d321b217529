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
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pydicom
from _common import HOST
from _common import PROCS
from _common import REPO
from _common import Minipacs
from _common import base_env
from _common import fmt
from _common import git_commit
from _common import percentile
from _common import send
from _common import setup_logging
from _common import wait_for_quiet
from dicomweb import WebOrthanc
from dicomweb import ensure_dicomweb_plugin
from pydicom.uid import generate_uid

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
import pgtemp  # noqa: E402

from storage.dataset import name_key  # noqa: E402
from storage.dataset import read_instance  # noqa: E402

log = logging.getLogger("scale")
BATCH_STUDIES, BATCH_SERIES_SIZE = 50, 100  # the 5,000 real instances of a step
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
    """Bulk rows straight into a stopped server's index, shaped like ingest's own."""

    def __init__(self, template: Path) -> None:
        self.parsed = read_instance(template)
        self.rng = random.Random(7)
        self.patients = 0

    def grow(self, connect, is_pg: bool, count: int) -> None:
        p = self.parsed
        conn = connect()
        cur = conn.cursor()
        ids = {}
        for table in ("patient", "study", "studymodality", "series", "instance"):
            cur.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}")
            ids[table] = cur.fetchone()[0]
        rows: dict[str, list[tuple]] = {t: [] for t in ids}
        now = time.strftime("%Y-%m-%d %H:%M:%S")

        def flush() -> None:
            for table, items in rows.items():
                if items:
                    insert(cur, is_pg, table, items)
                    items.clear()
            conn.commit()

        for _ in range(count // (SYN_STUDY_SIZE * SYN_STUDIES_PER_PATIENT)):
            self.patients += 1
            ids["patient"] += 1
            pid, name = f"SYN{self.patients:07d}", f"SYN^P{self.patients:07d}"
            patient_id = ids["patient"]
            rows["patient"].append(
                (
                    patient_id,
                    pid,
                    "",
                    name,
                    name_key(name),
                    "19700101",
                    "O",
                    SYN_STUDIES_PER_PATIENT,
                    SYN_STUDIES_PER_PATIENT,
                    SYN_STUDIES_PER_PATIENT * SYN_STUDY_SIZE,
                )
            )
            for _ in range(SYN_STUDIES_PER_PATIENT):
                ids["study"] += 1
                ids["series"] += 1
                ids["studymodality"] += 1
                study_uid, series_uid = generate_uid(), generate_uid()
                date = f"{self.rng.randint(2010, 2026)}{self.rng.randint(1, 12):02d}01"
                rows["study"].append(
                    (
                        ids["study"],
                        study_uid,
                        patient_id,
                        date,
                        "120000",
                        "120000.000000",
                        f"S{ids['study']}",
                        "1",
                        "",
                        "synthetic",
                        "CT",
                        p.sop_class_uid,
                        1,
                        SYN_STUDY_SIZE,
                        now,
                        False,
                    )
                )
                rows["studymodality"].append((ids["studymodality"], ids["study"], "CT"))
                rows["series"].append(
                    (ids["series"], series_uid, ids["study"], "CT", 1, "", SYN_STUDY_SIZE)
                )
                body = (
                    p.json.replace(p.study_uid, study_uid)
                    .replace(p.series_uid, series_uid)
                    .replace(p.patient["patient_id"], pid)
                )
                for n in range(SYN_STUDY_SIZE):
                    ids["instance"] += 1
                    sop = generate_uid()
                    rows["instance"].append(
                        (
                            ids["instance"],
                            sop,
                            ids["series"],
                            p.sop_class_uid,
                            n + 1,
                            p.transfer_syntax,
                            f"{study_uid}/{series_uid}/{sop}.dcm",
                            0,
                            "",
                            now,
                            "BULK",
                            body.replace(p.sop_uid, sop),
                            0,
                        )
                    )
            if len(rows["instance"]) >= 50_000:
                flush()
        flush()
        if is_pg:
            for table in ids:
                cur.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), {ids[table]})")
            conn.commit()
            conn.autocommit = True
            cur.execute("ANALYZE")  # autovacuum would, a little later
        conn.close()


COLUMNS = {
    "patient": "id, patient_id, issuer, patient_name, name_key, birth_date, sex, num_studies, "
    "num_series, num_instances",
    "study": "id, study_uid, patient_id, study_date, study_time, time_key, accession_number, "
    "study_id, referring_physician, description, modalities, sop_classes, num_series, "
    "num_instances, updated_at, protected",
    "studymodality": "id, study_id, modality",
    "series": "id, series_uid, study_id, modality, series_number, description, num_instances",
    "instance": "id, sop_uid, series_id, sop_class_uid, instance_number, transfer_syntax, path, "
    "size, sha256, received_at, calling_aet, json, state",
}


def insert(cur, is_pg: bool, table: str, items: list[tuple]) -> None:
    if is_pg:
        with cur.copy(f"COPY {table} ({COLUMNS[table]}) FROM STDIN") as copy:
            for item in items:
                copy.write_row(item)
    else:
        marks = ", ".join("?" * len(items[0]))
        cur.executemany(f"INSERT INTO {table} ({COLUMNS[table]}) VALUES ({marks})", items)


# ---------------------------------------------------------------------------- measuring


def timed(fn, reps: int) -> float | None:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return percentile(times, 0.5)


def http(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def measure(server, root: str, batch: list[Path], opts, patients: int) -> dict:
    """Ingest the step's real instances, then the searches and the metadata."""
    elapsed = send(server, batch, opts.associations, timeout=1800)
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
            HOST,
            str(server.port),
        ]
        result = subprocess.run(command, capture_output=True, text=True, env=base_env())
        assert result.returncode == 0 and "Find Response: 1 " in result.stderr, result.stderr

    def qido() -> None:
        body = http(f"{root}/studies?PatientID={next(queue)}")
        assert json.loads(body or b"[]"), "no study found"

    first = pydicom.dcmread(batch[0], stop_before_pixels=True)
    metadata_url = (
        f"{root}/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}/metadata"
    )
    count = len(json.loads(http(metadata_url)))
    assert count == BATCH_SERIES_SIZE, count
    return {
        "ingest_per_s": len(batch) / elapsed,
        "cfind_ms": timed(cfind, opts.reps),
        "qido_ms": timed(qido, opts.reps),
        "metadata_ms": timed(lambda: http(metadata_url), opts.metadata_reps),
    }


# ------------------------------------------------------------------------------ engines


class ScaleMinipacs(Minipacs):
    def __init__(self, workdir: Path, opts, index: str) -> None:
        super().__init__(workdir, opts)
        self.index = index

    def extra_args(self) -> list[str]:
        return ["--index", self.index] if self.index else []


def run_minipacs(engine: str, workdir: Path, batches, grower: Grower, opts) -> list[dict]:
    cluster = pgtemp.Cluster(fsync=True) if engine == "postgresql" else None
    index = cluster.database("scale") if cluster else ""
    server = ScaleMinipacs(workdir, opts, index)
    results, total, synthetic = [], 0, 0
    grower.patients = 0  # this engine's own synthetic patients
    try:
        for step, batch in zip(opts.steps, batches, strict=True):
            if step > total:
                started = time.monotonic()
                grower.patients = synthetic // (SYN_STUDY_SIZE * SYN_STUDIES_PER_PATIENT)
                grower.grow(connector(index, server.data), bool(index), step - total)
                synthetic += step - total
                total = step
                log.info(
                    "%s: grown to %d rows in %.0f s", engine, total, time.monotonic() - started
                )
            server.start()
            figures = measure(
                server, f"http://{HOST}:{server.http_port}/dicom-web", batch, opts, grower.patients
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


def connector(index: str, data: Path):
    if index:
        import psycopg

        return lambda: psycopg.connect(index)
    return lambda: sqlite3.connect(data / "index.sqlite")


def index_size(index: str, data: Path) -> float:
    if index:
        import psycopg

        with psycopg.connect(index) as conn:
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    else:
        size = sum(f.stat().st_size for f in data.glob("index.sqlite*"))
    return size / 1e6


class ScaleOrthanc(WebOrthanc):
    """Orthanc with DICOMweb, knowing our calling AE (it answers C-FIND only to known AEs)."""

    def config(self) -> dict:
        config = super().config()
        config["DicomModalities"] = {"BENCHSCU": {"AET": "BENCHSCU", "Host": HOST, "Port": 104}}
        return config


def run_orthanc(workdir: Path, batches, opts) -> list[dict]:
    """Real C-STORE up to each step while the budget lasts (Orthanc has no bulk path)."""
    if not ensure_dicomweb_plugin():
        return []
    server = ScaleOrthanc(workdir, opts)
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
                    send(server, part, opts.associations, timeout=opts.orthanc_budget * 2)
                total = step
            figures = measure(server, f"http://{HOST}:{server.http_port}/dicom-web", batch, opts, 0)
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
                f"| {name} | {r['step']:,} | {fmt(r['ingest_per_s'])} | "
                f"{fmt(r['cfind_ms'])} | {fmt(r['qido_ms'])} | "
                f"{fmt(r['metadata_ms'])} | {fmt(r['size_mb'], '.0f')} |"
            )
    for name, results in runs.items():
        if name.startswith("minipacs") and len(results) > 1:
            first, last = results[0], results[-1]
            ratio = last["ingest_per_s"] / first["ingest_per_s"]
            lines.append(
                f"\n{name}: ingest at {last['step']:,} = {ratio:.0%} of the rate at "
                f"{first['step']:,} (target ≥ 80 %) "
                f"{'PASS' if ratio >= 0.8 else 'FAIL'}; C-FIND "
                f"{fmt(last['cfind_ms'])} ms, QIDO {fmt(last['qido_ms'])} ms "
                f"(target < 50) {verdict(max(last['cfind_ms'], last['qido_ms']) < 50)}; "
                f"metadata {fmt(last['metadata_ms'])} ms (target < 100) "
                f"{'PASS' if last['metadata_ms'] < 100 else 'FAIL'}"
            )
    return "\n".join(lines)


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


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
    if opts.json:
        opts.json.write_text(json.dumps(runs, indent=1))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--steps", default="0,10000,100000,1000000", help="archive sizes (instances) to measure at"
    )
    parser.add_argument("--engines", default="sqlite,postgresql")
    parser.add_argument("--associations", type=int, default=2, help="storescu at once")
    parser.add_argument("--reps", type=int, default=30, help="timed searches per step")
    parser.add_argument("--metadata-reps", type=int, default=10)
    parser.add_argument(
        "--orthanc-budget",
        type=float,
        default=900,
        help="seconds Orthanc gets to grow by real C-STORE (0: skip it)",
    )
    parser.add_argument("--orthanc", type=Path, default=Path("/usr/sbin/Orthanc"))
    parser.add_argument("--minipacs", type=Path, default=REPO / ".venv/bin/minipacs")
    parser.add_argument("--startup-timeout", type=float, default=120)
    parser.add_argument(
        "--reuse", type=Path, help="start from the figures of an earlier --json (same code)"
    )
    parser.add_argument("--plot", type=Path, help="write the figures as a PNG (matplotlib)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    parser.add_argument("-v", "--verbose", action="store_true")
    opts = parser.parse_args(argv)
    opts.steps = [int(s) for s in opts.steps.split(",")]
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    setup_logging(opts.verbose)
    busy = wait_for_quiet(600)
    with tempfile.TemporaryDirectory(prefix="minipacs-scale-") as tmp:
        root = Path(tmp)
        log.info("writing %d real instances per step", BATCH_STUDIES * BATCH_SERIES_SIZE)
        batches = [
            write_batch(root / f"batch{n}", str(n), BATCH_STUDIES, BATCH_SERIES_SIZE)
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
        PROCS.stop_all()
    text = report(runs)
    print(f"commit {git_commit()}; other work during the run: {busy or 'none'}")
    print("rows between steps are bulk-generated (no files); each step's 5,000 are real C-STORE")
    print(text)
    save(runs, opts)
    if opts.plot:
        plot(runs, opts.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
