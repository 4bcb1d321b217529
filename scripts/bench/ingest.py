#!/usr/bin/env python3
"""C-STORE ingest benchmark: minipacs against Orthanc and dcmtk storescp, side by side.

    .venv/bin/python scripts/bench/ingest.py [--count 500] [--servers minipacs,storescp,orthanc]

One synthetic CT study (512×512, 16 bit, fresh UIDs, from scripts/make_study.py) is sent
with the same dcmtk `storescu` (TCP_NODELAY=1) to each server, over 1 association and over
N parallel associations (N storescu processes, one chunk of the files each), every run
against a fresh, empty server on 127.0.0.1. For each run it reports instances/s, MB/s,
the time from the start of sending until the last instance is queryable, and the
server's peak RSS; then ratios and the archive-core targets. See scripts/bench/README.md.

Progress goes to stderr (logging); the figures table goes to stdout.
"""

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import ORTHANC_BIN
from _common import PROCS
from _common import REPO
from _common import SCRIPTS
from _common import SERVER_CLASSES
from _common import BenchError
from _common import Interrupted
from _common import Server
from _common import ensure_orthanc
from _common import fmt
from _common import log_issues
from _common import orthanc_processes
from _common import orthanc_version
from _common import ratio
from _common import send
from _common import sigterm_unwinds
from _common import write_json

log = logging.getLogger("bench.ingest")

ALL_SERVERS = ("minipacs", "storescp", "orthanc")
MB = 1_000_000

# Targets from the archive-core issue.
TARGET_VS_ORTHANC_1 = 1.0
TARGET_VS_ORTHANC_N = 1.5
TARGET_VS_STORESCP = 0.5
TARGET_RSS_MIB = 200.0


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    server: str
    associations: int
    count: int
    total_bytes: int
    ok: bool = False
    error: str | None = None
    send_s: float | None = None
    queryable_s: float | None = None
    queryable_how: str = ""
    stored: int | None = None
    peak_rss_mib: float | None = None
    rss_processes: int = 0
    server_log_issues: int = 0
    server_log_sample: list[str] = field(default_factory=list)
    storescu_log_issues: int = 0
    storescu_log_sample: list[str] = field(default_factory=list)

    @property
    def inst_per_s(self) -> float | None:
        return self.count / self.send_s if self.ok and self.send_s else None

    @property
    def mb_per_s(self) -> float | None:
        return self.total_bytes / MB / self.send_s if self.ok and self.send_s else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["inst_per_s"] = self.inst_per_s
        data["mb_per_s"] = self.mb_per_s
        return data


def wait_queryable(server: Server, count: int, started: float, timeout: float) -> float | None:
    """Poll until `count` instances are queryable; seconds since `started`, or None."""
    deadline = time.perf_counter() + timeout
    seen = 0
    while time.perf_counter() < deadline:
        seen = server.count_queryable()
        if seen >= count:
            return time.perf_counter() - started
        server.check_alive()
        time.sleep(0.01)
    log.warning("%s: only %d of %d queryable after %.0f s", server.name, seen, count, timeout)
    return None


def measure(
    name: str, associations: int, files: list[Path], total_bytes: int, root: Path, opts: Any
) -> Run:
    run = Run(name, associations, len(files), total_bytes)
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-{associations}x-", dir=root))
    server = SERVER_CLASSES[name](workdir, opts)
    run.queryable_how = server.queryable_how
    try:
        server.start()
        log.info(
            "%s: ready on DICOM %d%s; sending %d instances over %d association(s)",
            name,
            server.port,
            f", HTTP {server.http_port}" if server.http_port else "",
            len(files),
            associations,
        )
        # The send starts at `started`; polling begins as soon as every storescu has
        # exited (a server answers Success only after storing, so nothing is missed).
        started = time.perf_counter()
        run.send_s = send(server, files, associations, opts.send_timeout)
        run.queryable_s = wait_queryable(server, len(files), started, opts.query_timeout)
        run.stored = server.count_queryable()
        kib, run.rss_processes = server.peak_rss_kib()
        run.peak_rss_mib = kib / 1024 if kib is not None else None
        run.ok = run.queryable_s is not None and run.stored == len(files)
        if not run.ok:
            run.error = f"{run.stored} of {len(files)} instances stored/queryable"
        log.info(
            "%s ×%d: %.2f s, %.1f inst/s, queryable at %s s, peak RSS %s MiB",
            name,
            associations,
            run.send_s,
            len(files) / run.send_s,
            f"{run.queryable_s:.2f}" if run.queryable_s is not None else "never",
            f"{run.peak_rss_mib:.1f}" if run.peak_rss_mib is not None else "?",
        )
    except BenchError as exc:
        run.error = str(exc)
        log.error("%s ×%d failed: %s", name, associations, exc)
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        log.exception("%s ×%d failed", name, associations)
    finally:
        server.stop()
        run.server_log_issues, run.server_log_sample = log_issues(server.log_path, server.log_issue)
        for path in sorted(workdir.glob("storescu-*.log")):
            hits, sample = log_issues(path)
            run.storescu_log_issues += hits
            run.storescu_log_sample.extend(sample[: 8 - len(run.storescu_log_sample)])
        if run.server_log_issues:
            log.warning(
                "%s ×%d: %d warning/error line(s) in its log, e.g.:\n  %s",
                name,
                associations,
                run.server_log_issues,
                "\n  ".join(run.server_log_sample),
            )
        if run.storescu_log_issues:
            log.warning(
                "%s ×%d: %d warning/error line(s) from storescu, e.g.:\n  %s",
                name,
                associations,
                run.storescu_log_issues,
                "\n  ".join(run.storescu_log_sample),
            )
        if opts.log_dir:
            opts.log_dir.mkdir(parents=True, exist_ok=True)
            for path in workdir.glob("*.log"):
                shutil.copy2(path, opts.log_dir / f"{name}-{associations}x-{path.name}")
        shutil.rmtree(workdir, ignore_errors=True)
    return run


