"""Extended query tags (`minipacs tags`): attributes made matching keys of C-FIND and QIDO-RS,
added while a server runs, back-filled by it, matched through their index on both engines.

The studies (from CT_small), each one series of two instances:
  S1  BodyPartExamined HEAD   SeriesDate 20200105  SliceThickness 1.25  OperatorsName
      Smith^Ann\\Jones^Bob; private block 10 "ACME 1.0": (0009,1010) ALPHA\\GAMMA
  S2  CHEST  20210310  5.0  Doe^Jim; block 10 "OTHER" holds a decoy ALPHA, "ACME 1.0" is
      block 11: (0009,1110) BETA; saved Implicit VR, so its private values are UN
  S3  CHEST  20220101  2.5  no operator, no private block
and S4 (KNEE) arrives after the tags are ready.
"""

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pydicom
import pytest
from conftest import Server
from conftest import import_files
from conftest import index_args
from conftest import minipacs
from conftest import run
from conftest import storescu
from dicom_files import TEST_FILES
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from pacs import scu
from storage import Archive
from storage import query
from storage.engine import open_database
from storage.models import db

STUDIES = {
    "S1": ("HEAD", "20200105", "1.25", ["Smith^Ann", "Jones^Bob"],
           [("ACME 1.0", ["ALPHA", "GAMMA"])]),
    "S2": ("CHEST", "20210310", "5.0", ["Doe^Jim"], [("OTHER", ["ALPHA"]), ("ACME 1.0", ["BETA"])]),
    "S3": ("CHEST", "20220101", "2.5", [], []),
    "S4": ("KNEE", "19990101", "3", [], []),
}  # fmt: skip
# The tags, added to the running server: the first set with `minipacs tags add`, the others
# with the call it makes (Archive.query_tags.add: names, level, Private Creator).
SERIES_TAGS = ("BodyPartExamined", "SeriesDate", "OperatorsName", "FrameOfReferenceUID")
MORE_TAGS = (
    (("SliceThickness",), "instance", ""),
    (("0009xx10",), "study", "ACME 1.0"),  # VR from the data: LO
)


def make_study(out: Path, label: str) -> dict:
    body, date, thickness, operators, blocks = STUDIES[label]
    template = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    template.remove_private_tags()  # GE's own block 10 of group 0009
    made = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid(), "sops": []}
    for number in (1, 2):
        ds = template.copy()
        ds.PatientID, ds.PatientName = f"P-{label}", f"Patient^{label}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = made["study"], made["series"]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.FrameOfReferenceUID = made["frame"]
        ds.BodyPartExamined, ds.SeriesDate, ds.SliceThickness = body, date, thickness
        ds.InstanceNumber = number
        if operators:
            ds.OperatorsName = operators
        for offset, (creator, values) in enumerate(blocks):
            block = ds.private_block(0x0009, creator, create=True)
            assert block.block_start == 0x1000 + (offset << 8)
            block.add_new(0x10, "LO", values)
        path = out / f"{ds.SOPInstanceUID}.dcm"
        if label == "S2":
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
            ds.save_as(path, implicit_vr=True, little_endian=True)
        else:
            ds.save_as(path)
        made["sops"].append(ds.SOPInstanceUID)
    return made


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, module_engine):
    """S1-S3 stored, then the tags added to the running server and back-filled."""
    root = tmp_path_factory.mktemp("query-tags")
    made = {}
    for label in ("S1", "S2", "S3"):
        (root / label).mkdir()
        made[label] = make_study(root / label, label)
    (root / "S4").mkdir()
    made["S4"] = make_study(root / "S4", "S4")
    data = root / "data"
    import_files(data, *(root / label for label in ("S1", "S2", "S3")), index=module_engine)
    server = Server(data, index=module_engine).start()
    tags("add", *SERIES_TAGS, "--level", "series", server=server)
    with Archive(data, fsync=False, index_url=module_engine) as archive:
        for names, level, creator in MORE_TAGS:
            archive.query_tags.add(names, level, creator)
    wait_ready(server)
    yield server, made, root
    server.kill()


def tags(*args: str, server: Server, **kwargs):
    return minipacs("tags", *args, "--data", str(server.data), *index_args(server.index), **kwargs)


def listing(server: Server) -> dict[str, dict]:
    lines = tags("list", "--json", server=server).stdout.splitlines()
    return {row["keyword"] or row["name"]: row for row in map(json.loads, lines)}


def wait_ready(server: Server, timeout: float = 60) -> None:
    """Until no tag is back-filling (polled in the index: a CLI start each look is slow)."""
    deadline = time.monotonic() + timeout
    while server.rows("SELECT count(*) FROM querytag WHERE state <> 'ready'") != [(0,)]:
        assert time.monotonic() < deadline, f"back-fill not done:\n{server.log()}"
        time.sleep(0.1)


