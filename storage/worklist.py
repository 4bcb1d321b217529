"""Modality Worklist items and Modality Performed Procedure Steps, in the index.

An item is made from plain fields (DICOM keywords: from the CLI, a CSV or JSON file, or
the HTTP API) into the attributes PS3.4 K.6 answers with, the scheduled step in a
Scheduled Procedure Step Sequence. Matching is storage.query's (`find_worklist`). MPPS
(PS3.4 F.7) moves an item's status: N-CREATE sets IN PROGRESS, N-SET COMPLETED or
DISCONTINUED, and a step that is no longer IN PROGRESS cannot be changed.
"""

import datetime
import json
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from typing import Any
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from storage import query
from storage.dataset import validate_uid
from storage.errors import InvalidUID
from storage.errors import Refused
from storage.models import PerformedStep
from storage.models import WorklistItem
from storage.models import db

TOP_LEVEL = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "AccessionNumber", "ReferringPhysicianName", "RequestedProcedureID",
    "RequestedProcedureDescription", "StudyInstanceUID", "AdmissionID",
    "RequestingPhysician",
)  # fmt: skip
STEP = (
    "Modality", "ScheduledStationAETitle", "ScheduledStationName",
    "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepID", "ScheduledProcedureStepDescription",
    "ScheduledPerformingPhysicianName", "ScheduledProcedureStepLocation",
)  # fmt: skip
FIELDS = TOP_LEVEL + STEP
REQUIRED = ("PatientID", "PatientName", "Modality", "ScheduledStationAETitle",
            "ScheduledProcedureStepStartDate")  # fmt: skip
FINAL = ("COMPLETED", "DISCONTINUED")


class WorklistError(Refused, ValueError):
    """An item or step that cannot be: the message says which field or state."""


class StepError(Refused):
    """An MPPS request refused; `status` is the DIMSE status (PS3.4 F.7.2)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def make_item(fields: dict[str, str]) -> Dataset:
    """The worklist item's dataset from plain fields (keywords of FIELDS)."""
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise WorklistError(f"unknown field(s) {sorted(unknown)}; known: {', '.join(FIELDS)}")
    missing = [name for name in REQUIRED if not str(fields.get(name, "")).strip()]
    if missing:
        raise WorklistError(f"missing {', '.join(missing)}")
    date = str(fields["ScheduledProcedureStepStartDate"]).replace("-", "")
    if len(date) != 8 or not date.isdigit():
        raise WorklistError("ScheduledProcedureStepStartDate is YYYYMMDD")
    item = Dataset()
    item.SpecificCharacterSet = "ISO_IR 192"
    for name in TOP_LEVEL:
        setattr(item, name, str(fields.get(name, "")).strip())
    try:
        uid = validate_uid(fields.get("StudyInstanceUID") or generate_uid(), "StudyInstanceUID")
    except InvalidUID as exc:
        raise WorklistError(str(exc)) from None
    item.StudyInstanceUID = uid
    step = Dataset()
    for name in STEP:
        setattr(step, name, str(fields.get(name, "")).strip())
    step.ScheduledProcedureStepStartDate = date
    # Type 1 in the MWL return keys (PS3.4 K.6-1): given, else from what is there.
    short_id = item.AccessionNumber or f"W{int(uid.rsplit('.', 1)[-1]) % 10**12:012d}"
    step.ScheduledProcedureStepID = step.ScheduledProcedureStepID or short_id
    item.RequestedProcedureID = item.RequestedProcedureID or step.ScheduledProcedureStepID
    step.ScheduledProcedureStepStartTime = step.ScheduledProcedureStepStartTime or "000000"
    described = item.RequestedProcedureDescription or step.ScheduledProcedureStepDescription
    item.RequestedProcedureDescription = item.RequestedProcedureDescription or described
    step.ScheduledProcedureStepDescription = step.ScheduledProcedureStepDescription or described
    step.ScheduledProcedureStepStatus = "SCHEDULED"
    item.ScheduledProcedureStepSequence = [step]
    return item


def add(fields: dict[str, str]) -> int:
    """Store an item; its id."""
    item = make_item(fields)
    step = item.ScheduledProcedureStepSequence[0]
    row = WorklistItem.create(
        patient_id=item.PatientID,
        accession_number=item.AccessionNumber,
        modality=step.Modality,
        station_aet=step.ScheduledStationAETitle,
        start_date=step.ScheduledProcedureStepStartDate,
        step_id=step.ScheduledProcedureStepID,
        study_uid=item.StudyInstanceUID,
        json=json.dumps(item.to_json_dict()),
        created_at=_now(),
    )
    return row.id


