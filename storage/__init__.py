"""The archive: files on disk, the index, the one ingest path and the one query engine."""

from storage.archive import Archive
from storage.archive import Outcome
from storage.archive import Stored
from storage.maintenance import Problem

__all__ = ["Archive", "Outcome", "Problem", "Stored"]
