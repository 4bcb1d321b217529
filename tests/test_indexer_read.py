"""The indexer's read of a journal entry (storage.dataset.read_received): the same index
keys, DICOM JSON and SHA-256 as read_instance and hash_file, which STOW-RS and import
use, and the same as before the indexer had a read of its own, for every instance file
shipped in pydicom (charset files, multi-frame, SR, implicit VR, big endian...).

tests/data/indexed.sha256 holds, for each file, the SHA-256 of what it was indexed as
(keys and DICOM JSON) on 2026-12-05: the stored JSON answers metadata requests and feeds
the change feed and extended query tags, so it must not drift with a refactor. A change
that is meant to change it rewrites the file: `.venv/bin/python tests/test_indexer_read.py`.
"""

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path

import pydicom
import pytest
from dicom_files import TEST_FILES
from dicom_files import dataset_bytes
from dicom_files import storable
from pydicom.uid import ImplicitVRLittleEndian

from storage import Archive
from storage import dataset
from storage import indexer
from storage.dataset import read_instance
from storage.dataset import read_received
from storage.files import hash_file
from storage.journal import file_meta

GOLDEN = Path(__file__).parent / "data" / "indexed.sha256"
FILES = storable()
# No shipped file has private numbers or bytes of implicit VR.
IMPLICIT_CT = "CT_small.dcm in Implicit VR"


def entry(sample, folder: Path) -> Path:
    """The journal entry a C-STORE of the file makes: our File Meta, its dataset bytes."""
    path = folder / f"{sample.path.name}~entry.dcm"
    meta = file_meta(sample.sop_class_uid, sample.sop_uid, sample.transfer_syntax, "SENDER")
    path.write_bytes(meta + dataset_bytes(sample.path))
    return path


