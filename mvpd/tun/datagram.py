"""Protection for TUN packets sent as raw datagrams next to DTLS (sans-I/O, no asyncio).

A WireGuard-like transport-data format, keyed from the DTLS connection the peers already
authenticated (fingerprints in the signed-off SDP), so it needs no handshake of its own:

    0       1       2       4                              12
    +-------+-------+-------+------------------------------+------------------+-------+
    | 0x0C  | epoch |  0 0  |  counter (64 bits, network)  | ciphertext (IP)  |  tag  |
    +-------+-------+-------+------------------------------+------------------+-------+
                header (12 bytes, the AEAD's associated data)                    16 bytes

First byte: 12. RFC 7983 (updated by RFC 9443) demultiplexes datagrams on a WebRTC 5-tuple by
their first byte: 0-3 STUN, 16-19 ZRTP, 20-63 DTLS, 64-79 TURN ChannelData, 64-127 and
192-255 QUIC, 128-191 RTP/RTCP; 4-15 belongs to nobody. aioice hands everything that does not
parse as STUN to its receive queue (the hook in :mod:`mvpd.tun.ice_datagrams` takes ours out
there), aiortc's ``RTCDtlsTransport`` only accepts 20-63 and 128-191 and silently ignores the
rest, and so does a browser: a peer without this feature never sees our datagrams. Bytes 2-3
are zero because aioice does not check STUN's magic cookie: it takes a datagram for STUN when
bytes 2-3 equal its length minus 20, and ours are at least 28 bytes long.

Cipher: AES-256-GCM (``cryptography``, one C call per packet). Measured here per 1400-byte
packet: AES-128-GCM 0.95 us, AES-256-GCM 1.16 us, ChaCha20-Poly1305 5.4 us to seal (the CPU
has AES-NI). Nonce: four zero bytes and the counter; each direction has its own key, so a
(key, nonce) pair is never used twice.

Keys: the DTLS keying-material exporter (RFC 5705), label :data:`EXPORTER_LABEL`, no context,
:data:`EXPORTER_LENGTH` bytes: the DTLS client's sending base secret, the server's, and an
8-byte session id both ends share (shown in status; differs per connection), the way
DTLS-SRTP derives its keys (RFC 5764). The key of epoch *n* is HMAC-SHA256(base, "mvpd tun
key" | n), so either end derives any epoch without talking.

Rekeying: a sender moves to the next epoch (counter back to 0) after :data:`REKEY_AFTER`
packets, AES-GCM's confidentiality limit in RFC 9001 section 6.6 (2^23 packets). A receiver
that sees the next epoch's byte derives that key once, and adopts it when a packet
authenticates; the previous epoch's key stays for packets still in flight until the epoch
after that (at most two receive keys, as in WireGuard). Every epoch has its own replay window.

Replay: RFC 6479's sliding window (a ring of 64-bit blocks, 1984 packets back from the
highest counter seen), updated only after a packet authenticates.

Feature negotiation: each end sends :data:`HELLO` (an authenticated, empty-of-IP control
message) when its tun channel opens and answers a peer's hello with :data:`REPLY`; an end
sends IP packets as datagrams only after it received an authenticated datagram from the peer
(:attr:`DatagramProtection.peer_confirmed`). Until then, and with a peer that never answers,
packets go on the data channel.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, fields

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: The first byte of every datagram (see the module docstring).
PACKET_TYPE = 12
HEADER = struct.Struct("!BBHQ")
TAG_SIZE = 16
#: Bytes a datagram adds to the IP packet it carries.
OVERHEAD = HEADER.size + TAG_SIZE
EXPORTER_LABEL = b"EXPORTER-mvpd-tun-v1"
KEY_SIZE = 32
SESSION_ID_SIZE = 8
EXPORTER_LENGTH = 2 * KEY_SIZE + SESSION_ID_SIZE
#: Packets sealed under one key before the next epoch: AES-GCM's confidentiality limit.
#: Read when a connection's protection is made, so a test can lower it for a whole daemon
#: (tests/e2e_tun/test_tun_datagram.py starts mvpd with it at a few thousand packets).
REKEY_AFTER = 1 << 23
#: Control messages (plaintexts that cannot be IP packets: version nibble 0).
HELLO = b"\x00\x01"
REPLY = b"\x00\x02"

_NONCE_PREFIX = bytes(4)
_KEY_INFO = b"mvpd tun key"


def epoch_key(base: bytes, epoch: int) -> bytes:
    """The AES-256 key of ``epoch`` derived from one direction's base secret."""
    return hmac.new(base, _KEY_INFO + epoch.to_bytes(8, "big"), hashlib.sha256).digest()


