"""The control socket's file: a directory only root can change, and a race-free bind.

Whoever can write the socket's directory (or any directory above it) can swap the socket for
a symlink between ``bind`` and ``chmod`` (making a root file world-writable) or put a socket
of their own in its place and read what root's ``mvpctl`` sends. So, like OpenSSH's
``StrictModes`` check of a key file's path:

- every directory from ``/`` down to the socket's must be owned by root (or by the user
  running the daemon) and writable by nobody else; a sticky world-writable ancestor such as
  ``/tmp`` is allowed (others cannot rename or remove entries they do not own there), but
  the socket's own directory must not be one. Missing directories are created, mode 0755.
  Anything else is a configuration error (exit 78) saying what to fix.
- The walk opens each directory with ``O_NOFOLLOW`` relative to the one above and checks the
  opened directory (``fstat``); a symlink met on the way is followed only when root (or
  the daemon's user) owns it, in a directory that has just passed the check.
- Every later operation is relative to the checked directory's file descriptor and never
  follows a symlink. The socket is bound under a temporary name (through
  ``/proc/self/fd/N/``, so the bind lands in that very directory whatever its path),
  given its group and mode (``fchownat``/``fchmodat`` with ``AT_SYMLINK_NOFOLLOW``; an
  ``fchmod`` on a socket's fd would change only the in-kernel socket inode, not the file,
  on Linux 6.x as checked), made to listen, and only then hard-linked to the final name:
  the path appears with its final owner and mode, and ``link`` never replaces anything, so
  a socket that appeared meanwhile (another mvpd starting) is not taken over. A stale
  socket is removed just before, only if ``lstat`` still shows the inode that was found
  dead; on shutdown the socket is removed only if it is still the inode we made.

Nothing here can be raced by another user: they cannot write any directory involved, and
root's own changes to the path's directories cannot redirect operations made relative to
the descriptor that was checked.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from .proto.errors import ConfigError

#: sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40


def _check_directory(fd: int, path: Path, *, own: bool) -> None:
    """Refuse a directory someone other than root (or this process's user) may change.
    ``own``: it is the socket's own directory, where a sticky bit does not make it safe."""
    st = os.fstat(fd)
    owners = {0, os.geteuid()}
    if st.st_uid not in owners:
        raise ConfigError(
            f"control socket directory {path} is owned by uid {st.st_uid}: every directory "
            "on the socket's path must be owned by root; fix it or set another socket path "
            "(socket, MVPD_SOCKET)"
        )
    writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and (own or not st.st_mode & stat.S_ISVTX):
        hint = "use a root-owned subdirectory" if st.st_mode & stat.S_ISVTX else \
            f"`chmod go-w {path}`"
        raise ConfigError(
            f"control socket directory {path} is writable by other users "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): they could replace the socket; {hint} "
            "or set another socket path (socket, MVPD_SOCKET)"
        )


def open_socket_directory(directory: Path) -> int:
    """Open ``directory`` (creating what is missing, mode 0755) after checking it and every
    directory above it; return its file descriptor. Raises :class:`ConfigError`."""
    directory = Path(os.path.abspath(directory))
    pending = list(directory.parts[1:])
    fd = os.open("/", _DIR_FLAGS)
    current = Path("/")
    links = 0
    try:
        _check_directory(fd, current, own=not pending)
        while pending:
            name = pending.pop(0)
            if name in ("", "."):
                continue
            if name == "..":
                parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd, current = parent, current.parent  # already checked on the way down
                continue
            created = False
            try:
                st = os.lstat(name, dir_fd=fd)
            except FileNotFoundError:
                try:
                    os.mkdir(name, 0o700, dir_fd=fd)  # 0755 once it is ours (below)
                    created = True
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise ConfigError(f"control socket directory {current / name}: cannot "
                                      f"create it ({exc.strerror}); set another socket path "
                                      "(socket, MVPD_SOCKET)") from None
                st = os.lstat(name, dir_fd=fd)
            if stat.S_ISLNK(st.st_mode):
                # In a sticky directory (/tmp) others may own entries: never follow theirs.
                if st.st_uid not in (0, os.geteuid()):
                    raise ConfigError(
                        f"control socket path {directory}: symlink {current / name} is owned "
                        f"by uid {st.st_uid}; use a path without it (socket, MVPD_SOCKET)"
                    )
                links += 1
                if links > _MAX_SYMLINKS:
                    raise ConfigError(f"too many symlinks in the control socket path {directory}")
                target = Path(os.readlink(name, dir_fd=fd))
                if target.is_absolute():
                    os.close(fd)
                    fd, current = os.open("/", _DIR_FLAGS), Path("/")
                pending[:0] = [p for p in target.parts if p != "/"]
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise ConfigError(f"control socket directory {directory}: {current / name} is "
                                  "not a directory; set another socket path (socket, "
                                  "MVPD_SOCKET)")
            child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd, current = child, current / name
            if created:
                os.fchmod(fd, 0o755)  # mvpctl users need x on it
            _check_directory(fd, current, own=not pending)
        return fd
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"control socket directory {directory}: {exc.strerror or exc}") \
            from None
    except BaseException:
        os.close(fd)
        raise


