"""The common C-FIND keys are answered through indexes, never a full table scan."""

import pytest
from pydicom.dataset import Dataset

from storage import Archive
from storage import query
from storage.models import db

CASES = {
    "PatientID": ("STUDY", {"PatientID": "PID1"}),
    "PatientName prefix": ("STUDY", {"PatientName": "DOE*"}),
    "StudyDate range": ("STUDY", {"StudyDate": "20200101-20201231"}),
    "AccessionNumber": ("STUDY", {"AccessionNumber": "A1"}),
    "StudyInstanceUID": ("STUDY", {"StudyInstanceUID": "1.2.3"}),
    "ModalitiesInStudy": ("STUDY", {"ModalitiesInStudy": "MR"}),
    "series of a study": ("SERIES", {"StudyInstanceUID": "1.2.3"}),
    "instances of a series": ("IMAGE", {"SeriesInstanceUID": "1.2.3"}),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_no_full_table_scan(tmp_path, case):
    level, values = CASES[case]
    identifier = Dataset()
    for keyword, value in values.items():
        setattr(identifier, keyword, value)
    with Archive(tmp_path / "data", fsync=False), db.connection_context():
        plan = query.explain(level, query.keys_from_dataset(identifier))
    assert plan
    assert not [step for step in plan if step.startswith("SCAN")], plan
