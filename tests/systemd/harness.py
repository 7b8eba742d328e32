"""Boot a real systemd as PID 1 of fresh namespaces, for tests of units and the daemon under it.

The container:

- ``unshare --fork --pid --mount --uts --ipc --net --cgroup`` from inside a cgroup made for it
  under the host's cgroup2 hierarchy (``/sys/fs/cgroup/unified`` on hybrid hosts), so the
  container's cgroup namespace is rooted there and removing that cgroup removes everything;
- its root is an overlay of the host's ``/`` with a tmpfs upper dir, so the project and its venv
  are visible read-only-in-effect and every write disappears with the container; those of them
  on another file system than ``/`` (which the overlay does not show) are bound in read-only;
- /tmp is not emptied at boot, so a project under /tmp (a CI checkout) stays visible;
- fresh proc, sysfs (read-only, so udev skips itself) and cgroup2 mounts; ``/proc/sys`` is
  read-only except ``/proc/sys/net`` because kernel.* and fs.* sysctls are host-wide;
- a private tmpfs ``/dev`` with only harmless nodes and its own ``/dev/net/tun``;
- ``container=mvpd-test`` in PID 1's environment, so systemd and its units treat it as a
  container (no module loading, no clock setting, no swap or block devices at shutdown);
- a minimal default target (basic.target) with timers, getty, sysctl, binfmt, module loading,
  time sync and similar host-touching units masked.

Nothing host-wide is changed. :meth:`SystemdContainer.stop` sends SIGRTMIN+4 (poweroff) to the
container's PID 1, waits, then removes the cgroup and the scratch directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: The project and its interpreter, reached inside the container through the overlay of ``/``.
PROJECT = Path(__file__).resolve().parents[2]
PYTHON = Path(sys.executable)
HOST_CGROUP2_CANDIDATES = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
SYSTEMD = Path("/lib/systemd/systemd")
#: The console scripts of the project's venv, reached inside the container through the overlay.
MVPD_BIN = PYTHON.parent / "mvpd"
MVPCTL_BIN = PYTHON.parent / "mvpctl"
#: What the container must see of the host: the project, its venv and the Python behind it.
CODE_PATHS = (PROJECT, Path(sys.prefix), Path(sys.base_prefix).resolve())

#: Units that would touch the host (clock, sysctls, modules, binfmt, entropy) or that are
#: pointless in a throwaway container and slow its boot.
MASKED_UNITS = (
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "systemd-timesyncd.service",
    "systemd-random-seed.service",
    "systemd-remount-fs.service",
    "systemd-pstore.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    "systemd-hwdb-update.service",
    "systemd-udevd.service",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-journal-catalog-update.service",
    "systemd-update-done.service",
    "systemd-boot-system-token.service",
    "ldconfig.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "timers.target",
    "getty.target",
    "console-getty.service",
    "e2scrub_reap.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
)

# Runs as PID 1 of the new namespaces, builds the root and execs systemd (keeping PID 1).
_STAGE2 = r"""
set -eu
D="$1"
mount --make-rprivate /
mount -t tmpfs -o mode=0755 mvpd-test "$D"
mkdir "$D/upper" "$D/work" "$D/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$D/upper,workdir=$D/work" "$D/root"
R="$D/root"
# The daemon's state (its identity and known_peers) starts empty, whatever the host keeps
# in /var/lib/mvpd (removed in the overlay only; the host's copy is untouched).
rm -rf "$R/var/lib/mvpd"
shift
for P in "$@"; do  # code on other file systems than /, which the overlay does not show
    mkdir -p "$R$P"
    mount --rbind "$P" "$R$P"
    mount -o remount,bind,ro "$R$P"
done
mount -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount --bind "$R/proc/sys" "$R/proc/sys"
mount --bind "$R/proc/sys/net" "$R/proc/sys/net"
mount -o remount,bind,ro "$R/proc/sys"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 "$R/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid,size=8m dev "$R/dev"
mknod -m 666 "$R/dev/null" c 1 3
mknod -m 666 "$R/dev/zero" c 1 5
mknod -m 666 "$R/dev/full" c 1 7
mknod -m 666 "$R/dev/random" c 1 8
mknod -m 666 "$R/dev/urandom" c 1 9
mknod -m 666 "$R/dev/tty" c 5 0
mknod -m 600 "$R/dev/console" c 1 3
mkdir -m 755 "$R/dev/net" "$R/dev/pts" "$R/dev/shm" "$R/dev/mqueue"
mknod -m 666 "$R/dev/net/tun" c 10 200
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"
ln -s /proc/self/fd/2 "$R/dev/stderr"
cp -a "$D/../setup/." "$R/" 2>/dev/null || true
cd "$R"
mkdir -p "$R/.oldroot"
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
exec env -i container=mvpd-test PATH=/usr/sbin:/usr/bin:/sbin:/bin /lib/systemd/systemd \
    --log-target=journal --log-level=info </dev/null
