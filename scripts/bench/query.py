#!/usr/bin/env python3
"""C-FIND and C-MOVE: minipacs beside Orthanc on the same corpus, both servers up at once.

    .venv/bin/python scripts/bench/query.py [--studies 2000] [--reps 20] [--json F]

What it measures, how, and its targets: scripts/bench/README.md, section query.py.
"""

import argparse
import random
import shutil
import subprocess
import time
from collections import Counter
from functools import partial
from pathlib import Path

import harness as bench

log = bench.log
OPTIONS: bench.Options = {
    "--studies": (2000, "small studies of the corpus"),
    "--reps": (20, "timed runs of each query"),
    "--move-reps": (3, "timed C-MOVEs per server"),
}
SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
}
# Return keys of the study-level queries: what a study list shows. Orthanc answers all of
# them from its database (main DICOM tags or computed), never from its files.
STUDY_KEYS = (  # noqa: SIM905
    "PatientName PatientID PatientBirthDate PatientSex StudyInstanceUID StudyDate StudyTime "
    "AccessionNumber StudyID StudyDescription ReferringPhysicianName ModalitiesInStudy "
    "NumberOfStudyRelatedSeries NumberOfStudyRelatedInstances"
).split()
# Targets of the Query/Retrieve issue: minipacs' p50 ÷ Orthanc's, its C-MOVE rate ÷ Orthanc's.
FIND_GOAL = {"ModalitiesInStudy=MR": 0.5}  # the other queries: 1.0
MOVE_GOAL = 1.0


def write_corpus(folder: Path, studies: int) -> tuple[str, dict[str, int]]:
    """The small studies (seeded), each instance a 64² CT_small with new attributes; the
    patient with most studies, and the answers of the study-level queries."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    ds = dcmread(bench.make_study(folder / "template", 1, 64)[0])
    shutil.rmtree(folder / "template")
    rng = random.Random(20261125)
    patients = [f"Q{number:06d}" for number in range(max(1, studies * 2 // 3))]
    per_patient: Counter[str] = Counter()
    with_mr = 0
    for number in range(studies):
        ds.PatientID = patients[number] if number < len(patients) else rng.choice(patients)
        ds.PatientName = f"QUERY^{ds.PatientID}"
        ds.StudyInstanceUID = generate_uid()
        ds.StudyDate = f"{rng.randint(2010, 2025)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        ds.AccessionNumber = f"Q{number:09d}"
        modalities = [rng.choice(["CT", "CR", "US"])] + (["MR"] if rng.random() < 0.45 else [])
        for series, modality in enumerate(modalities, 1):
            ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = generate_uid(), series, modality
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
            for instance in range(1, rng.randint(1, 2) + 1):
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.InstanceNumber = instance
                ds.save_as(
                    folder / f"{number:05d}-{series}-{instance}.dcm", enforce_file_format=True
                )
        per_patient[ds.PatientID] += 1
        with_mr += "MR" in modalities
    probe, count = per_patient.most_common(1)[0]
    return probe, {"PatientID": count, "ModalitiesInStudy=MR": with_mr}


def settle(idle: float = 0.9, limit: float = 60.0) -> None:
    """Flush what loading left dirty, then wait until the CPUs are idle for a whole second
    (at most `limit` s): the first runs measured the writeback of a few hundred megabytes
    and the servers' post-load work otherwise (~45 ms instead of ~30 for both)."""
    subprocess.run(["sync"], check=False)

    def ticks() -> tuple[int, int]:  # all and idle, from the cpu line of /proc/stat
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(values), values[3]

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        total, free = ticks()
        time.sleep(1.0)
        total_after, free_after = ticks()
        if (free_after - free) >= idle * (total_after - total):
            return


def scenario(opts: argparse.Namespace, root: Path) -> int:
    tools = ("findscu", "movescu", "storescu", "echoscu", "storescp")
    bench.require(tools, (bench.ORTHANC,), hint="Debian packages dcmtk and orthanc")
    log.info("writing %d studies and the CT study", opts.studies)
    patient, expected = write_corpus(root / "corpus", opts.studies)
    ct = bench.read_study(bench.make_study(root / "ct", 500))
    storescp = bench.StoreScp(root / "storescp")
    storescp.start()
    bench.minipacs_import(root / "minipacs-data", [root / "corpus", root / "ct"])
    peer = ["--peer", f"{storescp.aet}={bench.HOST}:{storescp.port}"]
    minipacs = bench.Minipacs(root / "minipacs", root / "minipacs-data", peer)
    orthanc = bench.Orthanc(root / "orthanc", peers={storescp.aet: storescp.port})
    servers = [minipacs, orthanc]
    for server in servers:
        server.start()
    files = sorted((root / "corpus").iterdir()) + ct.files
    log.info("sending %d instances to Orthanc", len(files))
    bench.send(orthanc, files, 4)
    bench.wait_queryable(orthanc, len(files))
    settle()

    study = dict.fromkeys(STUDY_KEYS, "")
    series = {"StudyInstanceUID": ct.study, "SeriesInstanceUID": "", "Modality": ""}
    images = {"StudyInstanceUID": ct.study, "SeriesInstanceUID": ct.series, "SOPInstanceUID": ""}
    queries = {  # name: level, keys, answers
        "PatientID": ("STUDY", {**study, "PatientID": patient}, expected["PatientID"]),
        "ModalitiesInStudy=MR": (
            "STUDY",
            {**study, "ModalitiesInStudy": "MR"},
            expected["ModalitiesInStudy=MR"],
        ),
        "series of the CT study": ("SERIES", series, 1),
        "images of the CT series": ("IMAGE", images, len(ct.files)),
    }
    out = bench.Report(f"C-FIND and C-MOVE beside {bench.orthanc_version()}", opts)
    rows, failed = [], False
    for name, (level, keys, answers) in queries.items():
        query = {"QueryRetrieveLevel": level, **keys}
        calls = {s.name: partial(bench.findscu, s, query, "-S") for s in servers}
        cells, check = bench.side_by_side(bench.interleaved(opts.reps, calls), answers)
        failed |= check != "ok"
        rows.append([name, level, answers, *cells, check])
        goal = FIND_GOAL.get(name, 1.0)
        out.target(f"C-FIND {name}: minipacs p50 ÷ orthanc", cells[-1], goal, higher=False)
    header = ["query", "level", "answers", "minipacs p50", "p95", "orthanc p50", "p95", "ratio"]
    title = f"C-FIND, findscu start to exit, ms ({opts.reps} runs each, servers interleaved)"
    out.table(title, [*header, "answer counts"], rows)

    n = len(ct.files)
    calls = {
        s.name: lambda first, s=s: (bench.movescu(s, storescp, ct.study, n), n) for s in servers
    }
    moves = bench.interleaved(opts.move_reps, calls)
    rate = {name: bench.ratio(1000 * len(ct.files), m.p50) for name, m in moves.items()}
    rows = [[name, rate[name], m.p50, m.error or "ok"] for name, m in moves.items()]
    title = f"C-MOVE of the {len(ct.files)}-instance CT study to storescp, movescu start to exit"
    out.table(title, ["server", "inst/s", "p50 ms", "status"], rows)
    out.target("C-MOVE: minipacs inst/s ÷ orthanc", bench.ratio(*rate.values()), MOVE_GOAL)
    failed |= any(m.error for m in moves.values())
    for server in [*servers, storescp]:
        server.stop()
    return out.finish(failed)


if __name__ == "__main__":
    raise SystemExit(bench.main(__doc__, OPTIONS, scenario))