class ReplayWindow:
    """RFC 6479 anti-replay window: :meth:`check` before decrypting, :meth:`update` after.

    A ring of :data:`BLOCKS` 64-bit blocks; moving forward clears whole blocks, so nothing is
    ever shifted. Counters more than :data:`SIZE` behind the highest one seen are too old.
    """

    BLOCK_BITS = 64
    BLOCKS = 32
    SIZE = (BLOCKS - 1) * BLOCK_BITS

    def __init__(self) -> None:
        self._blocks = [0] * self.BLOCKS
        self.top = -1  # the highest counter accepted so far

    def check(self, counter: int) -> bool:
        """Whether ``counter`` is new and not too old (nothing changes)."""
        if counter > self.top:
            return True
        if self.top - counter >= self.SIZE:
            return False
        block = (counter >> 6) % self.BLOCKS
        return not (self._blocks[block] >> (counter & 63)) & 1

    def update(self, counter: int) -> None:
        """Record ``counter`` (already :meth:`check`-ed and authenticated)."""
        blocks = self._blocks
        if counter > self.top:
            current = self.top >> 6 if self.top >= 0 else -1
            new = counter >> 6
            for i in range(current + 1, min(new, current + self.BLOCKS) + 1):
                blocks[i % self.BLOCKS] = 0
            self.top = counter
        blocks[(counter >> 6) % self.BLOCKS] |= 1 << (counter & 63)


@dataclass
class DatagramStats:
    """Counters of one peer's datagram path."""

    packets_out: int = 0
    bytes_out: int = 0
    packets_in: int = 0
    bytes_in: int = 0
    #: Authentic but already seen, or too far behind the window.
    replayed: int = 0
    #: Not ours, too short, unknown epoch, or failed authentication.
    undecryptable: int = 0
    #: Not sent (no path, too big) or authentic but neither an IP packet nor a control message.
    dropped: int = 0
    rekeys: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Sealer:
    """One direction's sending state."""

    def __init__(self, base: bytes, rekey_after: int) -> None:
        self._base = base
        self._rekey_after = rekey_after
        self.epoch = 0
        self.counter = 0
        self._cipher = AESGCM(epoch_key(base, 0))

    def rekey(self) -> None:
        self.epoch += 1
        self.counter = 0
        self._cipher = AESGCM(epoch_key(self._base, self.epoch))

    def seal(self, plaintext: bytes) -> bytes:
        counter = self.counter
        if counter >= self._rekey_after:
            self.rekey()
            counter = 0
        self.counter = counter + 1
        header = HEADER.pack(PACKET_TYPE, self.epoch & 0xFF, 0, counter)
        return header + self._cipher.encrypt(_NONCE_PREFIX + header[4:], plaintext, header)


class _EpochKey:
    __slots__ = ("cipher", "epoch", "window")

    def __init__(self, base: bytes, epoch: int) -> None:
        self.epoch = epoch
        self.cipher = AESGCM(epoch_key(base, epoch))
        self.window = ReplayWindow()


