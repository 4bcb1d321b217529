"""Errors the archive raises; `pacs` maps them to DIMSE statuses, `viewer` to HTTP codes."""


class StorageError(Exception):
    """Base class: something the archive refused or could not do."""


class InvalidUID(StorageError):
    """A UID that is missing, not `^[0-9]+(\\.[0-9]+)*$` or longer than 64 characters."""


class InvalidDataset(StorageError):
    """The bytes do not parse as a DICOM dataset, or it lacks what an instance needs."""


class NotDicom(InvalidDataset):
    """Not a DICOM Part 10 file at all (import skips these)."""


class OverPixelBudget(InvalidDataset):
    """The dataset declares more pixel data than the configured budget (`pixel_budget_mb`):
    decoding it could take the process's memory."""


class UIDMismatch(StorageError):
    """The dataset's SOP Class/Instance UID differ from what the request announced."""


class UIDConflict(UIDMismatch):
    """The dataset's UIDs contradict what the archive holds (0xA900, as a mismatch with
    the request): the indexer sets such an instance aside instead of filing it."""


class SeriesConflict(UIDConflict):
    """The dataset's Series Instance UID is stored under another study: a series belongs to
    one study (PS3.3 C.7.3.1), so filing it there would put the instance in a study its
    own Study Instance UID does not name."""


class InstanceConflict(UIDConflict):
    """The dataset's SOP Instance UID is stored under another series or study (a re-sent
    instance with edited UIDs): moving it is no replacement of its bytes, so only policy
    `keep` takes it, by keeping the stored one. `stored` is the stored one's path."""

    def __init__(self, message: str, stored: str) -> None:
        super().__init__(message)
        self.stored = stored


class DuplicateRejected(StorageError):
    """Different bytes arrived under a stored SOP Instance UID and the policy is `reject`."""


class OutOfResources(StorageError):
    """The disk is full (or a quota/limit was hit): nothing was stored."""


class Refused(Exception):
    """A request the index turns down by its rules (a worklist item without a patient, an
    MPPS update of a finished step): an answer, not a failure of the archive."""


class ObjectStoreError(StorageError):
    """The object store (`storage = "s3://…"`) could not give or take an object: `pacs`
    answers a DIMSE failure, `viewer` 503 with this message."""


class StoreUnavailable(ObjectStoreError):
    """The object store does not answer (down, unreachable, timing out)."""


class ObjectMissing(ObjectStoreError):
    """The index knows the instance but its object is not in the bucket (yet): another
    node has not uploaded it, or it was lost."""
