"""Whom this agent believes: the ``known_peers`` file and the check every SDP goes through.

:class:`KnownPeers` is the file in the state directory (like SSH's known_hosts): the
fingerprints remembered on first contact (trust on first use) and those the operator added
with ``mvpctl trust``. :class:`PeerVerifier` applies the configured policy
(:func:`mvpd.proto.trust.decide`) to the fingerprint in a peer's offer or answer before it is
applied, remembers first contacts, and logs and reports refusals.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from .config import AgentSettings
from .identity import AgentIdentity, IdentityStore, check_private, write_private
from .logs import fields
from .proto.errors import ConfigError, IdentityRefused
from .proto.trust import (
    KnownEntry,
    KnownHow,
    TrustDecision,
    TrustPolicy,
    Verdict,
    admits,
    decide,
    effective_policy,
    format_known_peers,
    offered_fingerprint,
    parse_known_peers,
)

log = logging.getLogger(__name__)

KNOWN_PEERS = "known_peers"
#: Peers and fingerprints kept at most (a hostile swarm of first contacts must not grow
#: the file without bound); past it, first contacts are accepted but not remembered.
MAX_KNOWN_PEERS = 10000

RefusalListener = Callable[[str, TrustDecision], None]


class KnownPeers:
    """The ``known_peers`` file: read once, rewritten atomically (mode 0600) on change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, list[KnownEntry]] = {}
        if path.exists():
            check_private(path, what="known peers file")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"known peers file {path} cannot be read: {exc}") from None
            self.entries = parse_known_peers(text, source=str(path))

    def get(self, peer: str) -> list[KnownEntry]:
        return list(self.entries.get(peer, ()))

    def add(self, peer: str, fingerprint: str, how: KnownHow) -> bool:
        """Add (or upgrade to ``trusted``) one fingerprint; ``False`` if nothing changed."""
        entries = self.entries.setdefault(peer, [])
        for i, entry in enumerate(entries):
            if entry.fingerprint == fingerprint:
                if entry.how == how or how == "remembered":
                    return False
                entries[i] = KnownEntry(fingerprint, how, entry.added)
                break
        else:
            if sum(len(e) for e in self.entries.values()) >= MAX_KNOWN_PEERS:
                if not entries:
                    del self.entries[peer]
                raise ConfigError(f"{self.path} holds {MAX_KNOWN_PEERS} fingerprints already; "
                                  "`mvpctl forget` some")
            entries.append(KnownEntry(fingerprint, how, int(time.time())))
        self._save()
        return True

    def forget(self, peer: str, fingerprint: str | None = None) -> int:
        """Remove ``peer``'s fingerprints (only ``fingerprint`` when given); how many."""
        entries = self.entries.get(peer, [])
        kept = [e for e in entries if fingerprint is not None and e.fingerprint != fingerprint]
        removed = len(entries) - len(kept)
        if kept:
            self.entries[peer] = kept
        else:
            self.entries.pop(peer, None)
        if removed:
            self._save()
        return removed

    def _save(self) -> None:
        write_private(self.path, format_known_peers(self.entries).encode("utf-8"))


class PeerVerifier:
    """This agent's identity and its trust in others, as the peer sessions use them."""

    def __init__(
        self,
        settings: AgentSettings,
        store: IdentityStore,
        identity: AgentIdentity,
        known: KnownPeers,
    ) -> None:
        self.settings = settings
        self.store = store
        self.identity = identity
        self.known = known
        self._listeners: list[RefusalListener] = []

    @classmethod
    def load(cls, settings: AgentSettings) -> PeerVerifier:
        """Load (or make) the identity and read ``known_peers`` from ``settings.state_dir``;
        :class:`ConfigError` when a file is unsafe or damaged."""
        store = IdentityStore(settings.state_dir)
        identity = store.load()
        return cls(settings, store, identity, KnownPeers(settings.state_dir / KNOWN_PEERS))

    def add_refusal_listener(self, listener: RefusalListener) -> None:
        self._listeners.append(listener)

    def policy_for(self, peer: str, mode: str) -> TrustPolicy:
        """``peers.<peer>.trust`` (or ``peers."*"``'s), else ``trust``, else by mode."""
        settings = self.settings.peer_settings(peer)
        return effective_policy(settings.trust if settings else None, self.settings.trust, mode)

    def pins(self, peer: str) -> list[str]:
        """``peers.<peer>.fingerprints`` (or ``peers."*"``'s)."""
        settings = self.settings.peer_settings(peer)
        return list(settings.fingerprints) if settings else []

    def check_connect(self, peer: str, mode: str) -> None:
        """Before offering: :class:`IdentityRefused` at once when no identity of ``peer``
        could pass (policy ``pinned``, nothing pinned or trusted), rather than after the
        answer."""
        if self.policy_for(peer, mode) != "pinned" or self.pins(peer):
            return
        if any(e.how == "trusted" for e in self.known.get(peer)):
            return
        raise IdentityRefused(
            f"identity refused: {mode} mode to {peer} needs its identity pinned (trust policy "
            f"pinned): add its `mvpctl id` fingerprint to peers.{peer}.fingerprints or run "
            f"`mvpctl trust {peer} FINGERPRINT`"
        )

    def check(self, peer: str, sdp: str, mode: str) -> TrustDecision:
        """Decide on the fingerprint in ``peer``'s offer or answer ``sdp`` (before it is
        applied). A first contact under ``tofu`` is remembered; a refusal is logged and
        reported to the listeners."""
        try:
            offered = offered_fingerprint(sdp)
        except IdentityRefused as exc:
            decision = TrustDecision(Verdict.REFUSE, "refused", "none", (), exc.message)
        else:
            decision = decide(peer, self.policy_for(peer, mode), self.pins(peer),
                              self.known.get(peer), offered)
        if decision.verdict == Verdict.REMEMBER:
            try:
                self.known.add(peer, offered, "remembered")
                log.info("peer %s: first contact, remembering its identity %s", peer, offered,
                         extra=fields(peer=peer, event="identity-remembered"))
            except (ConfigError, OSError) as exc:
                log.warning("peer %s: identity accepted but not remembered: %s", peer, exc)
        elif decision.verdict == Verdict.REFUSE:
            expected = ", ".join(decision.expected) or "none"
            log.warning("peer %s: identity refused: %s; expected %s, offered %s", peer,
                        decision.reason, expected, decision.offered,
                        extra=fields(peer=peer, event="identity-refused", expected=expected,
                                     offered=decision.offered))
            for listener in list(self._listeners):
                listener(peer, decision)
        return decision

    def admits_mode(self, peer: str, mode: str, decision: TrustDecision | None) -> bool:
        """Whether a session accepted with ``decision`` may carry ``mode``: the mode of an
        answered offer is only known once its channel opens, and tun mode has the stricter
        default policy."""
        if decision is None:
            return True
        return admits(self.policy_for(peer, mode), decision.status)
