"""pynetdicom as a storage SCU, sending files exactly as they are on disk."""

from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom import _config
from pynetdicom.sop_class import Verification


def store_files(
    port: int, paths: list[Path], contexts: list[tuple[str, str]], calling_aet: str = "PYNETDICOM"
) -> list[Dataset]:
    """C-STORE each path over one association (dataset bytes straight from the file);
    return the response of each (an empty Dataset when none came back)."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title=calling_aet)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established, "association rejected or aborted"
    try:
        return [assoc.send_c_store(path) for path in paths]
    finally:
        assoc.release()


def store_dataset(port: int, ds: Dataset, syntax: str) -> Dataset:
    """C-STORE one in-memory dataset; its file_meta is not sent."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(ds.SOPClassUID, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def echo(port: int) -> int:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        return assoc.send_c_echo().Status
    finally:
        assoc.release()
