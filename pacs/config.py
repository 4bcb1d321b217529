"""Configuration: one dataclass, filled from a TOML file, then MINIPACS_* variables, then flags.

Nothing else in minipacs reads the environment.
"""

import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from dataclasses import fields
from dataclasses import replace
from pathlib import Path
from typing import Any

from storage import deidentify
from storage import events
from storage import objectstore
from storage import routing
from storage.engine import is_postgres_url

SERVICES = ("echo", "store", "find", "move", "get")
LOOPBACK = ("127.0.0.1", "::1", "localhost")
AET_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # PS3.5 AE VR: no backslash, 16 chars


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class Peer:
    """A known remote AE: a C-MOVE destination, and what it may do (pacs.policy)."""

    aet: str
    host: str
    port: int
    allow: frozenset[str] = frozenset(SERVICES)
    check_host: bool = True  # associations from this AE must come from `host`
    tls: bool = False  # we reach it (C-MOVE) over TLS
    cert: str = ""  # its associations must come over mutual TLS with this certificate CN


# How a setting's value (from TOML, a MINIPACS_* variable's text or a flag) becomes its
# field's (`_convert`): by the field's own "convert" in its metadata, a function of the
# value and the setting's name; else by its type: a whole number at least its "minimum"
# (1 unless the metadata says) and at most its "maximum", a boolean, a path, or text.
# Every message names the setting.