def implicit_ct(folder: Path, scanner: str = "HiSpeed CT/i") -> Path:
    """CT_small (GE private elements) as sent in Implicit VR, as a journal entry, with
    private elements no dictionary knows (UN): short, long, and without a creator."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    block = ds.private_block(0x0029, "MINIPACS TEST", create=True)  # 0029,11xx (GE has 10)
    block.add_new(0x10, "OB", bytes(range(16)))
    block.add_new(0x20, "OB", bytes(2000))
    ds.add_new(0x00311010, "OB", b"\1\2")
    ds[0x00091004].value = scanner  # GEMS_IDEN_01 SH
    path = folder / "implicit.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ImplicitVRLittleEndian, "SENDER")
    path.write_bytes(meta + dataset_bytes(path))
    return path


def digest(parsed) -> str:
    return hashlib.sha256(
        json.dumps(dataclasses.asdict(parsed), sort_keys=True).encode()
    ).hexdigest()


def golden() -> dict[str, str]:
    lines = GOLDEN.read_text().splitlines()
    return dict(line.split("  ", 1)[::-1] for line in lines if line)


@pytest.mark.parametrize("sample", FILES, ids=lambda f: f.path.name)
def test_entry_indexed_as_before(sample, tmp_path):
    path = entry(sample, tmp_path)
    parsed, sha = read_received(path)
    assert (parsed, sha) == (read_instance(path), hash_file(path)[1])
    assert digest(parsed) == golden()[sample.path.name]


def test_private_elements_of_implicit_vr_indexed_as_before(tmp_path):
    """storage.dicomjson encodes numbers and bytes from their bytes once it knows their VR,
    as pydicom would (UN when no dictionary knows them), and remembers pydicom's JSON of
    private text."""
    path = implicit_ct(tmp_path)
    parsed, sha = read_received(path)
    assert (parsed, sha) == (read_instance(path), hash_file(path)[1])
    body = json.loads(parsed.json)
    assert body["00191011"] == {"vr": "SS", "Value": [2]}  # GEMS_ACQU_01
    assert body["00291110"] == {"vr": "UN", "InlineBinary": "AAECAwQFBgcICQoLDA0ODw=="}
    assert body["00291120"] == {"vr": "UN", "BulkDataURI": "00291120"}
    assert body["00311010"] == {"vr": "UN", "InlineBinary": "AQI="}
    assert digest(parsed) == golden()[IMPLICIT_CT]
    # Private text is pydicom's JSON, remembered under the element's bytes among others.
    assert body["00091004"] == {"vr": "SH", "Value": ["HiSpeed CT/i"]}
    (tmp_path / "other").mkdir()
    other, _ = read_received(implicit_ct(tmp_path / "other", scanner="LightSpeed"))
    assert json.loads(other.json)["00091004"] == {"vr": "SH", "Value": ["LightSpeed"]}


def test_large_entry_read_as_any_file(tmp_path, monkeypatch):
    """Over WHOLE_READ an entry is not held in memory whole: read_instance and hash_file."""
    sample = next(f for f in FILES if f.path.name == "SC_rgb_rle_2frame.dcm")  # multi-frame
    path = entry(sample, tmp_path)
    monkeypatch.setattr(dataset, "WHOLE_READ", path.stat().st_size - 1)
    parsed, sha = read_received(path)
    assert (parsed, sha) == (read_instance(path), hash_file(path)[1])
    assert digest(parsed) == golden()[sample.path.name]


def test_every_file_has_its_digest():
    assert {f.path.name for f in FILES} | {IMPLICIT_CT} <= set(golden())
    assert pydicom.__version__.startswith("3.")


if __name__ == "__main__":  # rewrite the golden digests (see the docstring)
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        rows = [f"{digest(read_instance(entry(f, Path(folder))))}  {f.path.name}" for f in FILES]
        rows.append(f"{digest(read_instance(implicit_ct(Path(folder))))}  {IMPLICIT_CT}")
    GOLDEN.write_text("\n".join(rows) + "\n")


def test_entries_parsed_ahead_reach_the_indexer_as_read(tmp_path):
    """What an idle DICOM worker parses for the indexer (indexer.parse_ahead, through a
    real pipe, read back by indexer.read_parsed) is what the indexer would have read
    itself; it parses only past the indexer's next two batches, and stops when told."""
    sample = next(sample for sample in FILES if sample.path.name == "CT_small.dcm")
    with Archive(tmp_path / "data", fsync=False) as archive:
        first = entry(sample, tmp_path).read_bytes()
        for number in range(indexer.AHEAD + 6):  # named as the journal names them
            (archive.journal.folder / f"{number:020d}-1-{number}~{len(first)}~e30.dcm").write_bytes(
                first
            )
        entries = archive.journal.entries()
        expected = {path.name: read_received(path) for path in entries[indexer.AHEAD :]}
        got: dict = {}
        done = threading.Event()

        def offer(name, parsed, sha):
            got[name] = (parsed, sha)
            if len(got) == len(expected):
                done.set()

        source, out = os.pipe()
        reader = threading.Thread(target=indexer.read_parsed, args=(source, offer))
        reader.start()
        stop = threading.Event()
        worker = threading.Thread(
            target=indexer.parse_ahead, args=(archive, out, lambda: False, stop)
        )
        worker.start()
        assert done.wait(60)
        stop.set()
        worker.join(10)
        os.close(out)
        reader.join(10)
        os.close(source)
        assert not worker.is_alive() and not reader.is_alive()
        assert got == expected


def test_parsing_ahead_stops_when_nobody_reads(tmp_path):
    """A worker whose supervisor closed its end of the pipe stops parsing ahead (the
    indexer then reads every entry itself) instead of dying on a broken pipe."""
    sample = next(sample for sample in FILES if sample.path.name == "CT_small.dcm")
    with Archive(tmp_path / "data", fsync=False) as archive:
        first = entry(sample, tmp_path).read_bytes()
        for number in range(indexer.AHEAD + 2):
            name = f"{number:020d}-1-{number}~{len(first)}~e30.dcm"
            (archive.journal.folder / name).write_bytes(first)
        source, out = os.pipe()
        os.close(source)
        stop = threading.Event()
        worker = threading.Thread(
            target=indexer.parse_ahead, args=(archive, out, lambda: False, stop)
        )
        worker.start()
        worker.join(30)
        stopped = not worker.is_alive()
        stop.set()
        worker.join(10)
        os.close(out)
        assert stopped
