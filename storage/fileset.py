"""A study or series as a DICOM File-set (PS3.10 section 8, PS3.3 Annex F), streamed as a
ZIP: the instance files as stored plus a DICOMDIR, for a CD or a mail.

pydicom's FileSet writes a DICOMDIR only for instances it has copied into a staging folder
first (`FileSet.add` saves every dataset, `write` copies them again), so the DICOMDIR is
made here, from the DICOM JSON the index keeps: no instance file is opened until its bytes
are streamed. Each instance's directory record type follows PS3.3 F.5 by its SOP Class
(LEAF_TYPES), the choice pydicom's FileSet makes.

File IDs: `DICOM/PT000001/ST000001/SE000001/IM000001` (PS3.10 8.5: at most 8 components of
at most 8 characters, A-Z 0-9 _), numbered in series then instance order.
"""

import json
import os
import time
import zipfile
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import NamedTuple

from pydicom.datadict import dictionary_VR
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import MediaStorageDirectoryStorage
from pydicom.uid import generate_uid

from storage.files import CHUNK
from storage.journal import IMPLEMENTATION_UID
from storage.journal import IMPLEMENTATION_VERSION

ROOT = "DICOM"  # the folder holding every instance, beside DICOMDIR
FILE_SET_ID = "MINIPACS"
MAX_PER_LEVEL = 999_999  # six digits after a two-letter prefix: eight characters

# Keys of each directory record (PS3.3 F.5), those pydicom's DIRECTORY_RECORDERS write:
# Types 1 and 2 always there (empty when the instance lacks them), 1C and 3 when it has
# them. pydicom's recorders refuse an instance without a Type 1 value, which real files
# often lack (StudyID, InstanceNumber): a download must not fail for that, and inventing
# a value would put in the DICOMDIR what the instance does not say.
RECORD_KEYS: dict[str, tuple[str, str]] = {  # kind: (Types 1 and 2, Types 1C and 3)
    "PATIENT": ("PatientName PatientID", ""),
    "STUDY": ("StudyDate StudyTime StudyDescription StudyInstanceUID StudyID AccessionNumber", ""),
    "SERIES": ("Modality SeriesInstanceUID SeriesNumber", ""),
    "IMAGE": ("InstanceNumber", ""),
    "RT DOSE": ("InstanceNumber DoseSummationType", ""),
    "RT STRUCTURE SET": (
        "InstanceNumber StructureSetLabel StructureSetDate StructureSetTime",
        "",
    ),
    "RT PLAN": ("InstanceNumber RTPlanLabel RTPlanDate RTPlanTime", ""),
    "RT TREAT RECORD": ("InstanceNumber TreatmentDate TreatmentTime", ""),
    "PRESENTATION": (
        "PresentationCreationDate PresentationCreationTime InstanceNumber ContentLabel "
        "ContentDescription ContentCreatorName",
        "ReferencedSeriesSequence BlendingSequence",
    ),
    "SR DOCUMENT": (
        "InstanceNumber CompletionFlag VerificationFlag ContentDate ContentTime "
        "ConceptNameCodeSequence",
        "VerificationDateTime ContentSequence",
    ),
    "KEY OBJECT DOC": (
        "InstanceNumber ContentDate ContentTime ConceptNameCodeSequence",
        "ContentSequence",
    ),
    "WAVEFORM": ("InstanceNumber ContentDate ContentTime", ""),
    "RAW DATA": ("InstanceNumber ContentDate ContentTime", ""),
    "SPECTROSCOPY": (
        "ImageType ContentDate ContentTime InstanceNumber NumberOfFrames Rows Columns "
        "DataPointRows DataPointColumns",
        "ReferencedImageEvidenceSequence",
    ),
    "ENCAP DOC": (
        "ContentDate ContentTime InstanceNumber DocumentTitle ConceptNameCodeSequence "
        "MIMETypeOfEncapsulatedDocument",
        "HL7InstanceIdentifier",
    ),
    "ASSESSMENT": ("InstanceNumber InstanceCreationDate InstanceCreationTime", ""),
    "RADIOTHERAPY": (
        "InstanceNumber ContentDescription ContentCreatorName",
        "UserContentLabel UserContentLongLabel",
    ),
    "SURFACE SCAN": ("ContentDate ContentTime", ""),
    "STEREOMETRIC": ("", ""),
    "PLAN": ("", ""),
}
for _kind in ("REGISTRATION", "FIDUCIAL", "VALUE MAP", "MEASUREMENT", "SURFACE", "TRACT"):
    # the Content Identification Macro, with the content date and time
    RECORD_KEYS[_kind] = (
        "InstanceNumber ContentDate ContentTime ContentLabel ContentDescription ContentCreatorName",
        "",
    )

