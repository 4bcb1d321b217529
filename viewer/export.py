"""Cohort export: the instances a query selects, out of the archive into a folder a
notebook can open. No Flask here: `minipacs export` (pacs.cli.export) and the HTTP export
jobs (viewer.export_jobs) both call `prepare` then `Export.run`.

The folder (docs/decisions.md, 2026-12-05):

    <PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   dicom
    <PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.png   png
    <PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>.nii.gz (and .json)    nifti
    manifest.csv or manifest.jsonl: one row per instance, its tags, files and SHA-256
    .export.json, .export.log: the plan and what is done (a re-run resumes from them)

Names are the exported values: with de-identification (storage.deidentify, the one module
for it) the patient's pseudonym and the new UIDs, so the tree says nothing the files do
not. DICOM files are copied as stored, or de-identified; NIfTI volumes are Debian's
`dcm2niix` run on the exported series folder (no orientation code of ours), for series
that are volumes; PNG previews come from the one render pipeline (viewer.render).

Resumable and checked: each file is written aside, then renamed into place, and the log
gets a line once it is; a re-run with the same query and options skips what is done. The
state files hold no query values and no original UIDs (the plan lists index ids and the
exported SOP Instance UIDs), so a de-identified export holds nothing that links it back.
At the end the manifest is written and every row checked: counts, files, SHA-256.

Bounded on disk: before each file the destination's free space is read, and a run stops
(`Outcome.stopped`) rather than leave less than a reserve: on the archive's own disk its
`disk_reserve_mb` plus MARGIN, so C-STORE keeps room after an export; on another disk
FLOOR. A disk that fills anyway (ENOSPC, EDQUOT) stops it the same way. What is done
stays done: a re-run once there is room goes on.
"""

import csv
import fcntl
import hashlib
import hmac
import io
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import BinaryIO

import numpy as np
from pydicom.datadict import dictionary_VR
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from storage import Archive
from storage import audit
from storage import deidentify
from storage import files
from storage.dataset import read_dataset
from storage.errors import StorageError
from storage.query import Key
from storage.query import identifier
from storage.query import keys_from_dataset
from storage.rows import InstanceLocation
from viewer import render

log = logging.getLogger(__name__)

FORMATS = ("dicom", "nifti", "png")
MANIFESTS = ("csv", "jsonl")
LEVELS = ("IMAGE", "SERIES", "STUDY")
UNIQUE = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
DEFAULT_TAGS = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "SeriesDescription",
    "InstanceNumber",
)
COLUMNS = ("dicom", "sha256", "png", "nifti", "note")  # after the tags
STATE, LOG, LOCK = ".export.json", ".export.log", ".export.lock"
PARTIAL = ".partial"  # files being written, renamed into place once whole
STAGE = ".stage"  # DICOM files kept only for the NIfTI and PNG steps (no "dicom" format)
UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
DCM2NIIX = "dcm2niix"
MARGIN = 256 << 20  # free bytes an export leaves on the archive's disk beyond its reserve
FLOOR = 64 << 20  # free bytes an export leaves on any other disk


class ExportError(ValueError):
    """The export cannot be done as asked (key, format, folder): a usage error, or 400."""


class NothingSelected(ExportError):
    """The query selects no instance."""


class DiskFull(Exception):
    """Writing on would leave the destination under its reserve, or it is full: the run
    stops (not a ValueError: no single instance is to blame)."""


@dataclass(frozen=True)
class Options:
    """What an export writes. Made by `options`, which checks every value."""

    formats: tuple[str, ...] = ("dicom",)
    deidentify: bool = False
    deid_options: tuple[str, ...] = ()  # storage.deidentify.OPTIONS names
    manifest: str = "csv"
    tags: tuple[str, ...] = DEFAULT_TAGS


