"""The index: Patient → Study → Series → Instance, one row per entity.

The matching keys of PS3.4 C.6 are plain indexed columns; counts and the
ModalitiesInStudy/SOPClassesInStudy lists are maintained on every insert so
queries never count rows. Each instance keeps its DICOM JSON (PS3.18 F.2, bulk
data left out) so return keys and metadata never need the file.
"""

from peewee import AutoField
from peewee import BigIntegerField
from peewee import BooleanField
from peewee import Database
from peewee import DatabaseProxy
from peewee import DateTimeField
from peewee import DoubleField
from peewee import ForeignKeyField
from peewee import IntegerField
from peewee import Model
from peewee import TextField

db = DatabaseProxy()
# What takes a database takes `db` as well: the proxy passes everything on to it.
AnyDatabase = Database | DatabaseProxy


class BaseModel(Model):
    # peewee adds this primary key when a model names none; declared so a type checker
    # knows `Model.id` (the same column, the same DDL).
    id = AutoField()

    class Meta:
        database = db


# Identity is PatientID + IssuerOfPatientID (PS3.3 C.7.1.1); '' when absent.
class Patient(BaseModel):
    patient_id = TextField(default="")
    issuer = TextField(default="")
    patient_name = TextField(default="")
    name_key = TextField(default="", index=True)  # alphabetic group, upper case: PN matching
    birth_date = TextField(default="")
    sex = TextField(default="")
    num_studies = IntegerField(default=0)
    num_series = IntegerField(default=0)
    num_instances = IntegerField(default=0)

    class Meta:
        indexes = ((("patient_id", "issuer"), True),)


# A study belongs to the patient of the first instance that created it.
class Study(BaseModel):
    study_uid = TextField(unique=True)
    patient = ForeignKeyField(Patient, backref="studies", lazy_load=False, index=True)
    patient_id: int  # the key's value, peewee's accessor beside `patient`
    study_date = TextField(default="", index=True)
    study_time = TextField(default="")
    time_key = TextField(default="")  # StudyTime as HHMMSS.ffffff, for range matching
    accession_number = TextField(default="", index=True)
    study_id = TextField(default="")
    referring_physician = TextField(default="")
    description = TextField(default="")
    modalities = TextField(default="")  # ModalitiesInStudy, backslash-separated, sorted
    sop_classes = TextField(default="")  # SOPClassesInStudy, backslash-separated, sorted
    num_series = IntegerField(default=0)
    num_instances = IntegerField(default=0)
    updated_at = DateTimeField(index=True)  # last instance received: retention order
    protected = BooleanField(default=False)  # never removed by retention


# One row per modality per study: ModalitiesInStudy matching through an index.
class StudyModality(BaseModel):
    study = ForeignKeyField(Study, backref="modality_rows", lazy_load=False)
    modality = TextField()

    class Meta:
        indexes = ((("modality", "study"), True),)


class Series(BaseModel):
    series_uid = TextField(unique=True)
    study = ForeignKeyField(Study, backref="series", lazy_load=False, index=True)
    modality = TextField(default="", index=True)
    series_number = IntegerField(null=True)
    description = TextField(default="")
    num_instances = IntegerField(default=0)


# state: 0 = file and row agree; 1 = a `replace` is rewriting the file (start-up rehashes it).
class Instance(BaseModel):
    sop_uid = TextField(unique=True)
    series = ForeignKeyField(Series, backref="instances", lazy_load=False, index=True)
    sop_class_uid = TextField(index=True)
    instance_number = IntegerField(null=True)
    transfer_syntax = TextField()
    path = TextField()  # relative to the archive root
    size = BigIntegerField()
    sha256 = TextField()
    received_at = DateTimeField()
    calling_aet = TextField(default="")
    json = TextField()
    state = IntegerField(default=0)


# Append-only, hash-chained: each row's `hash` covers its fields and the previous row's
# hash (storage.audit). Who/what/when/outcome of PS3.15 A.5 audit messages; UIDs and
# Patient ID, never names.
class AuditEvent(BaseModel):
    at = TextField(index=True)  # UTC, ISO 8601 with microseconds
    event = TextField(index=True)  # store, query, retrieve, view, export, delete, login, …
    outcome = TextField()  # "success" or what failed
    who = TextField(default="", index=True)  # user, or calling AE title
    address = TextField(default="")
    patient_id = TextField(default="", index=True)
    study_uid = TextField(default="", index=True)
    detail = TextField(default="")  # JSON: series/instance UIDs, counts, query keys
    prev_hash = TextField()
    hash = TextField()


# Web users (storage.users): a role and a salted password hash (werkzeug's scrypt).
class User(BaseModel):
    name = TextField(unique=True)
    role = TextField()  # one of storage.users.ROLES
    password_hash = TextField()
    created_at = TextField()

    class Meta:
        table_name = "webuser"  # "user" is reserved in PostgreSQL


# Bearer tokens for scripts: only the SHA-256 of each (tokens are random, 256 bits).
class ApiToken(BaseModel):
    user = ForeignKeyField(User, backref="tokens", on_delete="CASCADE", lazy_load=False)
    token_hash = TextField(unique=True)
    expires_at = TextField(default="")  # UTC ISO 8601; empty: never
    created_at = TextField()


