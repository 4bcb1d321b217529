"""Index rows that storage hands to the DICOM and web sides are typed (storage.rows), not
string-keyed dicts: what `Catalog.locate`, the routing queue and the audit trail return, on
each engine, in-process."""

import dataclasses
import datetime

import pydicom
import pytest
from dicom_files import TEST_FILES
from pydicom.uid import generate_uid

from storage import Archive
from storage import audit
from storage.models import RouteItem
from storage.models import db
from storage.query import Key
from storage.rows import AuditRecord
from storage.rows import InstanceLocation
from storage.rows import RouteEntry

STUDY_UID = 0x0020000D


@pytest.fixture
def archive(tmp_path, engine):
    with Archive(tmp_path / "data", fsync=False, index_url=engine) as opened:
        yield opened


def _import(archive: Archive, folder, study_uid: str, number: int) -> pydicom.Dataset:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber = number
    path = folder / f"{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    archive.import_file(path)
    return ds


def test_locate_gives_each_instance_as_a_typed_row(archive, tmp_path):
    study = generate_uid()
    sent = [_import(archive, tmp_path, study, n) for n in (7, 3)]
    _import(archive, tmp_path, generate_uid(), 1)  # another study: not located

    found = list(archive.catalog.locate("STUDY", [Key(STUDY_UID, "UI", study)]))

    assert all(type(row) is InstanceLocation for row in found)
    assert [(r.sop_uid, r.series_uid, r.instance_number) for r in found] == [
        (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber) for ds in sent
    ]
    for row, ds in zip(found, sent, strict=True):
        assert row.study_uid == study
        assert row.sop_class_uid == ds.SOPClassUID
        assert row.transfer_syntax == ds.file_meta.TransferSyntaxUID
        assert row.path.is_absolute() and row.path.is_relative_to(archive.root)
        assert pydicom.dcmread(row.path).SOPInstanceUID == ds.SOPInstanceUID
    assert found[0].pk < found[1].pk
    with pytest.raises(dataclasses.FrozenInstanceError):
        found[0].path = tmp_path  # type: ignore[misc]


def test_the_routing_queue_gives_typed_entries(archive):
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    with db.connection_context():
        for sop_uid in ("1.2.3.4", None):
            RouteItem.create(
                destination="PEER", study_uid="1.2.3", sop_uid=sop_uid, due_at=now, created_at=now
            )

    listed = archive.route_queue.items()
    claimed = archive.route_queue.due()

    assert all(type(entry) is RouteEntry for entry in listed + claimed)
    assert [(e.destination, e.study_uid, e.sop_uid, e.status) for e in listed] == [
        ("PEER", "1.2.3", "1.2.3.4", "pending"),
        ("PEER", "1.2.3", None, "pending"),
    ]
    assert [e.id for e in claimed] == [e.id for e in listed]
    assert {e.status for e in claimed} == {"sending"}
    assert all(e.due_at > now for e in claimed)  # leased


def test_the_audit_trail_gives_typed_records(archive):
    for who in ("ALICE", "BOB"):
        event = audit.Event("query", who=who, study_uid="1.2.3", detail={"level": "STUDY"})
        archive.write(archive.chain.append, db, event)

    records = list(archive.audit_events(event="query"))
    only_bob = list(archive.audit_events(who="BOB"))

    assert all(type(record) is AuditRecord for record in records)
    assert [(r.who, r.study_uid, r.detail) for r in records] == [
        ("ALICE", "1.2.3", '{"level":"STUDY"}'),
        ("BOB", "1.2.3", '{"level":"STUDY"}'),
    ]
    assert records[1].prev_hash == records[0].hash != ""
    assert only_bob == records[1:]
