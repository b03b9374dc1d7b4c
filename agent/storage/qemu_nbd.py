"""A qemu-nbd export of one image, private to the worker that opens it, read through libnbd.

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
import os
import shutil
import socket
import tempfile

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


def _new_dir() -> str:
    if _base is not None and len(_base) + 32 < SOCKET_PATH_MAX:
        os.makedirs(_base, mode=0o700, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=_base)  # 0700
    return tempfile.mkdtemp(prefix="hostagent-nbd-")


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

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "qemu-nbd.log"), errors="replace") as f:
                return f.read()[-qemu_img.DETAIL_MAX:]
        except (OSError, TypeError):
            return ""

    def open(self) -> "Export":
        nbd = _nbd()
        self.dir = _new_dir()
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
        self.h = nbd.NBD()
        self.h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        if self.depth:
            self.h.add_meta_context(DEPTH)
        try:
            self.h.connect_unix(path)
        except nbd.Error as exc:
            self.close()
            raise qemu_img.tool_error("qemu-nbd", self.log() or str(exc)) from None
        return self

    def size(self) -> int:
        return self.h.get_size()

    def close(self) -> None:
        """Disconnect (qemu-nbd then exits by itself) and wait for qemu-nbd to be gone."""
        if self.h is not None:
            with contextlib.suppress(Exception):
                self.h.shutdown()
            self.h = None
        if self.proc is not None:
            qemu_img.wait_gone(self.proc)
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


@contextlib.contextmanager
def export(opts: str, *, writable: bool = False, depth: bool = False):
    exp = Export(opts, writable=writable, depth=depth)
    exp.open()
    try:
        yield exp
    finally:
        exp.close()