# The record type under a SERIES record by SOP Class (PS3.3 F.5; the storage classes
# pydicom's FileSet knows, by their keywords); any other SOP Class is an IMAGE.
LEAF_TYPES: dict[str, str] = {
    keyword: kind
    for kind, keywords in {
        "RT DOSE": "RTDoseStorage",
        "RT STRUCTURE SET": "RTStructureSetStorage",
        "RT TREAT RECORD": "RTBeamsTreatmentRecordStorage RTBrachyTreatmentRecordStorage "
        "RTTreatmentSummaryRecordStorage RTIonBeamsTreatmentRecordStorage",
        "PRESENTATION": "GrayscaleSoftcopyPresentationStateStorage "
        "ColorSoftcopyPresentationStateStorage PseudoColorSoftcopyPresentationStateStorage "
        "BlendingSoftcopyPresentationStateStorage XAXRFGrayscaleSoftcopyPresentationStateStorage "
        "BasicStructuredDisplayStorage",
        "WAVEFORM": "BasicVoiceAudioWaveformStorage TwelveLeadECGWaveformStorage "
        "GeneralECGWaveformStorage AmbulatoryECGWaveformStorage HemodynamicWaveformStorage "
        "CardiacElectrophysiologyWaveformStorage ArterialPulseWaveformStorage "
        "RespiratoryWaveformStorage GeneralAudioWaveformStorage "
        "RoutineScalpElectroencephalogramWaveformStorage ElectromyogramWaveformStorage "
        "ElectrooculogramWaveformStorage SleepElectroencephalogramWaveformStorage "
        "MultichannelRespiratoryWaveformStorage BodyPositionWaveformStorage",
        "SR DOCUMENT": "BasicTextSRStorage EnhancedSRStorage ComprehensiveSRStorage "
        "MammographyCADSRStorage ChestCADSRStorage ProcedureLogStorage XRayRadiationDoseSRStorage "
        "SpectaclePrescriptionReportStorage ColonCADSRStorage "
        "MacularGridThicknessAndVolumeReportStorage ImplantationPlanSRStorage "
        "Comprehensive3DSRStorage RadiopharmaceuticalRadiationDoseSRStorage ExtensibleSRStorage "
        "AcquisitionContextSRStorage SimplifiedAdultEchoSRStorage PatientRadiationDoseSRStorage "
        "PlannedImagingAgentAdministrationSRStorage PerformedImagingAgentAdministrationSRStorage",
        "KEY OBJECT DOC": "KeyObjectSelectionDocumentStorage",
        "SPECTROSCOPY": "MRSpectroscopyStorage",
        "RAW DATA": "RawDataStorage",
        "REGISTRATION": "SpatialRegistrationStorage DeformableSpatialRegistrationStorage",
        "FIDUCIAL": "SpatialFiducialsStorage",
        "VALUE MAP": "RealWorldValueMappingStorage",
        "STEREOMETRIC": "StereometricRelationshipStorage",
        "MEASUREMENT": "LensometryMeasurementsStorage AutorefractionMeasurementsStorage "
        "KeratometryMeasurementsStorage SubjectiveRefractionMeasurementsStorage "
        "VisualAcuityMeasurementsStorage OphthalmicAxialMeasurementsStorage "
        "OphthalmicVisualFieldStaticPerimetryMeasurementsStorage",
        "SURFACE": "SurfaceSegmentationStorage",
        "SURFACE SCAN": "SurfaceScanMeshStorage SurfaceScanPointCloudStorage",
        "TRACT": "TractographyResultsStorage",
        "ASSESSMENT": "ContentAssessmentResultsStorage",
    }.items()
    for keyword in keywords.split()
}
RADIOTHERAPY_MODALITIES = ("RTINTENT", "RTSEGANN", "RTRAD")  # second-generation RT IODs


def _tag(keyword: str) -> str:
    """The DICOM JSON key of a keyword ("PatientID" → "00100020")."""
    return f"{_tag_number(keyword):08X}"