"""


class HarnessUnsupported(RuntimeError):
    """This machine cannot boot the container (not root, no cgroup2, no systemd, ...)."""


def unsupported_reason() -> str | None:
    """Why the container cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts, cgroups)"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is missing"
    for tool in ("unshare", "nsenter", "pivot_root", "mknod"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if host_cgroup2() is None:
        return "no writable cgroup2 hierarchy on the host"
    if not Path("/proc/filesystems").read_text().count("overlay"):
        return "the kernel has no overlayfs"
    return None


def foreign_code_paths(paths: Sequence[Path] = CODE_PATHS) -> list[Path]:
    """Those of ``paths`` on another file system than ``/`` (a CI volume, a tmpfs /tmp): the
    overlay of ``/`` shows only the root file system, so the container binds them in."""
    root_dev = os.stat("/").st_dev
    found: list[Path] = []
    for path in sorted({p.absolute() for p in paths}):
        if any(f == path or f in path.parents for f in found):
            continue
        with contextlib.suppress(OSError):
            if os.stat(path).st_dev != root_dev:
                found.append(path)
    return found


def host_cgroup2() -> Path | None:
    """The host's cgroup2 mount point, if any."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    points = {line.split()[1] for line in mounts if line.split()[2] == "cgroup2"}
    for candidate in HOST_CGROUP2_CANDIDATES:
        if str(candidate) in points and os.access(candidate, os.W_OK):
            return candidate
    return None


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _own_cgroup2_path() -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return "/"


class SystemdContainer:
    """A booted systemd in fresh namespaces; use :func:`booted` or :meth:`start`/:meth:`stop`."""

    def __init__(self, name: str | None = None, *, boot_timeout: float = 30.0) -> None:
        self.name = name or f"mvpd-test-{uuid.uuid4().hex[:8]}"
        self.boot_timeout = boot_timeout
        self.scratch = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.setup_dir = self.scratch / "setup"
        self.mount_dir = self.scratch / "mnt"
        self.cgroup: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None

    # --- building ---------------------------------------------------------------------------

    def add_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Put a file into the container's root before boot (``path`` is absolute inside)."""
        target = self.setup_dir / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def _prepare_setup(self) -> None:
        units = "etc/systemd/system"
        self.add_file(f"/{units}/default.target", "[Unit]\nDescription=Test default\n"
                      "Requires=basic.target\nAfter=basic.target\nAllowIsolate=yes\n")
        for unit in MASKED_UNITS:
            link = self.setup_dir / units / unit
            link.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to("/dev/null")
        self.add_file("/etc/systemd/journald.conf.d/50-test.conf",
                      "[Journal]\nStorage=volatile\nRateLimitBurst=0\nForwardToSyslog=no\n")
        self.add_file("/etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
        self.add_file("/etc/hostname", self.name[:63] + "\n")
        self.add_file("/etc/fstab", "# empty: the test container mounts nothing from fstab\n")
        # Debian's tmp.conf (D /tmp) empties /tmp at boot: in the overlay that hides a project
        # or venv under the host's /tmp (a CI checkout) from everything in the container.
        self.add_file("/etc/tmpfiles.d/tmp.conf", "d /tmp 1777 root root -\n")

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Boot the container and wait until systemd reports a finished start-up."""
        reason = unsupported_reason()
        if reason is not None:
            raise HarnessUnsupported(reason)
        self._prepare_setup()
        self.mount_dir.mkdir()
        root = host_cgroup2()
        assert root is not None
        self.cgroup = root / _own_cgroup2_path().lstrip("/") / self.name
        if not self.cgroup.parent.exists() or not os.access(self.cgroup.parent, os.W_OK):
            self.cgroup = root / self.name
        remove_stale_cgroups(self.cgroup.parent)
        self.cgroup.mkdir()
        # The shell joins the new cgroup first, so unshare --cgroup roots the namespace there.
        outer = (
            f"echo $$ > {shlex.quote(str(self.cgroup / 'cgroup.procs'))} && "
            "exec unshare --fork --kill-child=SIGKILL --pid --mount --uts --ipc --net --cgroup "
            "--propagation private "
            f"sh -c {shlex.quote(_STAGE2)} stage2 {shlex.quote(str(self.mount_dir))} "
            + " ".join(shlex.quote(str(p)) for p in foreign_code_paths())
        )
        self.proc = subprocess.Popen(
            ["sh", "-c", outer],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.scratch / "boot.log", "wb"),  # noqa: SIM115 - closed by the child
            start_new_session=True,
            # If the test process dies without cleaning up, unshare gets SIGKILL and takes
            # the container's PID 1 (so the whole PID namespace) with it.
            preexec_fn=_die_with_parent,
        )
        try:
            self.pid = self._find_init_pid()
            self._wait_booted()
        except BaseException:
            self.stop()
            raise

    def _find_init_pid(self) -> int:
        """The container's PID 1, seen from the host: the only child of ``unshare``."""
        assert self.proc is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HarnessUnsupported(f"container exited early: {self.boot_log()}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            with contextlib.suppress(OSError):
                pids = children.read_text().split()
                if pids:
                    return int(pids[0])
            time.sleep(0.02)
        raise HarnessUnsupported("the container's init did not appear")

    def _wait_booted(self) -> None:
        deadline = time.monotonic() + self.boot_timeout
        state = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise HarnessUnsupported(f"container exited during boot: {self.boot_log()}")
            result = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                return
            time.sleep(0.1)
        failed = self.run(["systemctl", "--failed", "--no-pager"], check=False).stdout
        raise HarnessUnsupported(f"systemd did not finish booting (state {state!r}): {failed}")

    def boot_log(self) -> str:
        """What the container wrote to stderr before systemd took over."""
        with contextlib.suppress(OSError):
            return (self.scratch / "boot.log").read_text(errors="replace")[-2000:]
        return ""

    def stop(self, timeout: float = 30.0) -> None:
        """Power the container off (SIGRTMIN+4 to its PID 1), then remove all it left."""
        if self.proc is not None and self.proc.poll() is None:
            if self.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGRTMIN + 4)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._kill_cgroup()
                self.proc.wait(timeout=10)
        if self.cgroup is not None:
            self._kill_cgroup()
            self._remove_cgroup(self.cgroup)
            self.cgroup = None
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _kill_cgroup(self) -> None:
        if self.cgroup is None:
            return
        kill = self.cgroup / "cgroup.kill"
        if kill.exists():
            with contextlib.suppress(OSError):
                kill.write_text("1")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._cgroup_populated(self.cgroup):
            time.sleep(0.05)

    @staticmethod
    def _cgroup_populated(cgroup: Path) -> bool:
        with contextlib.suppress(OSError):
            for line in (cgroup / "cgroup.events").read_text().splitlines():
                if line.startswith("populated "):
                    return line.split()[1] == "1"
        return False

    @classmethod
    def _remove_cgroup(cls, cgroup: Path) -> None:
        if not cgroup.exists():
            return
        for child in cgroup.iterdir():
            if child.is_dir():
                cls._remove_cgroup(child)
        deadline = time.monotonic() + 5
        while True:
            try:
                cgroup.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # --- using ------------------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside every namespace of the container (as root)."""
        assert self.pid is not None
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{shlex.join(argv)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``systemctl ARGS`` inside the container."""
        return self.run(["systemctl", "--no-pager", *args], check=check)

    def write_file(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside the running container (e.g. a unit), then daemon-reload
        yourself."""
        self.run(["sh", "-c", f"mkdir -p \"$(dirname {shlex.quote(path)})\" && "
                  f"cat > {shlex.quote(path)} && chmod {mode:o} {shlex.quote(path)}"], input=text)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """``systemctl show -p PROP ... UNIT`` as a dict."""
        out = self.systemctl("show", *(f"-p{p}" for p in props), unit).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(
        self, unit: str, prop: str, wanted: str | Sequence[str], timeout: float = 20.0
    ) -> str:
        """Poll a unit property until it has one of the wanted values; return the value."""
        values = (wanted,) if isinstance(wanted, str) else tuple(wanted)
        deadline = time.monotonic() + timeout
        value = ""
        while time.monotonic() < deadline:
            value = self.show(unit, prop).get(prop, "")
            if value in values:
                return value
            time.sleep(0.1)
        status = self.systemctl("status", unit, check=False).stdout
        raise AssertionError(f"{unit} {prop}={value!r}, wanted {values}\n{status}")

    def journal(self, *args: str) -> str:
        """``journalctl ARGS`` inside the container (after a journal sync)."""
        self.run(["journalctl", "--sync"], check=False)
        return self.run(["journalctl", "--no-pager", *args]).stdout


@dataclass
class InstalledUnits:
    """The container after ``mvpd install-units`` ran inside it, and what that printed."""

    container: SystemdContainer
    output: str


def remove_stale_cgroups(parent: Path) -> list[Path]:
    """Remove the cgroups of containers whose test process died before cleaning up: named
    ``mvpd-test-*``, empty and older than a minute (a running container's cgroup is populated;
    one being set up by a parallel run is new)."""
    removed = []
    for cgroup in parent.glob("mvpd-test-*"):
        with contextlib.suppress(OSError):
            if time.time() - cgroup.stat().st_mtime < 60:
                continue
        if cgroup.is_dir() and not SystemdContainer._cgroup_populated(cgroup):
            with contextlib.suppress(OSError):
                SystemdContainer._remove_cgroup(cgroup)
                removed.append(cgroup)
    return removed


@contextlib.contextmanager
def booted(name: str | None = None) -> Iterator[SystemdContainer]:
    """Boot a container for the ``with`` block; always clean up."""
    container = SystemdContainer(name)
    container.start()
    try:
        yield container
    finally:
        container.stop()
