#!/usr/bin/env python3
"""Clinical workflow services: Modality Worklist C-FIND on 10,000 items, minipacs beside
dcmtk's wlmscpfs (the worklist SCP dcmtk ships, items as .wl files) in the same run; and
auto-routing throughput to a dcmtk storescp beside a plain C-MOVE of the same study.

Worklist: the same items (seeded) go into minipacs with `minipacs worklist import` and
into wlmscpfs's folder as .wl files; each query runs `findscu -W` (process start to exit)
--reps times per server, interleaved; answer counts must agree. Routing: a study is
stored into a minipacs whose route points at a storescp that is down (the items queue),
then storescp starts and the time until it holds every instance gives the forwarding
rate; the same study moved with `movescu` from a minipacs without routes gives C-MOVE's.

    .venv/bin/python scripts/bench/workflow.py [--items 10000] [--reps 20] [--instances 300]
"""

import argparse
import csv
import json
import logging
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as bench
import pydicom

sys.path.insert(0, str(bench.REPO))
sys.path.insert(0, str(bench.REPO / "scripts"))
from make_study import make_study  # noqa: E402

from storage.worklist import make_item  # noqa: E402

log = logging.getLogger("bench")
SURNAMES = [f"NAME{n:03d}" for n in range(100)]  # 1 % of the patients each
STATIONS = {"CT": ["CT01", "CT02"], "MR": ["MR01"], "US": ["US01"], "CR": ["CR01"]}
DAYS = 50
FIRST_DAY = 20270101


class Wlmscpfs(bench.Server):
    """dcmtk's worklist SCP: answers from the .wl files of <folder>/<AE title>/."""

    name = "wlmscpfs"
    aet = "WLMSCP"

    def __init__(self, workdir: Path, opts: argparse.Namespace) -> None:
        super().__init__(workdir, opts)
        self.folder = workdir / "worklists"
        (self.folder / self.aet).mkdir(parents=True)
        (self.folder / self.aet / "lockfile").touch()  # wlmscpfs serves only folders with one

    def command(self) -> list[str]:
        return ["wlmscpfs", "-dfp", str(self.folder), str(self.port)]


