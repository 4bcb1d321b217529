"""Who may do what over DICOM: the one association policy (docs/architecture.md, "Who may do what").

Every A-ASSOCIATE-RQ passes `decide`: the called AE title must be ours, a known calling
AE (`peer`) must come from its host (unless its entry says check_host=no) and, when its
entry names a certificate (`cert=CN`), over mutual TLS with that certificate; a
certificate named by peers may call only as one of them. The services it may use come
from its entry (or `unknown_aet` for AEs we do not know). An association is
rejected with the A-ASSOCIATE-RJ reason PS3.8 9.3.4 defines; an accepted one is offered
only the presentation contexts of its permitted services, so a forbidden C-FIND has no
context to travel on.
"""

import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass

from pynetdicom import evt
from pynetdicom.events import Event
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelMove
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove
from pynetdicom.sop_class import Verification

from pacs.config import LOOPBACK
from pacs.config import SERVICES
from pacs.config import Config
from pacs.worklist import WORKLIST_FIND
from storage import Archive
from storage import audit

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ (result, source, diagnostic): rejected-permanent by the service user.
CALLING_AET_NOT_RECOGNISED = (0x01, 0x01, 0x03)
CALLED_AET_NOT_RECOGNISED = (0x01, 0x01, 0x07)


@dataclass(frozen=True)
class Decision:
    allowed: frozenset[str]
    reject: tuple[int, int, int] | None = None
    reason: str = ""


def decide(
    config: Config, calling: str, called: str, address: str, cert: str | None = None
) -> Decision:
    """What an association from `calling` (at `address`) to `called` may do; `cert` is the
    common name of the client certificate of a mutual TLS connection (None: no TLS)."""
    if called.strip() != config.aet:
        return Decision(frozenset(), CALLED_AET_NOT_RECOGNISED, f"called AE {called!r} is not us")
    peer = next((p for p in config.peer if p.aet == calling.strip()), None)
    bound = {p.aet for p in config.peer if cert and p.cert == cert}
    if bound and (peer is None or peer.aet not in bound):
        reason = f"certificate {cert!r} may call only as {', '.join(sorted(bound))}"
        return Decision(frozenset(), CALLING_AET_NOT_RECOGNISED, reason)
    if peer is None:
        allowed = config.unknown_aet_services()
        if not allowed:
            return Decision(allowed, CALLING_AET_NOT_RECOGNISED, "unknown calling AE")
        return Decision(allowed)
    if peer.check_host and not _same_host(address, peer.host):
        reason = f"calling AE {peer.aet} is expected from {peer.host}, not {address}"
        return Decision(frozenset(), CALLING_AET_NOT_RECOGNISED, reason)
    if peer.cert and cert != peer.cert:
        shown = f"certificate {cert!r}" if cert else "no TLS client certificate"
        reason = f"calling AE {peer.aet} must present certificate {peer.cert!r}, not {shown}"
        return Decision(frozenset(), CALLING_AET_NOT_RECOGNISED, reason)
    if not peer.allow:
        return Decision(peer.allow, CALLING_AET_NOT_RECOGNISED, f"{peer.aet} may do nothing")
    return Decision(peer.allow)


def _same_host(address: str, host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        addresses = {host}
    except ValueError:
        try:
            addresses = set(socket.gethostbyname_ex(host)[2])
        except OSError:
            return False
    return address in addresses or (address in LOOPBACK and host in LOOPBACK)


def certificate_name(sock: object) -> str | None:
    """The subject common name of a TLS connection's client certificate ('' when it sent
    none); None for a plain connection."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    subject = (sock.getpeercert() or {}).get("subject", ())
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    return names[0] if names else ""


SERVICE_OF = {
    Verification: "echo",
    PatientRootQueryRetrieveInformationModelFind: "find",
    StudyRootQueryRetrieveInformationModelFind: "find",
    PatientRootQueryRetrieveInformationModelMove: "move",
    StudyRootQueryRetrieveInformationModelMove: "move",
    PatientRootQueryRetrieveInformationModelGet: "get",
    StudyRootQueryRetrieveInformationModelGet: "get",
    WORKLIST_FIND: "find",
}  # every other context we support is storage or storage commitment: "store"


def handle_requested(event: Event, config: Config, archive: Archive) -> None:
    """EVT_REQUESTED: reject, or narrow the contexts to the permitted services."""
    assoc = event.assoc
    request = assoc.requestor.primitive
    calling = request.calling_ae_title
    address = assoc.requestor.address
    cert = certificate_name(assoc.dul.socket.socket)
    decision = decide(config, calling, request.called_ae_title, address, cert)
    if decision.reject is not None:
        record_rejection(archive, calling, address, request.called_ae_title, decision.reason)
        assoc.acse.send_reject(*decision.reject)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()
        return
    assoc.permitted = decision.allowed  # handlers check it again per request
    if decision.allowed != frozenset(SERVICES):
        # C-GET sends instances back on storage contexts: they stay when `get` is allowed.
        keep = decision.allowed | ({"store"} if "get" in decision.allowed else set())
        assoc.acceptor.supported_contexts = [
            cx
            for cx in assoc.acceptor.supported_contexts
            if SERVICE_OF.get(cx.abstract_syntax, "store") in keep
        ]


def record_rejection(archive: Archive, calling: str, address: str, called: str, reason: str):
    """Log and audit a rejected association."""
    log.warning("association from %s at %s rejected: %s", calling, address, reason)
    archive.audit(
        audit.Event(
            "rejected",
            f"failure: {reason}",
            who=calling,
            address=address,
            detail={"called": called},
        )  # fmt: skip
    )


def permitted(event: Event, service: str) -> bool:
    """Whether this request's association may use `service` (decided at association)."""
    return service in getattr(event.assoc, "permitted", frozenset(SERVICES))
