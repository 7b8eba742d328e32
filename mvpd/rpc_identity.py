"""The identity RPC methods: ``id``, ``id.rotate``, ``trust`` and ``forget``.

This agent's DTLS identity (its fingerprint, a rotation in progress) and the peers'
fingerprints it trusts (known_peers), both held by the core's
:class:`~mvpd.identity.IdentityVerifier`. A part of :class:`mvpd.rpc_methods.RpcMethods`.
"""

from __future__ import annotations

import logging

from .config import AgentSettings
from .control_handler import Caller
from .core import AgentCore
from .proto.errors import InvalidParams, NotFound
from .proto.rpc import (
    ForgetParams,
    IdentityInfo,
    IdResult,
    KnownPeerEntry,
    NoParams,
    RotateParams,
    TrustParams,
    TrustResult,
)
from .proto.trust import normalize_fingerprint, short_fingerprint

log = logging.getLogger("mvpd.rpc")


class IdentityMethods:
    """``id``, ``id.rotate``, ``trust`` and ``forget`` on the core's identity verifier."""

    settings: AgentSettings
    core: AgentCore

    async def rpc_id(self, params: NoParams, caller: Caller) -> IdResult:
        verifier = self.core.verifier
        pending = verifier.store.pending()
        return IdResult(
            agent_id=self.settings.agent_id,
            current=_identity_info(verifier.identity.fingerprint),
            next=_identity_info(pending.fingerprint) if pending is not None else None,
            state_dir=str(verifier.store.state_dir),
        )

    async def rpc_id_rotate(self, params: RotateParams, caller: Caller) -> IdResult:
        verifier = self.core.verifier
        if params.finish:
            old = verifier.identity.fingerprint
            verifier.identity = verifier.store.finish_rotation()
            log.warning("identity rotated by %s: new connections use %s (was %s)", caller,
                        verifier.identity.fingerprint, old)
        else:
            pending = verifier.store.begin_rotation()
            log.info("identity rotation started by %s: next identity %s", caller,
                     pending.fingerprint)
        return await self.rpc_id(NoParams(), caller)

    async def rpc_trust(self, params: TrustParams, caller: Caller) -> TrustResult:
        fingerprint = _fingerprint_param(params.fingerprint)
        changed = self.core.verifier.known.add(params.peer, fingerprint, "trusted")
        log.info("%s trusted for %s by %s", fingerprint, params.peer, caller)
        return self._known(params.peer, int(changed))

    async def rpc_forget(self, params: ForgetParams, caller: Caller) -> TrustResult:
        fingerprint = None
        if params.fingerprint is not None:
            fingerprint = _fingerprint_param(params.fingerprint)
        removed = self.core.verifier.known.forget(params.peer, fingerprint)
        if not removed:
            raise NotFound(f"known_peers holds no {'such ' if fingerprint else ''}fingerprint "
                           f"for {params.peer}")
        log.info("%s forgotten (%d fingerprint(s)) by %s", params.peer, removed, caller)
        return self._known(params.peer, removed)

    def _known(self, peer: str, changed: int) -> TrustResult:
        entries = [
            KnownPeerEntry(fingerprint=e.fingerprint, how=e.how, added=e.added)
            for e in self.core.verifier.known.get(peer)
        ]
        return TrustResult(peer=peer, changed=changed, entries=entries)


def _identity_info(fingerprint: str) -> IdentityInfo:
    return IdentityInfo(fingerprint=fingerprint, short=short_fingerprint(fingerprint))


def _fingerprint_param(text: str) -> str:
    try:
        return normalize_fingerprint(text)
    except ValueError as exc:
        raise InvalidParams(str(exc)) from None
