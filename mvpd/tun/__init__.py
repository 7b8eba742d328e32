"""TUN mode: the shared TUN device, its peers, and their packets' way over the peer connection.

:mod:`mvpd.tun.device` makes TUN devices (pyroute2); :mod:`mvpd.tun.tunnel` is the shared
device with its peers' allowed IPs and routes; :mod:`mvpd.tun.writer` writes peers' packets
to the device from a thread. Packets travel as protected datagrams on the peer connection's
ICE path: :mod:`mvpd.tun.datagram` is the sans-I/O protection (header, AEAD, replay window,
rekeying, the hello exchange both ends use to advertise the feature);
:mod:`mvpd.tun.ice_datagrams` is the only module that reaches into aiortc and aioice
(keying material from the DTLS connection, raw datagrams on the nominated candidate pair);
:mod:`mvpd.udp_batch` sends a batch of datagrams on a UDP socket with segmentation
offload (SCTP's records use it too); :mod:`mvpd.tun.link` joins them for one peer's tun transport.
:mod:`mvpd.tun.tunnel_networks` says which networks the tunnels carry, so that no peer
connection's ICE candidates lie inside them.
"""
