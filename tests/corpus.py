"""A small synthetic archive with known answers for each PS3.4 matching rule.

Patients (PatientID: name):
  PID1: Doe^John       STUDY A 20200105 103000 CT (2 series: CT×3, CT×2)  ACC-A
                       STUDY B 20210310 140000 MR (1 series: MR×2)        ACC-B
  PID2: DOE^JANE       STUDY C 20200620 080000 MR+SR (series MR×2, SR×1)  ACC-C
  PID3: Smith^Anna     STUDY D 20191231 235900 CR (1 series CR×1)         ACC-D
plus the Japanese patient of pydicom's chrH31.dcm (Yamada^Tarou=山田^太郎=やまだ^たろう).
"""

from pathlib import Path

import pydicom
from dicom_files import CHARSET_FILES
from dicom_files import TEST_FILES
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

STUDIES = {
    "A": ("PID1", "Doe^John", "20200105", "103000", "ACC-A", [("CT", 3), ("CT", 2)]),
    "B": ("PID1", "Doe^John", "20210310", "140000", "ACC-B", [("MR", 2)]),
    "C": ("PID2", "DOE^JANE", "20200620", "080000", "ACC-C", [("MR", 2), ("SR", 1)]),
    "D": ("PID3", "Smith^Anna", "20191231", "235900", "ACC-D", [("CR", 1)]),
}
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "SR": "1.2.840.10008.5.1.4.1.1.88.11",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
}


def build(out: Path) -> dict[str, dict]:
    """Write the corpus under `out`; return {study label: {uid, series: [(uid, [sop uids])]}}."""
    out.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    made: dict[str, dict] = {}
    for label, (pid, name, date, time, accession, series_list) in STUDIES.items():
        study_uid = generate_uid()
        made[label] = {"uid": study_uid, "series": []}
        for number, (modality, count) in enumerate(series_list, start=1):
            series_uid = generate_uid()
            sops = []
            for instance in range(1, count + 1):
                ds = template.copy()
                ds.PatientID, ds.PatientName = pid, name
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
                ds.SOPInstanceUID = generate_uid()
                ds.SOPClassUID = SOP_CLASS[modality]
                ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.StudyDate, ds.StudyTime, ds.AccessionNumber = date, time, accession
                ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, number, instance
                ds.StudyDescription = f"study {label}"
                ds.SeriesDescription = f"{modality} series {number}"
                ds.BodyPartExamined = "HEAD" if label == "A" else "CHEST"
                code = Dataset()
                code.CodeValue = f"PROC-{label}"
                code.CodingSchemeDesignator = "LOCAL"
                code.CodeMeaning = f"procedure {label}"
                ds.ProcedureCodeSequence = [code]
                ds.save_as(out / f"{ds.SOPInstanceUID}.dcm")
                sops.append(ds.SOPInstanceUID)
            made[label]["series"].append((series_uid, sops))
    japanese = pydicom.dcmread(CHARSET_FILES / "chrH31.dcm")
    japanese.save_as(out / "chrH31.dcm")
    made["J"] = {"uid": japanese.StudyInstanceUID, "series": []}
    return made
