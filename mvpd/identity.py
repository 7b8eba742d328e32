"""This agent's long-term identity: one DTLS certificate and key, kept in the state directory.

A peer connection makes a new certificate by default, so a fingerprint in an SDP says
nothing about who made it. mvpd instead makes one ECDSA P-256 key and a self-signed
certificate at first start, keeps them in ``state_dir`` (``/var/lib/mvpd``) and uses them for
every connection: the certificate's SHA-256 fingerprint is this agent's identity, which
peers pin or remember (:mod:`mvpd.proto.trust`). The certificate is valid for 20 years:
WebRTC peers (aiortc, browsers) check only that the certificate matches the fingerprint in
the SDP, never its dates, so expiry would add nothing but an outage.

Files (all written atomically, mode 0600, the directory 0700)::

    identity.key / identity.crt            the identity in use
    identity.next.key / identity.next.crt  a rotation in progress (``mvpctl id rotate``)

Rotation keeps things simple: ``rotate`` makes the next identity and only reports it; every
connection still uses the current one, so nothing breaks while peers are told the new
fingerprint (``mvpctl trust ME NEW`` on each, which keeps the old one trusted too).
``rotate --finish`` then makes the next identity the current one for new connections and
deletes the old key. A key file another user could read or write is refused at start
(:class:`~mvpd.proto.errors.ConfigError`, exit 78), naming the file.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .proto.errors import ConfigError
from .proto.trust import ALGORITHM, normalize_fingerprint, short_fingerprint

#: Years a certificate is valid (its dates are never checked by WebRTC peers).
VALIDITY_YEARS = 20
CURRENT = "identity"
NEXT = "identity.next"


@dataclass
class AgentIdentity:
    """A key and its self-signed certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    _rtc: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def generate(cls) -> AgentIdentity:
        """A new ECDSA P-256 key (what browsers and aiortc use) and its certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mvpd")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365 * VALIDITY_YEARS))
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @property
    def fingerprint(self) -> str:
        """``sha-256 AB:CD:...``, as in an SDP's ``a=fingerprint`` line."""
        digest = self.certificate.fingerprint(hashes.SHA256()).hex().upper()
        return normalize_fingerprint(f"{ALGORITHM} {digest}")

    @property
    def short(self) -> str:
        """The fingerprint's short form, to read aloud."""
        return short_fingerprint(self.fingerprint)

    def rtc_certificate(self) -> Any:
        """aiortc's ``RTCCertificate`` for this identity (made once)."""
        if self._rtc is None:
            from aiortc.rtcdtlstransport import RTCCertificate

            self._rtc = RTCCertificate(key=self.key, cert=self.certificate)
        return self._rtc

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


# --- private files -------------------------------------------------------------------------


def check_private(path: Path, *, what: str) -> os.stat_result:
    """Refuse (:class:`ConfigError`) a file or directory that is not ours alone: owned by
    another user, or readable or writable by group or others (directories: writable)."""
    try:
        info = path.lstat()
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"{what} {path} is a symbolic link; refusing to use it")
    mode = stat.S_IMODE(info.st_mode)
    is_dir = stat.S_ISDIR(info.st_mode)
    loose = mode & (0o022 if is_dir else 0o077)
    if info.st_uid != os.geteuid() or loose:
        wanted = "0700" if is_dir else "0600"
        raise ConfigError(
            f"{what} {path} has mode {mode:04o} and owner uid {info.st_uid}: it must belong "
            f"to uid {os.geteuid()} with mode {wanted}; refusing to use it. Fix it with "
            f"`chown {os.geteuid()} {path}; chmod {wanted[1:]} {path}` if its content is "
            "trustworthy, else remove it"
        )
    return info


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file renamed over it), mode 0600."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def prepare_state_dir(state_dir: Path) -> Path:
    """Create ``state_dir`` (mode 0700) if needed and check nobody else can write in it."""
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"state directory {state_dir} cannot be created: {exc.strerror}; set state_dir "
            "(MVPD_STATE_DIR) to a directory this user owns"
        ) from None
    check_private(state_dir, what="state directory")
    return state_dir


class IdentityStore:
    """The identity files in one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def _paths(self, stem: str) -> tuple[Path, Path]:
        return self.state_dir / f"{stem}.key", self.state_dir / f"{stem}.crt"

    def _read(self, stem: str) -> AgentIdentity | None:
        key_path, cert_path = self._paths(stem)
        if not key_path.exists() and not cert_path.exists():
            return None
        for path in (key_path, cert_path):
            if not path.exists():
                raise ConfigError(f"identity file {path} is missing (its pair exists); restore "
                                  f"it, or remove both {key_path.name} and {cert_path.name} "
                                  "to make a new identity that peers must trust again")
            check_private(path, what="identity file")
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"identity file {key_path} or {cert_path} is damaged: {exc}"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise ConfigError(f"identity file {key_path} does not hold an ECDSA P-256 key")
        if certificate.public_key() != key.public_key():
            raise ConfigError(f"identity file {cert_path} does not belong to the key in "
                              f"{key_path}")
        return AgentIdentity(key, certificate)

    def _write(self, stem: str, identity: AgentIdentity) -> None:
        key_path, cert_path = self._paths(stem)
        write_private(key_path, identity.key_pem())
        write_private(cert_path, identity.certificate_pem())

    def load(self) -> AgentIdentity:
        """The current identity, made (and stored) on first use; :class:`ConfigError` for
        files with wrong permissions, owner or content."""
        prepare_state_dir(self.state_dir)
        identity = self._read(CURRENT)
        if identity is None:
            identity = AgentIdentity.generate()
            self._write(CURRENT, identity)
        self._read(NEXT)  # a damaged or exposed pending key is refused at start too
        return identity

    def pending(self) -> AgentIdentity | None:
        """The next identity while a rotation is in progress."""
        return self._read(NEXT)

    def begin_rotation(self) -> AgentIdentity:
        """Make the next identity (or return the one already waiting)."""
        pending = self._read(NEXT)
        if pending is None:
            pending = AgentIdentity.generate()
            self._write(NEXT, pending)
        return pending

    def finish_rotation(self) -> AgentIdentity:
        """Make the next identity the current one; :class:`ConfigError` if there is none."""
        pending = self._read(NEXT)
        if pending is None:
            raise ConfigError("no identity rotation in progress: run `mvpctl id rotate` first")
        self._write(CURRENT, pending)
        for path in self._paths(NEXT):
            path.unlink()
        return pending