def _chmod_socket(name: str, mode: int, dir_fd: int) -> None:
    """``fchmodat(AT_SYMLINK_NOFOLLOW)``; glibc implements it through /proc and Python says
    ``ValueError`` when it cannot. Without /proc, check that the name is still a socket
    first: the directory is writable only by root, so nobody else can change it meanwhile."""
    try:
        os.chmod(name, mode, dir_fd=dir_fd, follow_symlinks=False)
    except (ValueError, NotImplementedError):
        if not stat.S_ISSOCK(os.lstat(name, dir_fd=dir_fd).st_mode):
            raise OSError(f"{name} is no longer our socket") from None
        os.chmod(name, mode, dir_fd=dir_fd)


def _same_file(a: os.stat_result | None, b: os.stat_result) -> bool:
    """The same inode, not a new one that reuses its number (the change time tells)."""
    return a is not None and (a.st_dev, a.st_ino, a.st_mode, a.st_ctime_ns) == \
        (b.st_dev, b.st_ino, b.st_mode, b.st_ctime_ns)


def check_socket_path(path: Path) -> None:
    """Raise :class:`ConfigError` now if the daemon could not use ``path`` for its socket
    (creating its directory if missing): before anything else starts."""
    SocketFile(path).close()


class SocketFile:
    """The socket's name in a checked directory (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"control socket path {self.path} is {len(os.fsencode(self.path))} bytes long; "
                f"Unix sockets allow {MAX_SOCKET_PATH}: set a shorter one (socket, MVPD_SOCKET)"
            )
        if not self.path.name or self.path.name in (".", ".."):
            raise ConfigError(f"control socket path {self.path} does not name a file")
        self.name = self.path.name
        self.dir_fd = open_socket_directory(self.path.parent)
        self._identity: tuple[int, int] | None = None

    def existing(self) -> os.stat_result | None:
        """``lstat`` of whatever has the socket's name now, or None."""
        try:
            return os.lstat(self.name, dir_fd=self.dir_fd)
        except FileNotFoundError:
            return None

    def in_directory(self, name: str) -> str:
        """A socket address for ``name`` in the checked directory: through its descriptor
        (``/proc/self/fd/N/name``) when /proc is there and the result fits in sun_path,
        else the configured path (its directories passed the check)."""
        proc = f"/proc/self/fd/{self.dir_fd}"
        if os.path.isdir(proc) and len(os.fsencode(f"{proc}/{name}")) <= MAX_SOCKET_PATH:
            return f"{proc}/{name}"
        return str(self.path.parent / name)

    def bind(
        self, *, group_id: int | None, mode: int, backlog: int,
        stale: os.stat_result | None = None,
    ) -> socket.socket:
        """A listening socket at the path, with group ``group_id`` and ``mode`` from its first
        moment there. ``stale``: what :meth:`existing` showed at the path and was found dead
        (removed if it is still there). Raises ``FileExistsError`` if something else is at
        the path, other ``OSError`` when the socket cannot be made."""
        temp = f".mvpd.{os.getpid()}.new"  # short: the bind address must fit in sun_path
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(temp, dir_fd=self.dir_fd).st_mode):
                os.unlink(temp, dir_fd=self.dir_fd)  # left by a crash of this very pid
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self.in_directory(temp))
            try:
                if group_id is not None:
                    os.chown(temp, -1, group_id, dir_fd=self.dir_fd, follow_symlinks=False)
                _chmod_socket(temp, mode, self.dir_fd)
                sock.listen(backlog)
                if stale is not None and _same_file(self.existing(), stale):
                    os.unlink(self.name, dir_fd=self.dir_fd)
                os.link(temp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd,
                        follow_symlinks=False)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=self.dir_fd)
            st = os.lstat(self.name, dir_fd=self.dir_fd)
            self._identity = (st.st_dev, st.st_ino)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        """Remove the socket if it is still the one :meth:`bind` made; close the directory."""
        if self._identity is not None:
            st = self.existing()
            if st is not None and stat.S_ISSOCK(st.st_mode) and \
                    (st.st_dev, st.st_ino) == self._identity:
                with contextlib.suppress(OSError):
                    os.unlink(self.name, dir_fd=self.dir_fd)
            self._identity = None
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1
