#!/usr/bin/env python3
"""Workflow: Modality Worklist C-FIND beside wlmscpfs; auto-routing beside C-MOVE.

    .venv/bin/python scripts/bench/workflow.py [--items 10000] [--reps 20] [--instances 300]

What it measures, how, and its targets: scripts/bench/README.md, section workflow.py.
"""

import argparse
import csv
import json
import random
import re
import subprocess
import time
from functools import partial
from pathlib import Path

import harness as bench

from storage.worklist import make_item

OPTIONS: bench.Options = {
    "--items": (10_000, "worklist items"),
    "--reps": (20, "timed runs of each query"),
    "--instances": (300, "instances routed and moved"),
}
STATIONS = {"CT": ["CT01", "CT02"], "MR": ["MR01"], "US": ["US01"], "CR": ["CR01"]}
STEP = "ScheduledProcedureStepSequence[0]"
QUERIES = {
    "PatientID exact": {"PatientID": "P004242"},
    "PatientName NAME042*": {"PatientName": "NAME042*"},
    "one day, CT01": {
        f"{STEP}.ScheduledStationAETitle": "CT01",
        f"{STEP}.ScheduledProcedureStepStartDate": "20270110",
    },
    "one day, all": {f"{STEP}.ScheduledProcedureStepStartDate": "20270110"},
    "a week, MR": {
        f"{STEP}.Modality": "MR",
        f"{STEP}.ScheduledProcedureStepStartDate": "20270105-20270111",
    },
}
RETURN_KEYS = ["PatientName", "PatientID", "AccessionNumber", f"{STEP}.Modality"]
RETURN_KEYS += [f"{STEP}.ScheduledStationAETitle", f"{STEP}.ScheduledProcedureStepStartDate"]


class Wlmscpfs(bench.Server):
    """dcmtk's worklist SCP: answers from the .wl files of <folder>/<AE title>/."""

    name = "wlmscpfs"
    aet = "WLMSCP"
    log_issue = re.compile(r"^E: ")  # it warns of every type 2 attribute it adds

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.folder = workdir / "worklists" / self.aet
        self.folder.mkdir(parents=True)
        (self.folder / "lockfile").touch()  # wlmscpfs serves only folders with one

    def command(self) -> list[str]:
        return ["wlmscpfs", "-dfp", str(self.folder.parent), str(self.port)]


def items(count: int) -> list[dict[str, str]]:
    """Seeded items: 100 surnames (1 % of the patients each), 5 stations, 50 days."""
    rng = random.Random(7)
    rows = []
    for n in range(count):
        modality = rng.choice(list(STATIONS))
        day = 50 * n // count
        rows.append(
            {
                "PatientID": f"P{n:06d}",
                "PatientName": f"NAME{rng.randrange(100):03d}^GIVEN{n % 997}",
                "AccessionNumber": f"ACC{n:07d}",
                "Modality": modality,
                "ScheduledStationAETitle": rng.choice(STATIONS[modality]),
                "ScheduledProcedureStepStartDate": f"2027{1 + day // 28:02d}{1 + day % 28:02d}",
                "ScheduledProcedureStepStartTime": f"{8 + n % 10:02d}{n % 60:02d}",
                "RequestedProcedureDescription": f"{modality} exam",
            }
        )
    return rows


def minipacs_cli(*args: str) -> str:
    """A `minipacs` command from the code snapshot, fsync off; its stdout."""
    env = {**bench.minipacs_env(), "MINIPACS_FSYNC": "false"}
    command = [str(bench.MINIPACS), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout


def worklist(root: Path, opts: argparse.Namespace, out: bench.Report) -> bool:
    """The worklist table; whether the answer counts differ."""
    rows = items(opts.items)
    minipacs, wlm = bench.Minipacs(root / "mwl-minipacs"), Wlmscpfs(root / "mwl-wlmscpfs")
    source = root / "items.csv"
    with source.open("w", newline="") as file:
        writer = csv.DictWriter(file, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    started = time.perf_counter()
    minipacs_cli("worklist", "import", str(source), "--data", str(minipacs.data))
    imported = time.perf_counter() - started
    for n, row in enumerate(rows):
        path = wlm.folder / f"item{n:06d}.wl"
        make_item(row).save_as(path, implicit_vr=True, little_endian=True)
    minipacs.start()
    wlm.start()
    table, differ = [], False
    for name, keys in QUERIES.items():
        query = {**dict.fromkeys(RETURN_KEYS, ""), **keys}
        calls = {s.name: partial(bench.findscu, s, query, "-W") for s in (minipacs, wlm)}
        found = bench.interleaved(opts.reps, calls)
        cells, check = bench.side_by_side(found, found["wlmscpfs"].answers)  # the same?
        differ |= check != "ok"
        table.append([name, found["minipacs"].answers, *cells, check])
    minipacs.stop()
    wlm.stop()
    title = f"Modality Worklist C-FIND, {opts.items:,} items, findscu -W start to exit, ms"
    header = ["query", "answers", "minipacs p50", "p95", "wlmscpfs p50", "p95", "ratio", "status"]
    out.table(title, header, table)
    out.note(f"minipacs worklist import of the items: {imported:.1f} s")
    return differ


def routing(root: Path, opts: argparse.Namespace, out: bench.Report) -> None:
    files = bench.make_study(root / "study", opts.instances, size=256)
    study = bench.read_study(files)
    storescp = bench.StoreScp(root / "storescp")
    peer = ["--peer", f"{storescp.aet}={bench.HOST}:{storescp.port}"]
    routes = root / "routes.toml"  # everything to STORESCP
    routes.write_text(f'route = ["{storescp.aet}"]\nroute_retry = 1\n')
    routed = bench.Minipacs(root / "routed", args=[*peer, "--config", str(routes)])
    routed.start()
    bench.send(routed, files)
    routed.stop()  # every item waits (the peer was down): make them due, bring it up
    queued = minipacs_cli("queue", "--json", "--data", str(routed.data)).splitlines()
    ids = [str(json.loads(line)["id"]) for line in queued]
    minipacs_cli("queue", "--retry", *ids, "--data", str(routed.data))
    storescp.start()
    started = time.perf_counter()
    startup = routed.start()
    arrived = partial(bench.count_files, storescp.out)
    bench.poll(lambda: arrived() >= len(files), 600, "routing: every instance delivered")
    routing_s = time.perf_counter() - started
    routed.stop()
    bench.minipacs_import(root / "mover-data", [root / "study"])
    mover = bench.Minipacs(root / "mover", root / "mover-data", peer)
    mover.start()
    move_s = bench.movescu(mover, storescp, study.study, len(files))
    mover.stop()
    storescp.stop()
    rows = [
        ["auto-routing (queued, the peer comes up)", routing_s, len(files) / routing_s, startup],
        ["C-MOVE (movescu start to exit)", move_s, len(files) / move_s, None],
    ]
    title = f"forwarding {len(files)} instances (256², 128 KiB) to storescp --fork"
    out.table(title, ["", "s", "inst/s", "minipacs start-up s"], rows)


def scenario(opts: argparse.Namespace, root: Path) -> int:
    tools = ("findscu", "movescu", "storescu", "storescp", "echoscu", "wlmscpfs")
    bench.require(tools, hint="Debian package dcmtk")
    out = bench.Report("Workflow: worklist and routing", opts)
    differ = worklist(root, opts, out)
    routing(root, opts, out)
    return out.finish(differ)


if __name__ == "__main__":
    raise SystemExit(bench.main(__doc__, OPTIONS, scenario))
