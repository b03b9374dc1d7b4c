"""The two ends of a transfer, as agent/client/transfer.py moves blocks between them: an
export of the agent (NBD on its unix socket), and a local file (a raw file read and written
by the kernel; a qcow2 through a private qemu-nbd, its format given, never probed, which dies
with this process). Each connection is a handle with the same few methods: size, extents
(what is data and what reads as zeros), pread, pwrite, zero, flush, shutdown."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile

BLOCK = 4 << 20
STATUS_MAX = 1 << 30  # bytes asked of one block status request
DRIVERS = {"raw": "raw", "qcow2": "qcow2"}
QCOW2_MAGIC = b"QFI\xfb"
ZEROS = memoryview(bytes(BLOCK))
# qemu-nbd's 4 MiB request buffers kept on its heap, not mapped and faulted in afresh for
# each request (agent/system.py says what it costs; the client imports nothing of the agent).
QEMU_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"


def nbd_module():
    try:
        import nbd
    except ImportError:
        raise RuntimeError("libnbd's Python binding is missing (Debian: python3-libnbd, "
                           "seen by a venv made with --system-site-packages)") from None
    return nbd


def is_qcow2(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == QCOW2_MAGIC


def _die_with_parent() -> None:  # in the child, between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class NbdHandle:
    """One NBD connection (libnbd), as run_blocks uses an end."""

    def __init__(self, h):
        self.h = h

    def size(self) -> int:
        return self.h.get_size()

    def extents(self, start: int, end: int):
        """(offset, length, zero) covering [start, end), from block status (zero: reads as
        zeros, a hole or written zeros)."""
        offset = start
        while offset < end:
            found, before = [], offset

            def got(context, at, entries, err):
                if context == "base:allocation":
                    pos = at
                    for i in range(0, len(entries), 2):
                        found.append((pos, entries[i], bool(entries[i + 1] & 2)))
                        pos += entries[i]
                return 0
            self.h.block_status(min(end - offset, STATUS_MAX), offset, got)
            if not found:  # no answer: read it all
                found = [(offset, end - offset, False)]
            for at, length, zero in found:
                length = min(length, end - at)
                if length > 0:
                    yield at, length, zero
                    offset = at + length
            if offset <= before:  # an answer that covers nothing would loop for ever
                raise RuntimeError("block status covers nothing")

    def pread_into(self, view: memoryview, offset: int) -> None:
        """Read len(view) bytes at offset into `view` (a buffer the caller reuses: a fresh
        4 MiB bytes object a read costs its allocation and page faults)."""
        nbd = nbd_module()
        cookie = self.h.aio_pread(nbd.Buffer.from_buffer(view), offset)
        while not self.h.aio_command_completed(cookie):
            self.h.poll(-1)

    def pwrite(self, data, offset: int) -> None:
        self.h.pwrite(data, offset)

    def zero(self, n: int, offset: int) -> None:
        self.h.zero(n, offset)

    def flush(self) -> None:
        self.h.flush()

    def shutdown(self) -> None:
        self.h.shutdown()


ALIGN = 4096  # what O_DIRECT asks of a write's offset, length and buffer here


def _aligned(view: memoryview, offset: int) -> bool:
    if view.readonly or not len(view) or offset % ALIGN or len(view) % ALIGN:
        return False
    return ctypes.addressof(ctypes.c_char.from_buffer(view)) % ALIGN == 0


def _open_direct(path: str, writable: bool) -> int | None:
    try:
        return os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_DIRECT |
                       os.O_CLOEXEC)
    except OSError:  # tmpfs and others: through the page cache only
        return None


class FileHandle:
    """A local raw file read and written by the kernel itself (no qemu-nbd between: a
    raw file's guest view is its bytes); holes found with SEEK_DATA and made by punching."""

    _libc = None

    def __init__(self, path: str, writable: bool):
        self.fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        self.direct = _open_direct(path, writable)  # a second descriptor for aligned I/O

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def extents(self, start: int, end: int):
        offset = start
        while offset < end:
            try:
                data = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing but a hole to the end
                data = end
            data = min(data, end)
            if data > offset:
                yield offset, data - offset, True
            if data >= end:
                return
            stop = min(os.lseek(self.fd, data, os.SEEK_HOLE), end)
            yield data, stop - data, False
            offset = stop

    def pread_into(self, view: memoryview, offset: int) -> None:
        fd = self.direct if self.direct is not None and _aligned(view, offset) else self.fd
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if not n:  # past the end: the guest reads zeros
                view[done:] = ZEROS[:len(view) - done]
                return
            done += n

    def pwrite(self, data, offset: int) -> None:
        """Aligned reads and writes from an aligned buffer (run_blocks' are mmap's) bypass
        the page cache: growing it costs this kind of VM more than the disk does (measured: a
        2 GiB download at 0.6x imageio's client through the cache). The rest go through it."""
        view = memoryview(data)
        if self.direct is not None and _aligned(view, offset):
            fd = self.direct
        else:
            fd = self.fd
        while len(view):
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def zero(self, n: int, offset: int) -> None:
        if FileHandle._libc is None:
            FileHandle._libc = ctypes.CDLL(None, use_errno=True)
            FileHandle._libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                                                   ctypes.c_int64, ctypes.c_int64]
        # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: zeros that take no room
        if FileHandle._libc.fallocate(self.fd, 0x02 | 0x01, offset, n) != 0:
            for at in range(offset, offset + n, BLOCK):  # no hole punching here: zeros
                self.pwrite(ZEROS[:min(BLOCK, offset + n - at)], at)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def shutdown(self) -> None:
        if self.direct is not None:
            os.close(self.direct)
        os.close(self.fd)


