"""Wire formats and state machines, sans I/O.

Nothing here imports asyncio, aiortc, pyroute2 or systemd: this package is what ``mvpctl``
loads, and what the protocol tests drive synchronously.
"""
