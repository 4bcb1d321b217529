"""The DICOM listener: which SOP classes and transfer syntaxes we accept, and the AE."""

import logging
import threading
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import _config
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelGet
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelMove
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from pacs import seam
from pacs.commitment import STORAGE_COMMITMENT
from pacs.config import Config
from pacs.handlers import build_handlers
from pacs.store_scp import StoreSCP
from pacs.tls import server_context
from pacs.worklist import MPPS
from pacs.worklist import WORKLIST_FIND
from storage import Archive

log = logging.getLogger(__name__)


QUERY_RETRIEVE = [
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
]


class SharedContext(PresentationContext):
    """A supported context that every association shares instead of deep-copying.

    pynetdicom deep-copies the supported contexts for each new association; with every
    storage class × every transfer syntax that costs ~70 ms per association
    (docs/ingest-performance.md). Negotiation never mutates them, so one copy
    serves all.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> "SharedContext":
        return self


class SharedContexts(list):
    """The list of them, shared the same way (copying ~180 items cost ~0.2 ms an association)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> "SharedContexts":
        return self


def transfer_syntaxes() -> list[str]:
    """Every transfer syntax pydicom knows, the uncompressed defaults first."""
    first = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    return first + [uid for uid in AllTransferSyntaxes if uid not in first]


def supported_contexts() -> SharedContexts:
    """Verification, Query/Retrieve, Storage Commitment, Modality Worklist and MPPS
    (uncompressed), every storage class in every syntax;
    storage contexts accept SCP/SCU role selection so C-GET can send back over them."""
    syntaxes = transfer_syntaxes()
    contexts = []
    for uid in [Verification, *QUERY_RETRIEVE, STORAGE_COMMITMENT, WORKLIST_FIND, MPPS]:
        contexts.append(_context(uid, syntaxes[:2]))
    for storage in AllStoragePresentationContexts:
        context = _context(storage.abstract_syntax, syntaxes)
        context.scu_role = True
        context.scp_role = True
        contexts.append(context)
    return SharedContexts(contexts)


def _storage_classes(contexts: list[PresentationContext], any_class: bool):
    """Whether a SOP class UID is one we store: a storage context's, or with
    accept_unknown_sop_classes any UID that is not one of our other services'."""
    services = {Verification, *QUERY_RETRIEVE, STORAGE_COMMITMENT, WORKLIST_FIND, MPPS}
    storage = {cx.abstract_syntax for cx in contexts} - services
    if any_class:
        return lambda uid: uid not in services
    return storage.__contains__


def _context(uid: str, syntaxes: list[str]) -> "SharedContext":
    context = SharedContext()
    context.abstract_syntax = uid
    context.transfer_syntax = syntaxes
    return context


def start_scp(
    config: Config, archive: Archive, shared_port: bool = False, tls: bool = False
) -> ThreadedAssociationServer:
    """Start listening (`tls`: on tls_port, DICOM over TLS); raises OSError when the address
    cannot be bound or the certificate files cannot be used."""
    seam.install()  # raises seam.SeamMismatch on a pynetdicom it does not know
    # pynetdicom decodes and formats every C-FIND/C-MOVE/C-GET identifier and C-FIND answer
    # for debug lines (~0.3 ms a request, ~6 % of C-FIND): patient data we keep out of logs.
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.UNRESTRICTED_STORAGE_SERVICE = config.accept_unknown_sop_classes
    ae = seam.ServerAE(ae_title=config.aet)
    ae.maximum_pdu_size = config.max_pdu
    ae.maximum_associations = config.max_associations
    ae.network_timeout = config.network_timeout
    ae.acse_timeout = config.acse_timeout
    ae.dimse_timeout = config.dimse_timeout
    context = None
    if tls:
        context = server_context(config.tls_cert, config.tls_key, config.tls_ca)
    contexts = supported_contexts()
    server = ae.make_server(
        (config.host, config.tls_port if tls else config.port),
        evt_handlers=build_handlers(archive, config),
        contexts=contexts,
        server_class=seam.SharedPortServer if shared_port else seam.Server,
        ssl_context=context,
    )
    if not tls:  # storage-only associations: our own upper layer (pacs.store_scp)
        store = StoreSCP(
            config,
            archive,
            _storage_classes(contexts, config.accept_unknown_sop_classes),
            transfer_syntaxes(),
            others=lambda: len(ae.active_associations),
        )
        store.fallback = server.process_request_thread
        server.divert = store.divert
        server.store_scp = store  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, name="dicom-listener", daemon=True).start()
    ae._servers.append(server)  # as AE.start_server does, so server.shutdown() finds it
    return server