class Local:
    """A local file's guest view: a raw file read and written directly (FileHandle), a
    qcow2 through a private qemu-nbd (read-only, or writable) on a socket in a fresh 0700
    directory, SIGKILLed if this process dies."""

    def __init__(self, path: str, fmt: str, writable: bool = False):
        self.path, self.fmt, self.writable = path, fmt, writable
        self.proc = self.dir = None
        if fmt != "raw":
            self._start()

    def _start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="hostagent-local-")
        self.socket = os.path.join(self.dir, "sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.socket)
            listener.listen(16)
            argv = ["qemu-nbd", "--persistent", "--shared=16", "-f", DRIVERS[self.fmt],
                    "--discard=unmap" if self.writable else "--read-only", self.path]
            direct = _open_direct(self.path, False)
            if direct is not None:  # past the page cache, as a raw file's aligned I/O
                os.close(direct)
                # Threads, not native: a qcow2's allocating writes wait one at a time in
                # the kernel's AIO (agent/storage/chain.py image_opts says what it cost).
                argv[1:1] = ["--cache=none", "--aio=threads"]
            fd = listener.fileno()

            def setup():  # systemd socket activation: the listener is fd 3
                _die_with_parent()
                have = os.environ.get("GLIBC_TUNABLES")  # as agent/system.py's QEMU_MALLOC
                os.putenv("GLIBC_TUNABLES", f"{have}:{QEMU_MALLOC}" if have else QEMU_MALLOC)
                if fd == 3:
                    os.set_inheritable(3, True)
                else:
                    os.dup2(fd, 3)
                os.putenv("LISTEN_PID", str(os.getpid()))
                os.putenv("LISTEN_FDS", "1")
            # Every other descriptor of ours is close-on-exec (PEP 446): fd 3 must survive.
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         close_fds=False, preexec_fn=setup)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        finally:
            listener.close()

    def connect(self):
        if self.proc is None:
            return FileHandle(self.path, self.writable)
        nbd = nbd_module()
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        try:
            h.connect_unix(self.socket)
        except nbd.Error as exc:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() \
                is not None else ""
            raise RuntimeError(f"qemu-nbd of {self.path}: {err.strip() or exc}") from None
        return NbdHandle(h)

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # flushes a writable image, then exits
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect_export(socket_path: str, dirty: str | None = None) -> NbdHandle:
    """A connection to an agent's export; `dirty`: a backup's, whose extents are only those
    its bitmap of that name marks dirty (DirtyHandle)."""
    nbd = nbd_module()
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if dirty:
        h.add_meta_context(DIRTY + dirty)
    h.connect_unix(socket_path)
    if dirty and not h.can_meta_context(DIRTY + dirty):
        h.shutdown()
        raise RuntimeError(f"the export serves no dirty bitmap {dirty!r}")
    return DirtyHandle(h, DIRTY + dirty) if dirty else NbdHandle(h)


DIRTY = "qemu:dirty-bitmap:"


class DirtyHandle(NbdHandle):
    """A backup export's connection whose extents are the dirty ones only: what changed
    since the bitmap began, each piece zero or data as base:allocation says (a range
    discarded or zeroed since is sent as zeros, so it hides what the previous backup
    holds there)."""

    def __init__(self, h, context: str):
        super().__init__(h)
        self.context = context

    def extents(self, start: int, end: int):
        offset = start
        while offset < end:
            dirty, alloc = [], []

            def got(context, at, entries, err):
                into = dirty if context == self.context else (
                    alloc if context == "base:allocation" else None)
                if into is not None:
                    pos = at
                    for i in range(0, len(entries), 2):
                        into.append((pos, entries[i], entries[i + 1]))
                        pos += entries[i]
                return 0
            self.h.block_status(min(end - offset, STATUS_MAX), offset, got)
            stop = min(_reach(dirty), _reach(alloc), end)
            if stop <= offset:  # an answer that covers nothing would loop for ever
                raise RuntimeError("block status covers nothing")
            for at, length, flags in dirty:
                if flags & 1:
                    yield from _pieces(at, min(at + length, stop), alloc)
            offset = stop


def _reach(entries) -> int:
    return entries[-1][0] + entries[-1][1] if entries else 0


def _pieces(start: int, end: int, alloc):
    """[start, end) cut where base:allocation's extents change: (offset, length, zero)."""
    for at, length, flags in alloc:
        lo, hi = max(start, at), min(end, at + length)
        if lo < hi:
            yield lo, hi - lo, bool(flags & 2)