def _tag_number(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag


class Stored(NamedTuple):
    """An instance as the index has it: its DICOM JSON, stored transfer syntax, file."""

    json: str
    transfer_syntax: str
    path: Path


class Member(NamedTuple):
    """A file of the ZIP: its name there (the File ID with "/") and the stored file."""

    name: str
    path: Path


@dataclass
class _Node:
    record: Dataset
    name: str  # its component of the File ID: a two-letter kind and a six-digit number
    children: list["_Node"] = field(default_factory=list)
    offset: int = 0

    def add(self, prefix: str, record: Dataset) -> "_Node":
        number = len(self.children) + 1
        if number > MAX_PER_LEVEL:
            raise ValueError(f"more than {MAX_PER_LEVEL} entries under one File-set record")
        child = _Node(record, f"{prefix}{number:06d}")
        self.children.append(child)
        return child


@dataclass(frozen=True)
class Plan:
    """What a File-set of a study or series holds: the DICOMDIR and the instance files."""

    dicomdir: bytes
    members: list[Member]


def plan(instances: Iterable[Stored]) -> Plan:
    """The File-set of one study's `instances` (all, or one series', in series then
    instance order): each gets a File ID and a record, the patient and study records
    come from the first instance, each series' from its first. Only the JSON is read."""
    root: list[_Node] = []
    series: dict[str, _Node] = {}
    members: list[Member] = []
    for stored in instances:
        found = json.loads(stored.json)
        if not root:
            root.append(_Node(_record("PATIENT", found), "PT000001"))
            root[0].add("ST", _record("STUDY", found))
        patient, study = root[0], root[0].children[0]
        series_uid = _value(found, "SeriesInstanceUID")
        if series_uid not in series:
            series[series_uid] = study.add("SE", _record("SERIES", found))
        leaf = series[series_uid].add("IM", _record(_leaf_type(found), found))
        file_id = [ROOT, patient.name, study.name, series[series_uid].name, leaf.name]
        leaf.record.ReferencedFileID = file_id
        leaf.record.ReferencedSOPClassUIDInFile = _value(found, "SOPClassUID")
        leaf.record.ReferencedSOPInstanceUIDInFile = _value(found, "SOPInstanceUID")
        leaf.record.ReferencedTransferSyntaxUIDInFile = stored.transfer_syntax
        members.append(Member("/".join(file_id), stored.path))
    return Plan(dicomdir(root), members)


def _value(found: dict[str, Any], keyword: str) -> str:
    values = found.get(_tag(keyword), {}).get("Value") or [""]
    return str(values[0])


def _leaf_type(found: dict[str, Any]) -> str:
    """The record type of an instance (IMAGE, SR DOCUMENT, PRESENTATION, RT DOSE…), as
    pydicom's FileSet decides it: the Modality of second-generation RT and of plans, an
    encapsulated document, an RT Plan Label, then the SOP Class. The single-level types
    (PALETTE, IMPLANT, HANGING PROTOCOL) never occur: their IODs have no study, so the
    archive cannot have stored them."""
    modality = _value(found, "Modality")
    if modality in RADIOTHERAPY_MODALITIES:
        return "RADIOTHERAPY"
    if modality == "PLAN":
        return "PLAN"
    if _tag("EncapsulatedDocument") in found:
        return "ENCAP DOC"
    if _tag("RTPlanLabel") in found:
        return "RT PLAN"
    return LEAF_TYPES.get(UID(_value(found, "SOPClassUID")).keyword, "IMAGE")


def _record(kind: str, found: dict[str, Any]) -> Dataset:
    """A directory record of `kind` with its keys from the instance's JSON; the offsets
    are set when the DICOMDIR is written."""
    required, conditional = (keys.split() for keys in RECORD_KEYS[kind])
    wanted: dict[str, Any] = {}
    for keyword in ("SpecificCharacterSet", *required, *conditional):
        tag = _tag(keyword)
        if tag in found:
            wanted[tag] = found[tag]
        elif keyword in required:
            wanted[tag] = {"vr": dictionary_VR(_tag_number(keyword))}
    if kind == "SR DOCUMENT" and _value(found, "VerificationFlag") == "VERIFIED":
        verified = _verified(found)
        if verified:
            wanted[_tag("VerificationDateTime")] = {"vr": "DT", "Value": [verified]}
    content = _tag("ContentSequence")
    if content in wanted:  # PS3.3 F.5.21, F.5.22: only the items that modify the title
        items = wanted[content].get("Value", [])
        kept = [i for i in items if _value(i, "RelationshipType") == "HAS CONCEPT MOD"]
        if kept:
            wanted[content] = {"vr": "SQ", "Value": kept}
        else:
            del wanted[content]
    record = Dataset.from_json(wanted, lambda *_: None)
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = kind
    return record


def _verified(found: dict[str, Any]) -> str:
    """The most recent Verification DateTime of a verified SR (PS3.3 F.5.21, Type 1C when
    VERIFIED): in the instance it is in each Verifying Observer Sequence item, in the
    record at the top. Compared as text: DT sorts by time within one offset."""
    items = found.get(_tag("VerifyingObserverSequence"), {}).get("Value") or []
    times = [_value(item, "VerificationDateTime") for item in items]
    return max((t for t in times if t), default="")


def dicomdir(root: list[_Node]) -> bytes:
    """The DICOMDIR file (Explicit VR Little Endian) recording the `root` entities and
    everything under them, depth first. Offsets count from the first byte of the
    preamble (PS3.3 F.3.2.1); they are fixed-length UL values, so each record is
    encoded once to learn its length and again with its offsets set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    head = Dataset()
    head.FileSetID = FILE_SET_ID
    head.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    head.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    head.FileSetConsistencyFlag = 0

    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    start = out.tell() + len(_encoded(head)) + SEQUENCE_HEAD_LENGTH
    nodes = list(_depth_first(root))
    offset = start
    for node in nodes:
        node.offset = offset
        offset += ITEM_HEAD_LENGTH + len(_encoded(node.record))
    _link(root)
    if root:
        head.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = root[0].offset
        head.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = root[-1].offset
    out.write(_encoded(head))
    out.write(SEQUENCE_HEAD)
    for node in nodes:
        body = _encoded(node.record)
        out.write(ITEM_TAG + len(body).to_bytes(4, "little") + body)
    out.write(SEQUENCE_END)
    return bytes(out.getvalue())


# (0004,1220) Directory Record Sequence, explicit VR, undefined length; its items have a
# defined length; the sequence ends with a delimitation item (PS3.5 7.5).
SEQUENCE_HEAD = b"\x04\x00\x20\x12SQ\x00\x00\xff\xff\xff\xff"
SEQUENCE_HEAD_LENGTH = len(SEQUENCE_HEAD)
ITEM_TAG = b"\xfe\xff\x00\xe0"
ITEM_HEAD_LENGTH = 8
SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _encoded(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    write_dataset(out, ds)
    return bytes(out.getvalue())


def _depth_first(nodes: list[_Node]) -> Iterator[_Node]:
    for node in nodes:
        yield node
        yield from _depth_first(node.children)


def _link(siblings: list[_Node]) -> None:
    """Each record points to the next at its level and to the first of its children."""
    for index, node in enumerate(siblings):
        following = siblings[index + 1].offset if index + 1 < len(siblings) else 0
        node.record.OffsetOfTheNextDirectoryRecord = following
        lower = node.children[0].offset if node.children else 0
        node.record.OffsetOfReferencedLowerLevelDirectoryEntity = lower
        _link(node.children)


# -- the ZIP ---------------------------------------------------------------------------


class _Pipe:
    """A write-only stream that zipfile fills and the generator empties: zipfile sees it
    cannot seek, so it writes each member's CRC and sizes after its data (a data
    descriptor) and never goes back."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