# --------------------------------------------------------------------------- report


def report(runs: list[Run], meta: dict[str, Any], parallel: int) -> tuple[str, list[dict]]:
    lines = [
        f"C-STORE ingest, {meta['count']} instances × {meta['instance_kb']:.0f} KB "
        f"({meta['total_mb']:.1f} MB), storescu TCP_NODELAY=1, 127.0.0.1, {meta['date']}",
        "",
        f"{'server':<9} {'assoc':>5} {'inst/s':>8} {'MB/s':>7} {'send s':>7} "
        f"{'queryable s':>11} {'peak RSS MiB':>12}  status",
    ]
    for run in runs:
        queryable = fmt(run.queryable_s, ".2f")
        if run.server == "storescp" and run.queryable_s is not None:
            queryable += "*"
        status = "ok" if run.ok else f"FAILED: {(run.error or '').splitlines()[0][:60]}"
        if run.server_log_issues:
            status += f" ({run.server_log_issues} log warnings/errors)"
        lines.append(
            f"{run.server:<9} {run.associations:>5} {fmt(run.inst_per_s):>8} "
            f"{fmt(run.mb_per_s):>7} {fmt(run.send_s, '.2f'):>7} {queryable:>11} "
            f"{fmt(run.peak_rss_mib):>12}  {status}"
        )
    if any(run.server == "storescp" for run in runs):
        lines.append("* storescp keeps no index: time until all files are on disk")
    rss_note = [r for r in runs if r.rss_processes > 1]
    if rss_note:
        lines.append("peak RSS sums VmHWM over the server's live process tree")

    by = {(run.server, run.associations): run for run in runs}

    def rate(server: str, assoc: int) -> float | None:
        run = by.get((server, assoc))
        return run.inst_per_s if run else None

    lines += ["", "ratios (instances/s):"]
    for assoc in sorted({1, parallel}):
        mp = rate("minipacs", assoc)
        lines.append(
            f"  {assoc} assoc: minipacs ÷ orthanc = {fmt(ratio(mp, rate('orthanc', assoc)), '.2f')}"
            f", minipacs ÷ storescp = {fmt(ratio(mp, rate('storescp', assoc)), '.2f')}"
        )

    targets: list[dict[str, Any]] = []

    def target(label: str, value: float | None, goal: float, higher_is_better: bool) -> None:
        if value is None:
            verdict = "n/a"
        elif higher_is_better:
            verdict = "PASS" if value >= goal else "FAIL"
        else:
            verdict = "PASS" if value <= goal else "FAIL"
        targets.append({"target": label, "value": value, "goal": goal, "verdict": verdict})

    target(
        "1 assoc: minipacs ≥ 1.0 × orthanc",
        ratio(rate("minipacs", 1), rate("orthanc", 1)),
        TARGET_VS_ORTHANC_1,
        True,
    )
    if parallel > 1:
        target(
            f"{parallel} assoc: minipacs ≥ 1.5 × orthanc",
            ratio(rate("minipacs", parallel), rate("orthanc", parallel)),
            TARGET_VS_ORTHANC_N,
            True,
        )
    for assoc in sorted({1, parallel}):
        target(
            f"{assoc} assoc: minipacs ≥ 0.5 × storescp",
            ratio(rate("minipacs", assoc), rate("storescp", assoc)),
            TARGET_VS_STORESCP,
            True,
        )
    rss = [r.peak_rss_mib for r in runs if r.server == "minipacs" and r.peak_rss_mib is not None]
    target("minipacs peak RSS ≤ 200 MiB", max(rss) if rss else None, TARGET_RSS_MIB, False)

    lines += ["", "targets:"]
    for t in targets:
        value = fmt(t["value"], ".1f" if "RSS" in t["target"] else ".2f")
        lines.append(f"  {t['target']:<36} {value:>7}  {t['verdict']}")
    return "\n".join(lines), targets


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--count", type=int, default=500, help="instances in the study")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each image")
    parser.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help="comma-separated subset of " + ",".join(ALL_SERVERS),
    )
    parser.add_argument(
        "--parallel", type=int, default=4, help="associations (storescu processes) at once"
    )
    parser.add_argument(
        "--minipacs-args",
        default="",
        help="extra arguments for `minipacs serve`; use the = form: --minipacs-args=--no-fsync",
    )
    parser.add_argument(
        "--storescp-args",
        default="+B +xa -pdu 131072 -dhl",
        help="storescp options besides --fork, -aet and -od",
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
        "--tmp",
        type=Path,
        default=None,
        help="parent of the temporary study and data folders; its disk is what is measured "
        "(None: the system temp folder)",
    )
    parser.add_argument("--log-dir", type=Path, help="keep every server and storescu log here")
    parser.add_argument("--startup-timeout", type=float, default=60.0, help="seconds")
    parser.add_argument(
        "--send-timeout", type=float, default=None, help="seconds per send (None: 60 + count / 2)"
    )
    parser.add_argument("--query-timeout", type=float, default=60.0, help="seconds")
    parser.add_argument(
        "--strict", action="store_true", help="exit 3 when a measured target is missed"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    opts = parser.parse_args(argv)
    servers = [s.strip() for s in opts.servers.split(",") if s.strip()]
    unknown = sorted(set(servers) - set(ALL_SERVERS))
    if unknown or not servers:
        parser.error(f"--servers: unknown {unknown}; choose from {','.join(ALL_SERVERS)}")
    opts.servers = [s for s in ALL_SERVERS if s in servers]
    if opts.count < 1 or opts.parallel < 1:
        parser.error("--count and --parallel must be ≥ 1")
    if opts.send_timeout is None:
        opts.send_timeout = 60.0 + opts.count / 2
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    logging.basicConfig(
        level="DEBUG" if opts.verbose else "INFO",
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    for tool in ("storescu", "echoscu") + (("storescp",) if "storescp" in opts.servers else ()):
        if shutil.which(tool) is None:
            log.error("%s not found: install dcmtk (apt-get install dcmtk)", tool)
            return 2
    if "minipacs" in opts.servers and not opts.minipacs.exists():
        log.error("%s not found: create the venv (./scripts/serve does)", opts.minipacs)
        return 2

    root: Path | None = None
    try:
        with sigterm_unwinds():
            if "orthanc" in opts.servers:
                if not ensure_orthanc(opts.orthanc):
                    opts.servers.remove("orthanc")
                else:
                    others = orthanc_processes()
                    if others:
                        log.warning(
                            "other Orthanc processes are running (pids %s): they are not "
                            "measured but share the CPU",
                            others,
                        )
            if not opts.servers:
                log.error("no server left to measure")
                return 2

            root = Path(tempfile.mkdtemp(prefix="minipacs-bench-", dir=opts.tmp))
            sys.path.insert(0, str(SCRIPTS))
            from make_study import make_study

            log.info("writing a %d-instance %d×%d study", opts.count, opts.size, opts.size)
            files = make_study(root / "study", opts.count, opts.size)
            total_bytes = sum(path.stat().st_size for path in files)
            meta: dict[str, Any] = {
                "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "count": opts.count,
                "size": opts.size,
                "total_mb": total_bytes / MB,
                "instance_kb": total_bytes / len(files) / 1000,
                "parallel": opts.parallel,
                "minipacs_args": opts.minipacs_args,
                "storescp_args": opts.storescp_args,
                "cpus": os.cpu_count(),
                "tmp": str(root),
            }
            if "orthanc" in opts.servers:
                meta["orthanc_version"] = orthanc_version(opts.orthanc)

            runs: list[Run] = []
            for name in opts.servers:
                for assoc in sorted({1, opts.parallel}):
                    runs.append(measure(name, assoc, files, total_bytes, root, opts))

            table, targets = report(runs, meta, opts.parallel)
            print(table)
            if opts.json:
                payload = {
                    "meta": meta,
                    "runs": [run.as_dict() for run in runs],
                    "targets": targets,
                }
                write_json(payload, opts.json)
            sys.stdout.flush()
            if not all(run.ok for run in runs):
                return 1
            if opts.strict and any(t["verdict"] == "FAIL" for t in targets):
                return 3
            return 0
    except (KeyboardInterrupt, Interrupted):
        log.error("interrupted: cleaning up")
        return 130
    finally:
        PROCS.stop_all()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
