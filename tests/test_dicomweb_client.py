"""DICOMweb through the `dicomweb-client` package against the real server (waitress):
every search, retrieve and store method it has, paging, chunked uploads."""

import email
import email.policy
import io
import urllib.request
import urllib.response

import numpy as np
import pydicom
import pytest
from conftest import Server
from conftest import minipacs
from dicom_files import CHARSET_FILES
from dicom_files import TEST_FILES
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.encaps import get_frame
from pydicom.uid import generate_uid
from requests import HTTPError

FILES = {
    "ct": TEST_FILES / "CT_small.dcm",
    "mr": TEST_FILES / "MR_small.dcm",
    "j2k": TEST_FILES / "JPEG2000.dcm",
    "rle2": TEST_FILES / "SC_rgb_rle_2frame.dcm",
    "jpeg": TEST_FILES / "SC_rgb_jpeg_dcmtk.dcm",
    "japanese": CHARSET_FILES / "chrH31.dcm",
    "ecg": TEST_FILES / "waveform_ecg.dcm",  # bulk data inside sequence items
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("dicomweb")
    minipacs("import", "--data", str(root / "data"), *(str(p) for p in FILES.values()))
    running = Server(root / "data").start()
    yield running
    running.kill()


@pytest.fixture(scope="module")
def client(server) -> DICOMwebClient:
    web = DICOMwebClient(f"{server.url}/dicom-web")
    web.set_http_retry_params(retry=False)  # it would retry a 503 for 30 s
    return web


def header(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(FILES[name], stop_before_pixels=True)


def uids(name: str) -> tuple[str, str, str]:
    ds = header(name)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def http_get(url: str, **headers: str) -> urllib.response.addinfourl:
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30)


def parts(response) -> list[email.message.Message]:
    """The parts of a multipart response, by the standard library's MIME parser."""
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + response.read(), policy=email.policy.HTTP)
    assert message.is_multipart()
    return list(message.iter_parts())


def value(answer: dict, tag: str):
    return (answer.get(tag) or {}).get("Value", [None])[0]


# -- QIDO-RS -------------------------------------------------------------------------


def test_search_for_studies_answers_the_default_attributes(client, server):
    ct = header("ct")
    found = client.search_for_studies(search_filters={"PatientID": ct.PatientID})
    assert len(found) == 1
    study = found[0]
    assert value(study, "0020000D") == ct.StudyInstanceUID
    assert value(study, "00100010")["Alphabetic"] == str(ct.PatientName)
    assert value(study, "00080061") == "CT"  # ModalitiesInStudy, computed
    assert value(study, "00201206") == 1 and value(study, "00201208") == 1
    assert value(study, "00081190") == f"{server.url}/dicom-web/studies/{ct.StudyInstanceUID}"
    assert "00080052" not in study  # QueryRetrieveLevel belongs to C-FIND


def test_match_keys_by_tag_wildcard_and_uid_list(client):
    ct, mr = header("ct"), header("mr")
    by_tag = client.search_for_studies(search_filters={"00100020": ct.PatientID})
    assert [value(s, "0020000D") for s in by_tag] == [ct.StudyInstanceUID]
    wildcard = client.search_for_studies(search_filters={"PatientName": "CompressedSamples^*"})
    assert {value(s, "0020000D") for s in wildcard} >= {ct.StudyInstanceUID, mr.StudyInstanceUID}
    listed = client.search_for_studies(
        search_filters={"StudyInstanceUID": f"{ct.StudyInstanceUID},{mr.StudyInstanceUID}"}
    )
    assert {value(s, "0020000D") for s in listed} == {ct.StudyInstanceUID, mr.StudyInstanceUID}


def test_includefield_and_all(client):
    ct = header("ct")
    some = client.search_for_studies(
        search_filters={"PatientID": ct.PatientID}, fields=["PatientAge", "00081030"]
    )[0]
    assert value(some, "00101010") == ct.PatientAge
    assert "00081030" in some
    everything = client.search_for_studies(
        search_filters={"PatientID": ct.PatientID}, fields=["all"]
    )[0]
    assert value(everything, "00101030") == ct.PatientWeight  # stored, not a default key
    assert "00080018" not in everything  # an instance attribute is not a study's


