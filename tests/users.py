"""A throwaway system user and group, and a directory they can reach, for the tests of who
may use the control socket (tests/test_control.py and tests/e2e/test_e2e_control.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def run_admin(*cmd: str) -> None:
    """Run a user-administration command (useradd, gpasswd, ...), retrying while another
    process holds the passwd lock; fail the test with its stderr otherwise."""
    for _ in range(20):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0:
            return
        if "lock" not in done.stderr:
            break
        time.sleep(0.25)
    raise AssertionError(f"{cmd} failed: {done.stderr}")


@contextlib.contextmanager
def throwaway_user(user_prefix: str, group_prefix: str) -> Iterator[tuple[str, str]]:
    """A new system user and group (not a member of it), removed afterwards. Skips the test
    when not root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a throwaway user")
    suffix = f"{os.getpid() % 100000}"
    user, group = f"{user_prefix}{suffix}", f"{group_prefix}{suffix}"
    run_admin("groupadd", "--system", group)
    try:
        run_admin("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user)
        try:
            yield user, group
        finally:
            subprocess.run(["userdel", user], capture_output=True)
    finally:
        subprocess.run(["groupdel", group], capture_output=True)


@contextlib.contextmanager
def public_directory(prefix: str) -> Iterator[Path]:
    """A new directory another user can reach (pytest's tmp_path is 0700), removed
    afterwards with everything in it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)