def remove(item_id: int) -> bool:
    return WorklistItem.delete().where(WorklistItem.id == item_id).execute() > 0


def listing() -> list[dict]:
    query = WorklistItem.select().order_by(WorklistItem.start_date, WorklistItem.id)
    rows = cast(Iterable[dict[str, Any]], query.dicts())  # peewee types rows as models
    return [
        {**{k: v for k, v in row.items() if k != "json"}, "item": json.loads(row["json"])}
        for row in rows
    ]


def create_step(sop_uid: str, attributes: Dataset) -> None:
    """MPPS N-CREATE: the step starts IN PROGRESS; its scheduled item follows."""
    status = str(attributes.get("PerformedProcedureStepStatus", ""))
    if status != "IN PROGRESS":
        raise StepError(0x0106, "PerformedProcedureStepStatus must be IN PROGRESS at N-CREATE")
    if PerformedStep.select().where(PerformedStep.sop_uid == sop_uid).exists():
        raise StepError(0x0111, f"performed procedure step {sop_uid} exists already")
    item = _scheduled_item(attributes)
    PerformedStep.create(sop_uid=sop_uid, status=status, worklist=item,
                         json=json.dumps(attributes.to_json_dict()), updated_at=_now())  # fmt: skip
    if item is not None:
        _set_item_status(item, "STARTED")


def set_step(sop_uid: str, changes: Dataset) -> str:
    """MPPS N-SET: update an IN PROGRESS step (and its item's status); the new status."""
    step = PerformedStep.get_or_none(PerformedStep.sop_uid == sop_uid)
    if step is None:
        raise StepError(0x0112, f"no performed procedure step {sop_uid}")
    if step.status != "IN PROGRESS":
        raise StepError(0x0110, "Performed Procedure Step Object may no longer be updated")
    status = str(changes.get("PerformedProcedureStepStatus", step.status))
    if status not in ("IN PROGRESS", *FINAL):
        raise StepError(0x0106, f"PerformedProcedureStepStatus {status!r} is not allowed")
    stored = json.loads(step.json)
    stored.update(changes.to_json_dict())
    step.json, step.status, step.updated_at = json.dumps(stored), status, _now()
    step.save()
    if step.worklist_id is not None and status in FINAL:
        item = WorklistItem.get_or_none(WorklistItem.id == step.worklist_id)
        if item is not None:
            _set_item_status(item, status)
    return status


def _scheduled_item(attributes: Dataset) -> WorklistItem | None:
    """The worklist item the step performs (Scheduled Step Attributes Sequence)."""
    for ref in attributes.get("ScheduledStepAttributesSequence", []):
        step_id = str(ref.get("ScheduledProcedureStepID", ""))
        accession = str(ref.get("AccessionNumber", ""))
        query = WorklistItem.select()
        if step_id:
            query = query.where(WorklistItem.step_id == step_id)
        elif accession:
            query = query.where(WorklistItem.accession_number == accession)
        else:
            continue
        study_uid = str(ref.get("StudyInstanceUID", ""))
        if study_uid:
            query = query.where(WorklistItem.study_uid == study_uid)
        item = query.first()
        if item is not None:
            return item
    return None


def _set_item_status(item: WorklistItem, status: str) -> None:
    """The Scheduled Procedure Step Status: SCHEDULED, STARTED, COMPLETED, DISCONTINUED."""
    stored = json.loads(item.json)
    for step in stored.get("00400100", {}).get("Value", []):
        step["00400020"] = {"vr": "CS", "Value": [status]}
    item.json, item.status = json.dumps(stored), status
    item.save()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


class Worklist:
    """One archive's worklist and performed steps: reads on this thread's connection,
    writes through the archive's index writer (`write`)."""

    def __init__(self, write: Callable) -> None:
        self._write = write

    def add(self, fields: dict[str, str]) -> int:
        return self._write(add, fields)

    def remove(self, item_id: int) -> bool:
        return self._write(remove, item_id)

    def items(self) -> list[dict]:
        with db.connection_context():
            return listing()

    def find(self, keys: list, options=None) -> Iterator[dict]:
        with db.connection_context():
            yield from query.find_worklist(keys, options or query.Options())

    def create_step(self, sop_uid: str, attributes) -> None:
        self._write(create_step, sop_uid, attributes)

    def set_step(self, sop_uid: str, changes) -> str:
        return self._write(set_step, sop_uid, changes)