def test_paging_with_get_remaining_ends(client):
    every = client.search_for_studies()
    paged = client.search_for_studies(limit=2, get_remaining=True)
    assert len(every) >= 5
    assert sorted(value(s, "0020000D") for s in paged) == sorted(
        value(s, "0020000D") for s in every
    )
    assert client.search_for_studies(offset=len(every)) == []


def test_fuzzy_matching_of_person_names(client):
    ct = header("ct")
    assert client.search_for_studies(search_filters={"PatientName": "ct1"}) == []
    fuzzy = client.search_for_studies(search_filters={"PatientName": "ct1"}, fuzzymatching=True)
    assert [value(s, "0020000D") for s in fuzzy] == [ct.StudyInstanceUID]


def test_text_in_another_character_set_reads_back(client):
    ds = header("japanese")
    found = client.search_for_studies(search_filters={"PatientID": ds.PatientID})
    name = value(found[0], "00100010")
    assert name["Ideographic"] == str(ds.PatientName.ideographic)


def test_search_for_series_and_instances(client):
    study, series, sop = uids("rle2")
    in_study = client.search_for_series(study)
    assert [value(s, "0020000E") for s in in_study] == [series]
    assert value(in_study[0], "00201209") == 2  # the RLE file and the JPEG one
    assert "00100020" not in in_study[0]  # scoped to a study: series attributes only
    every = client.search_for_series(search_filters={"Modality": header("rle2").Modality})
    assert series in [value(s, "0020000E") for s in every]
    assert all("00100020" in s for s in every)  # all series: the study's attributes too
    instances = {value(i, "00080018"): i for i in client.search_for_instances(study, series)}
    assert len(instances) == 2 and value(instances[sop], "00280008") == 2  # NumberOfFrames
    all_instances = client.search_for_instances(search_filters={"SOPInstanceUID": sop})
    assert value(all_instances[0], "0020000D") == study


# -- WADO-RS -------------------------------------------------------------------------


def test_retrieve_instance_as_stored_and_decompressed(client):
    study, series, sop = uids("j2k")
    stored = pydicom.dcmread(FILES["j2k"])
    same = client.retrieve_instance(study, series, sop, media_types=(("application/dicom", "*"),))
    assert same.file_meta.TransferSyntaxUID == stored.file_meta.TransferSyntaxUID
    assert same.PixelData == stored.PixelData
    plain = client.retrieve_instance(
        study, series, sop, media_types=(("application/dicom", "1.2.840.10008.1.2.1"),)
    )
    assert plain.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert plain.SOPInstanceUID == sop
    assert np.array_equal(plain.pixel_array, stored.pixel_array)


def test_retrieve_study_series_and_iterators(client):
    study, series, sop = uids("ct")
    assert [ds.SOPInstanceUID for ds in client.retrieve_study(study)] == [sop]
    assert [ds.SOPInstanceUID for ds in client.retrieve_series(study, series)] == [sop]
    assert [ds.SOPInstanceUID for ds in client.iter_study(study)] == [sop]
    assert [ds.SOPInstanceUID for ds in client.iter_series(study, series)] == [sop]


def test_metadata_at_every_level_with_bulk_data_uris(client, server):
    study, series, sop = uids("ct")
    for metadata in (
        client.retrieve_study_metadata(study),
        client.retrieve_series_metadata(study, series),
        [client.retrieve_instance_metadata(study, series, sop)],
    ):
        assert len(metadata) == 1
        assert value(metadata[0], "00080018") == sop
        uri = metadata[0]["7FE00010"]["BulkDataURI"]
        assert uri.startswith(f"{server.url}/dicom-web/studies/{study}/series/{series}/")
    stored = pydicom.dcmread(FILES["ct"])
    assert client.retrieve_bulkdata(uri) == [stored.PixelData]
    assert list(client.iter_bulkdata(uri)) == [stored.PixelData]


def test_bulk_data_inside_sequence_items(client):
    study, series, sop = uids("ecg")
    metadata = client.retrieve_instance_metadata(study, series, sop)
    stored = pydicom.dcmread(FILES["ecg"])
    for index, item in enumerate(metadata["54000100"]["Value"]):
        uri = item["54001010"]["BulkDataURI"]
        assert uri.endswith(f"/instances/{sop}/bulkdata/54000100/{index}/54001010")
        assert client.retrieve_bulkdata(uri) == [stored.WaveformSequence[index].WaveformData]