class DatagramProtection:
    """Seal and open one connection's TUN datagrams (see the module docstring).

    ``material`` is :data:`EXPORTER_LENGTH` bytes from the DTLS exporter with
    :data:`EXPORTER_LABEL`; ``dtls_client`` says which DTLS role this end has, which picks the
    sending half. ``rekey_after`` (packets per key, :data:`REKEY_AFTER` unless given) is for
    tests.
    """

    def __init__(
        self, material: bytes, *, dtls_client: bool, rekey_after: int | None = None
    ) -> None:
        if rekey_after is None:
            rekey_after = REKEY_AFTER
        if len(material) != EXPORTER_LENGTH:
            raise ValueError(f"need {EXPORTER_LENGTH} bytes of keying material")
        if rekey_after < 1:
            raise ValueError("rekey_after must be positive")
        client_base, server_base = material[:KEY_SIZE], material[KEY_SIZE:2 * KEY_SIZE]
        send_base, self._recv_base = (
            (client_base, server_base) if dtls_client else (server_base, client_base)
        )
        self.session_id = material[2 * KEY_SIZE:].hex()
        self.stats = DatagramStats()
        self._sealer = _Sealer(send_base, rekey_after)
        self._current = _EpochKey(self._recv_base, 0)
        self._previous: _EpochKey | None = None
        self._next: _EpochKey | None = None
        #: An authenticated datagram came from the peer: it speaks this format.
        self.peer_confirmed = False
        #: Hellos received and not answered yet (see :meth:`reply`).
        self.replies_due = 0

    @property
    def send_epoch(self) -> int:
        return self._sealer.epoch

    @property
    def receive_epoch(self) -> int:
        return self._current.epoch

    # --- sending -------------------------------------------------------------------------

    def seal(self, packet: bytes) -> bytes:
        """One IP packet as a datagram (counted)."""
        stats = self.stats
        stats.packets_out += 1
        stats.bytes_out += len(packet)
        before = self._sealer.epoch
        datagram = self._sealer.seal(packet)
        if self._sealer.epoch != before:
            stats.rekeys += 1
        return datagram

    def hello(self) -> bytes:
        """The control datagram that advertises the feature and asks for a :meth:`reply`."""
        return self._sealer.seal(HELLO)

    def reply(self) -> bytes:
        """The answer to a peer's hello (one due per hello received)."""
        self.replies_due = max(0, self.replies_due - 1)
        return self._sealer.seal(REPLY)

    # --- receiving -----------------------------------------------------------------------

    def open(self, datagram: bytes) -> bytes | None:
        """The IP packet in ``datagram``, or None when it is dropped (counted by reason) or a
        control message (handled: see :attr:`peer_confirmed` and :attr:`replies_due`)."""
        stats = self.stats
        if len(datagram) < OVERHEAD or datagram[0] != PACKET_TYPE or datagram[2] or datagram[3]:
            stats.undecryptable += 1
            return None
        epoch_byte = datagram[1]
        key = self._current
        if epoch_byte != key.epoch & 0xFF:
            other = self._other_key(epoch_byte)
            if other is None:
                stats.undecryptable += 1
                return None
            key = other
        counter = int.from_bytes(datagram[4:12], "big")
        window = key.window
        if not window.check(counter):
            stats.replayed += 1
            return None
        view = memoryview(datagram)
        try:
            plaintext = key.cipher.decrypt(_NONCE_PREFIX + datagram[4:12], view[12:], view[:12])
        except InvalidTag:
            stats.undecryptable += 1
            return None
        window.update(counter)
        if key is self._next:
            self._advance()
        self.peer_confirmed = True
        if plaintext and plaintext[0] >> 4 in (4, 6):
            stats.packets_in += 1
            stats.bytes_in += len(plaintext)
            return plaintext
        if plaintext == HELLO:
            self.replies_due += 1
        elif plaintext != REPLY:
            stats.dropped += 1
        return None

    def _other_key(self, epoch_byte: int) -> _EpochKey | None:
        previous = self._previous
        if previous is not None and epoch_byte == previous.epoch & 0xFF:
            return previous
        wanted = self._current.epoch + 1
        if epoch_byte != wanted & 0xFF:
            return None
        if self._next is None:  # derived once, however many forgeries name it
            self._next = _EpochKey(self._recv_base, wanted)
        return self._next

    def _advance(self) -> None:
        assert self._next is not None
        self._previous, self._current, self._next = self._current, self._next, None