def cfind(server: Server, level: str, **keys) -> list[Dataset]:
    return list(scu.find(scu.Remote(port=server.port), scu.identifier(level, keys)))


def qido(server: Server, path: str, **params) -> list[dict]:
    url = f"{server.url}/dicom-web/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read() or b"[]")


def labels(made: dict, uids, kind: str = "study") -> set[str]:
    by_uid = {m[kind]: label for label, m in made.items()}
    return {by_uid[uid] for uid in uids}


def qido_labels(made, answers, tag="0020000D", kind="study") -> set[str]:
    return labels(made, [a[tag]["Value"][0] for a in answers], kind)


def test_back_fill_counts_and_vr(pacs):
    server, _, _ = pacs
    rows = listing(server)
    assert rows["BodyPartExamined"]["total"] == 3  # series
    assert rows["SliceThickness"]["done"] == 6  # instances
    private = rows["0009xx10"]
    assert (private["creator"], private["vr"], private["level"]) == ("ACME 1.0", "LO", "STUDY")
    values = server.rows(
        "SELECT v.text FROM queryvalue v JOIN querytag t ON v.tag_id = t.id WHERE t.tag = ?",
        0x00090010,
    )
    assert sorted(v for (v,) in values) == ["ALPHA", "BETA", "GAMMA"]  # not OTHER's decoy
    text = tags("list", server=server).stdout
    assert "0009xx10  'ACME 1.0'  STUDY  LO  ready" in text


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"BodyPartExamined": "HEAD"}, {"S1"}),  # single value
        ({"BodyPartExamined": "CH*"}, {"S2", "S3"}),  # wildcard
        ({"BodyPartExamined": "head"}, set()),  # CS is case-sensitive
        ({"SeriesDate": "20200101-20211231"}, {"S1", "S2"}),  # closed range
        ({"SeriesDate": "20210310-"}, {"S2", "S3"}),  # open range
        ({"SliceThickness": "1.250"}, {"S1"}),  # a DS by its value
        ({"OperatorsName": "jones*"}, {"S1"}),  # PN: any value, case folded
        ({"OperatorsName": "DOE^JIM"}, {"S2"}),
    ],
)
def test_cfind_and_qido_match_through_the_tags(pacs, keys, expected):
    server, made, _ = pacs
    answers = cfind(server, "SERIES", SeriesInstanceUID="", **keys)
    assert labels(made, [a.SeriesInstanceUID for a in answers], "series") == expected
    found = qido(server, "series", **keys)
    assert qido_labels(made, found, "0020000E", "series") == expected


def test_uid_list(pacs):
    server, made, _ = pacs
    frames = f"{made['S1']['frame']}\\{made['S3']['frame']}"
    answers = cfind(server, "SERIES", SeriesInstanceUID="", FrameOfReferenceUID=frames)
    assert labels(made, [a.SeriesInstanceUID for a in answers], "series") == {"S1", "S3"}
    found = qido(server, "series", FrameOfReferenceUID=frames.replace("\\", ","))
    assert qido_labels(made, found, "0020000E", "series") == {"S1", "S3"}


def test_findscu_instance_level(pacs):
    server, made, _ = pacs
    result = run(
        "findscu", "-v", "-S", "-aec", "MINIPACS",
        "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={made['S2']['study']}",
        "-k", "SliceThickness=5", "-k", "SOPInstanceUID",
        "127.0.0.1", str(server.port),
    )  # fmt: skip
    assert result.stderr.count("(Pending)") == 2
    assert all(sop in result.stderr for sop in made["S2"]["sops"])


def private_find(server: Server, value: str) -> list[Dataset]:
    """A STUDY C-FIND on (0009,xx10) of ACME 1.0 in block 20, over Implicit VR (the values
    arrive as UN)."""
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = ""
    identifier.add_new(0x00090020, "LO", "ACME 1.0")
    identifier.add_new(0x00092010, "LO", value)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="MINIPACS")
    assert assoc.is_established
    try:
        answers = [
            answer
            for status, answer in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            )
            if status and status.Status in (0xFF00, 0xFF01)
        ]
    finally:
        assoc.release()
    return answers


