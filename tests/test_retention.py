"""Quota and retention: the least recently updated unprotected studies go first."""

import json
import os

import pydicom
import pytest
from conftest import index_args
from conftest import minipacs
from conftest import storescu
from conftest import wait_until
from make_study import make_study

from pacs import scu

pytestmark = pytest.mark.usefixtures("engine")


def study_uids(server) -> set[str]:
    keys = scu.identifier("STUDY", {"StudyInstanceUID": ""})
    return {a.StudyInstanceUID for a in scu.find(scu.Remote(port=server.port), keys)}


def test_quota_removes_oldest_unprotected_studies(start_server, tmp_path):
    server = start_server("--config", str(config(tmp_path, "quota_instances = 25\n")))
    studies = [make_study(tmp_path / name, 10, size=32) for name in "ABCD"]
    uid = {
        name: pydicom.dcmread(paths[0]).StudyInstanceUID
        for name, paths in zip("ABCD", studies, strict=True)
    }
    storescu(server.port, *studies[0])
    result = minipacs("protect", "--data", str(server.data), *index_args(server.index), uid["A"])
    assert "protected: 1" in result.stdout
    # B, C, D in this order, each once the one before is in the index (so received
    # later): 40 instances, 25 allowed. C's arrival takes B away, D's takes C.
    for name, kept in (("B", "AB"), ("C", "AC"), ("D", "AD")):
        storescu(server.port, *studies["ABCD".index(name)])
        wanted = {uid[n] for n in kept}
        assert wait_until(lambda w=wanted: study_uids(server) == w), (name, study_uids(server))
    assert server.rows("SELECT num_studies, num_instances FROM patient") == [(2, 20)]
    assert not (server.data / uid["B"]).exists() and not (server.data / uid["C"]).exists()
    assert list((server.data / ".trash").iterdir()) == []
    assert f"retention removed study {uid['B']} (10 instances" in server.log()
    audit = minipacs(
        "audit",
        "--data",
        str(server.data),
        *index_args(server.index),
        "--event",
        "delete",
        "--json",
    ).stdout
    assert [(e["who"], e["study_uid"]) for e in map(json.loads, audit.splitlines())] == [
        ("retention", uid["B"]),
        ("retention", uid["C"]),
    ]
    unknown = minipacs(
        "protect", "--data", str(server.data), *index_args(server.index), "1.2.3", check=False
    )
    assert unknown.returncode == 1 and "1.2.3: no such study" in unknown.stdout


def test_deletion_interrupted_by_a_crash_is_finished_at_start_up(start_server, tmp_path):
    server = start_server()
    paths = make_study(tmp_path / "s", 3, size=32)
    storescu(server.port, *paths)
    server.kill()
    study = pydicom.dcmread(paths[0]).StudyInstanceUID
    (server.data / ".trash").mkdir()
    os.rename(server.data / study, server.data / ".trash" / f"STUDY.{study}.0123")  # crash
    server.start()
    assert "1 deletion(s) finished" in server.log()
    assert server.rows("SELECT count(*) FROM instance") == [(0,)]
    assert server.rows("SELECT count(*) FROM patient") == [(0,)]
    assert list((server.data / ".trash").iterdir()) == []
    assert study_uids(server) == set()


def config(tmp_path, text: str):
    path = tmp_path / "minipacs.toml"
    path.write_text(text + "retention_interval = 1\n")
    return path
