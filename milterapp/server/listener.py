"""Listening sockets: open one for a connection spec, adopt one, or take systemd's.

:func:`listen` is the one way the server (and the parent of worker processes) gets its
socket from the options: the socket given, else systemd's, else a new one for the spec.

Everything that can go wrong here becomes a :class:`ServerError` whose ``kind`` follows
milter-client (``IO`` for bind and address problems, ``UNIX_SOCKET`` for unix socket ones)
and whose message says what to do. Unix sockets get their mode and group before the first
connection can arrive, and a stale socket file is removed only if it is really a socket that
nobody listens on: never a regular file, never through a symlink, never a live socket.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
from dataclasses import dataclass
from typing import Final

from milterapp.errors import ServerError, ServerErrorKind
from milterapp.server.options import ServerOptions
from milterapp.spec import ConnectionSpec

__all__ = ["Listener", "adopt", "listen", "systemd_socket"]

#: Longest unix socket path the kernel takes (sun_path is 108 bytes with the final NUL).
MAX_UNIX_PATH: Final = 107
_SD_LISTEN_FDS_START: Final = 3


@dataclass
class Listener:
    """A listening socket and what to undo when it closes."""

    sock: socket.socket
    description: str
    unix_path: str | None = None
    remove_on_close: bool = False
    _inode: tuple[int, int] | None = None

    def close(self) -> None:
        """Close the socket and, if we created it, remove its unix socket file."""
        self.sock.close()
        if not (self.unix_path and self.remove_on_close and self._inode):
            return
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(self.unix_path)
            # Only our own socket: another server may have replaced it since.
            if stat.S_ISSOCK(info.st_mode) and (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self.unix_path)


def listen(options: ServerOptions) -> Listener:
    """The listening socket ``options`` ask for: ``listen_socket`` if given, else the socket
    systemd passed (unless ``socket_activation`` is off), else a new one for ``spec``.

    Raises:
        ServerError: the address is in use or not available, permission is denied, the
            unix socket path is too long, its directory is missing, a live milter holds it,
            or the given socket is not a listening stream socket.
    """
    if options.listen_socket is not None:
        return adopt(options.listen_socket)
    if options.socket_activation and (inherited := systemd_socket()) is not None:
        return adopt(inherited)
    return _open(options)


def _io_error(message: str) -> ServerError:
    return ServerError(message, kind=ServerErrorKind.IO)


def _unix_error(message: str) -> ServerError:
    return ServerError(message, kind=ServerErrorKind.UNIX_SOCKET)


def _open(options: ServerOptions) -> Listener:
    """Create, bind and listen on a socket for ``options.spec``.

    Raises:
        ServerError: the address is in use or not available, permission is denied, the
            unix socket path is too long, its directory is missing, or a live milter holds it.
    """
    spec = options.spec
    if spec.scheme == "unix":
        assert spec.path is not None
        return _open_unix(
            spec.path,
            backlog=options.backlog,
            mode=options.unix_socket_mode,
            group=options.unix_socket_group,
            remove_stale=options.remove_unix_socket_on_create,
            remove_on_close=options.remove_unix_socket_on_close,
        )
    return _open_inet(spec, options.backlog)


def _open_inet(spec: ConnectionSpec, backlog: int) -> Listener:
    family = socket.AF_INET6 if spec.scheme == "inet6" else socket.AF_INET
    host = spec.listen_host
    where = f"{spec} ({host} port {spec.port})"
    try:
        infos = socket.getaddrinfo(
            host, spec.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise _io_error(f"cannot resolve {host!r} for {spec}: {exc.strerror}") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _io_error(_bind_advice(exc, where)) from exc
    host_text = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
    return Listener(sock, f"{spec.scheme}:{sock.getsockname()[1]}@{host_text}")


def _bind_advice(exc: OSError, where: str) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (
            f"cannot listen on {where}: address already in use; "
            "stop the other process or choose another port"
        )
    if exc.errno == errno.EACCES:
        return f"cannot listen on {where}: permission denied; ports below 1024 need privileges"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: the address is not one of this machine's"
    return f"cannot listen on {where}: {exc.strerror or exc}"


def _open_unix(
    path: str,
    *,
    backlog: int,
    mode: int,
    group: str | int | None,
    remove_stale: bool,
    remove_on_close: bool,
) -> Listener:
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise _unix_error(
            f"unix socket path {path!r} is {len(os.fsencode(path))} bytes; the limit is "
            f"{MAX_UNIX_PATH}: choose a shorter path"
        )
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise _unix_error(
            f"cannot create unix socket {path!r}: directory {directory!r} does not exist"
        )
    gid = _group_id(group)
    if remove_stale:
        _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bind under a strict umask so the socket is never reachable with looser permissions
    # than asked for, not even between bind() and chmod().
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise _unix_error(
                f"unix socket {path!r} already exists; remove it or let milterapp remove "
                "stale sockets (remove_unix_socket_on_create=True)"
            ) from exc
        raise _unix_error(f"cannot create unix socket {path!r}: {exc.strerror or exc}") from exc
    finally:
        os.umask(old_umask)
    try:
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(backlog)
        info = os.lstat(path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise _unix_error(f"cannot set up unix socket {path!r}: {exc.strerror or exc}") from exc
    return Listener(
        sock,
        f"unix:{path}",
        unix_path=path,
        remove_on_close=remove_on_close,
        _inode=(info.st_dev, info.st_ino),
    )


def _group_id(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise _unix_error(f"unknown group {group!r} for the unix socket") from None


def _remove_stale(path: str) -> None:
    try:
        info = os.lstat(path)  # lstat: a symlink is judged as itself, never followed
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise _unix_error(
            f"{path!r} exists and is not a socket; refusing to remove it: choose another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        pass  # nobody listens: stale
    except OSError as exc:
        raise _unix_error(f"cannot check unix socket {path!r}: {exc.strerror or exc}") from exc
    else:
        raise _unix_error(
            f"another process is listening on unix socket {path!r}; stop it first "
            "(milterapp never removes a live socket)"
        )
    finally:
        probe.close()
    os.unlink(path)


def systemd_socket() -> socket.socket | None:
    """Return the listening socket systemd passed us (socket activation), if any.

    Reads ``LISTEN_PID``/``LISTEN_FDS`` as ``sd_listen_fds(3)`` does and unsets them, so that
    child processes do not take the socket for theirs. Only the first socket is used.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    try:
        sock = socket.socket(fileno=_SD_LISTEN_FDS_START)
    except OSError as exc:
        raise _io_error(f"systemd passed no usable socket on fd 3: {exc.strerror or exc}") from exc
    os.set_inheritable(sock.fileno(), False)
    return sock


def adopt(sock: socket.socket) -> Listener:
    """Wrap a socket that is already bound and listening (the reference's listen channel).

    Raises:
        ServerError: it is not a listening stream socket.
    """
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        raise _io_error(f"the given listen socket is unusable: {exc.strerror or exc}") from exc
    if sock.type != socket.SOCK_STREAM or not listening:
        raise _io_error("the given listen socket must be a stream socket that is listening")
    name = sock.getsockname()
    description = f"unix:{name}" if sock.family == socket.AF_UNIX else f"socket {name!r}"
    return Listener(sock, description)