def _int(value: Any, name: str, minimum: int = 1, maximum: int | None = None) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a whole number, not {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, not {value!r}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, not {value!r}")
    return number


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {value!r}")


def _port(value: Any, name: str) -> int:
    port = _int(value, name, 0)
    if port > 65535:
        raise ConfigError(f"{name} must be 0-65535, not {value!r}")
    return port


def _aet(value: Any, name: str) -> str:
    value = str(value)
    if not AET_RE.fullmatch(value) or not value.strip():
        raise ConfigError(f"{name} {value!r} is not a valid AE title (1-16 characters, no '\\')")
    return value


def _one_of(*choices: str, upper: bool = False) -> Callable[[Any, str], str]:
    """A converter to one of `choices` (given in capitals when `upper`)."""
    listed = f"{', '.join(choices[:-1])} or {choices[-1]}"

    def convert(value: Any, name: str) -> str:
        text = str(value).upper() if upper else str(value)
        if text not in choices:
            raise ConfigError(f"{name} must be {listed}, not {value!r}")
        return text

    return convert


def _items(value: Any) -> list:
    """A repeatable setting's items: a TOML list as it is, text split at commas."""
    return value.split(",") if isinstance(value, str) else list(value)


def _peers(value: Any, name: str) -> tuple[Peer, ...]:
    return tuple(parse_peer(p) if isinstance(p, str) else p for p in _items(value) if p)


def _routes(value: Any, name: str) -> tuple[routing.Rule, ...]:
    try:
        return tuple(
            routing.parse_rule(r) if isinstance(r, str) else r
            for r in _items(value)
            if str(r).strip()
        )
    except routing.RuleError as exc:
        raise ConfigError(str(exc)) from None


def _subscriptions(value: Any, name: str) -> tuple[events.Subscriber, ...]:
    try:
        chosen = tuple(
            events.parse_setting(s) if isinstance(s, (str, dict)) else s
            for s in _items(value)
            if not isinstance(s, str) or s.strip()
        )
    except events.SubscriptionError as exc:
        raise ConfigError(str(exc)) from None
    urls = [s.url for s in chosen]
    if len(set(urls)) < len(urls):
        raise ConfigError(f"{name}: one URL twice")
    return chosen


def _origins(value: Any, name: str) -> tuple[str, ...]:
    return tuple(str(o).strip().rstrip("/") for o in _items(value) if str(o).strip())


def _deid_options(value: Any, name: str) -> str:
    try:
        return ",".join(sorted(deidentify.parse_options(str(value))))
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _unknown_aet(value: Any, name: str) -> str:
    return "+".join(sorted(_services(str(value), name))) or "none" if str(value) else ""


def _seconds(value: Any, name: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number of seconds, not {value!r}") from None
    if not 0 <= seconds <= 600:
        raise ConfigError(f"{name} must be 0-600 seconds, not {value!r}")
    return seconds


def _index_url(value: Any, name: str) -> str:
    text = str(value).strip()
    if text and not is_postgres_url(text):
        raise ConfigError(f"{name} must be empty (SQLite) or postgresql://…, not {text!r}")
    return text


def _storage_url(value: Any, name: str) -> str:
    text = str(value).strip()
    if text != "file":
        try:
            objectstore.parse_url(text)
        except ValueError as exc:
            raise ConfigError(f"{name} must be file or s3://bucket/prefix: {exc}") from None
    return text


def _endpoint(value: Any, name: str) -> str:
    text = str(value).strip().rstrip("/")
    if text and not text.startswith(("http://", "https://")):
        raise ConfigError(f"{name} must be http(s)://host:port, not {text!r}")
    return text


def _syslog_url(value: Any, name: str) -> str:
    text = str(value).strip()
    if text and not text.startswith("udp://"):
        raise ConfigError(f"{name} must be udp://host:port, not {text!r}")
    return text


def _base_url(value: Any, name: str) -> str:
    return str(value).rstrip("/")


@dataclass(frozen=True)
class Config:
    data: Path = field(
        default=Path("pacs-data"), metadata={"help": "Archive folder (files and index)."}
    )
    index: str = field(
        default="",
        metadata={
            "convert": _index_url,
            "help": "Index database: empty for SQLite in the data folder, or "
            "postgresql://user:password@host:port/db (several servers may share one, with one "
            "shared data folder).",
        },
    )
    aet: str = field(default="MINIPACS", metadata={"convert": _aet, "help": "Our AE title."})
    storage: str = field(
        default="file",
        metadata={
            "convert": _storage_url,
            "help": "Where instances live: file (the data folder) or s3://bucket/prefix, an "
            "S3-compatible object store, with the data folder as the durable first stop and "
            "a cache (credentials: the AWS environment variables and files).",
        },
    )
    storage_endpoint: str = field(
        default="",
        metadata={
            "convert": _endpoint,
            "help": "URL of an S3-compatible store that is not AWS (MinIO, SeaweedFS, Ceph): "
            "http://host:port; empty: AWS.",
        },
    )
    storage_region: str = field(
        default="", metadata={"help": "Region of the bucket; empty: the AWS configuration's."}
    )
    storage_path_style: bool = field(
        default=False,
        metadata={
            "help": "Address the bucket in the path (http://host/bucket/key), as most "
            "on-premises stores need, rather than in the host name."
        },
    )
    storage_cache_mb: int = field(
        default=4096,
        metadata={
            "minimum": 0,
            "help": "Local copies of uploaded or fetched objects kept in the data folder "
            "(MiB; least recently used go first). Instances not yet uploaded are not counted "
            "and never removed.",
        },
    )
    storage_sync: bool = field(
        default=False,
        metadata={
            "help": "Send Success (C-STORE, STOW-RS) only once the object store has the "
            "instance, for a data folder on a disk not to be trusted; off: once durable in "
            "the data folder, uploaded in the background."
        },
    )
    host: str = field(
        default="127.0.0.1",
        metadata={
            "help": "Address the DICOM and HTTP servers bind to. 127.0.0.1 keeps them private to "
            "this machine; 0.0.0.0 exposes patient data to every host that can reach it."
        },
    )
    port: int = field(
        default=11112, metadata={"convert": _port, "help": "DICOM port (0 picks a free one)."}
    )
    http_port: int = field(
        default=8080, metadata={"convert": _port, "help": "HTTP port (0 picks a free one)."}
    )
    tls_port: int = field(
        default=2762,
        metadata={"convert": _port, "help": "DICOM TLS port, used when tls_cert is set (PS3.15)."},
    )
    tls_cert: str = field(
        default="", metadata={"help": "Our certificate (PEM) for DICOM TLS, as server and client."}
    )
    tls_key: str = field(default="", metadata={"help": "The private key (PEM) of tls_cert."})
    tls_ca: str = field(
        default="",
        metadata={
            "help": "CA certificates (PEM) that sign peers' certificates: clients of the TLS "
            "port must present one (mutual TLS), TLS peers we call must have one."
        },
    )
    https_cert: str = field(
        default="",
        metadata={
            "help": "A certificate (PEM, chain first) for the web side: with it, http_port "
            "speaks HTTPS only."
        },
    )
    https_key: str = field(default="", metadata={"help": "The private key (PEM) of https_cert."})
    peer: tuple[Peer, ...] = field(
        default=(),
        metadata={
            "convert": _peers,
            "help": "Known remote AEs, AET=HOST:PORT[?allow=echo+store+find+move+get"
            "&check_host=no&tls=yes&cert=CN] (repeatable; all services unless `allow` "
            "narrows them; only from HOST unless check_host=no; cert: only over mutual TLS "
            "with a client certificate of that subject common name).",
        },
    )
    unknown_aet: str = field(
        default="",
        metadata={
            "convert": _unknown_aet,
            "help": "Services for calling AEs not in `peer` (echo+store+find+move+get, or "
            "none); empty: all on 127.0.0.1, echo+store when listening beyond it.",
        },
    )
    log_level: str = field(
        default="INFO",
        metadata={
            "convert": _one_of("DEBUG", "INFO", "WARNING", "ERROR", upper=True),
            "help": "DEBUG, INFO, WARNING or ERROR.",
        },
    )
    fsync: bool = field(
        default=True,
        metadata={
            "help": "fsync every file and index commit before Success (off trades safety "
            "for speed)."
        },
    )
    duplicates: str = field(
        default="keep",
        metadata={
            "convert": _one_of("keep", "replace", "reject"),
            "help": "Different bytes under a stored SOP Instance UID: keep, replace or reject.",
        },
    )
    accept_unknown_sop_classes: bool = field(
        default=False,
        metadata={"help": "Accept C-STORE of SOP classes that are not standard storage classes."},
    )
    max_pdu: int = field(
        default=1 << 20,
        metadata={
            "minimum": 0,
            "help": "Largest PDU a peer may send us, in bytes (0 = no limit, which lets one "
            "peer make us hold a whole dataset in memory).",
        },
    )
    workers: int = field(
        default=1,
        metadata={
            "help": "DICOM processes sharing the port (SO_REUSEPORT), beside the web server's "
            "process and the indexer's; 1 keeps ingest fast and apart from web load on 2 "
            "cores, more use more cores."
        },
    )
    index_wait: float = field(
        default=0.0,
        metadata={
            "convert": _seconds,
            "help": "Seconds a storage association's release may wait until what it stored "
            "is queryable (0: release at once; each instance is durable at its Success "
            "either way, and queryable within a second).",
        },
    )
    pn_case_insensitive: bool = field(
        default=True,
        metadata={"help": "Match person names without regard to case (PS3.4 C.2.2.2.1)."},
    )
    max_results: int = field(
        default=10000,
        metadata={
            "help": "C-FIND answers before the query ends with 0xA700 (Out of Resources) "
            "asking for a narrower query."
        },
    )
    render_cache_mb: int = field(
        default=16,
        metadata={
            "minimum": 0,
            "help": "Memory for decoded frames kept for re-rendering (MiB; 0: none).",
        },
    )
    volume_cache_mb: int = field(
        default=256,
        metadata={
            "minimum": 0,
            "help": "Memory for volumes decoded for MPR (MiB; a 512×512×500 CT takes 250): "
            "a volume larger than this answers 422 (0: no MPR).",
        },
    )
    render_max_size: int = field(
        default=4096,
        metadata={
            "help": "Largest width or height (pixels) of a rendered image: WADO-URI rows and "
            "columns, DICOMweb viewport; larger requests answer 400."
        },
    )
    disk_reserve_mb: int = field(
        default=64,
        metadata={
            "minimum": 0,
            "help": "Free space (MiB) C-STORE leaves on the data folder's disk for the index: "
            "below it stores are refused (0xA700), so every acknowledged instance has room "
            "to become queryable (0: fill the disk).",
        },
    )
    pixel_budget_mb: int = field(
        default=1024,
        metadata={
            "help": "Most memory (MiB) one instance's pixels may need decoded: Rows × Columns "
            "× frames × samples × bytes. Larger instances are refused at ingest; any "
            "stored earlier, and frames whose rendering needs more (16 bytes a sample), "
            "answer 422 instead of being decoded."
        },
    )
    move_associations: int = field(
        default=2,
        metadata={
            "maximum": 8,
            "help": "Associations a C-MOVE sends over at once (one sends while the peer "
            "stores what came over another); a peer that refuses more gets one.",
        },
    )
    max_associations: int = field(
        default=32, metadata={"help": "Concurrent DICOM associations before new ones are refused."}
    )
    acse_timeout: int = field(
        default=30,
        metadata={
            "help": "Seconds a peer has to send its association request (or answer a "
            "release) before the connection is closed."
        },
    )
    dimse_timeout: int = field(
        default=60,
        metadata={"help": "Seconds to wait for a DIMSE message (a C-MOVE peer's reply…)."},
    )
    network_timeout: int = field(
        default=60,
        metadata={"help": "Seconds an association may stay silent before it is aborted."},
    )
    http_timeout: int = field(
        default=30,
        metadata={
            "help": "Seconds an HTTP connection may stay idle, or dribble its request, before "
            "it is closed (slow clients cannot hold threads)."
        },
    )
    http_connections: int = field(
        default=100, metadata={"help": "Open HTTP connections before new ones wait."}
    )
    http_header_kb: int = field(
        default=64, metadata={"help": "Largest HTTP request head (KiB); larger ones answer 431."}
    )
    public_url: str = field(
        default="",
        metadata={
            "convert": _base_url,
            "help": "Base URL clients reach the web side at (BulkDataURI, RetrieveURL); empty: "
            "the URL of each request.",
        },
    )
    trust_proxy: bool = field(
        default=False,
        metadata={
            "help": "Take the client-facing scheme, host and prefix from X-Forwarded-Proto/"
            "Host/Prefix (only behind a reverse proxy that sets them)."
        },
    )
    route: tuple[routing.Rule, ...] = field(
        default=(),
        metadata={
            "convert": _routes,
            "help": "Auto-routing rules, e.g. 'AI_NODE modality=CT+MR stable=60' or "
            "'https://host/dicom-web match=SeriesDescription:*HEAD*' (repeatable).",
        },
    )
    route_retry: int = field(
        default=30,
        metadata={"help": "Seconds before a failed forward is tried again (doubling each time)."},
    )
    subscription: tuple[events.Subscriber, ...] = field(
        default=(),
        metadata={
            "convert": _subscriptions,
            "help": "Event subscriptions beside those of `minipacs subscribe`: TOML tables "
            "[[subscription]] with url, events (a list) and secret, or "
            "'URL events=study.stable+instance.created secret=S' (repeatable).",
        },
    )
    study_stable: int = field(
        default=60,
        metadata={
            "help": "Seconds without a new instance after which a study is stable (the "
            "study.stable and study.updated events)."
        },
    )
    deid_options: str = field(
        default="",
        metadata={
            "convert": _deid_options,
            "help": "PS3.15 Annex E options of de-identified web retrievals (anonymize=yes), "
            "comma list: uids, devid, instid, patchars, fulldates|modifdates, desc, struct, "
            "graph; empty: the Basic Profile alone.",
        },
    )
    cors_origins: tuple[str, ...] = field(
        default=(),
        metadata={
            "convert": _origins,
            "help": "Origins allowed to call the web side cross-origin (comma list, * = any).",
        },
    )
    parse_processes: int = field(
        default=0,
        metadata={
            "minimum": 0,
            "help": "Child processes that parse STOW-RS uploads for the web server (0: in its "
            "request threads; C-STORE is parsed by the indexer process).",
        },
    )
    quota_mb: int = field(
        default=0,
        metadata={
            "minimum": 0,
            "help": "Archive size limit (MiB of stored files; 0 = none): the least recently "
            "updated unprotected studies are removed to stay under it.",
        },
    )
    quota_instances: int = field(
        default=0,
        metadata={
            "minimum": 0,
            "help": "Archive instance limit (0 = none), enforced like quota_mb.",
        },
    )
    retention_interval: int = field(
        default=60,
        metadata={
            "help": "Seconds between quota checks and change feed pruning (the first runs at "
            "start-up)."
        },
    )
    changefeed_days: int = field(
        default=0,
        metadata={
            "minimum": 0,
            "help": "Days the change feed keeps its entries (0: forever); older ones are "
            "pruned, the newest always kept (GET /changefeed says where the feed starts).",
        },
    )
    token: str = field(
        default="",
        metadata={
            "help": "Bearer token (`minipacs user token`) that `minipacs changes` sends to the "
            "web side; MINIPACS_TOKEN keeps it off the command line."
        },
    )
    audit_syslog: str = field(
        default="",
        metadata={
            "convert": _syslog_url,
            "help": "Also send audit events to this syslog collector as RFC 5424 messages "
            "over UDP: udp://host:514.",
        },
    )
    max_upload_mb: int = field(
        default=4096,
        metadata={"help": "Largest STOW-RS request body (MiB); bigger ones answer 413."},
    )
    session_idle_minutes: int = field(
        default=30,
        metadata={"help": "Minutes without a request after which a login session ends."},
    )
    session_hours: int = field(
        default=12,
        metadata={"help": "Hours after logging in at which a session ends, however active."},
    )
    login_failures: int = field(
        default=10,
        metadata={
            "help": "Failed logins for one user name, or from one address, within "
            "login_lockout_minutes before further logins are refused (429) until it passes."
        },
    )
    login_lockout_minutes: int = field(
        default=15, metadata={"help": "The window of login_failures, in minutes."}
    )
    token_days: int = field(
        default=90,
        metadata={
            "minimum": 0,
            "help": "Days a new bearer token is valid, unless `minipacs user token --days` "
            "says otherwise (0: never expires).",
        },
    )

    @property
    def beyond_loopback(self) -> bool:
        """Whether other hosts can reach us: then nothing is open without a user or peer."""
        return self.host not in LOOPBACK

    def object_store(self) -> objectstore.Settings | None:
        """Where the archive keeps its objects (storage.objectstore); None: files only."""
        if self.storage == "file":
            return None
        return objectstore.Settings(
            self.storage,
            endpoint=self.storage_endpoint,
            region=self.storage_region,
            path_style=self.storage_path_style,
            cache_bytes=self.storage_cache_mb << 20,
            sync=self.storage_sync,
        )

    def event_options(self) -> events.Options:
        """What the archive puts into the events it queues (storage.events)."""
        return events.Options(source=events.source_for(self.aet), stable=self.study_stable)

    def unknown_aet_services(self) -> frozenset[str]:
        """What calling AEs we do not know may do."""
        if self.unknown_aet:
            return _services(self.unknown_aet, "unknown_aet")
        if not self.beyond_loopback:
            return frozenset(SERVICES)
        return frozenset({"echo", "store"})


def settings() -> list[str]:
    """Names of every setting (TOML key; MINIPACS_<NAME> in the environment)."""
    return [f.name for f in fields(Config)]


def parse_peer(text: str) -> Peer:
    """Parse `AET=HOST:PORT[?allow=SERVICE+SERVICE&check_host=no&tls=yes&cert=CN]`."""
    text, _, options = text.partition("?")
    aet, sep, address = text.partition("=")
    host, colon, port = address.rpartition(":")
    if not sep or not colon or not host:
        raise ConfigError(f"peer {text!r} is not AET=HOST:PORT")
    peer = Peer(_aet(aet.strip(), "peer AE title"), host.strip(), _port(port, f"peer {aet} port"))
    for option in filter(None, options.split("&")):
        name, _, value = option.partition("=")
        if name == "allow":
            peer = replace(peer, allow=_services(value, f"peer {aet} allow"))
        elif name == "check_host":
            peer = replace(peer, check_host=_bool(value, f"peer {aet} check_host"))
        elif name == "tls":
            peer = replace(peer, tls=_bool(value, f"peer {aet} tls"))
        elif name == "cert" and value.strip():
            peer = replace(peer, cert=value.strip())
        else:
            raise ConfigError(
                f"peer {aet}: unknown option {name!r} (allow, check_host, tls, cert=CN)"
            )
    return peer


def _services(text: str, name: str) -> frozenset[str]:
    names = frozenset(filter(None, text.replace(" ", "+").split("+")))
    if names == {"none"}:
        return frozenset()
    unknown = names - set(SERVICES)
    if unknown:
        raise ConfigError(
            f"{name}: unknown service(s) {', '.join(sorted(unknown))}; "
            f"use {'+'.join(SERVICES)} or none"
        )
    return names


def load(config_file: Path | None, env: dict[str, str], flags: dict[str, Any]) -> Config:
    """Merge file < environment < flags into a validated Config."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values.update(tomllib.loads(Path(config_file).read_text()))
        except OSError as exc:
            raise ConfigError(f"config file {config_file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from exc
    for name in settings():
        key = f"MINIPACS_{name.upper()}"
        if key in env:
            values[name] = env[key]
    values.update({k: v for k, v in flags.items() if v is not None and v != ()})
    unknown = set(values) - set(settings())
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    config = replace(Config(), **{k: _convert(k, v) for k, v in values.items()})
    tied = [p.aet for p in config.peer if p.cert]
    if tied and not config.tls_ca:
        raise ConfigError(
            f"peer {tied[0]}: cert= needs tls_ca (client certificates come with mutual TLS)"
        )
    return config


FIELDS = {setting.name: setting for setting in fields(Config)}


def _convert(name: str, value: Any) -> Any:
    """The value of setting `name`: by its own converter, else by its type (see above)."""
    setting = FIELDS[name]
    if "convert" in setting.metadata:
        return setting.metadata["convert"](value, name)
    if setting.type is int:
        minimum, maximum = setting.metadata.get("minimum", 1), setting.metadata.get("maximum")
        return _int(value, name, minimum, maximum)
    if setting.type is bool:
        return _bool(value, name)
    if setting.type is Path:
        return Path(value)
    return str(value)
