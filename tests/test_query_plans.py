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


@pytest.mark.parametrize("level", query.LEVELS)
def test_select_list_rendered_once_reads_as_peewee_renders_it(tmp_path, level):
    """The engine's select list is rendered once per level and reused: the whole SQL must
    be what peewee writes from the columns themselves, conditions and subqueries included."""
    condition = query.Patient.patient_id == "PID1"
    if level != "PATIENT":
        modality = query.StudyModality
        condition &= query.Study.id.in_(
            modality.select(modality.study).where(modality.modality == "MR")
        )
    models = query.LEVEL_MODELS[: query.LEVELS.index(level) + 1]
    with Archive(tmp_path / "data", fsync=False), db.connection_context():
        for _ in range(2):  # the first renders and keeps it, the second reuses it
            ours = query._base(level).where(condition).sql()
            plain = models[-1].select(*query._fields(level))
            for child, parent in zip(reversed(models), reversed(models[:-1]), strict=False):
                plain = plain.join(
                    parent, on=(getattr(child, parent.__name__.lower()) == parent.id)
                )
            plain = plain.where(condition).order_by(models[-1].id).sql()
            assert ours == plain
