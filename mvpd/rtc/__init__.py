"""A WebRTC peer-connection stack for data channels: aiortc's ICE and DTLS objects, our SCTP.

See :mod:`mvpd.rtc.connection` for how the parts fit together.
"""