def items(count: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for n in range(count):
        modality = rng.choice(list(STATIONS))
        day = DAYS * n // count
        rows.append(
            {
                "PatientID": f"P{n:06d}",
                "PatientName": f"{rng.choice(SURNAMES)}^GIVEN{n % 997}",
                "AccessionNumber": f"ACC{n:07d}",
                "Modality": modality,
                "ScheduledStationAETitle": rng.choice(STATIONS[modality]),
                "ScheduledProcedureStepStartDate": f"2027{1 + day // 28:02d}{1 + day % 28:02d}",
                "ScheduledProcedureStepStartTime": f"{8 + n % 10:02d}{n % 60:02d}",
                "RequestedProcedureDescription": f"{modality} exam",
            }
        )
    return rows


STEP = "ScheduledProcedureStepSequence[0]"
QUERIES = [  # (name, findscu keys)
    ("PatientID exact", ["PatientID=P004242"]),
    ("PatientName NAME042*", ["PatientName=NAME042*"]),
    (
        "one day, CT01",
        [
            f"{STEP}.ScheduledStationAETitle=CT01",
            f"{STEP}.ScheduledProcedureStepStartDate=20270110",
        ],
    ),
    ("one day, all", [f"{STEP}.ScheduledProcedureStepStartDate=20270110"]),
    (
        "a week, MR",
        [f"{STEP}.Modality=MR", f"{STEP}.ScheduledProcedureStepStartDate=20270105-20270111"],
    ),
]
RETURN_KEYS = [
    "PatientName",
    "PatientID",
    "AccessionNumber",
    f"{STEP}.Modality",
    f"{STEP}.ScheduledStationAETitle",
    f"{STEP}.ScheduledProcedureStepStartDate",
]


def findscu(server: bench.Server, keys: list[str]) -> tuple[float, int]:
    given = {k.split("=")[0] for k in keys}
    args = [a for k in [*keys, *(r for r in RETURN_KEYS if r not in given)] for a in ("-k", k)]
    command = ["findscu", "-W", "-aet", bench.CALLING_AET, "-aec", server.aet, *args, bench.HOST]
    command.append(str(server.port))
    started = time.perf_counter()
    result = subprocess.run(
        command, env=bench.base_env(), capture_output=True, text=True, timeout=120
    )
    elapsed = (time.perf_counter() - started) * 1000
    if result.returncode != 0:
        raise bench.BenchError(f"findscu against {server.name} failed: {result.stderr[-500:]}")
    output = result.stderr + result.stdout
    return elapsed, output.count("(Pending)") - output.count("Final Find Response (Pending)")


def run_worklist(root: Path, opts) -> dict:
    rows = items(opts.items, opts.seed)
    mp_dir, wl_dir = root / "mwl-minipacs", root / "mwl-wlmscpfs"
    mp_dir.mkdir()
    wl_dir.mkdir()
    minipacs, wlm = bench.Minipacs(mp_dir, opts), Wlmscpfs(wl_dir, opts)
    source = mp_dir / "items.csv"
    with source.open("w", newline="") as fp:
        writer = csv.DictWriter(fp, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    started = time.perf_counter()
    subprocess.run(
        [str(opts.minipacs), "worklist", "import", str(source), "--data", str(minipacs.data)],
        env={**bench.base_env(), "MINIPACS_FSYNC": "false"},
        check=True,
        capture_output=True,
    )
    imported = time.perf_counter() - started
    for n, row in enumerate(rows):
        item = make_item(row)
        item.is_little_endian, item.is_implicit_VR = True, True
        item.save_as(wlm.folder / wlm.aet / f"item{n:06d}.wl", enforce_file_format=False)
    minipacs.start()
    wlm.start()
    results: dict = {"items": opts.items, "import_s": round(imported, 1), "queries": {}}
    for name, keys in QUERIES:
        times: dict[str, list[float]] = {"minipacs": [], "wlmscpfs": []}
        counts: dict[str, int] = {}
        for _ in range(opts.reps):
            for server in (minipacs, wlm):
                elapsed, count = findscu(server, keys)
                times[server.name].append(elapsed)
                counts[server.name] = count
        results["queries"][name] = {
            server: {
                "answers": counts[server],
                "p50": bench.percentile(t, 0.5),
                "p95": bench.percentile(t, 0.95),
            }
            for server, t in times.items()
        }
        log.info("%s: %s", name, results["queries"][name])
    minipacs.stop()
    wlm.stop()
    return results


def run_routing(root: Path, opts) -> dict:
    study = make_study(root / "study", opts.instances, size=256)
    scp_dir, mp_dir, mv_dir = root / "storescp", root / "routed", root / "mover"
    for folder in (scp_dir, mp_dir, mv_dir):
        folder.mkdir()
    storescp = bench.StoreScp(scp_dir, opts)
    peer = ["--peer", f"STORESCP={bench.HOST}:{storescp.port}"]
    routes = mp_dir / "routes.toml"  # everything to STORESCP
    routes.write_text('route = ["STORESCP"]\nroute_retry = 1\n')
    routed = bench.Minipacs(mp_dir, opts, args=[*peer, "--config", str(routes)])
    routed.start()
    bench.send(routed, study, 1, timeout=600)
    routed.stop()  # everything queued (the peer was down); now the peer comes up
    ids = subprocess.run(
        [str(opts.minipacs), "queue", "--json", "--data", str(routed.data)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    ids = [str(json.loads(line)["id"]) for line in ids]
    subprocess.run(
        [str(opts.minipacs), "queue", "--retry", *ids, "--data", str(routed.data)],
        check=True,
        capture_output=True,
    )
    storescp.start()
    started = time.perf_counter()
    routed.start()
    startup_s = time.perf_counter() - started
    deadline = started + 600
    while bench.count_files(storescp.out) < len(study):
        if time.perf_counter() > deadline:
            raise bench.BenchError("routing did not deliver every instance in 600 s")
        time.sleep(0.05)
    routing_s = time.perf_counter() - started
    routed.stop()
    for path in storescp.out.iterdir():
        path.unlink()
    bench.minipacs_import(opts, mv_dir / "data", [root / "study"], root / "import.log")
    mover = bench.Minipacs(mv_dir, opts, args=peer)
    mover.start()
    uid = pydicom.dcmread(study[0], stop_before_pixels=True).StudyInstanceUID
    started = time.perf_counter()
    subprocess.run(
        ["movescu", "-S", "-aet", bench.CALLING_AET, "-aec", mover.aet, "-aem", "STORESCP"]
        + ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={uid}", bench.HOST]
        + [str(mover.port)],
        env=bench.base_env(),
        check=True,
        capture_output=True,
    )
    move_s = time.perf_counter() - started
    moved = bench.count_files(storescp.out)
    mover.stop()
    storescp.stop()
    return {
        "instances": len(study),
        "routing_s": round(routing_s, 2),
        "routing_per_s": round(len(study) / routing_s, 1),
        "startup_s": round(startup_s, 2),
        "move_s": round(move_s, 2),
        "move_per_s": round(moved / move_s, 1),
        "moved": moved,
    }


def report(results: dict) -> str:
    lines = []
    if "worklist" in results:
        w = results["worklist"]
        lines.append(
            f"Modality Worklist C-FIND, {w['items']:,} items (minipacs import "
            f"{w['import_s']} s); findscu -W start to exit, ms p50/p95"
        )
        lines.append(f"  {'query':24} {'answers':>8} {'minipacs':>16} {'wlmscpfs':>16} ratio")
        for name, by in w["queries"].items():
            mp, wl = by["minipacs"], by["wlmscpfs"]
            agree = mp["answers"] if mp["answers"] == wl["answers"] else "DIFFER"
            lines.append(
                f"  {name:24} {agree!s:>8} {mp['p50']:7.1f}/{mp['p95']:<7.1f} "
                f"{wl['p50']:7.1f}/{wl['p95']:<7.1f} {mp['p50'] / wl['p50']:.2f}"
            )
    if "routing" in results:
        r = results["routing"]
        lines.append(f"Forwarding {r['instances']} instances (256², 128 KiB) to storescp --fork")
        lines.append(
            f"  auto-routing (queued, peer comes up): {r['routing_s']} s, "
            f"{r['routing_per_s']} inst/s (incl. minipacs start-up {r['startup_s']} s)"
        )
        lines.append(
            f"  C-MOVE (movescu, start to exit):      {r['move_s']} s, "
            f"{r['move_per_s']} inst/s ({r['moved']} moved)"
        )
    return "\n".join(lines)


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10000)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip", choices=["worklist", "routing"], action="append", default=[])
    parser.add_argument("--storescp-args", default="+B +xa -pdu 131072 -dhl")
    text = "seconds to wait for other benchmarks/tests on the machine to end"
    parser.add_argument("--quiet-wait", type=float, default=300, help=text)
    bench.add_common_args(parser, startup=120, orthanc=False, folders=False, strict=False)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    bench.setup_logging(opts.verbose)
    tools = ("findscu", "movescu", "storescu", "storescp", "echoscu", "wlmscpfs")
    if not bench.require(tools, hint="dcmtk"):
        return 2
    busy = bench.wait_for_quiet(opts.quiet_wait)
    results: dict = {"commit": bench.git_commit()}
    try:
        with bench.sigterm_unwinds(), tempfile.TemporaryDirectory(prefix="minipacs-wf-") as tmp:
            if "worklist" not in opts.skip:
                results["worklist"] = run_worklist(Path(tmp), opts)
            if "routing" not in opts.skip:
                results["routing"] = run_routing(Path(tmp), opts)
    except bench.BenchError as exc:
        log.error("%s", exc)
        return 1
    finally:
        bench.PROCS.stop_all()
    print(f"commit {results['commit']}; other work during the run: {busy or 'none'}")
    print(report(results))
    if opts.json:
        bench.write_json(results, opts.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