def test_private_tag_by_its_creator_in_any_block(pacs):
    server, made, _ = pacs
    assert labels(made, [a.StudyInstanceUID for a in private_find(server, "GAMMA")]) == {"S1"}
    beta = private_find(server, "BETA")  # S2's block 11, an Implicit VR file
    assert labels(made, [a.StudyInstanceUID for a in beta]) == {"S2"}
    assert beta[0][0x00090020].value == "ACME 1.0"  # the answer keeps the query's block
    alpha = private_find(server, "ALPHA")  # OTHER's (0009,1010) holds ALPHA in S2 too
    assert labels(made, [a.StudyInstanceUID for a in alpha]) == {"S1"}
    found = qido(server, "studies", **{"0009xx10": "BETA", "includefield": "0009xx10"})
    assert qido_labels(made, found) == {"S2"}
    assert found[0]["00090010"]["Value"] == ["ACME 1.0"]
    assert found[0]["00091010"]["Value"] == ["BETA"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        qido(server, "studies", **{"0009xx11": "X"})  # not registered
    refused.value.close()
    assert refused.value.code == 400


def test_instances_stored_later_match(pacs):
    server, made, root = pacs
    storescu(server.port, *sorted((root / "S4").iterdir()))
    answers = cfind(server, "SERIES", SeriesInstanceUID="", BodyPartExamined="KNEE")
    assert labels(made, [a.SeriesInstanceUID for a in answers], "series") == {"S4"}
    found = qido(server, "instances", SliceThickness="3")
    assert {a["00080018"]["Value"][0] for a in found} == set(made["S4"]["sops"])


def test_plan_uses_the_value_index(pacs):
    server, _, _ = pacs
    if server.index:
        pytest.skip("EXPLAIN QUERY PLAN is SQLite's")
    db.initialize(open_database("", server.data, fsync=False))
    try:
        with db.connection_context():
            for tag, vr, value in ((0x00180015, "CS", "HEAD"), (0x00180050, "DS", "1.25")):
                plan = query.explain("IMAGE", [query.Key(tag, vr, value)])
                assert any("queryvalue_tag_id_" in step for step in plan), plan
                assert not [step for step in plan if step.startswith("SCAN")], plan
    finally:
        db.obj.close_all()


def test_a_tag_another_node_back_fills_is_matched_on_the_json_meanwhile(pacs):
    """Until back-filled a tag answers in full from the stored JSON; a lease that runs out
    (its node died) is taken over, and `remove` takes the values and the tag away."""
    server, made, _ = pacs
    server.rows(
        "INSERT INTO querytag (tag, creator, keyword, vr, level, state, mark, done, total, "
        "worker, lease_until, created_at) VALUES (?, '', 'Manufacturer', 'LO', 'STUDY', "
        "'adding', 0, 0, 0, 'elsewhere:1:x', '9999', '')",
        0x00080070,
    )
    # CT_small's GE MEDICAL SYSTEMS, in every study stored (S4 too, when stored already)
    expected = labels(
        made, [a.StudyInstanceUID for a in cfind(server, "STUDY", StudyInstanceUID="")]
    )
    assert {"S1", "S2", "S3"} <= expected
    answers = cfind(server, "STUDY", StudyInstanceUID="", Manufacturer="GE*")
    assert labels(made, [a.StudyInstanceUID for a in answers]) == expected
    assert qido_labels(made, qido(server, "studies", Manufacturer="GE*")) == expected
    assert listing(server)["Manufacturer"]["state"] == "adding"  # as `tags list` shows it

    server.rows("UPDATE querytag SET lease_until = '2000-01-01' WHERE tag = ?", 0x00080070)
    wait_ready(server)
    progress = server.rows("SELECT done, total FROM querytag WHERE tag = ?", 0x00080070)
    assert progress == [(len(expected), len(expected))]
    answers = cfind(server, "STUDY", StudyInstanceUID="", Manufacturer="GE*")
    assert labels(made, [a.StudyInstanceUID for a in answers]) == expected

    tags("remove", "Manufacturer", server=server)
    assert server.rows("SELECT count(*) FROM querytag WHERE tag = ?", 0x00080070) == [(0,)]
    answers = cfind(server, "STUDY", StudyInstanceUID="", Manufacturer="GE*")  # a scan again
    assert labels(made, [a.StudyInstanceUID for a in answers]) == expected


def test_refusals(pacs):
    server, _, _ = pacs
    if server.index:
        pytest.skip("the checks read the index the same way on both engines")
    for args, reason in (
        (("StudyDate",), "matching key of the index already"),
        (("ImageComments",), "LT values are not matching keys"),
        (("0009xx12", "--creator", "NOBODY"), "give it (--vr)"),
        (("0009xx10",), "give its Private Creator"),
        (("BodyPartExamined", "--level", "series"), "registered already"),
    ):
        result = tags("add", *args, server=server, check=False)
        assert result.returncode == 2, result
        assert reason in result.stderr
