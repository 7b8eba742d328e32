"""What the tests of passed descriptors share: both ways mvpd copies, and draining a pipe."""

from __future__ import annotations

import os

import pytest

from mvpd import descriptor_copy


@pytest.fixture(params=["loop", "thread"])
def copy_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Copy pipes and sockets on the event loop (the default), or everything in threads
    (as for terminals and files, and on kernels without RWF_NOWAIT for pipes)."""
    monkeypatch.setattr(descriptor_copy, "LOOP_COPY", request.param == "loop")
    return str(request.param)


def drained_to_eof(fd: int) -> bool:
    """Read the pipe ``fd`` empty without blocking; whether it is at end of file (every
    writer, the daemon's copies included, has closed it)."""
    os.set_blocking(fd, False)
    try:
        while os.read(fd, 1 << 20):
            pass
    except BlockingIOError:
        return False
    return True
