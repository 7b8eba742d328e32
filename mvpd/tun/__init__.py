"""TUN mode: the shared TUN device, its peers, and their packets' way over the peer connection.

:mod:`mvpd.tun.device` makes TUN devices (pyroute2); :mod:`mvpd.tun.tunnel` is the shared
device with its peers' allowed IPs and routes; :mod:`mvpd.tun.writer` writes peers' packets
to the device from a thread. Packets travel as protected datagrams on the peer connection's
ICE path: :mod:`mvpd.tun.datagram` is the sans-I/O protection (header, AEAD, replay window,
rekeying, the hello exchange both ends use to advertise the feature);
:mod:`mvpd.tun.ice_datagrams` carries them as raw datagrams on the nominated candidate pair,
keyed from the DTLS connection (what it needs of aiortc's and aioice's insides comes from
:mod:`mvpd.rtc.aiortc_internals`, behind its version gate);
:mod:`mvpd.udp_batch` sends a batch of datagrams on a UDP socket with segmentation
offload (SCTP's records use it too); :mod:`mvpd.tun.link` joins them for one peer's tun transport.
:mod:`mvpd.tun.tunnel_networks` says which networks the tunnels carry, so that no peer
connection's ICE candidates lie inside them.
"""
