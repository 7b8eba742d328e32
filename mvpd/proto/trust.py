"""Peer identity decisions (sans-I/O): which DTLS certificate fingerprint a peer may have.

Every agent keeps one long-term DTLS certificate (:mod:`mvpd.identity`), so the SHA-256
fingerprint of that certificate is the agent's identity, as a WireGuard public key is. An
offer or answer names the certificate its sender will present in ``a=fingerprint`` lines;
DTLS then fails unless the certificate presented matches them. So checking the fingerprint
in the SDP before applying it is enough to know who is at the other end, whatever the
signaling server claims.

What is accepted for a peer depends on its policy (:data:`TrustPolicy`):

* ``pinned``: only the fingerprints pinned in the config (``peers.<id>.fingerprints``) and
  those the operator added with ``mvpctl trust``;
* ``tofu`` (trust on first use, like SSH's known_hosts): those too, and on first contact the
  fingerprint offered, which is remembered; a different one later is refused;
* ``any``: whatever is offered (no protection against the signaling server).

Pinned fingerprints, when a peer has some, are the only ones accepted whatever the policy.
This module also reads and writes the ``known_peers`` file's text.
"""

from __future__ import annotations

import base64
import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from .errors import ConfigError, IdentityRefused

TrustPolicy = Literal["tofu", "pinned", "any"]
#: The hash every identity is named by (the one browsers and aiortc always offer).
ALGORITHM = "sha-256"
_DIGEST_BYTES = 32
_HEX_PAIR = re.compile(r"^[0-9A-F]{2}$")
#: How a fingerprint got into ``known_peers``.
KnownHow = Literal["remembered", "trusted"]
#: What a decision says about the peer, as ``mvpctl status`` shows it: ``pinned`` (in the
#: config), ``trusted`` (added with ``mvpctl trust``), ``remembered`` (first seen earlier),
#: ``new`` (first contact, remembered now), ``unverified`` (policy ``any``), ``refused``.
TrustStatus = Literal["pinned", "trusted", "remembered", "new", "unverified", "refused"]


def normalize_fingerprint(text: str) -> str:
    """``sha-256 AB:CD:...`` (the canonical form) from a fingerprint as people write it: with
    or without the ``sha-256`` prefix, any case, with colons or as 64 bare hex digits.

    Raises ``ValueError`` naming what is wrong."""
    value = text.strip()
    parts = value.split()
    if len(parts) == 2:
        algorithm, value = parts[0].lower(), parts[1]
        if algorithm != ALGORITHM:
            raise ValueError(f"only {ALGORITHM} fingerprints are used, not {parts[0]!r}")
    elif len(parts) != 1:
        raise ValueError(f"{text[:120]!r} is not a fingerprint (sha-256 AB:CD:... )")
    value = value.upper()
    if ":" in value:
        pairs = value.split(":")
    else:
        pairs = re.findall("..", value) if len(value) == 2 * _DIGEST_BYTES else []
    if len(pairs) != _DIGEST_BYTES or not all(_HEX_PAIR.match(p) for p in pairs):
        raise ValueError(
            f"{text[:120]!r} is not a SHA-256 fingerprint: 32 hex bytes separated by colons "
            "(as `mvpctl id` prints it)"
        )
    return f"{ALGORITHM} {':'.join(pairs)}"


def fingerprint_bytes(fingerprint: str) -> bytes:
    """The digest a canonical fingerprint names."""
    return bytes.fromhex(fingerprint.split()[-1].replace(":", ""))


def short_fingerprint(fingerprint: str) -> str:
    """A short form to read aloud or compare by eye: the first 100 bits of the digest in
    base32, in four groups of five (``K7QX2-MNB4A-...``). Enough to tell identities apart
    on the phone; the full fingerprint is what gets pinned."""
    text = base64.b32encode(fingerprint_bytes(fingerprint)).decode("ascii")[:20]
    return "-".join(text[i : i + 5] for i in range(0, 20, 5))


def sdp_fingerprints(sdp: str) -> list[str]:
    """Every ``a=fingerprint`` of an SDP (session and media level) whose algorithm is
    sha-256, canonical. Lines that cannot be parsed are returned as they are, so that they
    never match anything."""
    found = []
    for line in sdp.splitlines():
        if not line.startswith("a=fingerprint:"):
            continue
        value = line.split(":", 1)[1].strip()
        if value.split(" ", 1)[0].lower() != ALGORITHM:
            continue  # aiortc checks the other algorithms against the same certificate
        try:
            found.append(normalize_fingerprint(value))
        except ValueError:
            found.append(value)
    return found


def offered_fingerprint(sdp: str) -> str:
    """The one sha-256 fingerprint an offer or answer commits its sender to.

    :class:`IdentityRefused` when there is none (nothing to check: DTLS would then accept
    whichever certificate came) or when the SDP names several different ones."""
    found = set(sdp_fingerprints(sdp))
    if not found:
        raise IdentityRefused("the SDP has no sha-256 DTLS fingerprint (a=fingerprint)")
    if len(found) > 1:
        raise IdentityRefused("the SDP names several different sha-256 DTLS fingerprints")
    offered = found.pop()
    try:
        return normalize_fingerprint(offered)
    except ValueError as exc:
        raise IdentityRefused(f"the SDP's DTLS fingerprint is malformed: {exc}") from None