def test_frames_uncompressed_and_as_stored(client):
    study, series, sop = uids("rle2")
    stored = pydicom.dcmread(FILES["rle2"])
    frames = client.retrieve_instance_frames(study, series, sop, [2, 1])
    rows, columns = stored.Rows, stored.Columns
    for data, index in zip(frames, (1, 0), strict=True):
        pixels = np.frombuffer(data, dtype=np.uint8).reshape(rows, columns, 3)
        assert np.array_equal(pixels, stored.pixel_array[index])
    study, series, sop = uids("j2k")
    stored = pydicom.dcmread(FILES["j2k"])
    codestreams = client.retrieve_instance_frames(
        study, series, sop, [1], media_types=(("image/jp2", "*"),)
    )
    assert codestreams == [get_frame(stored.PixelData, 0, number_of_frames=1)]
    assert list(client.iter_instance_frames(study, series, sop, [1])) == [
        stored.pixel_array.astype("<u2").tobytes()
        if stored.BitsAllocated == 16
        else stored.pixel_array.tobytes()
    ]


def test_rendered_instance_frame_and_series(client):
    study, series, sop = uids("ct")
    jpeg = client.retrieve_instance_rendered(study, series, sop)
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    png = client.retrieve_instance_rendered(
        study, series, sop, media_types=("image/png",), params={"viewport": "64,64"}
    )
    assert Image.open(io.BytesIO(png)).size == (64, 64)
    study, series, sop = uids("rle2")
    frame = client.retrieve_instance_frames_rendered(study, series, sop, [2])
    assert Image.open(io.BytesIO(frame)).size == (header("rle2").Columns, header("rle2").Rows)
    assert Image.open(io.BytesIO(client.retrieve_series_rendered(study, series))).format == "JPEG"


def test_rendered_series_as_multipart_has_one_image_per_instance(server):
    study, series, _ = uids("rle2")
    response = http_get(
        f"{server.url}/dicom-web/studies/{study}/series/{series}/rendered",
        Accept='multipart/related; type="image/png"',
    )
    images = parts(response)
    assert [part.get_content_type() for part in images] == ["image/png", "image/png"]
    assert Image.open(io.BytesIO(images[0].get_payload(decode=True))).format == "PNG"


# -- STOW-RS -------------------------------------------------------------------------


def fresh_copy(name: str, study_uid: str | None = None) -> pydicom.Dataset:
    ds = pydicom.dcmread(FILES[name])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if study_uid:
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid(prefix=None)[:60]
    return ds


def test_store_instances_then_find_and_retrieve_them(client):
    datasets = [fresh_copy("ct"), fresh_copy("mr")]
    answer = client.store_instances(datasets)
    stored = [item.ReferencedSOPInstanceUID for item in answer.ReferencedSOPSequence]
    assert stored == [ds.SOPInstanceUID for ds in datasets]
    assert "FailedSOPSequence" not in answer or not answer.FailedSOPSequence
    back = client.retrieve_instance(
        datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID, datasets[0].SOPInstanceUID
    )
    assert back.PixelData == datasets[0].PixelData


def test_chunked_upload_over_one_megabyte(client):
    study_uid = generate_uid()
    datasets = [fresh_copy("ct", study_uid) for _ in range(40)]  # ~40 × 39 KB, chunked
    answer = client.store_instances(datasets, study_instance_uid=study_uid)
    assert len(answer.ReferencedSOPSequence) == 40
    assert len(client.search_for_instances(study_uid)) == 40


def test_store_to_another_study_fails_that_instance(client):
    ds = fresh_copy("ct")
    with pytest.raises(HTTPError) as raised:
        client.store_instances([ds], study_instance_uid=generate_uid())
    assert raised.value.response.status_code == 409
    failed = raised.value.response.json()["00081198"]["Value"][0]
    assert failed["00081155"]["Value"] == [ds.SOPInstanceUID]
    assert failed["00081197"]["Value"] == [0xA900]
    assert client.search_for_instances(search_filters={"SOPInstanceUID": ds.SOPInstanceUID}) == []
