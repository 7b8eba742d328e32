"""A WebRTC peer connection for data channels: aiortc's ICE and DTLS, our own SCTP.

The parts, in the order they come to life:

* :class:`aiortc.RTCIceGatherer` with the ICE servers given (an explicit list, maybe empty:
  aiortc would otherwise ask a public STUN server) and the transport policy; it gathers
  every local candidate before the description is made (half trickle, like aiortc), less
  those inside the networks ICE must not use (``excluded_networks``: the host's tunnels);
* :class:`aiortc.RTCIceTransport`: controlling on the offerer's side (RFC 8445 section 6.1.1,
  unless the peer is ICE lite); remote candidates from the description and from
  :meth:`PeerConnection.addIceCandidate` (queued until the remote description is set), less
  those inside the excluded networks;
* :class:`aiortc.RTCDtlsTransport` with an :class:`aiortc.RTCCertificate` (pass one in to
  keep a long-term identity); the role comes from a=setup (RFC 8842), the peer's
  certificate must match its a=fingerprint;
* :class:`~mvpd.rtc.sctp_transport.SctpTransport`: our sans-I/O association on DTLS
  application data, and the data channels on it.

The public surface follows the W3C ``RTCPeerConnection`` where it has a name for the thing
(``createOffer``, ``setRemoteDescription``, ``createDataChannel``, ``connectionState``,
events ``datachannel`` and ``connectionstatechange``); what it lacks is in snake_case
(:meth:`PeerConnection.selected_pair`, :attr:`PeerConnection.local_fingerprint`,
:meth:`PeerConnection.export_keying_material`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiortc import (
    RTCCertificate,
    RTCConfiguration,
    RTCDtlsTransport,
    RTCIceCandidate,
    RTCIceGatherer,
    RTCIceServer,
    RTCIceTransport,
    RTCSessionDescription,
)
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from ..proto.ippacket import IPNetwork
from ..sctp.dcep import ChannelParameters, ChannelState, DcepError
from . import aiortc_internals as internals
from .datachannel import DataChannel
from .description import (
    MAX_MESSAGE_SIZE,
    SCTP_PORT,
    LocalParameters,
    RemoteDescription,
    build_description,
    parse_description,
)
from .errors import InvalidStateError
from .events import EventEmitter
from .excluded_networks import ExcludedNetworks
from .sctp_transport import (
    MAX_CHANNELS,
    SCTP_CLOSED,
    SCTP_CONNECTED,
    SCTP_FAILED,
    SctpTransport,
)

log = logging.getLogger(__name__)

#: UDP socket buffers of the local candidates (capped by net.core.rmem_max/wmem_max).
SOCKET_BUFFER_SIZE = 4 * 1024 * 1024
#: How long :meth:`PeerConnection.close` waits for the peer to confirm the channels' stream
#: resets and the SCTP SHUTDOWN (a round trip each) before it stops DTLS and ICE anyway.
CLOSE_TIMEOUT = 1.0
#: Remote candidates kept while waiting for the remote description (a hostile peer's
#: flood stops here; a browser sends a few per interface).
MAX_PENDING_CANDIDATES = 256


@dataclass(frozen=True)
class IceConfiguration:
    """ICE servers (explicit: an empty list means none) and the transport policy."""

    servers: tuple[RTCIceServer, ...] = ()
    policy: str = "all"  # or "relay"

    def __post_init__(self) -> None:
        if self.policy not in ("all", "relay"):
            raise ValueError(f"the ICE transport policy is 'all' or 'relay', not {self.policy!r}")

    @classmethod
    def from_rtc_configuration(cls, config: RTCConfiguration) -> IceConfiguration:
        """The same servers and policy as an aiortc ``RTCConfiguration``, which must list
        its servers (``iceServers=None`` means a public STUN server to aiortc)."""
        if config.iceServers is None:
            raise ValueError(
                "give the ICE servers explicitly (an empty list for none): without a list "
                "aiortc would ask a public STUN server"
            )
        relay = config.iceTransportPolicy == RTCIceTransportPolicy.RELAY
        return cls(tuple(config.iceServers), "relay" if relay else "all")


class PeerConnection(EventEmitter):
    """One peer connection carrying data channels (no media).

    Events: ``datachannel`` (a channel the peer opened), ``connectionstatechange``.
    """

    def __init__(
        self,
        ice: IceConfiguration | None = None,
        *,
        certificate: RTCCertificate | None = None,
        max_message_size: int = MAX_MESSAGE_SIZE,
        socket_buffer_size: int = SOCKET_BUFFER_SIZE,
        max_channels: int = MAX_CHANNELS,
        excluded_networks: Callable[[], Iterable[IPNetwork]] | None = None,
    ) -> None:
        """``excluded_networks`` returns the networks no candidate may be in, local or
        remote (called once, when first needed): a path through them would run through a
        tunnel of this host."""
        super().__init__()
        self.socket_buffer_size = socket_buffer_size
        self.max_channels = max_channels
        internals.check_versions()
        config = ice or IceConfiguration()
        self.certificate = certificate or RTCCertificate.generateCertificate()
        self.max_message_size = max_message_size
        policy = (
            RTCIceTransportPolicy.RELAY if config.policy == "relay" else RTCIceTransportPolicy.ALL
        )
        self._gatherer = RTCIceGatherer(iceServers=list(config.servers), iceTransportPolicy=policy)
        self._ice = RTCIceTransport(self._gatherer)
        self._dtls = RTCDtlsTransport(self._ice, [self.certificate])
        internals.check_objects(self._gatherer, self._ice, self._dtls)
        self._sctp: SctpTransport | None = None
        self._local: RTCSessionDescription | None = None
        self._local_setup: str | None = None
        self._remote: RemoteDescription | None = None
        self._pending_candidates: list[RTCIceCandidate | None] = []
        self._early_channels: list[DataChannel] = []
        self._connect_task: asyncio.Task[None] | None = None
        self._state = "new"
        self._failure = ""
        self._closed = False
        self.candidates_dropped = 0
        self._excluded: ExcludedNetworks | None = None
        #: Candidates dropped for lying in an excluded network: ours, and the peer's
        #: (signaled, or the source of a check that would have made a peer-reflexive one).
        self.local_candidates_excluded = 0
        self.remote_candidates_excluded = 0
        if excluded_networks is not None:
            self._excluded = ExcludedNetworks(excluded_networks)
            internals.refuse_checks_from(self._ice, self._excluded_remote)

    # --- state -----------------------------------------------------------------------------

    @property
    def connectionState(self) -> str:
        """new, connecting, connected, failed or closed (ICE, DTLS and SCTP together)."""
        return self._state

    @property
    def iceConnectionState(self) -> str:
        return str(self._ice.state)

    @property
    def iceGatheringState(self) -> str:
        return str(self._gatherer.state)

    @property
    def dtls_state(self) -> str:
        return str(self._dtls.state)

    @property
    def sctp_state(self) -> str:
        return self._sctp.state if self._sctp is not None else "new"

    @property
    def signalingState(self) -> str:
        if self._closed:
            return "closed"
        if self._local is not None and self._remote is None:
            return "have-local-offer"
        if self._remote is not None and self._remote.type == "offer" and self._local is None:
            return "have-remote-offer"
        return "stable"

    @property
    def failure(self) -> str:
        """Why the connection failed ("" unless ``connectionState`` is failed)."""
        return self._failure

    @property
    def localDescription(self) -> RTCSessionDescription | None:
        return self._local

    @property
    def remoteDescription(self) -> RTCSessionDescription | None:
        if self._remote is None:
            return None
        return RTCSessionDescription(sdp=self._remote.sdp, type=self._remote.type)

    @property
    def local_fingerprint(self) -> str:
        """Our certificate's SHA-256 fingerprint, as in a=fingerprint."""
        for fingerprint in self.certificate.getFingerprints():
            if fingerprint.algorithm == "sha-256":
                return str(fingerprint.value)
        raise InvalidStateError("the certificate has no sha-256 fingerprint")

    def selected_pair(self) -> internals.SelectedPair | None:
        """The candidate pair ICE nominated (``.path`` is ``direct`` or ``relayed``)."""
        return internals.selected_pair(self._ice)

    @property
    def ice_transport(self) -> RTCIceTransport:
        return self._ice

    @property
    def sctp(self) -> SctpTransport | None:
        return self._sctp

    def export_keying_material(self, label: bytes, length: int) -> bytes:
        """RFC 5705 keying material of the DTLS session (same bytes on both ends)."""
        return internals.export_keying_material(self._dtls, label, length)

    def _set_state(self, state: str, reason: str = "") -> None:
        if state == self._state or self._state in ("closed", "failed"):
            return
        if state == "failed":
            self._failure = reason
        log.debug("connection state %s%s", state, f" ({reason})" if reason else "")
        self._state = state
        if state in ("closed", "failed") and self._sctp is not None:
            # Nothing can reach the peer any more: stop SCTP's timers, close the channels.
            self._sctp.detach()
        self.emit("connectionstatechange")

    # --- descriptions ----------------------------------------------------------------------

    async def createOffer(self) -> RTCSessionDescription:
        """Gather (once) and describe ourselves as the offerer (a=setup:actpass)."""
        self._check_open()
        if self._remote is not None or self._local is not None:
            raise InvalidStateError("an offer is made once, before any description is set")
        return await self._describe("offer", "actpass")

    async def createAnswer(self) -> RTCSessionDescription:
        """Answer the remote offer: we take the DTLS role the offer leaves us (RFC 8842:
        active, the DTLS client, when the offer says actpass)."""
        self._check_open()
        remote = self._remote
        if remote is None or remote.type != "offer":
            raise InvalidStateError("no remote offer to answer")
        setup = "passive" if remote.setup == "active" else "active"
        return await self._describe("answer", setup)

    async def _describe(self, kind: str, setup: str) -> RTCSessionDescription:
        await self._gatherer.gather()
        self._check_open()
        self._drop_excluded_local_candidates()
        if self.socket_buffer_size:
            internals.set_socket_buffers(self._ice, self.socket_buffer_size)
        local = LocalParameters(
            ice=self._gatherer.getLocalParameters(),
            candidates=self._gatherer.getLocalCandidates(),
            candidates_complete=self._gatherer.state == "completed",
            fingerprints=self._dtls.getLocalParameters().fingerprints,
            setup=setup,
            mid=self._remote.mid if self._remote is not None else "0",
            sctp_port=SCTP_PORT,
            max_message_size=self.max_message_size,
        )
        self._local_setup = setup
        return RTCSessionDescription(sdp=build_description(kind, local), type=kind)

    async def setLocalDescription(
        self, description: RTCSessionDescription
    ) -> None:
        """Use a description made by :meth:`createOffer` or :meth:`createAnswer`."""
        self._check_open()
        if self._local is not None or self._local_setup is None:
            raise InvalidStateError("set the description createOffer/createAnswer returned")
        if description.type == "answer" and self._remote is None:
            raise InvalidStateError("an answer needs the remote offer first")
        self._local = description
        if description.type == "offer":
            # The offerer controls (RFC 8445 6.1.1), from now on: the answerer starts its
            # checks as soon as it answers, and they may arrive before our answer does. A
            # still-controlled agent receiving them is a role conflict that can leave both
            # ends waiting for the other to nominate.
            internals.set_ice_controlling(self._ice, True)
        self._maybe_connect()

    async def setRemoteDescription(
        self, description: RTCSessionDescription
    ) -> None:
        """Apply the peer's offer or answer; :class:`InvalidSdp` if it is unusable."""
        self._check_open()
        if self._remote is not None:
            raise InvalidStateError("the remote description is already set (no renegotiation)")
        if description.type == "offer" and self._local is not None:
            raise InvalidStateError("we made an offer: the peer must answer, not offer")
        if description.type == "answer" and self._local is None:
            raise InvalidStateError("an answer needs our offer first")
        remote = parse_description(description.sdp, description.type)
        self._remote = remote
        # ICE role: the offerer controls, unless the answerer is a lite agent; an offer
        # from a lite agent makes us controlling too (RFC 8445 section 6.1.1).
        controlling = description.type == "answer" or remote.ice.iceLite
        internals.set_ice_controlling(self._ice, controlling)
        for candidate in remote.candidates:
            if not self._excluded_remote(candidate.ip):
                await self._ice.addRemoteCandidate(candidate)
        pending, self._pending_candidates = self._pending_candidates, []
        for queued in pending:
            await self._add_candidate(queued)
        if remote.candidates_complete:
            await self._add_candidate(None)
        self._maybe_connect()

    async def addIceCandidate(
        self, candidate: RTCIceCandidate | None
    ) -> None:
        """A trickled remote candidate; ``None`` for end-of-candidates. Before the remote
        description they are kept (up to :data:`MAX_PENDING_CANDIDATES`)."""
        if self._closed:
            return
        if self._remote is None:
            if len(self._pending_candidates) >= MAX_PENDING_CANDIDATES:
                self.candidates_dropped += 1
                return
            self._pending_candidates.append(candidate)
            return
        await self._add_candidate(candidate)

    async def _add_candidate(self, candidate: RTCIceCandidate | None) -> None:
        if candidate is not None and candidate.component != 1:
            self.candidates_dropped += 1
            return
        if candidate is not None and self._excluded_remote(candidate.ip):
            return
        try:
            await self._ice.addRemoteCandidate(candidate)
        except ValueError as exc:  # aioice: a candidate after end-of-candidates
            self.candidates_dropped += 1
            log.debug("remote candidate ignored: %s", exc)

    @property
    def pending_candidates(self) -> int:
        return len(self._pending_candidates)

    def _drop_excluded_local_candidates(self) -> None:
        excluded = self._excluded
        if excluded is None:
            return
        dropped = internals.drop_local_candidates(
            self._gatherer, lambda address: excluded.holding(address) is not None
        )
        if dropped:
            self.local_candidates_excluded += len(dropped)
            log.debug("local candidates not offered (on a tunnel of this host): %s",
                      ", ".join(sorted({c.address for c in dropped})))

    def _excluded_remote(self, address: str) -> bool:
        """Whether a remote candidate's ``address`` (signaled, or the source of a check)
        lies in an excluded network, counted (the first of the connection is logged):
        reaching the peer there would go through a tunnel of this host."""
        network = self._excluded.holding(address) if self._excluded is not None else None
        if network is None:
            return False
        self.remote_candidates_excluded += 1
        if self.remote_candidates_excluded == 1:
            log.info("remote candidate %s ignored: it is inside %s, a network routed "
                     "through a tunnel of this host (further ones are only counted)",
                     address, network)
        return True

    def local_candidates(self) -> list[RTCIceCandidate]:
        """Our candidates, as offered to the peer (none before gathering)."""
        return self._gatherer.getLocalCandidates()

    def remote_candidates(self) -> list[RTCIceCandidate]:
        """The peer's candidates ICE has taken."""
        return self._ice.getRemoteCandidates()

    # --- channels --------------------------------------------------------------------------

    def createDataChannel(
        self,
        label: str,
        *,
        ordered: bool = True,
        maxPacketLifeTime: int | None = None,
        maxRetransmits: int | None = None,
        protocol: str = "",
        negotiated: bool = False,
        id: int | None = None,
        priority: int | None = None,
    ) -> DataChannel:
        """A new channel; it opens once the association is up and the peer acknowledged."""
        self._check_open()
        if negotiated and id is None:
            raise ValueError("a negotiated data channel needs an id")
        parameters = ChannelParameters(
            label=label, protocol=protocol, ordered=ordered,
            max_retransmits=maxRetransmits, max_packet_lifetime=maxPacketLifeTime,
            **({"priority": priority} if priority is not None else {}),
        )
        channel = DataChannel(
            _NO_TRANSPORT, parameters, stream_id=id if negotiated else None,
            negotiated=negotiated,
        )
        if self._sctp is not None:
            self._sctp.add_channel(channel)
        else:
            # The DTLS role (and so the stream id parity) is not known yet.
            self._early_channels.append(channel)
        return channel

    # --- connecting ------------------------------------------------------------------------

    def _maybe_connect(self) -> None:
        if self._local is None or self._remote is None or self._connect_task is not None:
            return
        self._set_state("connecting")
        self._connect_task = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        remote = self._remote
        assert remote is not None and self._local_setup is not None
        # a=setup: whoever is active is the DTLS client.
        local_setup = self._local_setup
        if local_setup == "actpass":
            local_setup = "passive" if remote.setup == "active" else "active"
        role = "client" if local_setup == "active" else "server"
        internals.set_dtls_role(self._dtls, role)
        sctp = SctpTransport(
            self._dtls,
            dtls_role=role,
            local_port=SCTP_PORT,
            remote_port=remote.sctp_port,
            remote_max_message_size=remote.max_message_size,
            local_max_message_size=self.max_message_size,
            on_datachannel=self._on_remote_channel,
            on_state=self._on_sctp_state,
            max_channels=self.max_channels,
        )
        self._sctp = sctp
        self._adopt_early_channels(sctp)
        sctp.attach()
        self._dtls.on("statechange", self._on_dtls_state)
        self._ice.on("statechange", self._on_ice_state)
        try:
            await self._ice.start(remote.ice)
            if self._ice.state != "completed":
                self._set_state("failed", "ICE found no working candidate pair")
                return
            # Before DTLS: no SCTP packet can have arrived yet.
            sctp.set_packet_size(internals.sctp_packet_size(self._ice))
            await self._dtls.start(remote.dtls)
            if self._dtls.state != "connected":
                self._set_state("failed", "the DTLS handshake failed (certificate does not "
                                "match the fingerprint, or no answer)")
                return
        except Exception as exc:  # aiortc raises ConnectionError, asserts on bad states
            self._set_state("failed", f"ICE/DTLS: {exc or type(exc).__name__}")
            return
        if not self._closed:
            sctp.start()

    def _adopt_early_channels(self, sctp: SctpTransport) -> None:
        early, self._early_channels = self._early_channels, []
        for channel in early:
            if channel.readyState == "closed":
                continue
            try:
                sctp.add_channel(channel)
            except DcepError as exc:
                log.warning("data channel %r not opened: %s", channel.label, exc)
                channel._set_state(ChannelState.CLOSED)

    def _on_remote_channel(self, channel: DataChannel) -> None:
        self.emit("datachannel", channel)

    def _on_ice_state(self) -> None:
        if self._ice.state == "failed":
            self._set_state("failed", "ICE connectivity lost (no answer to consent checks)")

    def _on_dtls_state(self) -> None:
        state = self._dtls.state
        if state == "failed":
            self._set_state("failed", "DTLS failed")
        elif state == "closed" and not self._closed:
            self._set_state("closed", "the peer closed DTLS")

    def _on_sctp_state(self, state: str, reason: str) -> None:
        if state == SCTP_CONNECTED:
            self._set_state("connected")
        elif state == SCTP_FAILED:
            self._set_state("failed", f"SCTP: {reason}")
        elif state == SCTP_CLOSED:
            self._set_state("closed", reason)

    # --- closing ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidStateError("the peer connection is closed")

    async def shutdown(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Close the channels (stream resets) and shut SCTP down (SHUTDOWN, so the peer sees
        a clean close, not an abort), waiting up to ``timeout`` seconds for the peer to
        confirm. DTLS and ICE stay up until :meth:`close`."""
        sctp = self._sctp
        if sctp is not None and not self._closed:
            await sctp.close(timeout)

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """:meth:`shutdown` (if not done yet), then close DTLS (close_notify) and stop ICE.
        Idempotent."""
        if self._closed:
            return
        await self.shutdown(timeout)
        self._closed = True
        sctp = self._sctp
        if sctp is not None:
            sctp.detach()
        for channel in self._early_channels:
            channel._set_state(ChannelState.CLOSED)
        self._early_channels.clear()
        task = self._connect_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self._dtls.stop()
        with contextlib.suppress(Exception):
            await self._ice.stop()
        self._state = "closed"
        self.emit("connectionstatechange")
        self.remove_all_listeners()

    def stats(self) -> dict[str, Any]:
        pair = self.selected_pair()
        return {
            "connection_state": self._state,
            "ice_state": self.iceConnectionState,
            "dtls_state": self.dtls_state,
            "sctp": self._sctp.stats() if self._sctp is not None else None,
            "path": pair.path if pair is not None else None,
            "candidates_dropped": self.candidates_dropped,
            "local_candidates_excluded": self.local_candidates_excluded,
            "remote_candidates_excluded": self.remote_candidates_excluded,
        }


class _NoTransport:
    """The transport of channels made before the DTLS role (and so SCTP) is known."""

    def channel_send(self, channel: DataChannel, data: str | bytes) -> None:
        raise InvalidStateError("the data channel is not open yet")

    def channel_close(self, channel: DataChannel) -> None:
        channel._set_state(ChannelState.CLOSED)

    def channel_buffered_amount(self, channel: DataChannel) -> int:
        return 0

    def channel_set_low_threshold(self, channel: DataChannel, threshold: int) -> None:
        pass


_NO_TRANSPORT = _NoTransport()