def effective_policy(
    peer_policy: TrustPolicy | None, default_policy: TrustPolicy | None, mode: str
) -> TrustPolicy:
    """A peer's policy: its own, else the configured default, else ``pinned`` for tun mode
    (its packets enter the routing table) and ``tofu`` for every other mode."""
    if peer_policy is not None:
        return peer_policy
    if default_policy is not None:
        return default_policy
    return "pinned" if mode == "tun" else "tofu"


def admits(policy: TrustPolicy, status: TrustStatus) -> bool:
    """Whether a peer whose fingerprint has ``status`` is acceptable under ``policy``."""
    if status == "refused":
        return False
    if policy == "pinned":
        return status in ("pinned", "trusted")
    if policy == "tofu":
        return status != "unverified"
    return True


@dataclass(frozen=True)
class KnownEntry:
    """One fingerprint of a peer in ``known_peers``."""

    fingerprint: str
    how: KnownHow
    #: UNIX time it was added.
    added: int = 0


class Verdict(str, enum.Enum):
    """What to do with an offered fingerprint."""

    ACCEPT = "accept"
    #: Accept and remember it (trust on first use).
    REMEMBER = "remember"
    REFUSE = "refuse"


@dataclass(frozen=True)
class TrustDecision:
    """The outcome of :func:`decide`."""

    verdict: Verdict
    status: TrustStatus
    offered: str
    #: The fingerprints that would have been accepted (for the refusal message).
    expected: tuple[str, ...] = ()
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.verdict != Verdict.REFUSE


def decide(
    peer: str,
    policy: TrustPolicy,
    pins: Sequence[str],
    known: Sequence[KnownEntry],
    offered: str,
) -> TrustDecision:
    """Whether ``peer`` offering the (canonical) fingerprint ``offered`` is accepted."""
    if pins:
        if offered in pins:
            return TrustDecision(Verdict.ACCEPT, "pinned", offered)
        return TrustDecision(
            Verdict.REFUSE, "refused", offered, tuple(pins),
            f"{peer} offered a DTLS fingerprint that is not pinned for it "
            f"(peers.{peer}.fingerprints)",
        )
    for entry in known:
        if entry.fingerprint == offered and admits(policy, entry.how):
            return TrustDecision(Verdict.ACCEPT, entry.how, offered)
    if policy == "any":
        return TrustDecision(Verdict.ACCEPT, "unverified", offered)
    expected = tuple(e.fingerprint for e in known if admits(policy, e.how))
    if policy == "pinned":
        return TrustDecision(
            Verdict.REFUSE, "refused", offered, expected,
            f"{peer} is not pinned and its trust policy is 'pinned': pin its fingerprint in "
            f"peers.{peer}.fingerprints or run `mvpctl trust {peer} FINGERPRINT`",
        )
    if expected:
        return TrustDecision(
            Verdict.REFUSE, "refused", offered, expected,
            f"{peer} offered a DTLS fingerprint other than the one remembered for it: "
            f"someone else may be answering in its name. If {peer} really changed its "
            f"identity, run `mvpctl trust {peer} FINGERPRINT` (after checking it with "
            f"{peer}'s `mvpctl id`) or `mvpctl forget {peer}`",
        )
    return TrustDecision(Verdict.REMEMBER, "new", offered)


# --- the known_peers file ------------------------------------------------------------------

KNOWN_PEERS_HEADER = (
    "# mvpd known_peers: the DTLS identities of peers (like SSH's known_hosts).\n"
    "# One line each: PEER sha-256 FINGERPRINT remembered|trusted ADDED-UNIX-TIME\n"
    "# Edit with `mvpctl trust PEER FINGERPRINT` and `mvpctl forget PEER`.\n"
)


def parse_known_peers(text: str, *, source: str = "known_peers") -> dict[str, list[KnownEntry]]:
    """The entries of a ``known_peers`` file by peer; :class:`ConfigError` naming the line
    that cannot be read (a damaged file must not silently trust or forget anyone)."""
    peers: dict[str, list[KnownEntry]] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            if len(parts) not in (4, 5) or parts[3] not in ("remembered", "trusted"):
                raise ValueError("expected PEER sha-256 FINGERPRINT remembered|trusted [TIME]")
            fingerprint = normalize_fingerprint(f"{parts[1]} {parts[2]}")
            added = int(parts[4]) if len(parts) == 5 else 0
        except ValueError as exc:
            raise ConfigError(f"{source} line {number}: {exc}") from None
        how: KnownHow = "trusted" if parts[3] == "trusted" else "remembered"
        entries = peers.setdefault(parts[0], [])
        if all(e.fingerprint != fingerprint for e in entries):
            entries.append(KnownEntry(fingerprint, how, added))
    return peers


def format_known_peers(peers: Mapping[str, Iterable[KnownEntry]]) -> str:
    """The text of a ``known_peers`` file (peers sorted, entries in the order given)."""
    lines = [KNOWN_PEERS_HEADER]
    for peer in sorted(peers):
        for entry in peers[peer]:
            lines.append(f"{peer} {entry.fingerprint} {entry.how} {entry.added}\n")
    return "".join(lines)