def options(
    formats: str | Iterable[str] = "dicom",
    deidentified: bool = False,
    deid_options: str | Iterable[str] = "",
    manifest: str = "csv",
    tags: str | Iterable[str] = "",
) -> Options:
    """Options from text ("dicom,nifti" or a list); ExportError names what is wrong."""
    chosen = _names(formats)
    unknown = [f for f in chosen if f not in FORMATS]
    if unknown or not chosen:
        raise ExportError(f"unknown format {', '.join(unknown)!r}; formats: {', '.join(FORMATS)}")
    if "nifti" in chosen and shutil.which(DCM2NIIX) is None:
        raise ExportError("the nifti format needs dcm2niix (Debian package dcm2niix) on PATH")
    if manifest not in MANIFESTS:
        raise ExportError(f"manifest must be {' or '.join(MANIFESTS)}, not {manifest!r}")
    columns = _names(tags) or list(DEFAULT_TAGS)
    for keyword in columns:
        if tag_for_keyword(keyword) is None or dictionary_VR(keyword) == "SQ":
            raise ExportError(f"tag {keyword!r} is not a DICOM keyword of a value")
    try:
        deid = sorted(deidentify.parse_options(deid_options))
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if deid and not deidentified:
        raise ExportError("de-identification options need de-identification (--deidentify)")
    return Options(
        tuple(f for f in FORMATS if f in chosen),
        deidentified,
        tuple(deid),
        manifest,
        tuple(columns),
    )


def _names(text: str | Iterable[str]) -> list[str]:
    names = text.split(",") if isinstance(text, str) else list(text)
    return [n.strip() for n in names if n.strip()]


def query_keys(level: str, pairs: dict[str, str]) -> list[Key]:
    """`minipacs find`'s keys (Keyword=value) as query keys at `level`. One at least must
    have a value: everything is asked for with `PatientID=*`, never by forgetting keys."""
    if level not in LEVELS:
        raise ExportError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    if not any(str(value).strip() for value in pairs.values()):
        raise ExportError("say what to export: Keyword=value keys (PatientID=* for everything)")
    try:
        ds = identifier(level, pairs)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    if UNIQUE[level] not in ds:
        setattr(ds, UNIQUE[level], "")
    return keys_from_dataset(ds)


def select(archive: Archive, level: str, pairs: dict[str, str]) -> list[InstanceLocation]:
    """Every instance of the entities `minipacs find -L level` would answer (the query
    engine's full matching), in study, series and instance number order."""
    keys = query_keys(level, pairs)
    unique = f"{tag_for_keyword(UNIQUE[level]):08X}"
    matched = {a[unique]["Value"][0] for a in archive.catalog.find(level, keys) if unique in a}
    attribute = {"STUDY": "study_uid", "SERIES": "series_uid", "IMAGE": "sop_uid"}[level]
    found = [i for i in archive.catalog.locate(level, keys) if getattr(i, attribute) in matched]
    if not found:
        raise NothingSelected("no stored instance matches the query")
    return sorted(found, key=lambda i: (i.study_uid, i.series_uid, i.instance_number or 0))


@dataclass(frozen=True)
class Plan:
    """An export folder's plan: its options, its instances (index id, exported SOP Instance
    UID), a keyed fingerprint of its query and a check value of its project key."""

    fingerprint: str
    options: Options
    instances: list[tuple[int, str]]
    key_file: str = ""
    key_check: str = ""


def prepare(
    archive: Archive,
    folder: Path,
    level: str,
    pairs: dict[str, str],
    chosen: Options,
    profile: deidentify.Profile | None,
    key_file: str = "",
) -> Plan:
    """The plan of `folder`: the one there when it was made for the same query, options
    and key (the export resumes), else a new one for an empty or new folder."""
    secret = files.secret(archive.root / ".deid-key")
    text = json.dumps([level, sorted(pairs.items())], ensure_ascii=False)
    fingerprint = hmac.new(secret, text.encode(), hashlib.sha256).hexdigest()
    key_check = profile.digest("export key", "").hex()[:16] if profile else ""
    existing = read_plan(folder)
    if existing is not None:
        if (existing.fingerprint, existing.options, existing.key_check) != (
            fingerprint,
            chosen,
            key_check,
        ):
            raise ExportError(
                f"{folder} holds another export (other query, options or key): resume it "
                "with --resume, or export into another folder"
            )
        return existing
    try:
        if folder.exists() and any(folder.iterdir()):
            raise ExportError(f"{folder} is not empty and holds no export: name a new folder")
    except NotADirectoryError:
        raise ExportError(f"{folder} is not a folder") from None
    retained = profile is None or "uids" in profile.options
    instances = [
        (i.pk, i.sop_uid if retained else profile.uid(i.sop_uid))  # type: ignore[union-attr]
        for i in select(archive, level, pairs)
    ]
    plan = Plan(fingerprint, chosen, instances, key_file, key_check)
    _write_state(folder, plan)
    return plan


