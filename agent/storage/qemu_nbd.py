"""qemu-nbd exports of one image: private to the worker that opens it and read through
libnbd (`Export`: a copy's source and destination, a checksum), or served to clients
(`Server`: Export.start's, for uploads, downloads and ovirt-imageio).

qemu-nbd is started by socket activation on a unix socket in a fresh 0700 directory (under
the agent's run dir, `exports/<pid>-<random>`: a killed worker cannot remove its own, so the
agent's start-up removes those whose process is gone): the socket listens before qemu-nbd
runs, so connecting never races its start-up, and nobody but this worker (and root) can
reach it. qemu-nbd runs as a child of the worker with a
parent-death signal and without --persistent, so it ends when the worker's connection
closes and is SIGKILLed when the worker dies: a killed worker, or a killed agent (whose death
kills its workers), never leaves one behind.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from agent import errors
from agent.storage import qemu_img

DEPTH = "qemu:allocation-depth"
SOCKET_PATH_MAX = 100  # a unix socket's path must fit in 108 bytes

# Where this process makes its exports' directories (configure): `<pid>-<random>` under the
# agent's run dir, so that the next start of the agent finds what a killed worker left (the
# dir of a pid that is gone) and removes it. Unconfigured (tests, tools): the temp dir.
_base: str | None = None


def configure(base: str | None) -> None:
    global _base
    _base = base


def new_dir() -> str:
    if _base is not None and len(_base) + 32 < SOCKET_PATH_MAX:
        os.makedirs(_base, mode=0o700, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=_base)  # 0700
    return tempfile.mkdtemp(prefix="hostagent-nbd-")


def _log(folder: str | None) -> str:
    """The tail of qemu-nbd's log in an export's directory ("" once it is gone)."""
    try:
        with open(os.path.join(folder, "qemu-nbd.log"), errors="replace") as f:
            return f.read()[-qemu_img.DETAIL_MAX:]
    except (OSError, TypeError):
        return ""


def _nbd():
    try:
        import nbd
    except ImportError:
        raise errors.OperationFailed("libnbd's Python binding is missing (Debian: "
                                     "python3-libnbd, seen by a venv made with "
                                     "--system-site-packages)", reason="missing-tool") from None
    return nbd


def nbd_error(exc, what: str, offset: int | None = None, tool_log: str = "") -> errors.AgentError:
    """A libnbd error as an agent error: ENOSPC is NoSpace, the rest OperationFailed."""
    code = getattr(exc, "errno", None) or 0
    name = errno.errorcode.get(code, str(code))
    data = {"errno": name, "detail": (getattr(exc, "string", None) or str(exc))[-1000:]}
    if offset is not None:
        data["offset"] = offset
    if tool_log:
        data["qemu_nbd"] = qemu_img.redact(tool_log[-qemu_img.DETAIL_MAX:])
    if code in (errno.ENOSPC, errno.EDQUOT):
        return errors.NoSpace(f"{what}: no space left", **data)
    return errors.OperationFailed(f"{what}: {data['detail']}", **data)


class Export:
    """One qemu-nbd and the libnbd handle connected to it (`h`)."""

    def __init__(self, opts: str, *, writable: bool, depth: bool = False):
        self.opts, self.writable, self.depth = opts, writable, depth
        self.proc = None
        self.h = None
        self.dir = None
        self.disconnected = False

    def log(self) -> str:
        return _log(self.dir)

    def open(self) -> "Export":
        self.start()
        try:
            return self.connect()
        except BaseException:
            self.close()
            raise

    def start(self) -> "Export":
        """qemu-nbd started on its socket, not yet connected to (`connect`): a caller that
        needs two exports starts one while it opens the other, and their starts overlap."""
        self.dir = new_dir()
        path = os.path.join(self.dir, "sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(4)
            argv = [qemu_img.QEMU_NBD, "--shared=1", "--image-opts", self.opts]
            if not self.writable:
                argv.insert(1, "--read-only")
            else:
                argv.insert(1, "--discard=unmap")
            if self.depth:
                argv.insert(1, "--allocation-depth")
            with open(os.path.join(self.dir, "qemu-nbd.log"), "wb") as log:
                self.proc = qemu_img.start(argv, listener.fileno(), log.fileno(),
                                           limits=qemu_img.SERVER)
        finally:
            listener.close()
        return self

    def connect(self) -> "Export":
        nbd = _nbd()
        path = os.path.join(self.dir, "sock")
        self.h = nbd.NBD()
        # No zeroing of each read's buffer first: a read that fails is never used (its
        # error ends the copy), and one that succeeds filled all of it (nbd_pread(3): all
        # or nothing). The zeroing was a memset of every piece in the copy's one loop.
        self.h.set_pread_initialize(False)
        self.h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        if self.depth:
            self.h.add_meta_context(DEPTH)
        try:
            self.h.connect_unix(path)
        except nbd.Error as exc:
            said = self.log()  # before close removes it
            self.close()
            raise qemu_img.tool_error("qemu-nbd", said or str(exc)) from None
        return self

    def size(self) -> int:
        return self.h.get_size()

    def disconnect(self) -> None:
        """End the connection: qemu-nbd then exits by itself, while the caller goes on (a
        copy's source, read whole, exits while its destination's flush and exit are
        waited for); close() waits for it to be gone."""
        if self.h is not None:
            with contextlib.suppress(Exception):
                self.h.shutdown()
            self.h = None
            self.disconnected = True

    def close(self) -> None:
        """Disconnect and wait for qemu-nbd to be gone; one never connected to waits for a
        client that will not come, and is killed."""
        connected = self.h is not None or self.disconnected
        self.disconnect()
        if self.proc is not None:
            if not connected:
                self.proc.kill()
            qemu_img.wait_gone(self.proc)
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


@contextlib.contextmanager
def export(opts: str, *, writable: bool = False, depth: bool = False, connect: bool = True):
    """An Export for the block, closed at its end. ``connect`` False: only started, for the
    caller to connect once something else is ready (two qemu processes starting at once)."""
    exp = Export(opts, writable=writable, depth=depth)
    if connect:
        exp.open()
    else:
        exp.start()
    try:
        yield exp
    finally:
        exp.close()


def connections(path: str) -> int:
    """How many clients are connected to the unix socket bound at `path`: the kernel lists
    each accepted connection under its listener's path, connected (state 03)."""
    count = 0
    try:
        with open("/proc/net/unix", "rb") as f:
            want = os.fsencode(path)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == want and fields[5] == b"03":
                    count += 1
    except OSError:
        return 0
    return count