# The auto-routing queue (storage.routing): an instance (sop_uid) or a whole study (sop_uid
# NULL, study-stable rules) to forward to `destination`; deleted once sent. It also holds
# event notifications (storage.events): a CloudEvent (`body`) for a `subscription`, and a
# study's stability timer (`event` set, no subscription) that becomes them once due.
class RouteItem(BaseModel):
    destination = TextField()  # a peer's AE title or a DICOMweb base URL (events: the URL)
    study_uid = TextField()
    sop_uid = TextField(null=True)
    status = TextField(default="pending", index=True)  # pending, sending, failed
    attempts = IntegerField(default=0)
    due_at = DateTimeField(index=True)  # the next attempt (sending: the end of its lease)
    last_error = TextField(default="")
    created_at = DateTimeField()
    event = TextField(default="")  # an event type (storage.events.TYPES); '' for a forward
    subscription = IntegerField(null=True)  # the Subscription a notification goes to
    body = TextField(default="")  # the notification as sent (CloudEvents JSON)

    class Meta:
        # a subscriber's notifications of one study go in order (storage.routing.claim)
        indexes = ((("subscription", "study_uid"), False),)


# HTTP receivers of events (storage.events): the types each wants, and the secret its
# notifications are signed with (HMAC-SHA256; kept here, shown once, never logged).
class Subscription(BaseModel):
    url = TextField()
    events = TextField()  # comma-separated types, e.g. "instance.created,study.stable"
    secret = TextField()
    origin = TextField(default="cli")  # cli, or config (kept as the config file says)
    created_at = DateTimeField()


# Modality Worklist items (storage.worklist): the matching keys as columns, the whole
# item as DICOM JSON; `status` mirrors the Scheduled Procedure Step Status (MPPS moves it).
class WorklistItem(BaseModel):
    patient_id = TextField(index=True)
    accession_number = TextField(default="", index=True)
    modality = TextField(default="", index=True)
    station_aet = TextField(default="", index=True)
    start_date = TextField(default="", index=True)  # YYYYMMDD
    status = TextField(default="SCHEDULED", index=True)
    study_uid = TextField(default="")
    step_id = TextField(default="", index=True)  # Scheduled Procedure Step ID
    json = TextField()
    created_at = TextField()


# Modality Performed Procedure Steps (N-CREATE / N-SET), linked to their worklist item.
class PerformedStep(BaseModel):
    sop_uid = TextField(unique=True)
    status = TextField()  # IN PROGRESS, COMPLETED, DISCONTINUED
    worklist = ForeignKeyField(WorklistItem, null=True, on_delete="SET NULL", lazy_load=False)
    worklist_id: int | None  # the key's value, peewee's accessor beside `worklist`
    json = TextField()
    updated_at = TextField()


# The change feed (storage.changefeed): one row per instance created, updated (a replace) or
# deleted, numbered in commit order in the transaction of the change. `sequence` is gapless
# and never reused (the newest entry outlives pruning); `at` is UTC ISO 8601 with
# microseconds and a Z, so text order is time order.
class Change(BaseModel):
    sequence = BigIntegerField(unique=True)
    at = TextField(index=True)
    action = TextField()  # create, update, delete
    study_uid = TextField()
    series_uid = TextField()
    sop_uid = TextField(index=True)
    who = TextField(default="")  # the calling AE title or user (for a delete: who deleted)

    class Meta:
        table_name = "changefeed"


# Extended query tags (storage.querytags): an attribute made a matching key at a level
# (STUDY, SERIES, IMAGE). Private ones name their element by group and low byte (`tag` is
# gggg00ee) and its Private Creator; the block differs between files. Back-fill: `state`
# adding until every entity up to `end_id` (the highest id when it began) has its values;
# `mark` is the last entity done, `done` of `total` the progress; `worker` holds the
# back-fill (or removal) until `lease_until`.
class QueryTag(BaseModel):
    tag = BigIntegerField()  # gggg,eeee as one number (0xFFFE0000 needs 64 bits)
    creator = TextField(default="")
    keyword = TextField(default="")
    vr = TextField()
    level = TextField()
    state = TextField(default="adding")  # adding, ready, removing
    end_id = BigIntegerField(null=True)
    mark = BigIntegerField(default=0)
    done = BigIntegerField(default=0)
    total = BigIntegerField(default=0)
    worker = TextField(default="")
    lease_until = TextField(default="")  # UTC ISO 8601
    created_at = TextField()

    class Meta:
        indexes = ((("tag", "creator"), True),)


# The values of an extended query tag, one row per value of each entity (`entity`: the id of
# the study, series or instance row, by the tag's level): `text` as matching compares it
# (TM as HHMMSS.ffffff), `folded` a PN's upper-case alphabetic group, `number` a number's
# value. Each matching form has its index, so a key is an indexed IN (SELECT entity ...).
class QueryValue(BaseModel):
    tag = ForeignKeyField(QueryTag, lazy_load=False, index=False)
    tag_id: int  # the key's value, peewee's accessor beside `tag`
    entity = IntegerField()
    text = TextField(default="")
    folded = TextField(null=True)
    number = DoubleField(null=True)

    class Meta:
        indexes = (
            (("tag", "text", "entity"), False),
            (("tag", "folded", "entity"), False),
            (("tag", "number", "entity"), False),
            (("tag", "entity"), False),
        )


# One row: the schema version this index is at (storage.schema migrates older ones).
class SchemaVersion(BaseModel):
    version = IntegerField()


MODELS = (
    Patient,
    Study,
    StudyModality,
    Series,
    Instance,
    AuditEvent,
    User,
    ApiToken,
    RouteItem,
    Subscription,
    WorklistItem,
    PerformedStep,
    Change,
    QueryTag,
    QueryValue,
    SchemaVersion,
)

# What the DICOM files tell: `minipacs reindex` drops these and rebuilds them from the files
# (parents first). Every other table holds what no file can (the audit trail, users and
# tokens, the routing queue, subscriptions, the worklist and MPPS, the change feed, the
# extended query tags' definitions) and a reindex keeps it as it is. No kept table has a
# foreign key into these (QueryValue's points out, to QueryTag).
FROM_FILES = (Patient, Study, StudyModality, Series, Instance, QueryValue)