def read_plan(folder: Path) -> Plan | None:
    try:
        state = json.loads((folder / STATE).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{folder / STATE} is unreadable: {exc}") from None
    chosen = Options(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in state["options"].items()}
    )
    return Plan(
        state["fingerprint"],
        chosen,
        [(pk, sop) for pk, sop in state["instances"]],
        state.get("key_file", ""),
        state.get("key_check", ""),
    )


def _write_state(folder: Path, plan: Plan) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        aside = folder / f"{STATE}.tmp"
        aside.write_text(json.dumps({"version": 1, **asdict(plan)}))
        os.replace(aside, folder / STATE)
    except OSError as exc:
        raise ExportError(f"cannot write into {folder}: {exc.strerror or exc}") from None


@dataclass
class Outcome:
    """What a run did; `problems` are (what, why) pairs, `cancelled` a run stopped early
    on request, `stopped` why one stopped for want of disk space."""

    total: int = 0
    exported: int = 0
    done_before: int = 0
    volumes: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    cancelled: bool = False
    stopped: str = ""

    def summary(self) -> dict[str, int]:
        return {
            "instances": self.total,
            "exported": self.exported,
            "already done": self.done_before,
            "volumes": self.volumes,
            "problems": len(self.problems),
        }


class Export:
    """One run over an export folder, under its lock: what the log says is done (and is
    still there) is skipped, the rest exported, then the manifest written and checked."""

    def __init__(
        self,
        archive: Archive,
        folder: Path,
        plan: Plan,
        profile: deidentify.Profile | None,
        who: str,
        pixel_budget: int | None = None,
        disk_reserve: int = 0,
    ) -> None:
        """`disk_reserve`: the bytes C-STORE keeps free on the archive's disk
        (`disk_reserve_mb`); an export into that disk leaves MARGIN more."""
        self.archive, self.folder, self.plan, self.profile = archive, folder, plan, profile
        self.options = plan.options
        self.who = who
        self.pixel_budget = pixel_budget
        self.disk_reserve = disk_reserve
        self.reserve = FLOOR  # set by `run` once the folder is there
        self.cache = render.FrameCache(0)  # each frame is rendered once: nothing to keep
        self.studies: dict[tuple[str, str], int] = {}  # (Patient ID, study) → exported now
        self.log: BinaryIO | None = None  # the folder's log, open while a run exports

    def run(
        self,
        progress: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> Outcome:
        outcome = Outcome(total=len(self.plan.instances))
        with _locked(self.folder):
            shared = os.stat(self.folder).st_dev == os.stat(self.archive.root).st_dev
            self.reserve = self.disk_reserve + MARGIN if shared else FLOOR
            rows, series_done = self._read_log()
            shutil.rmtree(self.folder / PARTIAL, ignore_errors=True)
            (self.folder / PARTIAL).mkdir()
            try:
                with open(self.folder / LOG, "ab", buffering=0) as self.log:
                    self._export(rows, series_done, outcome, progress, cancelled)
                self.log = None
            finally:
                self._audit(outcome)
            if not outcome.cancelled:
                self._finish(rows, series_done, outcome)
        return outcome

    def _export(self, rows, series_done, outcome, progress, cancelled) -> None:
        try:
            self._new_line()
            self._each(rows, series_done, outcome, progress, cancelled)
        except DiskFull as exc:
            outcome.stopped = str(exc)
            outcome.problems.append(("export", outcome.stopped))
            log.warning("export %s", outcome.stopped)

    def _each(self, rows, series_done, outcome, progress, cancelled) -> None:
        count = 0
        for group in self._series(outcome):
            for location, sop in group:
                if cancelled():
                    outcome.cancelled = True
                    return
                row = rows.get(sop)
                if row is not None and self._present(row, series_done):
                    outcome.done_before += 1
                else:
                    try:
                        rows[sop] = self._instance(location, sop)
                    except (deidentify.NotDeidentifiable, StorageError, OSError, ValueError) as exc:
                        outcome.problems.append((location.sop_uid, str(exc)))
                    else:
                        self._note({"instance": rows[sop]})
                        outcome.exported += 1
                count += 1
                if progress is not None:
                    progress(count, outcome.total)
            done = [rows[sop] for _, sop in group if sop in rows]
            if len(done) == len(group) and done[0]["series"] not in series_done:
                self._series_step(done, series_done, outcome)

    def _series(self, outcome: Outcome) -> Iterator[list[tuple[InstanceLocation, str]]]:
        """The plan's instances still stored, a list per series, in the plan's order."""
        planned = dict(self.plan.instances)
        found = {i.pk: i for i in self.archive.catalog.locate_ids(list(planned))}
        group: list[tuple[InstanceLocation, str]] = []
        for pk, sop in self.plan.instances:
            location = found.get(pk)
            if location is None or sop != self._uid(location.sop_uid):
                outcome.problems.append((sop, "no longer stored (deleted, or the index rebuilt)"))
                continue
            if group and group[0][0].series_uid != location.series_uid:
                yield group
                group = []
            group.append((location, sop))
        if group:
            yield group

    def _uid(self, uid: str) -> str:
        if self.profile is None or "uids" in self.profile.options:
            return uid
        return self.profile.uid(uid)

    def _present(self, row: dict, series_done: dict) -> bool:
        """Whether an instance the log lists as done is still there to be skipped."""
        needed = [row["png"]] if row["png"] else []
        if "dicom" in self.options.formats or row["series"] not in series_done:
            needed.append(row["file"])
        return all((self.folder / path).is_file() for path in needed)

    def _instance(self, location: InstanceLocation, sop: str) -> dict[str, Any]:
        """Export one instance: its DICOM file (kept or staged) and PNG; its log row."""
        stored = self.archive.files.local(location.path)  # fetched if only in a bucket
        if self.profile is None:
            ds = read_dataset(stored, stop_before_pixels=True)
            patient = str(ds.get("PatientID", ""))

            def write(fp: BinaryIO) -> None:
                with open(stored, "rb") as source:
                    shutil.copyfileobj(source, fp, files.CHUNK)

        else:
            ds = read_dataset(stored)
            patient = str(ds.get("PatientID", ""))
            deidentify.deidentify(ds, self.profile)

            def write(fp: BinaryIO) -> None:
                ds.save_as(fp, enforce_file_format=True)

        where = "/".join(_name(ds.get(k)) for k in ("PatientID", "StudyInstanceUID"))
        where += f"/{_name(ds.get('SeriesInstanceUID'))}"
        kept = "dicom" in self.options.formats
        path = f"{where if kept else f'{STAGE}/{where}'}/{_name(sop)}.dcm"
        digest = self._write(path, write, stored.stat().st_size)
        png, note = "", ""
        if "png" in self.options.formats:
            png, note = self._png(path, f"{where}/{_name(sop)}.png")
        key = (patient, location.study_uid)
        self.studies[key] = self.studies.get(key, 0) + 1
        return {
            "sop": sop,
            "series": where,
            "file": path,
            "sha256": digest,
            "png": png,
            "note": note,
            "tags": {k: _text(ds.get(k)) for k in self.options.tags},
        }

    def _write(self, path: str, write: Callable[[BinaryIO], None], size: int = 0) -> str:
        """Write a file of about `size` bytes aside, then rename it into place; its
        SHA-256. DiskFull, with nothing left half-written, when there is no room."""
        self._room(size)
        aside = self.folder / PARTIAL / Path(path).name
        try:
            with open(aside, "wb") as fp:
                write(fp)
            target = self.folder / path
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = files.hash_file(aside)[1]
            os.replace(aside, target)
        except OSError as exc:
            aside.unlink(missing_ok=True)
            self._full(exc)
            raise
        return digest

    def _room(self, size: int) -> None:
        """DiskFull when `size` more bytes would leave the folder's disk under the reserve
        (a statvfs a file: next to writing one, nothing)."""
        if shutil.disk_usage(self.folder).free - size < self.reserve:
            raise DiskFull(f"stopped: under {self.reserve >> 20} MiB free on {self.folder}")

    def _full(self, exc: OSError) -> None:
        """DiskFull for a "no room" error (ENOSPC, EDQUOT, EFBIG), else nothing."""
        if exc.errno in files.FULL_ERRNOS:
            raise DiskFull(f"stopped: no space left on {self.folder} ({exc.strerror})") from exc

    def _png(self, source: str, path: str) -> tuple[str, str]:
        """A PNG preview of the first frame (the file's own window); or why there is none."""
        request = render.Request(format="png", pixel_budget=self.pixel_budget)
        try:
            image = render.render(self.folder / source, request, self.cache)
        except Exception as exc:  # any instance may lack pixels or a decoder: noted, not fatal
            return "", f"no PNG: {exc}"
        self._write(path, lambda fp: fp.write(image), len(image))
        return path, ""

    def _series_step(self, rows: list[dict], series_done: dict, outcome: Outcome) -> None:
        """After a series' last instance: its NIfTI volume, then the staged files go."""
        where = rows[0]["series"]
        entry: dict[str, Any] = {"series": where, "nifti": [], "note": ""}
        if "nifti" in self.options.formats:
            paths = [self.folder / r["file"] for r in rows]
            problem = volume_problem([read_dataset(p, stop_before_pixels=True) for p in paths])
            if problem:
                entry["note"] = f"no NIfTI: {problem}"
                outcome.notes.append((where, entry["note"]))
            else:
                self._room(sum(p.stat().st_size for p in paths))  # about the volume's size
                try:
                    entry["nifti"] = self._dcm2niix(paths[0].parent, where)
                except ExportError as exc:
                    outcome.problems.append((where, str(exc)))
                    return
        if "dicom" not in self.options.formats:
            shutil.rmtree(self.folder / STAGE / where, ignore_errors=True)
        series_done[where] = entry
        self._note({"series": entry})

    def _note(self, entry: dict) -> None:
        """A line of the log, once the files it names are in place."""
        self._append(json.dumps(entry, ensure_ascii=False).encode() + b"\n")

    def _new_line(self) -> None:
        """After a last line cut short (a crash, a full disk) the next starts a line of its
        own: the cut one is ignored, and what it named is redone."""
        size = (self.folder / LOG).stat().st_size
        if size:
            with open(self.folder / LOG, "rb") as fp:
                fp.seek(size - 1)
                if fp.read(1) != b"\n":
                    self._append(b"\n")

    def _append(self, data: bytes) -> None:
        """Bytes at the log's end, unbuffered (a line the disk had no room for is not
        tried again when the log is closed); DiskFull when there is no room."""
        assert self.log is not None
        left = memoryview(data)
        try:
            while left:
                left = left[self.log.write(left) :]
        except OSError as exc:
            self._full(exc)
            raise

    def _dcm2niix(self, source: Path, where: str) -> list[str]:
        """dcm2niix on one series folder; the volumes (and BIDS sidecars) beside the folder."""
        name = where.rsplit("/", 1)[1]
        work = self.folder / PARTIAL / f"nifti-{name}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        command = [DCM2NIIX, "-z", "y", "-b", "y", "-ba", "y", "-f", name, "-o", str(work)]
        result = subprocess.run([*command, str(source)], capture_output=True, text=True)
        volumes = sorted(p.name for p in work.glob("*.nii.gz"))
        if result.returncode != 0 or not volumes:
            said = (result.stderr or result.stdout).strip().splitlines()[-1:]
            raise ExportError(f"dcm2niix failed (exit {result.returncode}): {' '.join(said)}")
        study = (self.folder / where).parent
        study.mkdir(parents=True, exist_ok=True)  # with no "dicom" format, nothing is there yet
        for made in sorted(work.iterdir()):
            os.replace(made, study / made.name)
        work.rmdir()
        return [f"{where.rsplit('/', 1)[0]}/{v}" for v in volumes]

    def _read_log(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """What earlier runs did: instance rows by exported SOP Instance UID, finished
        series by folder. A last line cut short by a crash is ignored (that work is redone)."""
        rows: dict[str, dict] = {}
        series: dict[str, dict] = {}
        try:
            with open(self.folder / LOG) as fp:
                for line in fp:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if "instance" in entry:
                        rows[entry["instance"]["sop"]] = entry["instance"]
                    elif "series" in entry:
                        series[entry["series"]["series"]] = entry["series"]
        except FileNotFoundError:
            pass
        return rows, series

    def _finish(self, rows: dict, series_done: dict, outcome: Outcome) -> None:
        """The manifest, in the plan's order, then every row checked against the files."""
        manifest = [
            self._manifest_row(rows[sop], series_done)
            for _, sop in self.plan.instances
            if sop in rows
        ]
        outcome.volumes = sum(len(entry["nifti"]) for entry in series_done.values())
        try:
            self._write(
                f"manifest.{self.options.manifest}", lambda fp: self._manifest(fp, manifest)
            )
        except DiskFull as exc:  # an earlier run's manifest, if any, still names only done files
            if not outcome.stopped:
                outcome.stopped = str(exc)
                outcome.problems.append(("manifest", outcome.stopped))
                log.warning("export %s", outcome.stopped)
        missing = outcome.total - len(manifest)
        if missing:
            outcome.problems.append(("export", f"{missing} of {outcome.total} not exported"))
        outcome.problems += verify(self.folder, manifest)
        if not outcome.problems and "dicom" not in self.options.formats:
            shutil.rmtree(self.folder / STAGE, ignore_errors=True)
        shutil.rmtree(self.folder / PARTIAL, ignore_errors=True)

    def _manifest_row(self, row: dict, series_done: dict) -> dict[str, str]:
        entry = series_done.get(row["series"], {})
        kept = "dicom" in self.options.formats
        notes = [n for n in (row["note"], entry.get("note", "")) if n]
        return {
            **row["tags"],
            "dicom": row["file"] if kept else "",
            "sha256": row["sha256"] if kept else "",
            "png": row["png"],
            "nifti": ";".join(entry.get("nifti", [])),
            "note": "; ".join(notes),
        }

    def _manifest(self, fp: BinaryIO, manifest: list[dict[str, str]]) -> None:
        text = io.TextIOWrapper(fp, encoding="utf-8", newline="")
        if self.options.manifest == "csv":
            writer = csv.DictWriter(text, [*self.options.tags, *COLUMNS])
            writer.writeheader()
            writer.writerows(manifest)
        else:
            for row in manifest:
                text.write(json.dumps(row, ensure_ascii=False) + "\n")
        text.flush()
        text.detach()

    def _audit(self, outcome: Outcome) -> None:
        """One `export` event per study this run wrote files of (its original Patient ID)."""
        deid = ",".join(["basic", *self.options.deid_options]) if self.profile else "no"
        result = "success"
        if outcome.stopped:
            result = f"failure: {outcome.stopped}"
        elif outcome.problems:
            result = f"failure: {len(outcome.problems)} problem(s)"
        for (patient, study), count in self.studies.items():
            self.archive.audit(
                audit.Event(
                    "export",
                    "cancelled" if outcome.cancelled else result,
                    who=self.who,
                    patient_id=patient,
                    study_uid=study,
                    detail={
                        "to": str(self.folder),
                        "instances": count,
                        "formats": ",".join(self.options.formats),
                        "deidentified": deid,
                    },
                )
            )
        self.studies.clear()


def verify(folder: Path, manifest: list[dict[str, str]]) -> list[tuple[str, str]]:
    """Every manifest row against the folder: DICOM files by SHA-256, PNG and NIfTI there."""
    problems = []
    for row in manifest:
        if row["dicom"]:
            try:
                digest = files.hash_file(folder / row["dicom"])[1]
            except OSError:
                digest = ""
            if digest != row["sha256"]:
                problems.append((row["dicom"], "missing, or not what was written"))
        for path in [row["png"], *row["nifti"].split(";")]:
            if path and not (folder / path).is_file():
                problems.append((path, "missing"))
    return problems


def volume_problem(headers: list[Dataset]) -> str:
    """Why a series is not one volume dcm2niix should make ('' when it is): one image,
    missing geometry, slices of other sizes or orientations, irregular spacing."""
    if len(headers) == 1:
        return "" if int(headers[0].get("NumberOfFrames") or 1) > 1 else "a single image"
    if any("ImageOrientationPatient" not in h or "ImagePositionPatient" not in h for h in headers):
        return "no Image Position/Orientation (Patient)"
    if len({(h.get("Rows"), h.get("Columns")) for h in headers}) > 1:
        return "images of different sizes"
    orientation = np.array([[float(v) for v in h.ImageOrientationPatient] for h in headers])
    if np.abs(orientation - orientation[0]).max() > 1e-4:
        return "slices not parallel"
    normal = np.cross(orientation[0][:3], orientation[0][3:])
    along = [float(np.dot(normal, [float(v) for v in h.ImagePositionPatient])) for h in headers]
    places, counts = np.unique(np.round(along, 3), return_counts=True)
    if len(places) < 2:
        return "every image at one position"
    if len(set(counts.tolist())) > 1:
        return "some positions have more images than others"
    gaps = np.diff(places)
    if gaps.max() - gaps.min() > max(0.01 * gaps.mean(), 1e-3):
        return "irregular slice spacing"
    return ""


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One run at a time on a folder (two would write the same files)."""
    with open(folder / LOCK, "a") as fp:
        try:
            fcntl.flock(fp, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"another export is writing into {folder}") from None
        yield


def _name(value: object) -> str:
    """A value as one safe path component (never empty, never hidden)."""
    text = UNSAFE.sub("_", str(value or "").strip())
    return text if text and not text.startswith(".") else f"_{text}"


def _text(value: object) -> str:
    if value is None:
        return ""
    if type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)  # type: ignore[attr-defined]
    return str(value)
