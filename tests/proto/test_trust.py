"""The identity decision and the known_peers text (sans-I/O, synchronous)."""

from __future__ import annotations

import pytest

from mvpd.proto.errors import ConfigError, IdentityRefused
from mvpd.proto.trust import (
    KnownEntry,
    Verdict,
    admits,
    decide,
    effective_policy,
    format_known_peers,
    normalize_fingerprint,
    offered_fingerprint,
    parse_known_peers,
    sdp_fingerprints,
    short_fingerprint,
)

A = "sha-256 " + ":".join(["AB"] * 32)
B = "sha-256 " + ":".join(["CD"] * 32)
C = "sha-256 " + ":".join(["EF"] * 32)


def sdp(*fingerprints: str, media: str = "") -> str:
    lines = ["v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0"]
    lines += [f"a=fingerprint:{f}" for f in fingerprints]
    lines += ["m=application 9 DTLS/SCTP 5000", "c=IN IP4 0.0.0.0"]
    if media:
        lines.append(f"a=fingerprint:{media}")
    return "\r\n".join(lines) + "\r\n"


def test_normalize_accepts_what_people_paste() -> None:
    digest = "ab" * 32
    assert normalize_fingerprint(A) == A
    assert normalize_fingerprint(A.lower()) == A
    assert normalize_fingerprint(A.split()[1]) == A
    assert normalize_fingerprint(digest) == A
    assert normalize_fingerprint(f"  SHA-256   {digest.upper()} ") == A


@pytest.mark.parametrize(
    "bad",
    ["", "sha-1 AB:CD", "sha-512 " + ":".join(["AB"] * 32), "AB:CD", ":".join(["GG"] * 32),
     "sha-256 " + ":".join(["ABC"] * 32), "a b c", "ab" * 31],
)
def test_normalize_refuses_anything_else(bad: str) -> None:
    with pytest.raises(ValueError):
        normalize_fingerprint(bad)


def test_short_form_is_four_groups_of_base32() -> None:
    short = short_fingerprint(A)
    groups = short.split("-")
    assert len(groups) == 4 and all(len(g) == 5 for g in groups)
    assert short != short_fingerprint(B)
    assert set(short.replace("-", "")) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def test_sdp_fingerprints_session_and_media_level() -> None:
    assert sdp_fingerprints(sdp(A)) == [A]
    assert sdp_fingerprints(sdp(media=A.lower())) == [A]
    assert sdp_fingerprints(sdp(A, "sha-1 00:11", media=B)) == [A, B]


def test_offered_fingerprint_one_and_only_one() -> None:
    assert offered_fingerprint(sdp(A, media=A)) == A
    with pytest.raises(IdentityRefused, match="no sha-256"):
        offered_fingerprint(sdp())
    with pytest.raises(IdentityRefused, match="no sha-256"):
        offered_fingerprint(sdp("sha-512 " + ":".join(["AB"] * 64)))
    with pytest.raises(IdentityRefused, match="several"):
        offered_fingerprint(sdp(A, media=B))  # a pinned one next to the attacker's own
    with pytest.raises(IdentityRefused, match="malformed"):
        offered_fingerprint(sdp("sha-256 not-hex"))


def test_effective_policy_defaults_by_mode() -> None:
    assert effective_policy(None, None, "chat") == "tofu"
    assert effective_policy(None, None, "tun") == "pinned"
    assert effective_policy(None, "any", "tun") == "any"
    assert effective_policy("tofu", "pinned", "tun") == "tofu"


def test_pins_are_the_only_accepted_fingerprints_whatever_the_policy() -> None:
    remembered = [KnownEntry(B, "trusted")]
    for policy in ("tofu", "pinned", "any"):
        accepted = decide("bob", policy, [A], remembered, A)
        assert (accepted.verdict, accepted.status) == (Verdict.ACCEPT, "pinned")
        refused = decide("bob", policy, [A], remembered, B)
        assert refused.verdict == Verdict.REFUSE and refused.expected == (A,)
        assert "peers.bob.fingerprints" in refused.reason


def test_tofu_remembers_the_first_and_refuses_a_change() -> None:
    first = decide("bob", "tofu", [], [], A)
    assert (first.verdict, first.status) == (Verdict.REMEMBER, "new")
    again = decide("bob", "tofu", [], [KnownEntry(A, "remembered")], A)
    assert (again.verdict, again.status) == (Verdict.ACCEPT, "remembered")
    changed = decide("bob", "tofu", [], [KnownEntry(A, "remembered")], B)
    assert changed.verdict == Verdict.REFUSE and changed.expected == (A,)
    assert "mvpctl trust bob" in changed.reason
    # A rotation the operator accepted: both the old and the new one pass.
    both = [KnownEntry(A, "remembered"), KnownEntry(B, "trusted")]
    assert decide("bob", "tofu", [], both, B).status == "trusted"
    assert decide("bob", "tofu", [], both, A).status == "remembered"
    assert decide("bob", "tofu", [], both, C).verdict == Verdict.REFUSE


def test_pinned_policy_takes_only_operator_trusted_entries() -> None:
    assert decide("bob", "pinned", [], [], A).verdict == Verdict.REFUSE
    assert decide("bob", "pinned", [], [KnownEntry(A, "remembered")], A).verdict == (
        Verdict.REFUSE
    )
    accepted = decide("bob", "pinned", [], [KnownEntry(A, "trusted")], A)
    assert (accepted.verdict, accepted.status) == (Verdict.ACCEPT, "trusted")


def test_any_accepts_unverified_and_never_remembers() -> None:
    decision = decide("bob", "any", [], [KnownEntry(A, "remembered")], B)
    assert (decision.verdict, decision.status) == (Verdict.ACCEPT, "unverified")


def test_admits_by_policy() -> None:
    assert admits("pinned", "pinned") and admits("pinned", "trusted")
    assert not admits("pinned", "remembered") and not admits("pinned", "new")
    assert admits("tofu", "new") and not admits("tofu", "unverified")
    assert admits("any", "unverified") and not admits("any", "refused")


def test_known_peers_round_trip() -> None:
    peers = {"bob": [KnownEntry(A, "remembered", 10), KnownEntry(B, "trusted", 20)],
             "alice": [KnownEntry(C, "trusted", 30)]}
    text = format_known_peers(peers)
    assert text.startswith("# mvpd known_peers")
    assert parse_known_peers(text) == peers


@pytest.mark.parametrize(
    "line",
    ["bob sha-256 AB remembered 1", "bob sha-256", f"bob {A} maybe 1", f"bob {A} trusted x",
     f"bob {A} trusted 1 extra"],
)
def test_known_peers_damaged_line_is_an_error_naming_it(line: str) -> None:
    with pytest.raises(ConfigError, match="kp line 2"):
        parse_known_peers(f"# header\n{line}\n", source="kp")
