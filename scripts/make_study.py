#!/usr/bin/env python3
"""Write a synthetic study made from a pydicom test file, with fresh UIDs.

    scripts/make_study.py OUT --count 500 --size 512

Each instance is the source file with its pixels resampled to size×size, a new SOP
Instance UID, one shared Study/Series UID, and its InstanceNumber/position set. Used by
the tests and the benchmarks: no data is downloaded. `make_studies` writes many small
studies (one patient each) the same way, for the ingest benchmark.
"""

import argparse
import logging
import random
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import generate_uid

log = logging.getLogger("make_study")


def _template(source: str, size: int):
    """The source file with its pixels resampled to size×size, Explicit VR Little Endian."""
    template = dcmread(get_testdata_file(source))
    pixels = template.pixel_array
    if size != pixels.shape[0]:
        index = np.arange(size) * pixels.shape[0] // size
        pixels = pixels[np.ix_(index, index * pixels.shape[1] // pixels.shape[0])]
    template.PixelData = np.ascontiguousarray(pixels).tobytes()
    template.Rows, template.Columns = pixels.shape
    template.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return template


def make_study(
    out: Path,
    count: int,
    size: int = 512,
    source: str = "CT_small.dcm",
    *,
    patient_id: str | None = None,
) -> list[Path]:
    """Write `count` instances of one new study under `out`; return their paths.

    `patient_id` replaces the source's PatientID (and PatientName) when given."""
    template = _template(source, size)
    if patient_id is not None:
        template.PatientID = patient_id
        template.PatientName = f"SYNTHETIC^{patient_id}"
    template.StudyInstanceUID = generate_uid()
    template.SeriesInstanceUID = generate_uid()
    template.StudyDescription = "minipacs synthetic study"
    template.AccessionNumber = template.StudyInstanceUID[-12:]
    out.mkdir(parents=True, exist_ok=True)
    return [
        _instance(template, number, out / f"{number:05d}.dcm") for number in range(1, count + 1)
    ]


def _instance(template, number: int, path: Path) -> Path:
    """The template as instance `number` of its series, with a new SOP Instance UID."""
    sop_uid = generate_uid()
    template.SOPInstanceUID = sop_uid
    template.file_meta.MediaStorageSOPInstanceUID = sop_uid
    template.InstanceNumber = number
    template.ImagePositionPatient = [0, 0, number]
    template.SliceLocation = number
    template.save_as(path, enforce_file_format=True)
    return path


def make_studies(
    out: Path,
    studies: int,
    size: int = 64,
    weights: tuple[float, ...] = (0.35, 0.25, 0.2, 0.2),
    seed: int = 0,
    source: str = "CT_small.dcm",
) -> list[Path]:
    """Write `studies` small new studies under `out`, each of one patient of its own and
    1..len(weights) instances (drawn with `weights`; the default averages 2.25); return
    the paths, study after study."""
    rng = random.Random(seed)
    template = _template(source, size)
    template.StudyDescription = "minipacs synthetic small study"
    out.mkdir(parents=True, exist_ok=True)
    counts = range(1, len(weights) + 1)
    paths = []
    for study in range(studies):
        template.PatientID = f"SMALL-{seed}-{study:06d}"
        template.PatientName = f"SMALL^{study:06d}"
        template.StudyInstanceUID = generate_uid()
        template.SeriesInstanceUID = generate_uid()
        template.AccessionNumber = template.StudyInstanceUID[-12:]
        for number in range(1, rng.choices(counts, weights)[0] + 1):
            paths.append(_instance(template, number, out / f"{study:06d}-{number}.dcm"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--source", default="CT_small.dcm")
    args = parser.parse_args()
    logging.basicConfig(level="INFO")
    paths = make_study(args.out, args.count, args.size, args.source)
    log.info("wrote %d instances to %s", len(paths), args.out)


if __name__ == "__main__":
    main()