class Server:
    """qemu-nbd serving one image to clients on a unix socket, until `stop`.

    --persistent and --shared: a client such as ovirt-imageio's daemon opens several
    connections, and a new one for each request, so the server stays up between them. The
    socket is in a fresh directory under the agent's run dir (the sweep of a dead worker's
    leftovers holds), 0700, or 0750 with the socket 0660 for `group` (an imageio daemon
    running as another user). qemu-nbd is the worker's child with a parent-death signal:
    it never outlives the worker. stop() is SIGTERM: qemu-nbd flushes and closes the image.
    """

    def __init__(self, opts: str, *, writable: bool, depth: bool = False,
                 group: str = "", max_connections: int = 8, bitmap: str | None = None):
        self.opts, self.writable, self.depth = opts, writable, depth
        self.group, self.max_connections, self.bitmap = group, max_connections, bitmap
        self.proc: subprocess.Popen | None = None
        self.dir: str | None = None
        self.socket: str | None = None

    def log(self) -> str:
        return _log(self.dir)

    def start(self) -> "Server":
        gid = _group_id(self.group)
        self.dir = new_dir()
        self.socket = os.path.join(self.dir, "sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket)
            if gid is not None:
                os.chown(self.dir, -1, gid)
                os.chmod(self.dir, 0o750)
                os.chown(self.socket, -1, gid)
                os.chmod(self.socket, 0o660)
                base = os.path.dirname(self.dir)
                os.chown(base, -1, gid)
                os.chmod(base, 0o710)  # the group passes through, lists nothing
            else:
                os.chmod(self.socket, 0o600)
            listener.listen(16)
            argv = [qemu_img.QEMU_NBD, "--persistent", f"--shared={self.max_connections}",
                    "--image-opts", self.opts]
            argv.insert(1, "--discard=unmap" if self.writable else "--read-only")
            if self.depth:
                argv.insert(1, "--allocation-depth")
            if self.bitmap:  # the meta context qemu:dirty-bitmap:NAME
                argv[1:1] = ["--bitmap", self.bitmap]
            with open(os.path.join(self.dir, "qemu-nbd.log"), "wb") as log:
                self.proc = qemu_img.start(argv, listener.fileno(), log.fileno(),
                                           limits=qemu_img.SERVER)
        except BaseException:
            listener.close()
            self.stop()
            raise
        listener.close()
        self._probe()
        return self

    def _probe(self) -> None:
        """Connect once and ask the size: qemu-nbd has opened the image and serves (a
        client is never handed the URL of a server that failed to start), and it is past
        its start-up, where a SIGTERM can be lost."""
        nbd = _nbd()
        h = nbd.NBD()
        try:
            h.connect_unix(self.socket)
            h.get_size()
            h.shutdown()
        except nbd.Error as exc:
            log = self.log()
            self.stop()
            raise qemu_img.tool_error("qemu-nbd", log or str(exc)) from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def connections(self) -> int:
        return connections(self.socket) if self.socket else 0

    def urls(self) -> dict:
        return {"url": f"nbd+unix:///?socket={self.socket}", "socket": self.socket,
                "imageio_url": f"nbd:unix:{self.socket}"}

    def stop(self, seconds: float = 30.0, beat=lambda: None) -> int | None:
        """SIGTERM (qemu-nbd flushes the image and exits), again every second, SIGKILL if
        it has not exited within `seconds`; its exit code (negative: a signal's), the
        directory removed. Heartbeats through `beat` while it waits."""
        code = None
        if self.proc is not None:
            deadline = time.monotonic() + seconds
            while self.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                qemu_img.exited(self.proc, 1.0)
                beat()
            qemu_img.wait_gone(self.proc, 0)
            code = self.proc.returncode
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        return code


def _group_id(group: str) -> int | None:
    if not group:
        return None
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise errors.OperationFailed(f"exports.group {group!r} is not a group here",
                                     reason="config") from None