def zip_chunks(fileset: Plan, local: Callable[[Path], Path] = lambda p: p) -> Iterator[bytes]:
    """The File-set as a ZIP, a chunk at a time: DICOMDIR first, then each file as stored
    (not compressed: DICOM that compresses is mostly stored compressed already, and
    deflating would cost the CPU that DICOM ingest needs). At most one chunk of a file
    is in memory; ZIP64 where a member or the archive needs it. `local`: the archive's
    reader (Archive.files.local), which fetches an object not in the data folder."""
    pipe = _Pipe()
    with zipfile.ZipFile(pipe, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        archive.writestr(_entry("DICOMDIR", len(fileset.dicomdir), time.time()), fileset.dicomdir)
        yield pipe.take()
        for member in fileset.members:
            with open(local(member.path), "rb") as source:
                status = os.fstat(source.fileno())
                entry = _entry(member.name, status.st_size, status.st_mtime)
                with archive.open(entry, "w") as target:
                    while chunk := source.read(CHUNK):
                        target.write(chunk)
                        yield pipe.take()
    yield pipe.take()


def _entry(name: str, size: int, mtime: float) -> zipfile.ZipInfo:
    entry = zipfile.ZipInfo(name, time.localtime(mtime)[:6])
    entry.file_size = size  # zipfile chooses ZIP64 for a member from this, before its data
    entry.compress_type = zipfile.ZIP_STORED
    entry.external_attr = 0o644 << 16
    return entry
