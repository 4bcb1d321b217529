"""Settings converted by their field's type or its own converter (pacs.config._convert),
in-process: each kind of setting, its values and its one-line messages, through `load` as
a MINIPACS_* variable's text (the command-line path is test_serve's)."""

from pathlib import Path

import pytest

from pacs.config import FIELDS
from pacs.config import Config
from pacs.config import ConfigError
from pacs.config import load

CONVERTED_BY_TYPE = (int, bool, Path, str)


def test_every_setting_has_a_converter():
    """A setting of another type (a tuple, a float) needs its own "convert", or its value
    would silently stay text."""
    for name, setting in FIELDS.items():
        assert setting.type in CONVERTED_BY_TYPE or "convert" in setting.metadata, name
        assert set(setting.metadata) <= {"help", "convert", "minimum", "maximum"}, name


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("data", "/srv/pacs", Path("/srv/pacs")),
        ("workers", "3", 3),
        ("quota_mb", "0", 0),  # "minimum": 0
        ("move_associations", "8", 8),
        ("fsync", "off", False),
        ("index_wait", "0.5", 0.5),
        ("log_level", "debug", "DEBUG"),
        ("duplicates", "reject", "reject"),
        ("unknown_aet", "store+echo", "echo+store"),
        ("cors_origins", "https://a/, https://b", ("https://a", "https://b")),
        ("public_url", "https://pacs.example/", "https://pacs.example"),
        ("storage_endpoint", "http://minio:9000/", "http://minio:9000"),
        ("deid_options", "uids,devid", "devid,uids"),
        ("token", "abc", "abc"),
    ],
)
def test_a_setting_from_text(name, text, value):
    assert getattr(load(None, {f"MINIPACS_{name.upper()}": text}, {}), name) == value


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("workers", "0", "workers must be at least 1, not '0'"),
        ("quota_mb", "-1", "quota_mb must be at least 0, not '-1'"),
        ("max_results", "many", "max_results must be a whole number, not 'many'"),
        ("move_associations", "9", "move_associations must be at most 8, not '9'"),
        ("tls_port", "65536", "tls_port must be 0-65535, not '65536'"),
        ("trust_proxy", "perhaps", "trust_proxy must be true or false, not 'perhaps'"),
        ("index_wait", "601", "index_wait must be 0-600 seconds, not '601'"),
        ("index_wait", "soon", "index_wait must be a number of seconds, not 'soon'"),
        ("duplicates", "KEEP", "duplicates must be keep, replace or reject, not 'KEEP'"),
        ("log_level", "loud", "log_level must be DEBUG, INFO, WARNING or ERROR, not 'loud'"),
        ("aet", "A\\B", "aet 'A\\\\B' is not a valid AE title"),
        ("unknown_aet", "echo+fly", "unknown_aet: unknown service(s) fly"),
        ("index", "mysql://db", "index must be empty (SQLite) or postgresql://…, not 'mysql://db'"),
        ("storage", "bucket", "storage must be file or s3://bucket/prefix"),
        ("storage_endpoint", "minio:9000", "storage_endpoint must be http(s)://host:port"),
        ("audit_syslog", "tcp://h:514", "audit_syslog must be udp://host:port, not 'tcp://h:514'"),
        ("deid_options", "bogus", "deid_options: "),
        (
            "subscription",
            "https://r/h secret=0123456789abcdef,https://r/h secret=fedcba9876543210",
            "subscription: one URL twice",
        ),
        ("peer", "WS1=host", "peer 'WS1=host' is not AET=HOST:PORT"),
    ],
)
def test_a_bad_setting_is_named_in_its_message(name, text, message):
    with pytest.raises(ConfigError) as refused:
        load(None, {f"MINIPACS_{name.upper()}": text}, {})
    assert str(refused.value).startswith(message)


def test_defaults_pass_their_own_converters():
    """Every default, given back as a value, converts to itself (a converter that changed
    its setting's default would be a second default)."""
    defaults = Config()
    for name in FIELDS:
        value = getattr(defaults, name)
        assert load(None, {}, {name: value} if value != () else {}) == defaults, name
